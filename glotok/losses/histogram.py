"""Codebook-wise histogram relation loss (GloTok, arXiv 2511.14184; see GLOTOK.md).

The distribution of pairwise cosine similarities of a set of vectors C (n, d) is summarised by a
soft histogram on ``bins`` evenly spaced centres B_k in [-1, 1]:

    p_k = sum_{i<j} exp(-alpha * (s_ij - B_k)^2),   s_ij = <c_i, c_j> / (|c_i| |c_j|),

normalised to sum 1. The loss pulls the histogram of the semantic codebook (the student) towards
a fixed teacher histogram: ``KL(P_t || P_s)``.

For n = 16384 there are 134M pairs; the naive (pairs, bins) tensor is about 21 GB in float32.
``soft_histogram`` computes the same numbers in row chunks through a custom autograd Function
that saves only the normalised input and recomputes each chunk in backward, so peak memory is
O(chunk_size * n) and the result equals ``soft_histogram_naive`` to float tolerance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# x86 CPUs compute subnormal floats (below 1.2e-38 in float32) tens of times slower than normal
# ones, and exp(-t) for far-away bins is subnormal, as are its products with small gradients
# in backward (measured: backward 6x slower without the clamp). Clamping the exponent at 50 turns each far-away
# term from ~0 into exp(-50) ~ 2e-22 relative to a term at the bin centre: far below float32
# and even float64 resolution, and large enough that products with unit-scaled gradients stay
# normal.
_MAX_EXPONENT = 50.0


def bin_centers(bins: int, device=None, dtype=None) -> Tensor:
    """The ``bins`` histogram centres, evenly spaced on [-1, 1] with both ends included. (bins,)"""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    return torch.linspace(-1.0, 1.0, bins, device=device, dtype=dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # bf16/fp16 have 8-11 mantissa bits: a sum of millions of kernel values would be noise.
    return torch.promote_types(x.dtype, torch.float32)


def _check_inputs(x: Tensor, bins: int, alpha: float) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D (n, d) set of vectors, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 vectors to form a pair, got n={x.shape[0]}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def soft_histogram_naive(x: Tensor, bins: int = 40, alpha: float = 190.0) -> Tensor:
    """Reference soft histogram of pairwise cosine similarities, by plain autograd.

    Args:
        x: (n, d) vectors; rows are l2-normalised here.
    Returns:
        (bins,) histogram summing to 1, float32 (float64 for float64 input). Memory is
        O(n^2 * bins): use only for tests and small n.
    """
    _check_inputs(x, bins, alpha)
    xn = F.normalize(x.to(_compute_dtype(x)), dim=1)
    n = xn.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=xn.device)
    sims = (xn @ xn.T)[iu[0], iu[1]]  # (pairs,)
    centers = bin_centers(bins, device=xn.device, dtype=xn.dtype)
    raw = torch.exp(-alpha * (sims[:, None] - centers) ** 2).sum(dim=0)
    return raw / raw.sum()


def _kernel_sums(s: Tensor, scaled_centers: list[float], out: Tensor, buf: Tensor) -> None:
    """out[k] += sum(exp(-(s - c_k)^2)) for sims and centres pre-scaled by sqrt(alpha).

    One bin at a time over a (c, m) buffer instead of a (c, m, bins) tensor: memory stays at
    two chunk-sized buffers whatever ``bins`` is, and every pass is an in-place elementwise op
    (fresh allocations of this size cost more in page faults than the arithmetic). Working in
    sqrt(alpha) units saves one multiply per bin.
    """
    for k, ck in enumerate(scaled_centers):
        torch.sub(s, ck, out=buf)
        buf.mul_(buf).clamp_(max=_MAX_EXPONENT).neg_().exp_()
        out[k] += buf.sum()


def _kernel_grad(s: Tensor, scaled_centers: list[float], g: list[float]) -> Tensor:
    """sum_k g_k * d/ds' exp(-(s' - c_k)^2) = sum_k g_k * (-2 t_k) exp(-t_k^2), t_k = s' - c_k.

    Same shape as ``s``; the caller applies the chain-rule factor sqrt(alpha) of s' = sqrt(a) s.
    """
    grad = torch.zeros_like(s)
    t = torch.empty_like(s)
    e = torch.empty_like(s)
    for ck, gk in zip(scaled_centers, g):
        if gk == 0.0:
            continue
        torch.sub(s, ck, out=t)
        torch.mul(t, t, out=e).clamp_(max=_MAX_EXPONENT).neg_().exp_()
        grad.addcmul_(t, e, value=-2.0 * gk)
    return grad


# Masked pairs (j <= i) are moved this far past the last bin, in sqrt(alpha) units: 8^2 > 50, so
# each lands on the exponent clamp and adds exp(-50) per bin, like any far-away pair.
_MASKED_OFFSET = 8.0


class _ChunkedPairHistogram(torch.autograd.Function):
    """Unnormalised soft histogram of the pairwise dot products x_i . x_j, i < j.

    Forward saves only ``x`` (n, d); backward recomputes each row chunk. Rows [a, b) are paired
    with columns [a, n) only, so the lower triangle of the n x n similarity matrix is never
    computed; inside the leading (c, c) block the pairs j <= i are masked.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bins: int, alpha: float, chunk_size: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bins, ctx.alpha, ctx.chunk_size = bins, alpha, chunk_size
        centers = _scaled_centers(bins, alpha)
        out = torch.zeros(bins, device=x.device, dtype=x.dtype)
        for _, _, s, _ in _chunk_sims(x, chunk_size, alpha):
            _kernel_sums(s, centers, out, torch.empty_like(s))
        return out

    @staticmethod
    @once_differentiable  # backward is hand-written: make double backward an error, not wrong
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        centers = _scaled_centers(ctx.bins, ctx.alpha)
        # One host sync per backward, not one per bin. Unit-scale g so that products with the
        # kernel's smallest values stay out of the subnormal range (see _MAX_EXPONENT).
        g = grad_out.tolist()
        g_max = max(abs(v) for v in g)
        if g_max == 0.0:
            return torch.zeros_like(x), None, None, None
        g = [v / g_max for v in g]
        grad_x = torch.zeros_like(x)
        for a, b, s, lower in _chunk_sims(x, ctx.chunk_size, ctx.alpha):
            d_s = _kernel_grad(s, centers, g)  # dL/ds_ij for i in [a, b), j in [a, n)
            d_s[:, : b - a].masked_fill_(lower, 0.0)
            d_s.mul_(math.sqrt(ctx.alpha) * g_max)  # chain rule of s' = sqrt(alpha) s; undo g
            # s_ij = x_i . x_j: row i gets dL/ds_ij x_j, and row j gets dL/ds_ij x_i.
            grad_x[a:b] += d_s @ x[a:]
            grad_x[a:] += d_s.T @ x[a:b]
        return grad_x, None, None, None


