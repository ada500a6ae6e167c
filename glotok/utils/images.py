"""Image grids without torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, ncol: int, pad: int = 2) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> one (rows*(H+pad)+pad, ncol*(W+pad)+pad, 3) uint8 image."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    nrow = -(-b // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return grid


def reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    """Pairs side by side: original, reconstruction, original, reconstruction, ... (8 columns)."""
    pairs = torch.stack([originals.float().cpu(), recons.float().cpu()], dim=1).flatten(0, 1)
    return make_grid(pairs, ncol=8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
    return path
