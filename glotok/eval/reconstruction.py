"""Reconstruction evaluation of a tokenizer checkpoint over val shards (``tools/evaluate.py``).

One task per val shard over Ray workers (:mod:`glotok.utils.parallel`). A worker holds the
tokenizer, the TF Inception (:class:`~glotok.eval.inception.InceptionFeatures`) and, when its
weights are present, LPIPS; per shard it center-crops the images at the tokenizer's size,
reconstructs them (``decode(encode(x))``) and publishes a *partial*
(``<output>/partials/<shard>.npz``, then its receipt, :mod:`glotok.data.receipts`):

    keys (n,) str                  the samples, in shard order
    recon_feats (n, 2048) float32  pool3 of the reconstructions
    ref_feats (n, 2048) float32    pool3 of the originals (when the reference is computed)
    psnr, ssim (n,) float64        per image, on 8-bit pixels; lpips (n,) when available
    counts_visual (Kv,), counts_semantic (Ks,) int64   code counts
    latent_ids (n,) int64, latent_vectors (n, C) float32   one semantic-latent vector per image
    grid_orig, grid_recon (m, 3, S, S) uint8   the first images, for the report's grid

The driver merges the partials in shard order into the mergeable accumulators of
:mod:`glotok.eval` (sums, never means of means), so the result is the same however the shards
were spread over workers, and a killed run resumes from the partials it left. rFID compares the
reconstructions with reference statistics of the same center-cropped val images: loaded from
``reference`` when it exists and its source hash matches (a mismatch is refused), else computed
in this very pass and saved there. The hash covers the val shards' names and sha256s, the crop
and size, and the Inception weights' sha256 (GLOTOK.md: every reference pinned by hash).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
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
from glotok.data.variants import CropVariants
from glotok.data.wds import DamagedShardError, iter_records
from glotok.eval.fid import (GaussianStats, frechet_distance, load_reference, save_reference,
                             source_hash)
from glotok.eval.inception import POOL3_DIM, InceptionFeatures
from glotok.eval.metrics import CodeCounter, ScalarMean, psnr, quantize_to_uint8, ssim
from glotok.eval.uniformity import LatentSample, latent_uniformity
from glotok.train.checkpoint_info import describe_checkpoint
from glotok.utils.parallel import RayOptions, ShardWorker, run_shard_tasks

logger = logging.getLogger(__name__)

PARTIAL_VERSION = 1
_ID_BITS = 24  # sample id = shard index << 24 | record index: unique over 16M-sample shards


@dataclass(frozen=True)
class EvalTask:
    index: int
    url: str
    name: str  # <shard stem>.npz
    digest: str
    keep_images: int


class ReconstructionWorker(ShardWorker):
    """Holds the tokenizer, Inception and (optionally) LPIPS; one val shard -> one partial."""

    def __init__(self, checkpoint: str, ema: bool, batch_size: int,
                 decode_workers: Optional[int], with_reference: bool,
                 inception_path: Optional[str], lpips_vgg: Optional[str],
                 lpips_lin: Optional[str], seed: int, partial_dir: str,
                 options: StorageOptions):
        from glotok.models.perceptual import LPIPS, PerceptualWeightsError
        from glotok.train.export import load_tokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, cfg, _ = load_tokenizer(checkpoint, ema=ema, device=self.device)
        self.crop = CropVariants(("center",), cfg.model.image_size)
        self.inception = InceptionFeatures(inception_path).to(self.device)
        try:
            self.lpips = LPIPS(vgg_path=lpips_vgg, lin_path=lpips_lin).to(self.device)
        except PerceptualWeightsError:
            self.lpips = None
        self.batch_size, self.with_reference, self.options = batch_size, with_reference, options
        self.seed = seed
        self.decode_workers = (default_decode_workers() if decode_workers is None
                               else decode_workers)
        self.receipts = Receipts(partial_dir, options)

    def fetch(self, task: EvalTask) -> bytes:
        return storage.read_bytes(task.url, self.options)

    @torch.no_grad()
    def compute(self, task: EvalTask, data: bytes) -> dict:
        try:
            records = list(iter_records(data))
        except DamagedShardError as exc:
            raise DamagedShardError(f"val shard {task.url} is damaged ({exc}): re-run "
                                    "tools/make_shards.py or drop it from the manifest") from exc
        model = self.model
        out: dict[str, list] = {k: [] for k in ("keys", "recon_feats", "ref_feats", "psnr",
                                                "ssim", "lpips", "grid_orig", "grid_recon")}
        counts = {"visual": CodeCounter(model.visual.quantizer.num_codes),
                  "semantic": CodeCounter(model.semantic.quantizer.num_codes)}
        latents = LatentSample(capacity=max(1, len(records)), seed=self.seed)  # keeps all
        skipped = []
        for batch in decoded_batches(records, self.crop, self.batch_size, self.decode_workers):
            skipped += [{"shard": task.url, "key": k, "reason": r} for k, r in batch["skipped"]]
            if batch["images"] is None:
                continue
            x8 = batch["images"][:, 0].to(self.device, non_blocking=True)
            x = x8.float().div_(127.5).sub_(1.0)
            indices = model.encode(x)
            recon = model.decode(indices).float().clamp_(-1.0, 1.0)
            out["keys"] += batch["key"]
            out["recon_feats"].append(self.inception(recon).cpu())
            if self.with_reference:
                out["ref_feats"].append(self.inception(x8).cpu())  # the 8-bit originals
            out["psnr"].append(psnr(x, recon).cpu())
            out["ssim"].append(ssim(x, recon).cpu())
            if self.lpips is not None:
                out["lpips"].append(self.lpips(x, recon).double().cpu())
            counts["visual"].update(indices[:, 0])
            counts["semantic"].update(indices[:, 1])
            ids = torch.tensor(batch["index"], dtype=torch.int64) + (task.index << _ID_BITS)
            latents.update(model.semantic.decode_indices(indices[:, 1]), ids)
            room = task.keep_images - sum(len(g) for g in out["grid_orig"])
            if room > 0:
                out["grid_orig"].append(x8[:room].cpu())
                out["grid_recon"].append(quantize_to_uint8(recon[:room]).cpu())
        if not out["keys"]:
            raise ValueError(f"val shard {task.url} has no decodable image ({len(skipped)} "
                             "skipped)")
        arrays = {"version": np.int64(PARTIAL_VERSION), "keys": np.array(out["keys"]),
                  "counts_visual": counts["visual"].counts.cpu().numpy(),
                  "counts_semantic": counts["semantic"].counts.cpu().numpy(),
                  "latent_ids": latents.ids, "latent_vectors": latents.vectors()}
        for k in ("recon_feats", "ref_feats", "psnr", "ssim", "lpips", "grid_orig",
                  "grid_recon"):
            if out[k]:
                arrays[k] = torch.cat(out[k]).numpy()
        return {"arrays": arrays, "skipped": skipped}

    def commit(self, task: EvalTask, output: dict) -> dict:
        buf = io.BytesIO()
        np.savez(buf, **output["arrays"])
        return self.receipts.publish(task.name, buf.getvalue(), task.digest, source=task.url,
                                     images=len(output["arrays"]["keys"]),
                                     with_reference=self.with_reference,
                                     skipped=output["skipped"])


class ReconstructionTotals:
    """The merged accumulators of a pass: add partials in any grouping, same result."""

    def __init__(self, visual_size: int, semantic_size: int, latent_capacity: int, seed: int):
        self.recon, self.ref = GaussianStats(POOL3_DIM), GaussianStats(POOL3_DIM)
        self.psnr, self.ssim, self.lpips = ScalarMean(), ScalarMean(), ScalarMean()
        self.visual, self.semantic = CodeCounter(visual_size), CodeCounter(semantic_size)
        self.latents = LatentSample(latent_capacity, seed)
        self.images, self.lpips_complete = 0, True
        self.grid_orig: list[np.ndarray] = []
        self.grid_recon: list[np.ndarray] = []

    def add(self, p: dict) -> None:
        self.images += len(p["keys"])
        self.recon.update(p["recon_feats"])
        if "ref_feats" in p:
            self.ref.update(p["ref_feats"])
        self.psnr.update(p["psnr"])
        self.ssim.update(p["ssim"])
        if "lpips" in p:
            self.lpips.update(p["lpips"])
        else:
            self.lpips_complete = False
        for counter, counts in ((self.visual, p["counts_visual"]),
                                (self.semantic, p["counts_semantic"])):
            partial = CodeCounter(counter.codebook_size)
            partial.counts += torch.from_numpy(counts)
            counter.merge(partial)
        self.latents.update(torch.from_numpy(p["latent_vectors"]), p["latent_ids"])
        if "grid_orig" in p:
            self.grid_orig.append(p["grid_orig"])
            self.grid_recon.append(p["grid_recon"])


def default_reference_path(source: str, image_size: int) -> str:
    """``<cache>/fid/<source as a file name>-<S>px.npz``; ``<cache>`` is ``$GLOTOK_CACHE`` or
    ``~/.cache/glotok``. One file per val set and size: stale contents are caught by its hash."""
    root = os.environ.get("GLOTOK_CACHE") or os.path.expanduser("~/.cache/glotok")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_")[-120:]
    return os.path.join(root, "fid", f"{slug}-{image_size}px.npz")


def reference_source(shard_set, image_size: int, inception: InceptionFeatures,
                     options: StorageOptions) -> dict:
    """What rFID reference statistics depend on (hashed by :func:`glotok.eval.fid.source_hash`):
    the val shards' names and sha256s (read and hashed here where the manifest has none), the
    crop and size, and the Inception network and weights."""
    import hashlib

    shas = list(shard_set.sha256)
    for i, (shard, sha) in enumerate(zip(shard_set.shards, shas)):
        if sha is None:
            logger.info("hashing %s (its manifest has no sha256)", shard.url)
            shas[i] = hashlib.sha256(storage.read_bytes(shard.url, options)).hexdigest()
    return {"kind": "rfid reference: center-cropped val images",
            "shards": [{"name": n, "sha256": s} for n, s in zip(shard_set.names, shas)],
            "crop": "center (ADM: short side to S, central S x S)", "image_size": image_size,
            "features": inception.description()}


def evaluate_reconstruction(source: str, checkpoint: str, output: str, *,
                            reference: Optional[str] = None, inception_path: Optional[str] = None,
                            lpips_vgg: Optional[str] = None, lpips_lin: Optional[str] = None,
                            batch_size: int = 32, ema: bool = True,
                            decode_workers: Optional[int] = None, grid_images: int = 8,
                            uniformity_samples: int = 10_000, tsne_perplexity: float = 30.0,
                            seed: int = 0, verify: bool = False,
                            options: StorageOptions = StorageOptions(),
                            ray: RayOptions = RayOptions(), progress: bool = True) -> dict:
    """Evaluate ``checkpoint`` on the val shards ``source``; write ``output/report.json`` and
    ``output/grid.png`` (originals | reconstructions); return the report.

    Raises:
        glotok.eval.fid.ReferenceMismatchError: ``reference`` exists but was computed from
            other data, crop or Inception weights (before any image is processed).
    """
    start = time.monotonic()
    ckpt = describe_checkpoint(checkpoint)
    weights = "ema" if ema and ckpt.has_ema else "generator"
    shard_set = open_shard_set(source, options)
    ref_source = reference_source(shard_set, ckpt.image_size, InceptionFeatures(inception_path),
                                  options)
    ref_hash = source_hash(ref_source)
    reference = reference or default_reference_path(shard_set.source, ckpt.image_size)
    cached = load_reference(reference, expected_hash=ref_hash) if os.path.exists(reference) \
        else None
    with_reference = cached is None
    logger.info("rFID reference %s (sha256 %s): %s", reference, ref_hash,
                "cached" if cached else "computed in this pass")

    partial_dir = storage.join(output, "partials")
    settings = {"version": PARTIAL_VERSION, "checkpoint": ckpt.url, "step": ckpt.step,
                "weights": weights, "seed": seed,
                "lpips": [lpips_vgg, lpips_lin],
                "inception": ref_source["features"]["weights_sha256"]}
    tasks = [EvalTask(i, s.url, os.path.splitext(name)[0] + ".npz",
                      plan_digest(**settings, source=s.url, sha256=entry["sha256"],
                                  keep=grid_images if i == 0 else 0),
                      grid_images if i == 0 else 0)
             for i, (s, name, entry) in enumerate(zip(shard_set.shards, shard_set.names,
                                                      ref_source["shards"]))]
    receipts = Receipts(partial_dir, options)
    done = receipts.completed({t.name: t.digest for t in tasks}, verify)
    if with_reference:  # partials of a pass that had the reference lack the originals' features
        done = {n: r for n, r in done.items() if r["with_reference"]}
    receipts.remove_stale({t.name for t in tasks}, suffix=".npz")
    todo = [t for t in tasks if t.name not in done]
    logger.info("%s: %d val shards, %d already evaluated, %d to do", shard_set.source,
                len(tasks), len(done), len(todo))
    results = run_shard_tasks(
        ReconstructionWorker,
        dict(checkpoint=ckpt.url, ema=ema, batch_size=batch_size, decode_workers=decode_workers,
             with_reference=with_reference, inception_path=inception_path, lpips_vgg=lpips_vgg,
             lpips_lin=lpips_lin, seed=seed, partial_dir=partial_dir, options=options),
        todo, ray, desc="evaluate", total=shard_set.num_samples,
        initial=sum(r["images"] for r in done.values()), progress=progress)
    done.update({r["name"]: r for r in results})

    totals = ReconstructionTotals(ckpt.visual_codebook_size, ckpt.semantic_codebook_size,
                                  uniformity_samples, seed)
    for t in tasks:  # shard order: the merge is exact, the order only fixes float rounding
        data = storage.read_bytes(receipts.url(t.name), options)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            totals.add({k: z[k] for k in z.files})
    if with_reference:
        cached = save_reference(reference, totals.ref, ref_source)
    report = _report(totals, cached, reference, ckpt, weights, shard_set, ref_source,
                     [s for t in tasks for s in done[t.name]["skipped"]], tsne_perplexity)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["reference"]["computed_in_this_pass"] = with_reference
    if totals.grid_orig:
        from glotok.utils.images import reconstruction_grid

        from PIL import Image

        grid = reconstruction_grid(torch.from_numpy(np.concatenate(totals.grid_orig)) / 127.5 - 1,
                                   torch.from_numpy(np.concatenate(totals.grid_recon)) / 127.5 - 1)
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        storage.write_bytes(storage.join(output, "grid.png"), buf.getvalue(), options)
        report["grid"] = storage.join(output, "grid.png")
    storage.write_bytes(storage.join(output, "report.json"),
                        json.dumps(report, indent=1).encode(), options)
    return report


def _codebook(counter: CodeCounter) -> dict:
    return {"size": counter.codebook_size, "used": counter.num_used(), "usage": counter.usage(),
            "perplexity": counter.perplexity()}


def _report(totals: ReconstructionTotals, ref, reference: str, ckpt, weights: str, shard_set,
            ref_source: dict, skipped: list, perplexity: float) -> dict:
    rfid = frechet_distance(totals.recon.mean(), totals.recon.cov(), ref.mu, ref.sigma)
    vectors = totals.latents.vectors()
    if vectors.shape[0] > 3 * perplexity:
        uniformity = {**latent_uniformity(vectors, perplexity=perplexity),
                      "latent": "refined semantic latent (decoder input), one position per image",
                      "perplexity": perplexity}
    else:
        uniformity = {"unavailable": f"{vectors.shape[0]} latent vectors; t-SNE with perplexity "
                      f"{perplexity:g} needs more than {3 * perplexity:g} (evaluate more images "
                      "or pass a smaller --tsne-perplexity)"}
    report = {
        "checkpoint": {**ckpt.describe(), "weights": weights},
        "data": {"source": shard_set.source, "num_shards": len(shard_set.shards),
                 "num_images": totals.images, "image_size": ckpt.image_size,
                 "crop": ref_source["crop"], "skipped": skipped},
        "reference": {"path": str(reference), "sha256": ref.source_sha256, "count": ref.count,
                      "created": ref.created},
        "inception": ref_source["features"],
        "rfid": rfid, "psnr": totals.psnr.mean(), "ssim": totals.ssim.mean(),
        "psnr_exact_images": totals.psnr.num_infinite,
        "lpips": totals.lpips.mean() if totals.lpips_complete and totals.lpips.count else None,
        "codebook": {"visual": _codebook(totals.visual), "semantic": _codebook(totals.semantic)},
        "uniformity": uniformity,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if report["lpips"] is None:
        report["lpips_unavailable"] = (
            "no LPIPS weights: pass --lpips-vgg (a torchvision VGG16 state dict) and "
            "--lpips-lin (the lpips package's weights/v0.1/vgg.pth), or install torchvision "
            "and lpips")
    return report
