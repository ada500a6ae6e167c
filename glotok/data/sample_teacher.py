"""A real teacher histogram for the sample set, built on first use.

GloTok's teacher is the histogram of pairwise cosines among k-means centroids of a pre-trained
vision model's pooled patch features (GLOTOK.md). The sample set has no DINOv2 at hand, so this
uses the ImageNet EfficientNet-Lite0 that ``glotok[sample]`` ships, in the same recipe: the
stride-16 feature map of each photo at 256x256 (16x16 positions, like ViT-B/14 patches at 224),
4x4-average-pooled to 16 vectors per photo, k-means, histogram of the centroids. The features
come from the teacher registry (``glotok.teacher``, ``efficientnet_lite0``).

Cache version 2: version 1 scaled the input twice (``net.normalize`` before ``features``, which
normalises again); the histograms differ by at most 1.3e-4 per bin, but a v1 file is not reused.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import torch

STRIDE16_TAP = 3  # EfficientNetPerceptual taps: strides 2, 4, 8, 16, 32
CACHE_VERSION = 2


def cache_root() -> Path:
    return Path(os.environ.get("GLOTOK_CACHE", Path.home() / ".cache" / "glotok"))


@torch.no_grad()
def sample_features(image_size: int = 256, pool: int = 4) -> torch.Tensor:
    """(N * (image_size/16/pool)^2, C) pooled stride-16 EfficientNet-Lite0 features."""
    from glotok.data.sample import sample_photo_paths
    from glotok.data.shards import center_crop_arr, decode_image
    from glotok.teacher import build_feature_extractor

    extractor = build_feature_extractor("efficientnet_lite0", tap=STRIDE16_TAP, pool=pool)
    photos = [np.asarray(center_crop_arr(decode_image(Path(path).read_bytes()), image_size))
              for _key, path, _label in sample_photo_paths()]
    feats = []
    for i in range(0, len(photos), 8):  # 8 photos per forward: bounded memory at any size
        batch = torch.from_numpy(np.stack(photos[i:i + 8])).permute(0, 3, 1, 2)
        feats.append(extractor(batch))  # (8 * 16, C), photo-major
    return torch.cat(feats)


def ensure_sample_teacher(bins: int = 40, alpha: float = 190.0, k: int = 128,
                          cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the sample teacher file for (bins, alpha, k), building it once (process-safe)."""
    from glotok.losses.teacher import build_teacher

    root = Path(cache_dir) if cache_dir else cache_root()
    out = root / "teacher" / (f"sample-efficientnet_lite0-v{CACHE_VERSION}-k{k}-bins{bins}"
                              f"-alpha{alpha:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        feats = sample_features()
        teacher = build_teacher(
            feats, bins=bins, alpha=alpha, k=k, seed=0,
            provenance={"source": "centroids", "model": "efficientnet_lite0 (ImageNet)",
                        "layer": f"stride-16 feature map (tap {STRIDE16_TAP}), 4x4 avg-pooled",
                        "images_seen": len(feats) // 16, "dataset": "glotok built-in sample set"})
        teacher.save(out)
    return out