def _scaled_centers(bins: int, alpha: float) -> list[float]:
    scale = math.sqrt(alpha)
    return [scale * c for c in bin_centers(bins, dtype=torch.float64).tolist()]


def _chunk_sims(x: Tensor, chunk_size: int, alpha: float):
    """Yield (a, b, sims, lower) per row chunk [a, b).

    ``sims`` (b - a, n - a) = sqrt(alpha) * x[a:b] @ x[a:].T, with the pairs j <= i moved past
    the last bin; ``lower`` (b - a, b - a) is the bool mask of those pairs.
    """
    n, scale = x.shape[0], math.sqrt(alpha)
    masks: dict[int, Tensor] = {}
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        if b - a not in masks:
            ones = torch.ones(b - a, b - a, dtype=torch.bool, device=x.device)
            masks[b - a] = ones.tril()
        s = (x[a:b] @ x[a:].T).mul_(scale)
        s[:, : b - a].masked_fill_(masks[b - a], scale + _MASKED_OFFSET)
        yield a, b, s, masks[b - a]


def soft_histogram(x: Tensor, bins: int = 40, alpha: float = 190.0,
                   chunk_size: int = 1024) -> Tensor:
    """Soft histogram of pairwise cosine similarities with O(chunk_size * n) memory.

    Same value as ``soft_histogram_naive``. Peak extra memory is about four (chunk_size, n)
    buffers in the compute dtype (256 MB for chunk_size=1024, n=16384, float32). Cost: about
    6 (forward) + 6 (backward) elementwise passes per bin over the n^2/2 pairs, memory-bound.

    Args:
        x: (n, d) vectors, any float dtype, CPU or CUDA; rows are l2-normalised here.
        chunk_size: rows per chunk; larger is faster on GPU and uses more memory.
    Returns:
        (bins,) histogram summing to 1, differentiable w.r.t. ``x``; float32 for 16/32-bit
        input, float64 for float64 input.
    """
    _check_inputs(x, bins, alpha)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    xn = F.normalize(x.to(_compute_dtype(x)), dim=1)
    raw = _ChunkedPairHistogram.apply(xn, bins, float(alpha), int(chunk_size))
    return raw / raw.sum()


