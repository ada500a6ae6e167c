"""Class-conditional generation from a :class:`glotok.models.far.FARTransformer`.

Each grid position takes one trunk step and two head sub-steps: the visual index is sampled
first, then the semantic index given it. With the KV cache (the default) the trunk runs once on
the class token (prefill) and then once per new token; without it, every position recomputes
the whole prefix (the reference the cache is tested and benchmarked against).

Classifier-free guidance doubles the batch with the null class and mixes the logits as
``uncond + s * (cond - uncond)``, written as ``cond + (s - 1) * (cond - uncond)`` so that s = 1
gives the conditional logits bit for bit. Randomness comes only from ``generator``: the same
seed gives the same indices, with or without the cache and with or without guidance at s = 1.
"""

from __future__ import annotations

from typing import Optional

import torch

from glotok.models.far import SEMANTIC, VISUAL, FARTransformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus of mass top_p to -inf.

    logits: (B, V) -> (B, V), a new tensor. ``top_k=0`` and ``top_p=1`` turn each filter off;
    the most likely index always survives.
    """
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop an index when the mass of those before it already reaches top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: Optional[torch.Generator] = None
                  ) -> torch.Tensor:
    """Draw one index per row. logits: (B, V) -> (B,) int64. ``temperature=0``: argmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _guide(logits: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """(2B, V) [cond; uncond] -> (B, V) guided; (B, V) unchanged without guidance."""
    if scale is None:
        return logits
    cond, uncond = logits.chunk(2)
    return cond + (scale - 1.0) * (cond - uncond)


@torch.no_grad()
def generate(model: FARTransformer, labels: torch.Tensor, *, cfg_scale: Optional[float] = 2.0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True) -> torch.Tensor:
    """Sample index maps for class ``labels``.

    labels: (B,) int in [0, num_classes] (num_classes: the null class, unconditional).
    cfg_scale: guidance scale s, or None for no guidance (conditional batch only, half the
    compute; s = 1 gives the same indices at twice the cost). temperature, top_k, top_p apply to
    both sub-steps. generator: the only source of randomness (on the model's device); without
    one, torch's global RNG. use_cache: False recomputes the full prefix at every position.

    Returns (B, 2, grid, grid) int64: [:, 0] visual, [:, 1] semantic, ready for
    ``GloTokTokenizer.decode``.
    """
    if model.training:
        raise RuntimeError("generate() needs the model in eval mode (dropout off): call "
                           "model.eval() first")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    if cfg_scale is not None and cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 or None, got {cfg_scale}")
    device = model.token_proj.weight.device
    labels = labels.to(device).long()
    b, n = labels.shape[0], model.seq_len
    if cfg_scale is not None:
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])

    def draw(logits: torch.Tensor) -> torch.Tensor:
        token = sample_logits(_guide(logits, cfg_scale), temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=generator)
        # Both halves of a guided batch continue from the same sampled token.
        return token if cfg_scale is None else token.repeat(2)

    tokens = torch.zeros(labels.shape[0], 2, n, dtype=torch.long, device=device)
    empty = tokens[:, 0, :0]
    # Under autocast the keys are in the autocast dtype, not the parameters'.
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else None)
    caches = model.new_caches(labels.shape[0], dtype) if use_cache else (None, None)
    trunk_caches, head_caches = caches
    if use_cache:  # prefill: the class token
        h = model.trunk(model.embed_sequence(labels, empty, empty), 0, trunk_caches)[:, -1]
    for t in range(n):
        if not use_cache:
            x = model.embed_sequence(labels, tokens[:, VISUAL, :t], tokens[:, SEMANTIC, :t])
            h = model.trunk(x)[:, -1]
        tokens[:, VISUAL, t] = draw(model.head_visual(h, head_caches))
        tokens[:, SEMANTIC, t] = draw(model.head_semantic(h, tokens[:, VISUAL, t], head_caches))
        if use_cache and t + 1 < n:
            x = model.embed_tokens(tokens[:, VISUAL, t:t + 1], tokens[:, SEMANTIC, t:t + 1])
            h = model.trunk(x, t + 1, trunk_caches)[:, -1]
    return tokens[:b].reshape(b, 2, model.grid_size, model.grid_size)
