"""Typed configuration of the AR generator (GLOTOK.md, "AR generator"): one dataclass per
component, YAML files under ``configs/ar/``, ``key=value`` overrides.

Loading goes through :func:`glotok.config.load_config` with ``schema=ARJobConfig``; that
function's own validation only knows the tokenizer, so :func:`load_ar_config` adds the AR checks
on top. Use it (or :func:`ar_config_from_dict` for a checkpoint's saved config) rather than
``load_config`` directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from glotok.config import (CheckpointConfig, ClusterConfig, ConfigError, LoopConfig, RunConfig,
                           ShardReadConfig, _validate_cluster, load_config,
                           validate_optim_and_loop)


@dataclass
class ARModelConfig:
    """FAR-style factorised AR transformer. Defaults: FAR-B over glotok-b's codebooks.

    Parameter counts (``glotok.models.far.FARTransformer.num_params``): FAR-B 383.5M, FAR-L
    859.3M with 12288 visual + 4096 semantic codes. The paper's 415M / 898M are for FQGAN's
    16384-entry tables on both codebooks (417.1M / 901.2M here with those sizes).
    """

    visual_vocab_size: int = 12288
    semantic_vocab_size: int = 4096
    grid_size: int = 16  # tokens per side: 256x256 images through a 16x downsampling tokenizer
    num_classes: int = 1000  # one more embedding, index num_classes, is the null class for CFG
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    head_layers: int = 3  # transformer layers of the factorised head (visual -> semantic)
    ffn_multiple_of: int = 256  # SwiGLU hidden = 8/3 * dim rounded up to this (LlamaGen)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    init_std: float = 0.02
    class_dropout: float = 0.1  # label -> null class in training, for classifier-free guidance
    token_dropout: float = 0.1  # on the input embeddings (LlamaGen's token_dropout_p)
    dropout: float = 0.1  # after attention and MLP (LlamaGen's resid/ffn dropout)
    attn_backend: str = "auto"  # auto: FlashAttention on CUDA fp16/bf16 when installed, else SDPA


@dataclass
class ARDataConfig(ShardReadConfig):
    """Pre-tokenized token shards (tools/pretokenize.py): per image, one (2, h, w) index map per
    augmentation variant (flip / ten-crop)."""

    # The token shards' manifest (tools/pretokenize.py writes it last), local or s3://, or a
    # shard pattern such as "/data/imagenet-tokens/train-{000000..000127}.tar".
    source: str = "runs/sample-tokens/manifest.json"
    # "random": one variant drawn per sample and epoch (the FAR recipe); "first": always the
    # first variant, the un-augmented centre crop (for debugging and overfitting checks).
    variant: str = "random"
    global_batch_size: int = 256  # over all ranks; must divide evenly by the world size
    shuffle_buffer: int = 10000


@dataclass
class AROptimConfig:
    """AdamW, constant learning rate (FAR/LlamaGen)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    grad_clip: float = 1.0


@dataclass
class ARTrainConfig(LoopConfig):
    """The shared loop settings; the AR trainer has no image grids."""


@dataclass
class ARSampleConfig:
    """Generation settings (glotok.sampling.generate)."""

    cfg_scale: Optional[float] = 2.0  # null: no guidance (conditional batch only, half the cost)
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    batch_size: int = 32  # per rank
    num_images: int = 50000  # class-balanced: num_images / num_classes per class


@dataclass
class ARJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ARModelConfig = field(default_factory=ARModelConfig)
    data: ARDataConfig = field(default_factory=ARDataConfig)
    optim: AROptimConfig = field(default_factory=AROptimConfig)
    train: ARTrainConfig = field(default_factory=ARTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: ARSampleConfig = field(default_factory=ARSampleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def load_ar_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Any:
    """Load an AR job config (YAML + ``key=value`` overrides) and validate it completely."""
    cfg = load_config(path, overrides, schema=ARJobConfig)
    validate_ar(cfg)
    return cfg


def ar_config_from_dict(data: dict) -> Any:
    """Rebuild a validated, read-only AR config from a plain dict (a checkpoint's config)."""
    cfg = OmegaConf.merge(OmegaConf.structured(ARJobConfig), OmegaConf.create(data))
    validate_ar(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def validate_ar(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the key for anything that cannot run."""
    validate_ar_model(cfg.model)
    d, o, t, s = cfg.data, cfg.optim, cfg.train, cfg.sample
    _require(bool(d.source), "data.source",
             "must name token shards: the manifest.json of tools/pretokenize.py or a pattern")
    _require(d.variant in ("random", "first"), "data.variant",
             f"'{d.variant}' is not one of random, first")
    _require(d.global_batch_size >= 1, "data.global_batch_size", "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 = no shuffling)")
    validate_optim_and_loop(o, t)
    _require(s.cfg_scale is None or s.cfg_scale >= 0, "sample.cfg_scale",
             "must be >= 0, or null for no guidance")
    _require(s.temperature >= 0, "sample.temperature", "must be >= 0 (0 = greedy)")
    _require(s.top_k >= 0, "sample.top_k", "must be >= 0 (0 = off)")
    _require(0 < s.top_p <= 1, "sample.top_p", "must be in (0, 1] (1 = off)")
    _require(s.batch_size >= 1 and s.num_images >= 1, "sample",
             "batch_size and num_images must be >= 1")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = only at the end)")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(cfg.checkpoint.sigterm_grace_s > 0, "checkpoint.sigterm_grace_s", "must be > 0")
    _validate_cluster(cfg.cluster)  # the same Ray layout rules as the tokenizer's
    _require(cfg.run.wandb in ("auto", "online", "offline", "disabled"), "run.wandb",
             f"'{cfg.run.wandb}' is not one of auto, online, offline, disabled")
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name",
             "must be a non-empty name without '/'")


def validate_ar_model(m: Any) -> None:
    """The model section alone: what :class:`FARTransformer` needs to build."""
    for k in ("visual_vocab_size", "semantic_vocab_size", "grid_size", "num_classes", "dim",
              "n_layers", "n_heads", "head_layers", "ffn_multiple_of"):
        v = getattr(m, k)
        _require(v >= 1, f"model.{k}", f"must be >= 1, got {v}")
    _require(m.dim % m.n_heads == 0, "model.dim",
             f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    head_dim = m.dim // max(m.n_heads, 1)
    # 2-D RoPE gives half of each head's channels to the row and half to the column, in pairs.
    _require(head_dim % 4 == 0, "model.n_heads",
             f"head dim {head_dim} (dim/n_heads) must be a multiple of 4 for 2-D RoPE")
    _require(0.0 <= m.class_dropout <= 1.0, "model.class_dropout",
             f"must be in [0, 1], got {m.class_dropout}")
    for k in ("token_dropout", "dropout"):
        v = getattr(m, k)
        _require(0.0 <= v < 1.0, f"model.{k}", f"must be in [0, 1), got {v}")
    _require(m.norm_eps > 0 and m.rope_base > 0 and m.init_std > 0, "model",
             "norm_eps, rope_base and init_std must be > 0")
    _require(m.attn_backend in ("auto", "flash", "sdpa"), "model.attn_backend",
             f"'{m.attn_backend}' is not one of auto, flash, sdpa")