class HistogramRelationLoss(nn.Module):
    """``KL(P_t || P_s)`` between a fixed teacher histogram and the codebook's soft histogram.

    The teacher is a non-persistent float32 buffer: it follows the module across devices (but
    not dtype casts) and is not in the state dict. It is an input named by the config (a
    provenance-stamped teacher file, ``glotok.losses.teacher``), not trained state. This module
    sits inside the tokenizer (the semantic quantizer's regulariser), so a persistent buffer
    would make tokenizer checkpoints unloadable without the loss (inference, hist_weight=0) and
    would pin a stale teacher on resume.

    Args:
        teacher_hist: (bins,) non-negative, summing to 1 (within 1e-4; renormalised here).
        eps: added to P_s inside the log, so empty student bins give a finite loss.
    """

    teacher_hist: Tensor

    def __init__(self, teacher_hist: Tensor, bins: int = 40, alpha: float = 190.0,
                 chunk_size: int = 1024, eps: float = 1e-8):
        super().__init__()
        teacher = torch.as_tensor(teacher_hist, dtype=torch.float64).detach().cpu()
        if teacher.dim() != 1 or teacher.numel() != bins:
            raise ValueError(f"teacher histogram has shape {tuple(teacher.shape)}, expected "
                             f"({bins},): build the teacher with the same number of bins")
        if not torch.isfinite(teacher).all() or (teacher < 0).any():
            raise ValueError("teacher histogram has negative or non-finite entries")
        total = teacher.sum().item()
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"teacher histogram sums to {total:.6g}, expected 1 (within 1e-4)")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.bins, self.alpha, self.chunk_size, self.eps = bins, float(alpha), chunk_size, eps
        self.register_buffer("teacher_hist", (teacher / total).float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # DeepSpeed's bf16 mode calls module.bfloat16() on the whole model, which would round
        # the teacher to 8 mantissa bits; let device moves through but keep it float32.
        teacher = self.teacher_hist
        super()._apply(fn, recurse)
        self.teacher_hist = teacher.to(device=fn(teacher).device)
        return self

    def student_histogram(self, codebook: Tensor) -> Tensor:
        """(bins,) soft histogram of the codebook, differentiable; detach it for logging."""
        if codebook.dim() != 2:
            raise ValueError(f"codebook must be 2-D (n, d), got shape {tuple(codebook.shape)}")
        return soft_histogram(codebook, self.bins, self.alpha, self.chunk_size)

    def forward(self, codebook: Tensor) -> Tensor:
        """Scalar ``KL(P_t || P_s)`` for the (n, d) codebook weights (float32, or float64)."""
        p_s = self.student_histogram(codebook)
        p_t = self.teacher_hist.to(device=p_s.device, dtype=p_s.dtype)
        return F.kl_div(torch.log(p_s + self.eps), p_t, reduction="sum")

    def extra_repr(self) -> str:
        return f"bins={self.bins}, alpha={self.alpha}, chunk_size={self.chunk_size}"
