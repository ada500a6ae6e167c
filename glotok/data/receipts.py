"""Which outputs of a shard job are already done: receipts under ``<dst>/_progress/``.

A job that writes one output per input shard (``tools/make_shards.py``, ``tools/pretokenize.py``,
the feature and evaluation passes of ``tools/build_teacher.py`` and ``tools/evaluate.py``)
publishes each output whole (:func:`glotok.data.storage.write_bytes`), then a receipt
``_progress/<name>.json``: the *plan digest* (a hash of everything the output depends on:
input shard and its checksum, model, settings), the output's size and sha256, and the job's
own fields (counts, skipped samples). On a rerun an output counts as done only when its
receipt has the current plan digest and the output has the receipt's size (``verify``: and its
sha256), so a run killed at any point (mid-write, between output and receipt, mid-manifest)
rewrites exactly what is missing, and a rerun with other settings or inputs redoes everything.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
from typing import Any, Callable, Optional

from glotok.data import storage
from glotok.data.storage import StorageOptions
from glotok.data.writer import PROGRESS_DIR


def plan_digest(**fields: Any) -> str:
    """sha256 of the canonical JSON of ``fields`` (what one output depends on)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Receipts:
    """The receipts of the outputs under ``dst`` (a directory or ``s3://`` prefix)."""

    def __init__(self, dst: str, options: StorageOptions = StorageOptions()):
        self.dst, self.options = dst, options
        self.progress = storage.join(dst, PROGRESS_DIR)

    def url(self, name: str) -> str:
        return storage.join(self.dst, name)

    def publish(self, name: str, data: bytes, digest: str, **fields: Any) -> dict:
        """Write output ``name`` whole, then its receipt; returns the receipt."""
        storage.write_bytes(self.url(name), data, self.options)
        receipt = {"name": name, "plan": digest, "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest(), **fields}
        storage.write_bytes(storage.join(self.progress, name + ".json"),
                            json.dumps(receipt).encode(), self.options)
        return receipt

    def completed(self, plans: dict[str, str], verify: bool = False,
                  check: Optional[Callable[[bytes, dict], bool]] = None) -> dict[str, dict]:
        """Receipts of the outputs in ``plans`` (name -> plan digest) that are done.

        Args:
            verify: also re-read each output and compare its sha256 (and run ``check``, which
                may inspect the bytes, e.g. count the records, against the receipt).
        """
        sizes = storage.list_sizes(self.dst, self.options)
        have = storage.list_sizes(self.progress, self.options)
        candidates = [n for n in plans if n in sizes and n + ".json" in have]

        def done(name: str) -> Optional[dict]:
            try:
                receipt = json.loads(storage.read_bytes(
                    storage.join(self.progress, name + ".json"), self.options, retries=2))
            except (ValueError, storage.StorageUnavailableError):
                return None  # unreadable or half-written by hand: redo the output
            if receipt.get("plan") != plans[name] or receipt.get("bytes") != sizes[name]:
                return None
            if verify:
                data = storage.read_bytes(self.url(name), self.options)
                if hashlib.sha256(data).hexdigest() != receipt.get("sha256"):
                    return None
                if check is not None and not check(data, receipt):
                    return None
            return receipt

        with cf.ThreadPoolExecutor(16) as pool:  # receipts are small: latency-bound on S3
            results = list(pool.map(done, candidates))
        return {n: r for n, r in zip(candidates, results) if r is not None}

    def remove_stale(self, keep: set[str], suffix: str) -> list[str]:
        """Delete our outputs (``*suffix`` with a receipt) not in ``keep``, with their receipts,
        and temp files of killed runs; returns the names removed. One writer per ``dst``."""
        removed = []
        receipts = storage.list_sizes(self.progress, self.options)
        for name in storage.list_sizes(self.dst, self.options):
            if name.endswith(suffix) and name not in keep and name + ".json" in receipts:
                storage.remove(self.url(name), self.options)
                storage.remove(storage.join(self.progress, name + ".json"), self.options)
                removed.append(name)
        for directory in (self.dst, self.progress):  # local temp files (S3 has none)
            for name in storage.list_sizes(directory, self.options):
                if name.startswith(".") and ".tmp-" in name:
                    storage.remove(storage.join(directory, name), self.options)
        return removed
