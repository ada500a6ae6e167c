"""gFID, Inception Score, precision and recall of generated samples against a reference batch.

The protocol of GLOTOK.md: samples in the ADM layout (``tools/sample.py``), the ADM ImageNet 256
reference batch (``VIRTUAL_imagenet256_labeled.npz``, pinned by sha256), pool3 features of the
TF Inception (2015-12-05). Pool3 features are computed over slices of the two ``.npz`` files by
Ray workers (:mod:`glotok.utils.parallel`) and merged here. Where no Inception classifier
weights are given, IS is reported as unavailable, never invented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from glotok.eval.fid import AdmReferenceBatch, GaussianStats, frechet_distance
from glotok.eval.inception import (IS_UNAVAILABLE, InceptionFeatures,
                                   inception_score_from_features)
from glotok.eval.metrics import precision_recall
from glotok.utils.parallel import RayOptions, ShardWorker, run_shard_tasks


class Pool3Worker(ShardWorker):
    """One task = ``(start, stop)``: pool3 features of ``arr_0[start:stop]`` of one ``.npz``
    (opened once by the driver, which checked its hash)."""

    def __init__(self, path: str, num_images: int, image_shape: tuple[int, ...],
                 inception_path: Optional[str] = None, batch_size: int = 100):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = InceptionFeatures(inception_path).to(self.device).eval()
        self.batch = AdmReferenceBatch(Path(path), "", False, num_images, tuple(image_shape),
                                       None, None)
        self.batch_size = batch_size

    @torch.no_grad()
    def compute(self, task: tuple[int, int], data) -> dict:
        start, stop = task
        feats = []
        for images in self.batch.iter_images(self.batch_size, start, stop):
            x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).to(self.device)  # uint8
            feats.append(self.net(x).float().cpu().numpy())
        return {"features": np.concatenate(feats), "images": stop - start}


def pool3_features(batch: AdmReferenceBatch, options: RayOptions, *, chunk: int = 1000,
                   inception_path: Optional[str] = None, desc: str = "pool3") -> np.ndarray:
    """(N, 2048) float32 pool3 features of ``arr_0`` of an ADM-layout ``.npz``, in order."""
    n = batch.num_images
    tasks = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    kwargs = {"path": str(batch.path), "num_images": n, "image_shape": batch.image_shape,
              "inception_path": inception_path}
    results = run_shard_tasks(Pool3Worker, kwargs, tasks, options, desc=desc, total=n)
    return np.concatenate([r["features"] for r in results])


def evaluate_generation(samples: str, reference: str, *, expected_sha256: Optional[str] = None,
                        allow_unpinned: bool = False, logits_weights: Optional[str] = None,
                        options: RayOptions = RayOptions(), inception_path: Optional[str] = None,
                        k: int = 3) -> dict:
    """The report: gFID, IS (or why not), precision, recall, and what was compared."""
    from glotok.eval.fid import load_adm_reference_batch

    ref = load_adm_reference_batch(reference, expected_sha256=expected_sha256,
                                   allow_unpinned=allow_unpinned)
    gen = load_adm_reference_batch(samples, allow_unpinned=True)
    fake = pool3_features(gen, options, inception_path=inception_path, desc="pool3 samples")
    real = None
    if ref.num_images:
        real = pool3_features(ref, options, inception_path=inception_path,
                              desc="pool3 reference")
    if ref.mu is not None and ref.sigma is not None:
        mu_r, sigma_r = ref.mu, ref.sigma
    else:
        stats = GaussianStats(real.shape[1]).update(real)
        mu_r, sigma_r = stats.mean(), stats.cov()
    fake_stats = GaussianStats(fake.shape[1]).update(fake)
    report = {
        "gfid": frechet_distance(fake_stats.mean(), fake_stats.cov(), mu_r, sigma_r),
        "num_samples": int(fake.shape[0]),
        "samples": str(samples),
        "reference": {"path": str(reference), "sha256": ref.sha256, "pinned": ref.pinned,
                      "num_images": ref.num_images},
        "inception": InceptionFeatures(inception_path).description(),
    }
    if logits_weights:
        mean, std = inception_score_from_features(torch.from_numpy(fake), logits_weights)
        report["inception_score"], report["inception_score_std"] = mean, std
    else:
        report["inception_score"] = None
        report["inception_score_note"] = IS_UNAVAILABLE
    if real is not None:
        p, r = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k)
        report["precision"], report["recall"] = float(p), float(r)
    else:
        report["precision"] = report["recall"] = None
        report["precision_recall_note"] = "the reference batch holds statistics only, no images"
    return report

