"""Bulk tokenization of image shards with a trained tokenizer: image shards -> token shards.

``pretokenize(source, output, checkpoint)`` writes one token shard per input shard (format in
:mod:`glotok.data.tokens`), one task per shard over Ray workers (:mod:`glotok.utils.parallel`).
A worker loads the tokenizer once; per shard it decodes the images into their variants
(:mod:`glotok.data.variants`) in DataLoader processes while the model encodes the previous
batch (on the GPU when there is one), and publishes the shard whole, then its receipt
(:mod:`glotok.data.receipts`), outside the model's lock, so writing overlaps the next shard.

Idempotent: a rerun skips every shard whose receipt matches its plan (input shard and its
sha256, checkpoint, variants, crops) and whose size matches (``verify``: and its sha256 and
record count), rewrites the rest whole, removes outputs of an earlier plan, and writes the
manifest last. So a run killed at any point and rerun yields exactly one record per input
sample and variant.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import torch

from glotok.data import storage
from glotok.data.batches import decoded_batches, default_decode_workers
from glotok.data.receipts import Receipts, plan_digest
from glotok.data.sources import open_shard_set
from glotok.data.storage import StorageOptions
from glotok.data.tokens import (FORMAT, MANIFEST_NAME, VERSION, TokenRecord, count_records,
                                token_dtype, token_shard_bytes)
from glotok.data.variants import CropVariants, parse_variants
from glotok.data.wds import DamagedShardError, iter_records
from glotok.train.checkpoint_info import describe_checkpoint
from glotok.utils.parallel import RayOptions, ShardWorker, run_shard_tasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """One input shard and where its output goes (small: sent to a Ray worker)."""

    url: str
    name: str
    digest: str


class TokenizeWorker(ShardWorker):
    """Holds the tokenizer; turns one image shard into one token shard."""

    def __init__(self, checkpoint: str, output: str, variants: tuple[str, ...],
                 crop_range: float, seed: int, ema: bool, batch_size: int,
                 decode_workers: Optional[int], dtype: str, options: StorageOptions):
        from glotok.train.export import load_tokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, cfg, _ = load_tokenizer(checkpoint, ema=ema, device=self.device)
        self.variants = CropVariants(tuple(variants), cfg.model.image_size, crop_range, seed)
        self.batch_size, self.dtype, self.options = batch_size, np.dtype(dtype), options
        self.decode_workers = (default_decode_workers() if decode_workers is None
                               else decode_workers)
        self.receipts = Receipts(output, options)

    def fetch(self, task: ShardTask) -> bytes:
        return storage.read_bytes(task.url, self.options)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, S, S) -> (N, 2, h, w) indices in ``self.dtype``, in batches."""
        out = []
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
            out.append(self.model.encode(x).to("cpu", non_blocking=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return torch.cat(out).numpy().astype(self.dtype)

    def compute(self, task: ShardTask, data: bytes) -> dict:
        try:
            records = list(iter_records(data))
        except DamagedShardError as exc:
            raise DamagedShardError(f"input shard {task.url} is damaged ({exc}): re-run "
                                    "tools/make_shards.py or drop it from the manifest") from exc
        names = self.variants.names
        per_batch = max(1, self.batch_size // len(names))
        out, skipped = [], []
        for batch in decoded_batches(records, self.variants, per_batch, self.decode_workers):
            skipped += [{"shard": task.name, "key": k, "reason": r} for k, r in batch["skipped"]]
            if batch["images"] is None:
                continue
            codes = self.encode(batch["images"].flatten(0, 1))
            codes = codes.reshape(len(batch["key"]), len(names), *codes.shape[1:])
            for key, label, per_image in zip(batch["key"], batch["label"].tolist(), codes):
                out += [TokenRecord(key, v, label, c) for v, c in zip(names, per_image)]
        for s in skipped:
            logger.warning("skipping sample %s of %s: %s", s["key"], task.url, s["reason"])
        return {"records": out, "skipped": skipped}

    def commit(self, task: ShardTask, output: dict) -> dict:
        records = output["records"]
        return self.receipts.publish(
            task.name, token_shard_bytes(records), task.digest, source=task.url,
            num_samples=len(records), num_images=len(records) // len(self.variants.names),
            skipped=output["skipped"])


def pretokenize(source: str, output: str, checkpoint: str, *, variants: str = "center,flip",
                random_crops: int = 1, crop_range: float = 1.1, seed: int = 0,
                batch_size: int = 64, ema: bool = True, decode_workers: Optional[int] = None,
                verify: bool = False, options: StorageOptions = StorageOptions(),
                ray: RayOptions = RayOptions(), progress: bool = True) -> dict:
    """Tokenize every image of ``source`` in every variant into token shards under ``output``;
    returns the manifest (also written to ``output/manifest.json``, last).

    Args:
        source: image shards (``sample``, a manifest, a pattern; see
            :func:`glotok.data.sources.open_shard_set`).
        output: directory or ``s3://`` prefix of the token shards.
        checkpoint: tokenizer run directory (its newest complete checkpoint, pinned now) or
            checkpoint directory.
        variants, random_crops, crop_range, seed: see :mod:`glotok.data.variants`.
        batch_size: images per forward pass (variants of one image stay in one batch).
        ema: EMA weights when the checkpoint has them (else the generator's).
        decode_workers: decoding processes per worker (default: see
            :func:`glotok.data.batches.default_decode_workers`).
        verify: on a rerun, re-hash and re-count finished shards before skipping them.
        ray: where the tasks run (:class:`~glotok.utils.parallel.RayOptions`).
    """
    names = parse_variants(variants, random_crops)
    ckpt = describe_checkpoint(checkpoint)
    weights = "ema" if ema and ckpt.has_ema else "generator"
    dtype = token_dtype(ckpt.visual_codebook_size, ckpt.semantic_codebook_size)
    shard_set = open_shard_set(source, options)
    settings = {"format": FORMAT, "version": VERSION, "checkpoint": ckpt.url, "step": ckpt.step,
                "weights": weights, "variants": names, "crop_range": crop_range, "seed": seed,
                "dtype": dtype.name}
    tasks = [ShardTask(s.url, name, plan_digest(**settings, source=s.url, sha256=sha,
                                                source_bytes=s.nbytes))
             for s, name, sha in zip(shard_set.shards, shard_set.names, shard_set.sha256)]
    receipts = Receipts(output, options)
    done = receipts.completed({t.name: t.digest for t in tasks}, verify,
                              check=lambda data, r: count_records(data) == r["num_samples"])
    todo = [t for t in tasks if t.name not in done]
    if todo:  # a manifest must never describe a directory that is being rewritten
        storage.remove(storage.join(output, MANIFEST_NAME), options)
    for name in receipts.remove_stale({t.name for t in tasks}, suffix=".tar"):
        logger.info("removed %s: not an output of this plan", receipts.url(name))
    logger.info("%s: %d shards, %d already complete, %d to tokenize in %d variants",
                shard_set.source, len(tasks), len(done), len(todo), len(names))

    total = shard_set.num_samples
    results = run_shard_tasks(
        TokenizeWorker,
        dict(checkpoint=ckpt.url, output=output, variants=tuple(names), crop_range=crop_range,
             seed=seed, ema=ema, batch_size=batch_size, decode_workers=decode_workers,
             dtype=dtype.name, options=options),
        todo, ray, desc="pretokenize", total=total * len(names) if total is not None else None,
        initial=sum(r["num_samples"] for r in done.values()),
        count=lambda r: r["num_samples"], progress=progress)
    done.update({r["name"]: r for r in results})

    shards = [done[t.name] for t in tasks]
    manifest = {
        "format": FORMAT, "version": VERSION, "created_by": "tools/pretokenize.py",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {**ckpt.describe(), "weights": weights},
        "source": shard_set.describe(), "variants": names, "crop_range": crop_range,
        "seed": seed, "dtype": dtype.name,
        "num_images": sum(r["num_images"] for r in shards),
        "num_records": sum(r["num_samples"] for r in shards),
        "shards": [{k: r[k] for k in ("name", "source", "num_samples", "num_images", "bytes",
                                      "sha256")} for r in shards],
        "skipped": [s for r in shards for s in r["skipped"]],
    }
    if shard_set.classes is not None:
        manifest["classes"] = shard_set.classes
    storage.write_bytes(storage.join(output, MANIFEST_NAME),
                        json.dumps(manifest, indent=1).encode(), options)
    logger.info("wrote %s: %d images x %d variants = %d records in %d shards",
                storage.join(output, MANIFEST_NAME), manifest["num_images"], len(names),
                manifest["num_records"], len(shards))
    return manifest
