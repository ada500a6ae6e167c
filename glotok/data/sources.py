"""The input of an offline job: a set of image shards, with what its manifest knows about them.

``source`` is what every tool's ``--source`` takes: ``sample`` (the built-in sample photos,
built on first use), a ``manifest.json`` written by ``tools/make_shards.py`` (local or
``s3://``), or anything :func:`glotok.data.stream.resolve_shards` takes (brace pattern, glob,
directory, comma list). Per-shard sha256s come from the manifest; they pin what outputs and
FID reference statistics were computed from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from glotok.data import storage
from glotok.data.storage import StorageOptions
from glotok.data.stream import resolve_shards
from glotok.data.walker import ShardInfo


@dataclass(frozen=True)
class ShardSet:
    """Shards in order, with sample counts and sha256s where the manifest has them."""

    source: str
    shards: list[ShardInfo]
    sha256: list[Optional[str]]
    classes: Optional[list]

    @property
    def names(self) -> list[str]:
        """Base names (``train-000000.tar``): the names of the jobs' per-shard outputs."""
        return [os.path.basename(s.url.rstrip("/")) for s in self.shards]

    @property
    def num_samples(self) -> Optional[int]:
        counts = [s.num_samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    def describe(self) -> dict:
        """The source as outputs record it: every shard's name, sample count and sha256."""
        return {"source": self.source, "num_samples": self.num_samples,
                "shards": [{"name": n, "num_samples": s.num_samples, "sha256": h}
                           for n, s, h in zip(self.names, self.shards, self.sha256)]}


def resolve_source(source: str) -> str:
    """``sample`` -> the built-in sample set's manifest (built once); else ``source``."""
    if source == "sample":
        from glotok.data.sample import MANIFEST_NAME, ensure_sample_shards

        return os.path.join(os.path.dirname(ensure_sample_shards()[0]), MANIFEST_NAME)
    return source


def open_shard_set(source: str, options: StorageOptions = StorageOptions()) -> ShardSet:
    """The shards of ``source`` (see the module docstring).

    Raises:
        FileNotFoundError: nothing matched; ValueError: two shards share a base name (the
            per-shard outputs would collide: list them from one directory).
    """
    url = resolve_source(source)
    if not storage.is_remote(url) and not url.endswith(".json") and "," not in url:
        url = os.path.abspath(url) if os.path.exists(url) else url
    shards = resolve_shards(url, options)
    sha256: list[Optional[str]] = [None] * len(shards)
    classes = None
    if url.strip().endswith(".json"):
        manifest = json.loads(storage.read_bytes(url, options))
        entries = [e if isinstance(e, dict) else {} for e in manifest.get("shards", [])]
        sha256 = [e.get("sha256") for e in entries]
        classes = manifest.get("classes")
        if not storage.is_remote(url):
            url = os.path.abspath(url)
    result = ShardSet(url, shards, sha256, classes)
    names = result.names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{source}: two shards are named {dup}; per-shard outputs are named "
                         "after their input, so list shards with distinct names")
    return result
