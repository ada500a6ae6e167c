"""The residual learning module: recovers part of the detail that quantisation loses."""

from __future__ import annotations

import torch
import torch.nn as nn

from glotok.models.layers import PositionEmbedding2D, TransformerBlock, init_linear


class ResidualRefiner(nn.Module):
    """Predicts the quantisation error ``z - z_q`` from the quantised map ``z_q``.

    (B, D, h, w) -> (B, D, h, w). Linear(D -> width), a learned 2-D position embedding, one
    pre-LN transformer block, Linear(width -> D) initialised to zero, so a new tokenizer starts
    as if the module were absent (the refined latent equals ``z_q``).

    It adds no tokens: its input is a function of the code indices only, so ``decode(indices)``
    reproduces the refined latent exactly.
    """

    def __init__(self, dim: int, grid: int, width: int = 512, heads: int = 8,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, width)
        self.pos = PositionEmbedding2D(grid, width)
        self.block = TransformerBlock(width, heads, mlp_ratio)
        self.proj_out = nn.Linear(width, dim)
        init_linear(self)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        b, d, h, w = z_q.shape
        t = self.proj_in(z_q.flatten(2).transpose(1, 2)) + self.pos(h, w)
        return self.proj_out(self.block(t)).transpose(1, 2).reshape(b, d, h, w)
