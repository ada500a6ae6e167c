"""Uniformity of a latent space, as VA-VAE measures it (density CV, normalised entropy, Gini).

Source: VA-VAE (Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent
Diffusion Models", CVPR 2025), code ``hustvl/LightningDiT``, ``tools/latent_vis.py``,
``calculate_uniformity_metrics`` and ``sample_latents``. Their recipe:

1. Draw 10,000 latent vectors: random images, one random spatial position of each, every
   channel standardised with the dataset's per-channel latent mean and std.
2. Embed them in 2-D with t-SNE (sklearn, perplexity 30, 1000 iterations, random_state 42).
3. Estimate the density at every embedded point with ``scipy.stats.gaussian_kde`` (Scott's
   bandwidth), evaluated at the points themselves.
4. From the n densities d_i: ``density_cv = std(d) / mean(d)``; ``normalized_entropy =
   H(d / sum d) / log2(n)`` (bits, with +1e-10 inside the log); Gini coefficient
   ``sum_i (2i - n - 1) d_(i) / (n sum d)`` over the sorted densities. A uniform latent has
   CV 0, normalised entropy 1 and Gini 0. (VA-VAE averages 10 such runs.)

Here step 1 is ``LatentSample``, a sample that per-rank passes build and merge exactly; steps
2-4 are ``latent_uniformity`` (2-3) and ``uniformity_metrics`` (4). For GloTok the caller passes
the semantic branch's latent map (B, 8, 16, 16). Where VA-VAE standardises with statistics of the
whole dataset, ``latent_uniformity`` uses those of the sample itself (10k vectors estimate them
well); pass ``standardize=False`` to embed the raw vectors.

Read the numbers comparatively: t-SNE evens out density by design (perplexity fixes each point's
effective neighbour count), so values depend on n, perplexity and iterations as much as on the
latent. Compare tokenizers only at the same settings and sample size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["LatentSample", "latent_uniformity", "uniformity_metrics"]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed uint64 hash of each uint64 (SplitMix64's finaliser); wraps mod 2^64."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


class LatentSample:
    """A uniform random sample of ``capacity`` images, one random latent position each.

    Bottom-k sampling on a hash of each image's global id: an image is kept iff its key
    ``hash(seed, id)`` is among the ``capacity`` smallest seen, and its position is
    ``hash(seed, id, 1) mod (H W)``. The result is a pure function of the set of (id, latent)
    pairs: ranks and workers each sample their share, ``merge`` keeps the smallest keys of the
    union, and the outcome equals one pass over everything regardless of how the data was split
    or ordered. Ids must be unique across the whole pass (e.g. the dataset index).

    Memory: ``capacity`` vectors of C float32, plus keys.
    """

    def __init__(self, capacity: int = 10_000, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"LatentSample capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.keys = np.zeros(0, dtype=np.uint64)
        self.ids = np.zeros(0, dtype=np.int64)
        self._vectors: np.ndarray | None = None  # (n, C) float32, rows aligned with keys

    def _hash(self, ids: np.ndarray, stream: int) -> np.ndarray:
        base = _splitmix64(np.full(ids.shape, self.seed, dtype=np.uint64) + np.uint64(stream))
        return _splitmix64(base ^ ids.astype(np.uint64))

    def update(self, latents: Tensor, sample_ids: Tensor | np.ndarray) -> "LatentSample":
        """latents: (B, C, H, W) latent maps (or (B, C) vectors); sample_ids: (B,) unique ints."""
        z = latents.detach()
        if z.dim() == 2:
            z = z[:, :, None, None]
        ids = np.asarray(torch.as_tensor(sample_ids).cpu(), dtype=np.int64).reshape(-1)
        if z.dim() != 4 or ids.shape[0] != z.shape[0]:
            raise ValueError(f"LatentSample.update takes (B, C, H, W) latents and B ids, got "
                             f"{tuple(latents.shape)} and {ids.shape[0]} ids")
        b, c, h, w = z.shape
        pos = torch.from_numpy((self._hash(ids, 1) % np.uint64(h * w)).astype(np.int64))
        picked = z.flatten(2)[torch.arange(b), :, pos.to(z.device)]  # (B, C)
        return self._keep(self._hash(ids, 0), ids, picked.float().cpu().numpy())

    def _keep(self, keys: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> "LatentSample":
        if self._vectors is not None and vectors.shape[1] != self._vectors.shape[1]:
            raise ValueError(f"LatentSample got {vectors.shape[1]}-channel latents after "
                             f"{self._vectors.shape[1]}-channel ones")
        if self._vectors is not None:
            keys = np.concatenate([self.keys, keys])
            ids = np.concatenate([self.ids, ids])
            vectors = np.concatenate([self._vectors, vectors])
        order = np.lexsort((ids, keys))[: self.capacity]  # by key, ties by id: deterministic
        self.keys, self.ids, self._vectors = keys[order], ids[order], vectors[order]
        return self

    def merge(self, other: "LatentSample") -> "LatentSample":
        if (other.capacity, other.seed) != (self.capacity, self.seed):
            raise ValueError(f"cannot merge LatentSamples with (capacity, seed) "
                             f"{(self.capacity, self.seed)} and {(other.capacity, other.seed)}")
        if other._vectors is None:
            return self
        return self._keep(other.keys, other.ids, other._vectors)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def vectors(self) -> np.ndarray:
        """(n, C) float32, n = min(capacity, images seen), in key order."""
        if self._vectors is None:
            raise ValueError("LatentSample is empty: call update() with some latents first")
        return self._vectors


def uniformity_metrics(density: np.ndarray) -> dict[str, float]:
    """VA-VAE's uniformity statistics of n non-negative densities (see the module docstring).

    Returns:
        ``density_cv`` (>= 0), ``normalized_entropy`` (in [0, 1]), ``gini`` (in [0, 1)), floats.
    """
    d = np.asarray(density, dtype=np.float64).reshape(-1)
    n = d.shape[0]
    if n < 2 or not np.all(np.isfinite(d)) or np.any(d < 0) or d.sum() <= 0:
        raise ValueError(f"uniformity_metrics needs >= 2 finite non-negative densities with a "
                         f"positive sum, got {n} values")
    p = d / d.sum()
    entropy = -np.sum(p * np.log2(p + 1e-10))
    ranks = np.arange(1, n + 1)
    gini = np.sum((2 * ranks - n - 1) * np.sort(d)) / (n * d.sum())
    return {
        "density_cv": float(d.std() / d.mean()),
        "normalized_entropy": float(entropy / np.log2(n)),
        "gini": float(gini),
    }


def latent_uniformity(vectors: np.ndarray | Tensor, *, standardize: bool = True,
                      perplexity: float = 30.0, max_iter: int = 1000,
                      seed: int = 42) -> dict[str, float]:
    """VA-VAE's uniformity of a latent sample: t-SNE to 2-D, Gaussian KDE, then the metrics.

    Args:
        vectors: (n, C) latent vectors, e.g. ``LatentSample.vectors()``; VA-VAE uses n = 10k
            (t-SNE of 10k points takes about a minute on CPU). n must exceed 3 * perplexity.
        standardize: z-score each channel over the sample first (VA-VAE: dataset statistics).
        perplexity, max_iter, seed: t-SNE settings; VA-VAE's are 30, 1000, 42.

    Returns:
        ``uniformity_metrics`` of the KDE densities, plus ``num_vectors``.
    """
    from scipy.stats import gaussian_kde
    from sklearn.manifold import TSNE

    x = np.asarray(torch.as_tensor(vectors).detach().cpu(), dtype=np.float64)
    if x.ndim != 2 or x.shape[0] <= 3 * perplexity:
        raise ValueError(f"latent_uniformity needs (n, C) vectors with n > 3 * perplexity = "
                         f"{3 * perplexity:g}, got shape {x.shape}")
    if standardize:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)  # constant channels stay 0
    emb = TSNE(n_components=2, perplexity=perplexity, max_iter=max_iter,
               random_state=seed).fit_transform(x)
    density = gaussian_kde(emb.T)(emb.T)
    return {**uniformity_metrics(density), "num_vectors": int(x.shape[0])}
