"""Build GloTok's teacher histogram over a shard set (``tools/build_teacher.py``).

GLOTOK.md's recipe: pooled patch features of a frozen vision model over the training set ->
k-means to K centroids -> histogram of the centroids' pairwise cosines (the teacher file of
:mod:`glotok.losses.teacher`). Two passes:

1. **Features** (:func:`extract_features`): one task per shard over Ray workers
   (:mod:`glotok.utils.parallel`); each worker builds the extractor once
   (:func:`glotok.teacher.build_feature_extractor`), decodes center crops in background
   processes, and publishes ``<work_dir>/<shard>.npy`` ((images * g * g, d) float16 by default)
   whole, then its receipt (:mod:`glotok.data.receipts`). A rerun after a kill skips the
   finished shards.
2. **k-means** (:func:`cluster_features`, on this process's GPU when it has one): spherical,
   seeded. When all vectors fit in ``init_sample`` it is exact Lloyd k-means on all of them
   (:func:`glotok.losses.teacher.kmeans`); otherwise that k-means on a seeded subsample gives
   the initial centroids, refined by mini-batch k-means (Sculley 2010, sklearn's per-centre
   learning rate 1 / count) streaming every feature file ``epochs`` times: ImageNet's ~20M
   vectors never need to be in memory at once.

Alternatively :func:`teacher_from_checkpoint` takes a trained tokenizer's semantic codebook.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from glotok.data import storage
from glotok.data.batches import decoded_batches, default_decode_workers
from glotok.data.receipts import Receipts, plan_digest
from glotok.data.sources import open_shard_set
from glotok.data.storage import StorageOptions
from glotok.data.variants import CropVariants
from glotok.data.wds import DamagedShardError, iter_records
from glotok.losses.histogram import soft_histogram
from glotok.losses.teacher import TeacherHistogram, build_teacher, kmeans, teacher_from_codebook
from glotok.utils.parallel import RayOptions, ShardWorker, progress_bar, run_shard_tasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureTask:
    url: str
    name: str  # <shard stem>.npy
    digest: str


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureWorker(ShardWorker):
    """Holds a feature extractor; turns one image shard into one feature file."""

    def __init__(self, model: str, model_kwargs: dict, image_size: int, batch_size: int,
                 decode_workers: Optional[int], dtype: str, work_dir: str,
                 options: StorageOptions):
        from glotok.teacher import build_feature_extractor

        self.device = _device()
        self.extractor = build_feature_extractor(model, **model_kwargs).to(self.device)
        self.crop = CropVariants(("center",), image_size)
        self.batch_size, self.dtype, self.options = batch_size, np.dtype(dtype), options
        self.decode_workers = (default_decode_workers() if decode_workers is None
                               else decode_workers)
        self.receipts = Receipts(work_dir, options)

    def fetch(self, task: FeatureTask) -> bytes:
        return storage.read_bytes(task.url, self.options)

    def compute(self, task: FeatureTask, data: bytes) -> dict:
        try:
            records = list(iter_records(data))
        except DamagedShardError as exc:
            raise DamagedShardError(f"input shard {task.url} is damaged ({exc}): re-run "
                                    "tools/make_shards.py or drop it from the manifest") from exc
        feats, images, skipped = [], 0, []
        for batch in decoded_batches(records, self.crop, self.batch_size, self.decode_workers):
            skipped += [{"shard": task.url, "key": k, "reason": r} for k, r in batch["skipped"]]
            if batch["images"] is not None:
                feats.append(self.extractor(batch["images"][:, 0]).cpu())  # (B * g * g, d)
                images += batch["images"].shape[0]
        if not feats:
            raise ValueError(f"shard {task.url} has no decodable image ({len(skipped)} skipped)")
        return {"features": torch.cat(feats).numpy().astype(self.dtype), "images": images,
                "skipped": skipped}

    def commit(self, task: FeatureTask, output: dict) -> dict:
        buf = io.BytesIO()
        np.save(buf, output["features"], allow_pickle=False)
        f = output["features"]
        return self.receipts.publish(
            task.name, buf.getvalue(), task.digest, source=task.url, images=output["images"],
            vectors=int(f.shape[0]), dim=int(f.shape[1]), skipped=output["skipped"],
            extractor=self.extractor.provenance())


def extract_features(source: str, work_dir: str, model: str, model_kwargs: dict, *,
                     image_size: int = 256, batch_size: int = 32,
                     decode_workers: Optional[int] = None, dtype: str = "float16",
                     options: StorageOptions = StorageOptions(), ray: RayOptions = RayOptions(),
                     progress: bool = True) -> list[dict]:
    """Pass 1: pooled features of every image of ``source``, one file per shard in
    ``work_dir`` (directory or ``s3://``); returns the shards' receipts, in shard order
    (``images``, ``vectors``, ``dim``, ``extractor`` provenance, ``skipped``)."""
    shard_set = open_shard_set(source, options)
    spec = {"model": model, "kwargs": {k: str(v) if isinstance(v, os.PathLike) else v
                                       for k, v in model_kwargs.items()},
            "image_size": image_size, "dtype": dtype}
    tasks = [FeatureTask(s.url, os.path.splitext(name)[0] + ".npy",
                         plan_digest(**spec, source=s.url, sha256=sha, source_bytes=s.nbytes))
             for s, name, sha in zip(shard_set.shards, shard_set.names, shard_set.sha256)]
    receipts = Receipts(work_dir, options)
    done = receipts.completed({t.name: t.digest for t in tasks})
    receipts.remove_stale({t.name for t in tasks}, suffix=".npy")
    todo = [t for t in tasks if t.name not in done]
    logger.info("features of %s: %d shards, %d already extracted, %d to do", shard_set.source,
                len(tasks), len(done), len(todo))
    results = run_shard_tasks(
        FeatureWorker, dict(model=model, model_kwargs=spec["kwargs"], image_size=image_size,
                            batch_size=batch_size, decode_workers=decode_workers, dtype=dtype,
                            work_dir=work_dir, options=options),
        todo, ray, desc=f"features ({model})", total=shard_set.num_samples,
        initial=sum(r["images"] for r in done.values()), progress=progress)
    done.update({r["name"]: r for r in results})
    return [done[t.name] for t in tasks]


def _load(work_dir: str, receipt: dict, options: StorageOptions) -> torch.Tensor:
    data = storage.read_bytes(storage.join(work_dir, receipt["name"]), options)
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


@torch.no_grad()
def minibatch_kmeans(chunks, centroids: torch.Tensor, *, epochs: int, batch_size: int,
                     seed: int) -> torch.Tensor:
    """Spherical mini-batch k-means from ``centroids`` (k, d), on their device.

    Args:
        chunks: callable returning, per epoch, an iterator of (n_i, d) tensors (e.g. one per
            feature file) covering all vectors.
        epochs: passes over all vectors; batch_size: vectors per update.

    Each batch assigns its vectors to the nearest centroid (cosine) and moves every centroid to
    the running mean of all vectors assigned to it so far (learning rate 1 / count); centroids
    that got no vector in an epoch are re-seeded with random vectors of its last batch.
    """
    c = F.normalize(centroids.float(), dim=1)
    k = c.shape[0]
    counts = torch.zeros(k, device=c.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(epochs):
        hits = torch.zeros(k, dtype=torch.long, device=c.device)
        last = None
        for chunk in chunks():
            x = F.normalize(chunk.to(c.device).float(), dim=1)
            x = x[torch.randperm(x.shape[0], generator=gen).to(c.device)]
            for xb in x.split(batch_size):
                assign = (xb @ c.T).argmax(dim=1)
                m = torch.bincount(assign, minlength=k)
                sums = torch.zeros_like(c).index_add_(0, assign, xb)
                counts += m
                hit = m > 0
                c[hit] += (sums[hit] - m[hit, None] * c[hit]) / counts[hit, None]
                c = F.normalize(c, dim=1)
                hits += m
                last = xb
        dead = (hits == 0).nonzero().flatten()
        if dead.numel() and last is not None:
            pick = torch.randint(last.shape[0], (dead.numel(),), generator=gen).to(c.device)
            c[dead], counts[dead] = last[pick], 0
    return c


def cluster_features(work_dir: str, receipts: list[dict], k: int, *, seed: int = 0,
                     init_sample: int = 262_144, epochs: int = 2, batch_size: int = 16_384,
                     options: StorageOptions = StorageOptions(),
                     device: Optional[torch.device] = None,
                     progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Pass 2: (k, d) unit-norm centroids of all feature vectors, and how they were found."""
    device = device or _device()
    total = sum(r["vectors"] for r in receipts)
    info = {"init_sample": init_sample, "device": device.type}
    if total <= init_sample:
        x = torch.cat([_load(work_dir, r, options) for r in receipts]).to(device).float()
        return kmeans(x, k, seed=seed).float(), {**info, "method": "lloyd"}
    frac = init_sample / total
    sample = []
    for i, r in enumerate(receipts):  # a seeded share of every file: the subsample spans all
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = _load(work_dir, r, options)
        sample.append(x[torch.randperm(x.shape[0], generator=gen)[:round(x.shape[0] * frac)]])
    init = kmeans(torch.cat(sample).to(device).float(), k, seed=seed)
    logger.info("k-means: initial %d centroids from %d of %d vectors; %d mini-batch epochs",
                k, sum(s.shape[0] for s in sample), total, epochs)

    bar = progress_bar(total=total * epochs, desc="mini-batch k-means", unit="vec",
                       disable=not progress)

    def chunks():
        order = torch.randperm(len(receipts), generator=torch.Generator().manual_seed(seed))
        for i in order.tolist():
            yield _load(work_dir, receipts[i], options)
            bar.update(receipts[i]["vectors"])  # counted when the next file is asked for

    with bar:
        c = minibatch_kmeans(chunks, init, epochs=epochs, batch_size=batch_size, seed=seed)
    return c, {**info, "method": "minibatch", "epochs": epochs, "batch_size": batch_size}


def teacher_from_features(source: str, output: str, *, model: str, model_kwargs: dict,
                          k: int = 4096, bins: int = 40, alpha: float = 190.0, seed: int = 0,
                          image_size: int = 256, batch_size: int = 32,
                          decode_workers: Optional[int] = None, work_dir: Optional[str] = None,
                          feature_dtype: str = "float16", init_sample: int = 262_144,
                          epochs: int = 2, kmeans_batch_size: int = 16_384,
                          keep_centroids: bool = False,
                          options: StorageOptions = StorageOptions(),
                          ray: RayOptions = RayOptions(), progress: bool = True
                          ) -> TeacherHistogram:
    """Features of ``source`` -> k-means (``k``) -> the teacher file ``output`` (saved, with the
    ``.centroids.npy`` sidecar when ``keep_centroids``). ``work_dir`` (default ``output``
    without ``.json`` + ``.work``; must be shared storage when Ray workers run on other nodes)
    keeps the per-shard features, so a rerun after a kill resumes."""
    work_dir = work_dir or os.path.splitext(output)[0] + ".work"
    receipts = extract_features(source, work_dir, model, model_kwargs, image_size=image_size,
                                batch_size=batch_size, decode_workers=decode_workers,
                                dtype=feature_dtype, options=options, ray=ray, progress=progress)
    centroids, info = cluster_features(work_dir, receipts, k, seed=seed, init_sample=init_sample,
                                       epochs=epochs, batch_size=kmeans_batch_size,
                                       options=options, progress=progress)
    extractor = receipts[0]["extractor"]
    shard_set = open_shard_set(source, options)
    provenance = {
        **extractor, "source": "features", "k": int(centroids.shape[0]),
        "images_seen": sum(r["images"] for r in receipts),
        "num_vectors": sum(r["vectors"] for r in receipts), "dim": receipts[0]["dim"],
        "image_size": image_size, "kmeans": info,
        "data": {"source": shard_set.source, "num_shards": len(receipts),
                 "shards_sha256": plan_digest(shards=shard_set.sha256)},
        "skipped": sum(len(r["skipped"]) for r in receipts)}
    teacher = build_teacher(centroids, bins=bins, alpha=alpha, k=None, seed=seed,
                            provenance=provenance, keep_centroids=keep_centroids)
    teacher.save(output)
    return teacher


def codebook_histogram(run: str, bins: int, alpha: float) -> tuple[torch.Tensor, dict]:
    """(normalised semantic codebook (n, d), provenance) of a trained tokenizer run or
    checkpoint; its histogram is the *student* of the histogram loss."""
    from glotok.train.export import load_tokenizer

    model, _, info = load_tokenizer(run, device="cpu")
    codebook = model.semantic.quantizer.codebook().detach()
    return codebook, {"model": info.url, "step": info.step, "layer": "semantic codebook",
                      "k": int(codebook.shape[0]), "dim": int(codebook.shape[1])}


def teacher_from_checkpoint(run: str, output: str, *, bins: int = 40, alpha: float = 190.0,
                            keep_centroids: bool = False) -> TeacherHistogram:
    """The teacher file ``output`` from the semantic codebook of a trained tokenizer."""
    codebook, provenance = codebook_histogram(run, bins, alpha)
    teacher = teacher_from_codebook(codebook, bins=bins, alpha=alpha, provenance=provenance,
                                    keep_centroids=keep_centroids)
    teacher.save(output)
    return teacher


def student_histogram(run: str, bins: int, alpha: float) -> tuple[list[float], dict]:
    """The histogram of a trained tokenizer's semantic codebook (sums to 1) and its source."""
    codebook, provenance = codebook_histogram(run, bins, alpha)
    with torch.no_grad():
        h = soft_histogram(codebook, bins, alpha).double()
    return (h / h.sum()).tolist(), provenance
