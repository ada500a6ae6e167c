"""Reconstruction and codebook metrics, each mergeable across ranks and workers.

- ``quantize_to_uint8``: the one float -> 8-bit rule every image metric here uses.
- ``psnr`` / ``ssim``: per image, on 8-bit pixels; ``ScalarMean`` averages them across ranks.
- ``CodeCounter``: per-code counts over a pass, for codebook usage and perplexity.
- ``precision_recall``: improved precision and recall (Kynkaenniemi et al. 2019) on pool3
  features, as ADM's evaluator computes them.

Every accumulator here is a sum (never a mean of means), so a per-rank or per-worker pass builds
its own, ``merge`` adds them, and the merged result equals one pass over all the data exactly
(integer counts) or up to float64 summation order (``ScalarMean``). The uniformity metrics of the
semantic latent live in ``glotok.eval.uniformity``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "quantize_to_uint8",
    "psnr",
    "ssim",
    "ScalarMean",
    "CodeCounter",
    "precision_recall",
]


def quantize_to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] (float) or uint8 -> uint8 (B, 3, H, W) in [0, 255].

    LlamaGen's rule (``reconstruction_vq_ddp.py``): ``clamp(127.5 x + 128, 0, 255)`` truncated
    to uint8, i.e. round-half-up of ``127.5 (x + 1)``. This is what a reconstruction becomes when
    saved as a PNG, and so what PSNR, SSIM and FID are computed on. uint8 input is returned as is.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
    return (127.5 * images.float() + 128.0).clamp_(0.0, 255.0).to(torch.uint8)


def _pixel_pair(x: Tensor, y: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Both images as float64 in [0, 255] after 8-bit quantisation; shapes checked."""
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"{what} takes two (B, C, H, W) batches of the same shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return quantize_to_uint8(x).double(), quantize_to_uint8(y.to(x.device)).double()


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB, peak 255.

    Args:
        x, y: (B, C, H, W), uint8 in [0, 255] or float in [-1, 1] (quantised by
            ``quantize_to_uint8`` first, as LlamaGen does with its reconstructions).

    Returns:
        (B,) float64; ``inf`` where the two 8-bit images are identical.

    LlamaGen compares the uint8 reconstruction / 255 with the ground truth in [0, 1] through
    ``skimage.metrics.peak_signal_noise_ratio`` (data range 1). Its ground truth is ``ToTensor``
    of an 8-bit image, so that equals ``10 log10(255^2 / MSE)`` on 8-bit pixels: this function.
    The dataset PSNR is the mean of the per-image values (``ScalarMean``), not the PSNR of the
    pooled MSE.
    """
    a, b = _pixel_pair(x, y, "psnr")
    mse = (a - b).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0 ** 2 / mse)  # mse 0 -> +inf, as skimage


# SSIM of Wang et al. 2004 with the standard constants.
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # skimage's default: radius int(3.5 * 1.5 + 0.5) = 5, an 11x11 window
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _gaussian_window(device: torch.device) -> Tensor:
    """scipy.ndimage's 1-D Gaussian kernel for sigma 1.5, truncate 3.5: (11,) float64, sum 1."""
    radius = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (t / _SSIM_SIGMA) ** 2)
    return w / w.sum()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity per image: Gaussian window 11 (sigma 1.5), per channel, averaged.

    Equals ``skimage.metrics.structural_similarity(x, y, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=255)`` on the 8-bit images (the test checks
    this to 1e-10). Like skimage, the mean runs over the pixels whose 11x11 window lies inside the
    image (a 5-pixel border is dropped), so the border padding never matters and none is done.

    Not LlamaGen's numbers: its script calls skimage with a 7x7 uniform window and
    ``data_range=2.0`` on [0, 1] images (larger constants), which inflates SSIM. Compare SSIM
    values only between runs of the same definition.

    Args:
        x, y: (B, C, H, W), uint8 or float in [-1, 1] (quantised first); H, W >= 11.

    Returns:
        (B,) float64 in [-1, 1].
    """
    a, b = _pixel_pair(x, y, "ssim")
    bsz, ch, h, w = a.shape
    win = _gaussian_window(a.device)
    if min(h, w) < win.numel():
        raise ValueError(f"ssim needs images of at least {win.numel()}x{win.numel()} pixels, "
                         f"got {h}x{w}")
    kh = win.view(1, 1, -1, 1).expand(ch, 1, -1, 1)
    kw = win.view(1, 1, 1, -1).expand(ch, 1, 1, -1)

    def blur(t: Tensor) -> Tensor:  # separable, 'valid': only windows inside the image
        return F.conv2d(F.conv2d(t, kh, groups=ch), kw, groups=ch)

    c1 = (_SSIM_K1 * 255.0) ** 2
    c2 = (_SSIM_K2 * 255.0) ** 2
    ux, uy = blur(a), blur(b)
    vx = blur(a * a) - ux * ux  # population (co)variances: use_sample_covariance=False
    vy = blur(b * b) - uy * uy
    vxy = blur(a * b) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


class ScalarMean:
    """Mean of per-sample values (PSNR, SSIM, LPIPS) over a distributed pass.

    ``update`` adds values; ``merge`` adds another rank's sum and count; ``mean`` divides.
    Infinite values (PSNR of an exact reconstruction) are counted apart and left out of the
    mean, so one perfect image does not make the dataset PSNR infinite; ``num_infinite`` says
    how many there were.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.num_infinite = 0

    def update(self, values: Tensor | np.ndarray) -> "ScalarMean":
        v = torch.as_tensor(values).detach().double().flatten().cpu()
        if torch.isnan(v).any():
            raise ValueError("ScalarMean.update got NaN values: the metric that produced them is "
                             "undefined for some inputs (check the images for NaN)")
        finite = torch.isfinite(v)
        self.num_infinite += int((~finite).sum())
        self.total += float(v[finite].sum())
        self.count += int(finite.sum())
        return self

    def merge(self, other: "ScalarMean") -> "ScalarMean":
        self.total += other.total
        self.count += other.count
        self.num_infinite += other.num_infinite
        return self

    def mean(self) -> float:
        if self.count == 0:
            raise ValueError("ScalarMean.mean of no finite values: nothing was added")
        return self.total / self.count


