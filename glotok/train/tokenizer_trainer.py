"""The GloTok tokenizer trainer: a generator engine and a discriminator engine under DeepSpeed.

Reads top-down: build -> resume from the newest complete checkpoint -> ``while step < max:
train_step(); log(); maybe save()`` -> final checkpoint and reconstruction grid.

The same code runs as one plain process (CPU, the embedded default), under ``torchrun``, and on
every Ray Train worker of a GPU cluster: :func:`init_distributed` reads the environment.

GAN step (works at ZeRO 0-3, see STACK.md §2.5): the generator step calls the discriminator
through ``d_engine.module`` with its parameters frozen, so the discriminator engine's hooks see
no gradient; the discriminator step then runs through its own engine on ``sg[recon]``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import deepspeed
import torch
from omegaconf import OmegaConf

from glotok.config import ConfigError, to_dict, to_yaml
from glotok.losses.tokenizer_loss import TokenizerObjective
from glotok.models.tokenizer import GloTokTokenizer
from glotok.models.quantizer import code_statistics
from glotok.train.checkpoint import DS_TAG, CheckpointManager
from glotok.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from glotok.train.ema import EMA
from glotok.train.metrics import MetricsLogger, memory_stats, sync_run_files
from glotok.train.preemption import StopSignal
from glotok.train.rng import rng_state, seed_everything, set_rng_state
from glotok.utils.images import reconstruction_grid, save_png
from glotok.utils.storage import Storage, local_cache_dir

log = logging.getLogger(__name__)


def resolve_precision(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[setting]


def deepspeed_config(cfg, dtype: torch.dtype) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        # We pass our own torch.optim.Adam: a config-declared optimizer would JIT-build
        # DeepSpeed's fused Adam, minutes on a CPU machine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _adam(params, lr: float, cfg, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")


def BatchStream(stream):  # noqa: N802 - the name __init__ builds its stream with
    """The trainer's batch source. :class:`glotok.data.stream.ShardStream` already is one:
    endless, ``next()`` -> ``{"image", "label", "key", "skipped"}``, and checkpointable with an
    exact position per DataLoader worker (``state_dict``, ``load_state_dict``,
    ``load_state_dict_repartitioned``), so nothing is replayed on resume."""
    return stream


def build_teacher_tensor(hist_cfg) -> torch.Tensor:
    from glotok.config import SAMPLE_TEACHER
    from glotok.losses.teacher import TeacherHistogram

    if hist_cfg.teacher == SAMPLE_TEACHER:
        from glotok.data.sample_teacher import ensure_sample_teacher

        path = ensure_sample_teacher(bins=hist_cfg.bins, alpha=hist_cfg.alpha)
    else:
        path = hist_cfg.teacher
    return TeacherHistogram.load(path).tensor()


def build_image_loader(data_cfg, image_size: int, dist_info: DistInfo, train: bool = True):
    """This rank's :class:`~glotok.data.stream.ShardStream` over ``data.source``: the built-in
    sample set (its local shards and manifest), a manifest (local or ``s3://``) or a shard
    pattern. ``train``: endless, shuffled, random crops; else one ordered pass of center crops.
    """
    from glotok.data.storage import StorageOptions
    from glotok.data.stream import ShardStream

    source = data_cfg.source
    if source == "sample":
        from glotok.data.sample import MANIFEST_NAME, ensure_sample_shards

        source = str(Path(ensure_sample_shards()[0]).with_name(MANIFEST_NAME))
    return ShardStream(
        source, image_size, data_cfg.batch_size, train=train, num_workers=data_cfg.num_workers,
        prefetch_factor=data_cfg.prefetch_factor, read_ahead=data_cfg.read_ahead,
        rank=dist_info.rank, world_size=dist_info.world_size, seed=data_cfg.seed,
        crop_range=data_cfg.crop_range, random_flip=data_cfg.random_flip,
        shuffle_buffer=data_cfg.shuffle_buffer,
        options=StorageOptions(data_cfg.s3_endpoint_url, data_cfg.s3_profile),
        retries=data_cfg.retries, retry_backoff=data_cfg.retry_backoff)


class TokenizerTrainer:
    def __init__(self, cfg: Any, stop_check: Optional[Callable[[], bool]] = None):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        # The run lives in `storage` (a local directory or s3://...). Metrics, wandb and images
        # are written to a local directory first (the run directory itself when it is local)
        # and copied to storage with every checkpoint.
        self.storage = Storage(f"{cfg.run.output_dir}/{cfg.run.name}")
        self.run_dir = (Path(self.storage.path()) if self.storage.local
                        else local_cache_dir(f"{cfg.run.name}/run", cfg.checkpoint.local_dir))
        if self.dist.is_main:
            self.storage.write_text("config.yaml", to_yaml(cfg))
        ckpt_storage = self.storage.child("checkpoints")
        staging = (Path(ckpt_storage.path()) / ".staging" if ckpt_storage.local
                   else local_cache_dir(f"{cfg.run.name}/staging", cfg.checkpoint.local_dir))
        self.checkpoints = CheckpointManager(ckpt_storage, staging, cfg.checkpoint.keep_last,
                                             self.dist.rank, self.dist.world_size,
                                             cfg.checkpoint.async_upload)
        self.resume_from = self.checkpoints.latest()
        # A checkpoint from another number of ranks is re-partitioned through DeepSpeed's
        # universal format, which must be chosen when the engines are built.
        self.universal = (self.resume_from is not None and cfg.train.zero_stage > 0
                          and self.resume_from.world_size != self.dist.world_size)
        self.stop = StopSignal(cfg.checkpoint.sigterm_grace_s, stop_check)
        barrier()

        hist = None
        if cfg.loss.hist_weight > 0:
            from glotok.losses.histogram import HistogramRelationLoss

            h = cfg.loss.hist
            hist = HistogramRelationLoss(build_teacher_tensor(h), bins=h.bins, alpha=h.alpha,
                                         chunk_size=h.chunk_size)
        # Seeded right before each model is built, so the initial weights are the same on every
        # rank and in every run, whatever ran before (building a teacher draws random numbers
        # on a cold cache only).
        seed_everything(cfg.train.seed)
        model = GloTokTokenizer(cfg.model, hist_loss=hist)
        ds_cfg = deepspeed_config(cfg, self.dtype)
        if self.universal:
            ds_cfg["checkpoint"] = {"load_universal": True}
        self.g_engine, *_ = deepspeed.initialize(
            model=model, optimizer=_adam(model.parameters(), cfg.optim.lr, cfg.optim, self.device),
            config=ds_cfg)
        self.engines = {"generator": self.g_engine}
        self.d_engine = None
        if cfg.loss.gan_weight > 0:
            from glotok.models.discriminator import PatchGANDiscriminator

            seed_everything(cfg.train.seed + 1)
            disc = PatchGANDiscriminator(3, cfg.loss.disc.ndf, cfg.loss.disc.n_layers)
            self.d_engine, *_ = deepspeed.initialize(
                model=disc, optimizer=_adam(disc.parameters(), cfg.optim.disc_lr or cfg.optim.lr,
                                            cfg.optim, self.device),
                config=ds_cfg)
            self.engines["discriminator"] = self.d_engine
        perceptual = None
        if cfg.loss.perceptual_weight > 0:
            from glotok.models.perceptual import build_perceptual

            p = cfg.loss.perceptual
            perceptual = build_perceptual(p.backbone, p.vgg_path, p.lin_path).to(self.device)
        self.objective = TokenizerObjective(cfg.loss, perceptual)
        self.ema = EMA(self.g_engine.module, cfg.train.ema_decay) if cfg.train.ema else None

        self.stream = BatchStream(build_image_loader(cfg.data, cfg.model.image_size, self.dist))
        self.step = 0
        self.samples_seen = 0
        # Per-rank data seeds differ, so the augmentation RNG in this process is seeded by rank.
        seed_everything(cfg.train.seed * 1000 + self.dist.rank + 1)

    # ---- state ---------------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict]:
        trainer = {"step": self.step, "samples_seen": self.samples_seen, "config": to_dict(self.cfg),
                   "ema": self.ema.state_dict() if self.ema else None}
        return trainer, {"rng": rng_state(), "data": self.stream.state_dict()}

    def save(self, blocking: bool = False) -> float:
        """Checkpoint the current step; returns the seconds training was blocked."""
        trainer, rank_state = self.state()
        stall = self.checkpoints.save(self.step, self.engines, trainer, rank_state,
                                      blocking=blocking)
        if self.dist.is_main and not self.storage.local:
            sync_run_files(self.run_dir, self.storage)
        return stall

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if there is one."""
        info = self.resume_from
        if info is None:
            return False
        saved = self.checkpoints.read_trainer_state(info).get("config", {}).get("model")
        if saved is not None and saved != to_dict(self.cfg)["model"]:
            raise ConfigError(f"run {self.storage.url} holds a checkpoint of a different model "
                              f"(config key 'model' differs); use another run.name")
        tag = (self.checkpoints.prepare_universal(info, list(self.engines)) if self.universal
               else DS_TAG)
        trainer, rank_state = self.checkpoints.load(info, self.engines, tag=tag)
        self.step, self.samples_seen = trainer["step"], trainer["samples_seen"]
        if self.ema is not None and trainer.get("ema") is not None:
            self.ema.load_state_dict(trainer["ema"])
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        if info.world_size == self.dist.world_size:
            self.stream.load_state_dict(rank_state["data"])
        else:
            self.stream.load_state_dict_repartitioned(
                self.checkpoints.read_all_rank_states(info), info.world_size)
        log.info("resumed from %s at step %d (saved by %d ranks, now %d)", info.url, self.step,
                 info.world_size, self.dist.world_size)
        return True

    # ---- one step ------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        g, d = self.g_engine, self.d_engine
        x = images.to(self.device, non_blocking=True)
        x_in = x.to(self.dtype)
        gan = d is not None and self.objective.gan_active(self.step)

        out = g(x_in)
        logits_fake = None
        if gan:
            d.module.requires_grad_(False)
            logits_fake = d.module(out["recon"])
        loss, terms = self.objective.generator_loss(x, out, logits_fake)
        g.backward(loss)
        g.step()
        if self.ema is not None:
            self.ema.update(g.module)

        if gan:
            d.module.requires_grad_(True)
            fake = out["recon"].detach()
            d_loss, d_terms = self.objective.discriminator_loss(d(x_in), d(fake))
            d.backward(d_loss)
            d.step()
            terms.update(d_terms)
        return terms

    # ---- loop ----------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run to ``train.max_steps`` (or until asked to stop). Returns a summary dict;
        ``stopped`` is True when a signal ended the run early, after a checkpoint."""
        cfg = self.cfg
        self.resume()
        metrics = MetricsLogger(self.run_dir, enabled=self.dist.is_main,
                                total_steps=cfg.train.max_steps, start_step=self.step,
                                config=to_dict(cfg), wandb=cfg.run.wandb,
                                project=cfg.run.wandb_project, run_name=cfg.run.name)
        self.stop.install()
        sums: dict[str, torch.Tensor] = {}
        n, t_last, last, stopped = 0, time.perf_counter(), {}, False
        timing = {"data_s": 0.0, "ckpt_stall_s": 0.0}
        self._reset_usage()
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                batch = next(self.stream)
                timing["data_s"] += time.perf_counter() - t0
                terms = self.train_step(batch["image"])
                self.step += 1
                self.samples_seen += batch["image"].shape[0] * self.dist.world_size
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v
                n += 1
                metrics.advance()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    last = self._summarise(sums, n, time.perf_counter() - t_last, timing)
                    metrics.log(self.step, last)
                    sums, n, t_last = {}, 0, time.perf_counter()
                    timing = {"data_s": 0.0, "ckpt_stall_s": 0.0}
                if cfg.train.image_every and self.step % cfg.train.image_every == 0:
                    self.write_grid(metrics, f"images/step_{self.step:08d}.png")
                if self.stop.agreed(self.device):
                    stopped = True
                    break
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    timing["ckpt_stall_s"] += self.save()
            latest = self.checkpoints.latest()
            if stopped or latest is None or latest.step != self.step:
                self.save(blocking=True)
            self.checkpoints.wait()
            grid = None
            if not stopped:
                grid = self.write_grid(metrics, "reconstructions.png")
            if self.dist.is_main:
                metrics.close()
                if not self.storage.local:
                    sync_run_files(self.run_dir, self.storage)
        finally:
            self.stop.uninstall()
            metrics.close()
        latest = self.checkpoints.latest()
        result = {"step": self.step, "metrics": last, "run_dir": self.storage.url,
                  "checkpoint": latest.url if latest else None,
                  "grid": f"{self.storage.url}/reconstructions.png" if grid else None,
                  "stopped": stopped, "save": dict(self.checkpoints.last_save)}
        if self.dist.is_main:
            self.storage.write_text("result.json", json.dumps(result, indent=1))
        return result

    def _reset_usage(self) -> None:
        for q in self.g_engine.module.quantizers.values():
            q.reset_usage()

    def _summarise(self, sums: dict, n: int, dt: float, timing: dict) -> dict[str, float]:
        keys = sorted(sums)
        # One reduction for all loss terms (means over ranks) and one per codebook's counts.
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) / n
                           for k in keys])
        vec = all_reduce_sum(vec) / self.dist.world_size
        out = {f"loss/{k}": float(v) for k, v in zip(keys, vec.tolist())}
        for name, q in self.g_engine.module.quantizers.items():
            counts = all_reduce_sum(q.usage.clone())
            stats = code_statistics(counts)
            out[f"codebook/{name}_usage"] = stats["usage"]
            out[f"codebook/{name}_perplexity"] = stats["perplexity"]
        self._reset_usage()
        images = n * self.cfg.data.batch_size * self.dist.world_size
        out["img_per_s"] = images / max(dt, 1e-9)
        out["img_per_s_per_worker"] = out["img_per_s"] / self.dist.world_size
        out["lr"] = self.g_engine.get_lr()[0]
        out["data_wait_frac"] = timing["data_s"] / max(dt, 1e-9)
        if timing["ckpt_stall_s"]:
            out["ckpt/stall_s"] = timing["ckpt_stall_s"]
        if "save_s" in self.checkpoints.last_save:
            out["ckpt/save_s"] = self.checkpoints.last_save["save_s"]
        out.update(memory_stats(self.device))
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}

    @torch.no_grad()
    def write_grid(self, metrics: MetricsLogger, rel: str) -> Path:
        """Originals beside reconstructions of a fixed, center-cropped batch. Collective under
        ZeRO-3 (every rank runs the forward); rank 0 writes the PNG."""
        if not hasattr(self, "_grid_batch"):
            loader = build_image_loader(OmegaConf.merge(self.cfg.data, {"num_workers": 0}),
                                        self.cfg.model.image_size,
                                        DistInfo(0, 1, 0, self.device), train=False)
            self._grid_batch = next(iter(loader))["image"][:8]
        model = self.g_engine.module
        model.eval()
        x = self._grid_batch.to(self.device)
        recon = model(x.to(self.dtype))["recon"].float()
        model.train()
        path = self.run_dir / rel
        if self.dist.is_main:
            grid = reconstruction_grid(x, recon)
            save_png(grid, path)
            metrics.image(self.step, "reconstructions", grid)
        return path
