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


def iter_records(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each sample of a tar held in memory, in order.

    Extensions are lower-cased. Directories and names without an extension are ignored.

    Raises:
        DamagedShardError: after the last intact sample, if the tar is cut short or corrupt;
            the sample whose members were cut is not yielded.
    """
    key, group = None, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for member in tar:
                m = _KEY_EXT.match(member.name)
                if not member.isfile() or m is None:
                    continue
                if m[1] != key:
                    if key is not None:
                        yield key, group
                    key, group = m[1], {}
                group[m[2].lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DamagedShardError(f"tar damaged after {key or 'its start'!r}: {exc}") from exc
    if key is not None:
        yield key, group
