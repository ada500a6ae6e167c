"""The WebDataset shard format: tars of samples, each sample a run of members sharing a key.

``n01440764_10026.jpg`` + ``n01440764_10026.cls`` is one sample with key ``n01440764_10026``
(webdataset's rule: the key is the path up to the first dot of the file name, the extension is
the rest). Shards are built in memory and published whole, so a reader never sees half a shard
that was written by us; a shard damaged later (a truncated copy, bit rot) is detected here.
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import Iterable, Iterator

_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")


class DamagedShardError(ValueError):
    """A tar ended early or holds a corrupt header; the records before the damage are intact."""


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, data)`` members with fixed metadata (mtime 0, uid 0, mode 644), so the
    bytes are a pure function of the contents: a rebuilt shard hashes the same."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes beyond 8 GB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax(block: bytes) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\n"`` of a PAX extended header."""
    out, pos = {}, 0
    while pos < len(block):
        space = block.index(b" ", pos)
        length = int(block[pos:space])
        key, _, value = block[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _members(data: bytes) -> Iterator[tuple[str, bytes, int, int]]:
    """``(name, typeflag, start, end)`` of each member; ``end`` lies beyond ``data`` when the
    tar is cut inside the member. PAX and GNU long-name headers are applied, not yielded."""
    pos, n, long_name, pax = 0, len(data), None, {}
    while pos + 512 <= n:
        at, header = pos, data[pos:pos + 512]
        if header.count(0) == 512:
            return  # end-of-archive block
        try:
            if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
                raise ValueError("checksum mismatch")
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
            start, kind = pos + 512, header[156:157]
            pos = start + (size + 511) // 512 * 512
            if kind in (b"x", b"L"):  # they name the next member
                if start + size > n:
                    raise DamagedShardError(f"tar cut inside a header at byte {at}")
                if kind == b"x":
                    pax = _pax(data[start:start + size])
                else:
                    long_name = data[start:start + size].split(b"\0", 1)[0].decode("utf-8")
                continue
            name = pax.get("path") or long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        except DamagedShardError:
            raise
        except ValueError as exc:  # garbage where numbers or UTF-8 names should be
            raise DamagedShardError(f"corrupt tar header at byte {at}: {exc}") from exc
        long_name, pax = None, {}
        yield name, kind, start, start + size
    if pos < n:
        raise DamagedShardError(f"tar cut inside a header at byte {pos}")


def iter_records(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each sample of a tar held in memory, in order.

    Reads ustar, PAX (long names) and GNU long-name headers straight from the buffer: the
    stdlib's stream mode costs ~0.3 ms per member in chunked copies, this a few microseconds.
    Extensions are lower-cased; directories, links and names without an extension are skipped.

    Raises:
        DamagedShardError: after the last intact sample, if a header is corrupt or the tar is
            cut inside a member; the sample whose members were cut is not yielded.
    """
    key, group = None, {}
    for name, kind, start, end in _members(data):
        m = _KEY_EXT.match(name)
        if end > len(data):
            if key is not None and (m is None or m[1] != key):
                yield key, group  # the cut member starts the next sample: this one is whole
            raise DamagedShardError(f"tar cut inside {name}")
        if kind not in (b"0", b"\0", b"7") or m is None:
            continue  # directories, links, global headers, names without an extension
        if m[1] != key:
            if key is not None:
                yield key, group
            key, group = m[1], {}
        group[m[2].lower()] = data[start:end]
    if key is not None:
        yield key, group
