"""Branch adapters: turn the shared encoder output into a branch's pre-quantisation features."""

from __future__ import annotations

import torch
import torch.nn as nn

from glotok.models.layers import PositionEmbedding2D, TransformerBlock, init_linear


class TransformerAdapter(nn.Module):
    """FQGAN-style adapter: a transformer over the latent grid, then a projection to code dim.

    (B, in_ch, h, w) -> (B, out_dim, h, w). With ``layers=0`` it is a 1x1 convolution.
    """

    def __init__(self, in_ch: int, out_dim: int, grid: int, layers: int, width: int, heads: int):
        super().__init__()
        self.layers = layers
        if layers == 0:
            self.proj = nn.Conv2d(in_ch, out_dim, 1)
            return
        self.proj_in = nn.Linear(in_ch, width)
        self.pos = PositionEmbedding2D(grid, width)
        # Blocks are built one by one (not nn.TransformerEncoder's deep copies) so that
        # deepspeed.zero.Init partitions every one of them.
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim)
        init_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers == 0:
            return self.proj(x)
        b, c, h, w = x.shape
        t = self.proj_in(x.flatten(2).transpose(1, 2)) + self.pos(h, w)
        for block in self.blocks:
            t = block(t)
        return self.proj_out(self.norm(t)).transpose(1, 2).reshape(b, -1, h, w)
