"""l2-normalised vector quantiser (LlamaGen/ViT-VQGAN style) with usage counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    z: torch.Tensor  # (B, D, h, w) l2-normalised encoder output
    z_q: torch.Tensor  # (B, D, h, w) quantised, straight-through: forward = code, backward = identity
    indices: torch.Tensor  # (B, h, w) int64
    codebook_loss: torch.Tensor  # scalar: ||sg[z] - e||^2
    commit_loss: torch.Tensor  # scalar: ||z - sg[e]||^2 (unweighted; beta is applied by the loss)
    regularizer_loss: Optional[torch.Tensor]  # scalar from the codebook regulariser, if any


class L2NormQuantizer(nn.Module):
    """Nearest-code quantisation on the unit sphere.

    Inputs and codes are l2-normalised, so the nearest code in Euclidean distance is the one of
    highest cosine similarity: ``argmax(z @ e.T)`` is an exact nearest-neighbour search, cheaper
    than materialising all distances.

    ``usage`` counts how often each code was chosen in training since the last
    :meth:`reset_usage`; it is a non-persistent int64 buffer (metrics, not state; integer so a
    bf16 cast of the module leaves it exact).

    ``regularizer``: an optional module called on the normalised codebook (n, D) in training,
    whose scalar result is returned as ``regularizer_loss``. It runs inside this module's
    forward so that, under ZeRO-3, it sees the gathered codebook rather than a partition.
    """

    def __init__(self, num_codes: int, dim: int, regularizer: Optional[nn.Module] = None):
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        self.regularizer = regularizer
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.int64), persistent=False)

    def codebook(self) -> torch.Tensor:
        """(n, D) l2-normalised codes."""
        return F.normalize(self.embedding.weight, dim=-1)

    @torch.no_grad()
    def reset_usage(self) -> None:
        self.usage.zero_()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, D, h, w) normalised codes."""
        if indices.min() < 0 or indices.max() >= self.num_codes:
            raise ValueError(f"code index out of range [0, {self.num_codes}): "
                             f"got [{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) features -> (B, h, w) indices of the nearest codes; no losses, no counts."""
        b, d, h, w = z.shape
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, d)
        return torch.argmax(flat @ self.codebook().to(flat.dtype).t(), dim=1).reshape(b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, D, h, w) pre-quantisation features (any scale)."""
        b, d, h, w = z.shape
        z = F.normalize(z, dim=1)
        codes = self.codebook()
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        with torch.no_grad():
            indices = torch.argmax(flat @ codes.to(flat.dtype).t(), dim=1)
        e = F.embedding(indices, codes).reshape(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        codebook_loss = F.mse_loss(e.float(), z.detach().float())
        commit_loss = F.mse_loss(z.float(), e.detach().float())
        z_q = z + (e - z).detach()
        reg = None
        if self.training:
            with torch.no_grad():
                self.usage += torch.bincount(indices, minlength=self.num_codes)
            if self.regularizer is not None:
                reg = self.regularizer(codes)
        return QuantizerOutput(z=z, z_q=z_q, indices=indices.reshape(b, h, w),
                               codebook_loss=codebook_loss, commit_loss=commit_loss,
                               regularizer_loss=reg)


def code_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Usage fraction and perplexity from a (num_codes,) count vector."""
    total = counts.sum()
    if total <= 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}