class CodeCounter:
    """How often each code of a codebook was chosen over a pass, summed across ranks.

    Usage is the fraction of codes chosen at least once over the whole pass (not per batch, not
    per rank); perplexity is ``exp(H(p))`` of the empirical code distribution, in codes (natural
    log; 1 = one code used, ``codebook_size`` = all codes equally often).

    ``counts`` is a plain int64 tensor: ``merge`` adds another counter's, or a rank can
    ``torch.distributed.all_reduce(counter.counts)`` it in place.
    """

    def __init__(self, codebook_size: int, device: torch.device | str | None = None) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.int64, device=device)

    def update(self, indices: Tensor) -> "CodeCounter":
        """indices: integer tensor of any shape with values in [0, codebook_size)."""
        idx = indices.detach().reshape(-1).to(self.counts.device)
        if idx.is_floating_point():
            raise TypeError(f"CodeCounter.update takes integer code indices, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"code index out of range [0, {self.codebook_size}): min "
                             f"{int(idx.min())}, max {int(idx.max())}; is this the right codebook?")
        self.counts += torch.bincount(idx.long(), minlength=self.codebook_size)
        return self

    def merge(self, other: "CodeCounter") -> "CodeCounter":
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"cannot merge code counts of codebooks of size "
                             f"{self.codebook_size} and {other.codebook_size}")
        self.counts += other.counts.to(self.counts.device)
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def num_used(self) -> int:
        return int((self.counts > 0).sum())

    def usage(self) -> float:
        """Fraction of the codebook used at least once, in [0, 1]."""
        return self.num_used() / self.codebook_size

    def perplexity(self) -> float:
        """exp of the entropy (nats) of the code frequencies, in [1, codebook_size]."""
        total = self.total
        if total == 0:
            raise ValueError("CodeCounter.perplexity of an empty count: no indices were added")
        p = self.counts[self.counts > 0].double() / total
        return math.exp(float(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------- precision/recall


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, clamped at 0 (ADM's formula)."""
    d = a.square().sum(1, keepdim=True) - 2.0 * (a @ b.T) + b.square().sum(1)[None]
    return d.clamp_min_(0.0)


def _knn_radii(feats: Tensor, k: int, batch_size: int) -> Tensor:
    """(N,) squared distance of each vector to its k-th nearest neighbour in ``feats``.

    The vector itself (distance 0) counts as the 0-th neighbour, as in ADM's
    ``ManifoldEstimator.manifold_radii`` (``np.partition(..., kth=k)[:, k]``).
    """
    out = torch.empty(feats.shape[0], dtype=feats.dtype, device=feats.device)
    for i in range(0, feats.shape[0], batch_size):
        d = _sq_dists(feats[i:i + batch_size], feats)
        out[i:i + batch_size] = d.kthvalue(k + 1, dim=1).values
    return out


def _inside(query: Tensor, anchors: Tensor, radii: Tensor, batch_size: int) -> Tensor:
    """(Nq,) bool: query vector within (<=) the k-NN ball of at least one anchor."""
    out = torch.empty(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], batch_size):
        out[i:i + batch_size] = (_sq_dists(query[i:i + batch_size], anchors) <= radii[None]).any(1)
    return out


@torch.no_grad()
def precision_recall(real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray, k: int = 3,
                     batch_size: int = 1024,
                     device: torch.device | str | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019), as ADM's evaluator.

    Each set's manifold is the union of balls around its vectors with radius the distance to the
    k-th nearest neighbour (k=3). Precision: fraction of fake vectors inside the real manifold;
    recall: fraction of real vectors inside the fake manifold. ADM feeds pool3 features of its
    10k reference images and all 50k samples.

    Args:
        real_feats: (N_real, D), e.g. pool3 features of the reference batch.
        fake_feats: (N_fake, D), of the samples. Both whole sets: gather the ranks' features
            first (the k-NN radii need all vectors of a set).
        k: neighbourhood size.
        batch_size: rows of the (batch, N) distance blocks; memory is batch * max(N) floats.
        device: where to compute (default: that of ``real_feats``); a GPU makes 50k x 50k fast.

    Returns:
        (precision, recall), each in [0, 1].

    Distances are float32 squared Euclidean, compared with ``<=`` as ADM does. ADM first tries
    float16 and falls back to float32 only on overflow; float32 throughout can differ from its
    numbers only for vectors that lie on a ball's boundary to within float16 precision.
    """
    real = torch.as_tensor(real_feats)
    fake = torch.as_tensor(fake_feats)
    device = torch.device(device) if device is not None else real.device
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall takes two (N, D) feature sets with the same D, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision_recall with k={k} needs more than {k} vectors per set, got "
                         f"{real.shape[0]} real and {fake.shape[0]} fake")
    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    precision = _inside(fake, real, real_radii, batch_size).double().mean()
    recall = _inside(real, fake, fake_radii, batch_size).double().mean()
    return float(precision), float(recall)
