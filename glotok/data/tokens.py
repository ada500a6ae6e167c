"""Token shards: the pre-tokenized codes the AR generator trains on (``tools/pretokenize.py``).

Format ``glotok-tokens`` version 1. A directory (local or ``s3://``) holding::

    <name>.tar              one per input image shard, same name; WebDataset tar
    _progress/<name>.json   receipt of each finished shard (plan digest, size, sha256, counts)
    manifest.json           written last: exists only when every shard is complete

Each tar holds one *record* per input image and variant, the variants of one image
consecutive and in the manifest's ``variants`` order (so a reader can group them), images in
the input shard's order. Record ``<key>/<variant>`` (``<key>`` is the input sample's key)::

    <key>/<variant>.tokens.npy   (2, h, w) integer .npy: [0] visual, [1] semantic indices
                                 (the layout of GloTokTokenizer.encode); dtype uint16 when both
                                 codebooks have <= 65536 codes, else int32
    <key>/<variant>.cls          class index, ASCII decimal (-1: none)
    <key>/<variant>.key.txt      the input sample's key, UTF-8
    <key>/<variant>.variant.txt  the variant's name (glotok.data.variants), ASCII

``webdataset`` reads these as is (``.decode()`` gives an ndarray, an int and two strings).

``manifest.json``::

    format "glotok-tokens", version 1, created_by
    tokenizer   checkpoint URL, step, weights ("ema" | "generator"), image_size, grid [h, w],
                codebook_sizes {visual, semantic}, config_sha256
    source      the input (manifest or pattern) and, per input shard, its name and sha256
    variants    the variant names, in record order; crop_range, seed
    dtype       "uint16" | "int32"
    num_images  input images tokenized; num_records = num_images * len(variants)
    shards      [{name, source, num_samples (records: webdataset samples, what the shard
                 stream checks), num_images, bytes, sha256}]
    skipped     [{shard, key, reason}] input samples whose image did not decode
    classes     the input manifest's class names, when it has them
"""

from __future__ import annotations

import io
import json
from typing import Iterable, Iterator, NamedTuple, Optional

import numpy as np

from glotok.data import storage
from glotok.data.storage import StorageOptions
from glotok.data.wds import iter_records, tar_bytes

FORMAT = "glotok-tokens"
VERSION = 1
MANIFEST_NAME = "manifest.json"
_MEMBERS = ("tokens.npy", "cls", "key.txt", "variant.txt")


class TokenFormatError(ValueError):
    """A token shard or manifest that is not in this format; the message names it."""


class TokenRecord(NamedTuple):
    """One image and variant: ``tokens`` is a (2, h, w) integer array (visual, semantic)."""

    key: str
    variant: str
    label: int
    tokens: np.ndarray


class TokenSample(NamedTuple):
    """All variants of one image: ``tokens`` is (V, 2, h, w), one row per ``variants`` name."""

    key: str
    label: int
    variants: tuple[str, ...]
    tokens: np.ndarray


def token_dtype(visual_codebook_size: int, semantic_codebook_size: int) -> np.dtype:
    """uint16 when every index fits (<= 65536 codes), else int32."""
    return np.dtype(np.uint16 if max(visual_codebook_size, semantic_codebook_size) <= 65536
                    else np.int32)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def record_members(record: TokenRecord) -> list[tuple[str, bytes]]:
    """The tar members of one record, in the order written."""
    if "/" in record.variant or "." in record.variant or "." in record.key.rsplit("/", 1)[-1]:
        raise TokenFormatError(f"record {record.key!r}/{record.variant!r}: a key's last part "
                               "and a variant name may not contain '.' (webdataset splits the "
                               "extension there)")
    if record.tokens.ndim != 3 or record.tokens.shape[0] != 2:
        raise TokenFormatError(f"record {record.key}/{record.variant}: tokens must be (2, h, w), "
                               f"got {record.tokens.shape}")
    base = f"{record.key}/{record.variant}"
    return [(f"{base}.tokens.npy", _npy(record.tokens)),
            (f"{base}.cls", str(int(record.label)).encode("ascii")),
            (f"{base}.key.txt", record.key.encode("utf-8")),
            (f"{base}.variant.txt", record.variant.encode("ascii"))]


def token_shard_bytes(records: Iterable[TokenRecord]) -> bytes:
    """A whole token shard (deterministic bytes: a rebuilt shard hashes the same)."""
    return tar_bytes(m for r in records for m in record_members(r))


def iter_token_records(data: bytes, where: str = "token shard") -> Iterator[TokenRecord]:
    """The records of a token shard held in memory, in order.

    Raises:
        TokenFormatError: a record lacks a member or holds a malformed array.
        glotok.data.wds.DamagedShardError: the tar is cut or corrupt (after the intact records).
    """
    for name, members in iter_records(data):
        missing = [m for m in _MEMBERS if m not in members]
        if missing:
            raise TokenFormatError(f"{where}: record {name} lacks {missing}: not a "
                                   f"{FORMAT} shard; rebuild it with tools/pretokenize.py")
        try:
            tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
            label = int(members["cls"].decode("ascii"))
        except ValueError as exc:
            raise TokenFormatError(f"{where}: record {name} is malformed ({exc}); rebuild it "
                                   "with tools/pretokenize.py") from exc
        yield TokenRecord(members["key.txt"].decode("utf-8"),
                          members["variant.txt"].decode("ascii"), label, tokens)


def iter_token_samples(data: bytes, where: str = "token shard") -> Iterator[TokenSample]:
    """The records of a token shard grouped per image (consecutive records of one key)."""
    group: list[TokenRecord] = []
    for record in iter_token_records(data, where):
        if group and record.key != group[0].key:
            yield _sample(group)
            group = []
        group.append(record)
    if group:
        yield _sample(group)


def _sample(group: list[TokenRecord]) -> TokenSample:
    return TokenSample(group[0].key, group[0].label, tuple(r.variant for r in group),
                       np.stack([r.tokens for r in group]))


def read_token_manifest(url: str, options: StorageOptions = StorageOptions()) -> dict:
    """The manifest of a token shard directory (``.../manifest.json`` or the directory).

    Raises:
        FileNotFoundError: no manifest: the pre-tokenization has not finished (re-run it).
        TokenFormatError: another format or version.
    """
    if not url.endswith(".json"):
        url = storage.join(url, MANIFEST_NAME)
    if storage.is_remote(url):
        if MANIFEST_NAME not in storage.list_sizes(storage.parent(url), options):
            raise FileNotFoundError(f"{url} does not exist: tools/pretokenize.py has not "
                                    "finished writing these token shards; re-run it")
    else:
        import os

        if not os.path.isfile(url):
            raise FileNotFoundError(f"{url} does not exist: tools/pretokenize.py has not "
                                    "finished writing these token shards; re-run it")
    manifest = json.loads(storage.read_bytes(url, options, retries=2))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise TokenFormatError(f"{url} is format {manifest.get('format')!r} version "
                               f"{manifest.get('version')!r}; this glotok reads {FORMAT} "
                               f"version {VERSION}: re-run tools/pretokenize.py")
    return manifest


def count_records(data: bytes) -> Optional[int]:
    """Number of records in a token shard's bytes, or None when it is damaged or malformed."""
    try:
        return sum(1 for _ in iter_token_records(data))
    except ValueError:  # DamagedShardError and TokenFormatError are ValueErrors
        return None
