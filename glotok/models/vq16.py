"""The VQGAN / LlamaGen "VQ-16" convolutional encoder and decoder.

With ``ch_mult=[1, 1, 2, 2, 4]`` there are four 2x downsamplings: a 256x256 image becomes a
16x16 grid of ``z_channels`` features. Self-attention runs in the lowest-resolution level and
in the middle block, where the grid is small enough for it to be cheap.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32 if channels % 32 == 0 else 1, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions of a feature map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding, as taming/LlamaGen: keeps an exact 2x reduction with a 3x3 kernel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(ch: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(ch, ch, dropout), AttnBlock(ch), ResnetBlock(ch, ch, dropout))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels = []
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            level = nn.Module()
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == len(ch_mult) - 1:
                    attns.append(AttnBlock(block_in))
            level.blocks = nn.ModuleList(blocks)
            level.attns = nn.ModuleList(attns)
            level.downsample = Downsample(block_in) if i != len(ch_mult) - 1 else nn.Identity()
            levels.append(level)
        self.levels = nn.ModuleList(levels)
        self.mid = _mid_block(block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for j, block in enumerate(level.blocks):
                h = block(h)
                if len(level.attns):
                    h = level.attns[j](h)
            h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*2^(L-1), w*2^(L-1)); the mirror of :class:`Encoder`."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, dropout)
        levels = []
        for i, mult in enumerate(reversed(ch_mult)):
            block_out = ch * mult
            level = nn.Module()
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == 0:
                    attns.append(AttnBlock(block_in))
            level.blocks = nn.ModuleList(blocks)
            level.attns = nn.ModuleList(attns)
            level.upsample = Upsample(block_in) if i != len(ch_mult) - 1 else nn.Identity()
            levels.append(level)
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            for j, block in enumerate(level.blocks):
                h = block(h)
                if len(level.attns):
                    h = level.attns[j](h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
