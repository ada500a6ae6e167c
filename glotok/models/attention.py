"""Causal self-attention for the AR generator: one entry point over two kernels, a KV cache for
decoding, and 2-D rotary position embeddings over the token grid.

:func:`attend` runs FlashAttention-2 (the ``flash_attn`` package) where it can, that is on CUDA
tensors in fp16/bf16 with the package installed, and PyTorch SDPA everywhere else. Backends:
``"auto"`` (that rule), ``"flash"`` (raise if it cannot run) and ``"sdpa"``. Both kernels see
the same (B, T, H, Dh) layout, FlashAttention's, so the choice never changes shapes.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):  # absent, or built against another torch/CUDA
        return False
    return True


def _flash_unusable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if torch.device(device).type != "cuda":
        return f"FlashAttention needs CUDA tensors, these are on {device}"
    if dtype not in _FLASH_DTYPES:
        return f"FlashAttention needs fp16 or bf16 tensors, these are {dtype}"
    if not flash_attn_installed():
        return "the flash_attn package is not installed (pip install 'glotok[gpu]')"
    return None


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel that ``backend`` means for tensors on ``device`` in ``dtype``: "flash" or "sdpa".

    Raises ValueError for an unknown name and RuntimeError for "flash" where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend '{backend}' is not one of {BACKENDS}")
    if backend == "sdpa":
        return "sdpa"
    reason = _flash_unusable_reason(torch.device(device), dtype)
    if backend == "flash" and reason is not None:
        raise RuntimeError(f"attention backend 'flash' was requested but {reason}; "
                           f"use backend 'auto' (falls back to SDPA) or 'sdpa'")
    return "sdpa" if reason is not None else "flash"


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    ``k``, ``v``: (B, max_len, H, Dh), the layout ``flash_attn_with_kvcache`` updates in place.
    ``length``: positions filled so far, the same for every row of the batch.
    """

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, max_len, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        # Stale entries past `length` are never read, so there is nothing to clear.
        self.length = 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
           cache: Optional[KVCache] = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention. q, k, v: (B, T, H, Dh) -> (B, T, H, Dh).

    Without a cache, position t attends to positions <= t of the same call. With one, the T new
    keys/values are written at ``cache.length``, each query attends to every cached position up
    to its own, and ``cache.length`` advances by T.
    """
    kind = resolve_backend(backend, q.device, q.dtype)
    if cache is None:
        if kind == "flash":
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, causal=True)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    start, t = cache.length, q.shape[1]
    if start + t > cache.max_len:
        raise RuntimeError(f"KV cache holds {cache.max_len} positions; cannot append {t} "
                           f"after {start}: build the cache for the full sequence length")
    if kind == "flash":
        from flash_attn import flash_attn_with_kvcache

        seqlens = torch.full((q.shape[0],), start, dtype=torch.int32, device=q.device)
        # Writes k, v into the cache at `seqlens`; causal is aligned to the end of the cache.
        out = flash_attn_with_kvcache(q, cache.k, cache.v, k=k, v=v, cache_seqlens=seqlens,
                                      causal=True)
    else:
        cache.k[:, start:start + t] = k
        cache.v[:, start:start + t] = v
        keys = cache.k[:, :start + t].transpose(1, 2)
        values = cache.v[:, :start + t].transpose(1, 2)
        mask = None
        if t > 1 and start > 0:
            # SDPA's is_causal aligns to the top-left corner; new queries sit at the bottom-right.
            mask = torch.ones(t, start + t, dtype=torch.bool, device=q.device).tril(start)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             is_causal=t > 1 and start == 0).transpose(1, 2)
    cache.length = start + t
    return out


# --------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_2d(grid_h: int, grid_w: int, head_dim: int, *, prefix: int = 0, base: float = 10000.0,
            device: torch.device | str | None = None) -> torch.Tensor:
    """(prefix + grid_h*grid_w, head_dim/2, 2) table of (cos, sin) per channel pair.

    The first half of each head's channel pairs rotates with the row, the second with the
    column (LlamaGen's layout). Grid positions follow raster order. The ``prefix`` rows (the
    class tokens) are the identity rotation: they hold no place on the grid, so attention to
    them depends on content alone. LlamaGen fills these rows with zeros, which zeroes the class
    token's query and key; the identity keeps them content-addressable.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / (base ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    rows = torch.arange(grid_h, dtype=torch.float32, device=device)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device)
    angles = torch.cat([torch.outer(rows, freqs)[:, None, :].expand(grid_h, grid_w, quarter),
                        torch.outer(cols, freqs)[None, :, :].expand(grid_h, grid_w, quarter)],
                       dim=-1).reshape(grid_h * grid_w, 2 * quarter)
    angles = torch.cat([angles.new_zeros(prefix, 2 * quarter), angles])
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs. x: (B, T, H, Dh); table: (T, Dh/2, 2) -> (B, T, H, Dh), x's dtype.

    Computed in fp32: bf16 angles lose the position resolution of a 16x16 grid's far corner.
    """
    xs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, Dh/2, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                       xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention without biases. (B, T, dim) -> (B, T, dim).

    ``rope``: (T, Dh/2, 2) rows for the T input positions, or None for no rotation.
    ``backend``: see :func:`resolve_backend`; a plain attribute, so it can be switched per model.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.backend = backend
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attend(q, k, v, cache=cache, backend=self.backend)
        return self.resid_dropout(self.wo(out.reshape(b, t, d)))


__all__ = ["BACKENDS", "KVCache", "CausalSelfAttention", "apply_rope", "attend",
           "flash_attn_installed", "resolve_backend", "rope_2d"]
