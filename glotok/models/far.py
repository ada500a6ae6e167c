"""FAR: a factorised autoregressive transformer over GloTok's two index maps (GLOTOK.md,
"AR generator"; FQGAN's ``far_dual.py`` and LlamaGen's ``gpt.py`` are the references).

    sequence  [class, x_0, ..., x_{L-2}]       x_t = Linear(concat(emb_vis(v_t), emb_sem(s_t)))
    trunk     n_layers Llama blocks, causal, 2-D RoPE       -> h_t predicts grid position t
    head      per position, a 2-step causal sequence [h_t, emb_vis(v_t)], head_layers blocks:
              step 0 -> visual logits, step 1 -> semantic logits given v_t (teacher-forced)

Each grid position thus takes two sub-steps, visual then semantic, but only one trunk step.
The trunk's RoPE rows: the class token is the identity rotation, ``x_t`` takes grid position t
(raster order) -- the position of the token it holds, as LlamaGen. The head uses no RoPE: its
two steps differ by the causal mask and by content.

Parameter counts (``num_params``), 12288 visual + 4096 semantic codes, 1000 classes: FAR-B
383.5M, FAR-L 859.3M. The paper's 415M / 898M are for FQGAN's 16384-entry tables on both
codebooks (417.1M / 901.2M with those sizes): the difference is the embedding and output tables.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from glotok.config_ar import validate_ar_model
from glotok.models.attention import (BACKENDS, CausalSelfAttention, KVCache, resolve_backend,
                                     rope_2d)

VISUAL, SEMANTIC = 0, 1  # the tokenizer's index layout: indices[:, VISUAL], indices[:, SEMANTIC]


class RMSNorm(nn.Module):
    """Computed in fp32 and cast back: bf16 sums of squares drift over dim=1280."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def swiglu_hidden(dim: int, multiple_of: int) -> int:
    """LlamaGen's SwiGLU width: 8/3 * dim (the FLOPs of a 4x GELU MLP), rounded up."""
    return -(-int(2 * 4 * dim / 3) // multiple_of) * multiple_of


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), hidden width :func:`swiglu_hidden`."""

    def __init__(self, dim: int, multiple_of: int, dropout: float = 0.0):
        super().__init__()
        hidden = swiglu_hidden(dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm Llama block. (B, T, dim) -> (B, T, dim)."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = CausalSelfAttention(cfg.dim, cfg.n_heads, cfg.dropout, cfg.attn_backend)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_multiple_of, cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class FARTransformer(nn.Module):
    """Class-conditional factorised AR model over (visual, semantic) index maps.

    ``cfg``: an :class:`glotok.config_ar.ARModelConfig` (dataclass or structured DictConfig).
    Layers are built one by one into ModuleLists (no deep copies), so DeepSpeed's
    ``zero.Init`` partitions every one of them.
    """

    def __init__(self, cfg: Any):
        super().__init__()
        validate_ar_model(cfg)
        self.cfg = cfg
        self.num_classes, self.grid_size = cfg.num_classes, cfg.grid_size
        self.seq_len = cfg.grid_size ** 2
        d = cfg.dim
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, d)  # + the null class
        self.visual_embedding = nn.Embedding(cfg.visual_vocab_size, d)
        self.semantic_embedding = nn.Embedding(cfg.semantic_vocab_size, d)
        self.token_proj = nn.Linear(2 * d, d, bias=False)
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.head_layers = nn.ModuleList([Block(cfg) for _ in range(cfg.head_layers)])
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.visual_output = nn.Linear(d, cfg.visual_vocab_size, bias=False)
        self.semantic_output = nn.Linear(d, cfg.semantic_vocab_size, bias=False)
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.init_weights()

    def _rope_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        return rope_2d(self.grid_size, self.grid_size, self.cfg.dim // self.cfg.n_heads,
                       prefix=1, base=self.cfg.rope_base, device=device)

    def _apply(self, fn, recurse=True):
        # The RoPE table is a function of the config, not state: after .to(bf16), .half() or
        # to_empty() it is rebuilt in fp32 on the new device, since bf16 cos/sin would blur the
        # positions and to_empty() leaves garbage.
        super()._apply(fn, recurse)
        self.rope = self._rope_table(self.rope.device)
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """LlamaGen's init: N(0, init_std) for every Linear and Embedding, zero output layers
        (the first loss is exactly log(vocab)). For a model made on the meta device: call it
        after ``to_empty``."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.visual_output.weight)
        nn.init.zeros_(self.semantic_output.weight)

    # ---------------------------------------------------------------------------------------
    # Pieces shared by training and sampling
    # ---------------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_attention_backend(self, backend: str) -> None:
        """"auto" | "flash" | "sdpa" for every attention layer (see attention.resolve_backend)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend '{backend}' is not one of {BACKENDS}")
        for m in self.modules():
            if isinstance(m, CausalSelfAttention):
                m.backend = backend

    def attention_backend(self, dtype: Optional[torch.dtype] = None) -> str:
        """The kernel the attention layers run for activations of ``dtype`` (default: the
        parameters' dtype) on this model's device: "flash" or "sdpa"."""
        attn = self.layers[0].attention
        p = attn.wqkv.weight
        return resolve_backend(attn.backend, p.device, dtype or p.dtype)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class (index ``num_classes``) with probability
        ``class_dropout``, drawn from torch's global RNG. (B,) -> (B,)."""
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def embed_tokens(self, visual: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """(B, T) visual and semantic indices -> (B, T, dim)."""
        return self.token_proj(torch.cat([self.visual_embedding(visual),
                                          self.semantic_embedding(semantic)], dim=-1))

    def embed_sequence(self, labels: torch.Tensor, visual: torch.Tensor,
                       semantic: torch.Tensor) -> torch.Tensor:
        """Class token then tokens: labels (B,), indices (B, T) -> (B, 1 + T, dim)."""
        return torch.cat([self.class_embedding(labels)[:, None],
                          self.embed_tokens(visual, semantic)], dim=1)

    def trunk(self, x: torch.Tensor, start: int = 0,
              caches: Optional[list[KVCache]] = None) -> torch.Tensor:
        """Sequence positions [start, start + T) of the trunk: (B, T, dim) -> (B, T, dim).

        Position 0 is the class token, position i >= 1 holds grid token i - 1. With ``caches``
        (one per layer, from :meth:`new_caches`), earlier positions come from the cache.
        """
        if start + x.shape[1] > self.rope.shape[0]:
            raise ValueError(f"sequence positions [{start}, {start + x.shape[1]}) exceed the "
                             f"model's 1 + {self.seq_len} (class token + {self.grid_size}^2 grid)")
        rope = self.rope[start:start + x.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if caches is None else caches[i])
        return x

    def _head(self, z: torch.Tensor, caches: Optional[list[KVCache]]) -> torch.Tensor:
        for i, layer in enumerate(self.head_layers):
            z = layer(z, None, None if caches is None else caches[i])
        return self.norm(z)

    def head(self, h: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sub-steps, teacher-forced. h (B, T, dim), visual (B, T) ->
        (visual logits (B, T, V_vis), semantic logits (B, T, V_sem)), fp32."""
        b, t, d = h.shape
        z = torch.stack([h, self.visual_embedding(visual)], dim=2).reshape(b * t, 2, d)
        z = self._head(z, None).reshape(b, t, 2, d)
        return (self.visual_output(z[:, :, 0]).float(),
                self.semantic_output(z[:, :, 1]).float())

    def head_visual(self, h: torch.Tensor, caches: Optional[list[KVCache]] = None) -> torch.Tensor:
        """Sub-step 1 for one position: h (B, dim) -> visual logits (B, V_vis), fp32.
        With ``caches`` (head caches of :meth:`new_caches`) they are reset and filled."""
        if caches is not None:
            for c in caches:
                c.reset()
        return self.visual_output(self._head(h[:, None], caches)[:, 0]).float()

    def head_semantic(self, h: torch.Tensor, visual: torch.Tensor,
                      caches: Optional[list[KVCache]] = None) -> torch.Tensor:
        """Sub-step 2: h (B, dim), visual (B,) -> semantic logits (B, V_sem), fp32. With
        ``caches``, only the visual step runs, attending to the cached h step."""
        e = self.visual_embedding(visual)[:, None]
        z = e if caches is not None else torch.cat([h[:, None], e], dim=1)
        return self.semantic_output(self._head(z, caches)[:, -1]).float()

    def new_caches(self, batch: int, dtype: Optional[torch.dtype] = None
                   ) -> tuple[list[KVCache], list[KVCache]]:
        """Empty KV caches for decoding: (trunk caches for 1 + grid^2 positions, head caches for
        the 2 sub-steps), one per layer, on the model's device."""
        p = self.token_proj.weight
        dtype = dtype or p.dtype
        heads, head_dim = self.cfg.n_heads, self.cfg.dim // self.cfg.n_heads

        def make(n: int, length: int) -> list[KVCache]:
            return [KVCache(batch, length, heads, head_dim, dtype=dtype, device=p.device)
                    for _ in range(n)]

        return make(len(self.layers), 1 + self.seq_len), make(len(self.head_layers), 2)

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------

    def flatten_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 2, h, w) on the model's grid, or (B, 2, L) in raster order with L <= grid^2,
        -> (B, 2, L) int64."""
        if indices.dim() == 4 and indices.shape[1] == 2:
            if tuple(indices.shape[2:]) != (self.grid_size, self.grid_size):
                raise ValueError(f"index map of grid {tuple(indices.shape[2:])}, but the model "
                                 f"is built for {self.grid_size}x{self.grid_size} "
                                 f"(model.grid_size)")
            indices = indices.flatten(2)
        if indices.dim() != 3 or indices.shape[1] != 2:
            raise ValueError(f"expected indices of shape (B, 2, h, w) or (B, 2, L), "
                             f"got {tuple(indices.shape)}")
        if not 1 <= indices.shape[2] <= self.seq_len:
            raise ValueError(f"sequence of {indices.shape[2]} positions; the model holds 1 to "
                             f"{self.seq_len} ({self.grid_size}^2)")
        if indices.dtype.is_floating_point:
            raise TypeError(f"indices must be integers, got {indices.dtype}")
        return indices.long()

    def forward(self, indices: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced training forward.

        indices: (B, 2, h, w) or (B, 2, L) -- [:, 0] visual, [:, 1] semantic; labels: (B,) class
        ids in [0, num_classes] (num_classes = null). In training mode labels are dropped to the
        null class with probability ``class_dropout``.

        Returns ``loss`` (mean of the two cross-entropies), ``loss_visual``, ``loss_semantic``
        (scalars, nats per index) and ``logits_visual`` (B, L, V_vis), ``logits_semantic``
        (B, L, V_sem) in fp32.
        """
        idx = self.flatten_indices(indices)
        if labels.shape != (idx.shape[0],):
            raise ValueError(f"labels must have shape ({idx.shape[0]},), got {tuple(labels.shape)}")
        if self.training and self.cfg.class_dropout > 0:
            labels = self.drop_labels(labels)
        visual, semantic = idx[:, VISUAL], idx[:, SEMANTIC]
        # The last token is never an input: nothing comes after it.
        x = self.embed_sequence(labels, visual[:, :-1], semantic[:, :-1])
        h = self.trunk(self.token_dropout(x))
        logits_v, logits_s = self.head(h, visual)
        loss_v = F.cross_entropy(logits_v.flatten(0, 1), visual.flatten())
        loss_s = F.cross_entropy(logits_s.flatten(0, 1), semantic.flatten())
        return {"loss": (loss_v + loss_s) / 2, "loss_visual": loss_v, "loss_semantic": loss_s,
                "logits_visual": logits_v, "logits_semantic": logits_s}
