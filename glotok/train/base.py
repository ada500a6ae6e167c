"""What every glotok trainer shares: run storage, checkpoints, resume, stopping, the loop.

A trainer subclass builds its DeepSpeed engines (in ``self.engines``), its data stream
(``self.stream``: endless, ``next()`` -> a batch dict, checkpointable) and defines
:meth:`Trainer.train_step`. The loop reads top-down::

    resume()                                  newest complete checkpoint, if any
    while step < max_steps:
        batch = next(stream); train_step(batch); step += 1
        log every N; hooks; stop on a signal (all ranks agree); checkpoint every N
    final checkpoint; finish()

The same code runs as one plain process (CPU, the embedded default), under ``torchrun``, and on
every Ray Train worker of a cluster: :func:`init_distributed` reads the environment.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import deepspeed
import torch

from glotok.config import ConfigError, to_dict, to_yaml
from glotok.train.checkpoint import DS_TAG, CheckpointManager
from glotok.train.distributed import all_reduce_sum, barrier, init_distributed
from glotok.train.ema import EMA
from glotok.train.metrics import MetricsLogger, memory_stats, sync_run_files
from glotok.train.preemption import StopSignal
from glotok.train.rng import rng_state, seed_everything, set_rng_state
from glotok.utils.storage import Storage, local_cache_dir

log = logging.getLogger(__name__)


def resolve_precision(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[setting]


class Trainer:
    """Base class; see the module docstring. ``cfg`` needs the sections run, train (max_steps,
    seed, zero_stage, precision, ema, ema_decay, log_every), optim (grad_clip, betas,
    weight_decay), checkpoint and model."""

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
        self.engines: dict[str, Any] = {}
        self.ema: Optional[EMA] = None
        self.stream: Any = None
        self.step = 0
        self.samples_seen = 0

    # ---- building ------------------------------------------------------------------------------

    def deepspeed_config(self, micro_batch: int) -> dict:
        cfg = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.optim.grad_clip,
            "zero_optimization": {"stage": self.cfg.train.zero_stage},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            # We pass our own torch optimiser: a config-declared one would JIT-build DeepSpeed's
            # fused Adam, minutes on a CPU machine.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if self.universal:
            cfg["checkpoint"] = {"load_universal": True}
        return cfg

    def build_engine(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     micro_batch: int):
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=self.deepspeed_config(micro_batch))
        self.engines[name] = engine
        return engine

    def seed_model_init(self, offset: int = 0) -> None:
        """Seed right before building a model: the same initial weights on every rank and in
        every run, whatever ran before (a cold cache may draw random numbers)."""
        seed_everything(self.cfg.train.seed + offset)

    def seed_rank(self) -> None:
        """After building: each rank's own stream of random numbers."""
        seed_everything(self.cfg.train.seed * 1000 + self.dist.rank + 1)

    # ---- subclass hooks ------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's batch; returns detached scalar terms."""
        raise NotImplementedError

    def samples_in(self, batch: dict) -> int:
        raise NotImplementedError

    def extra_metrics(self, steps: int, dt: float) -> dict[str, float]:
        """Trainer-specific figures for a log line covering ``steps`` steps in ``dt`` seconds.
        Collective (all ranks call it)."""
        return {}

    def after_step(self, metrics: MetricsLogger) -> None:
        """Per-step extras, e.g. image grids. Collective."""

    def finish(self, metrics: MetricsLogger) -> dict:
        """After the final checkpoint of a run that was not stopped; extra result fields."""
        return {}

    # ---- state ---------------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict]:
        trainer = {"step": self.step, "samples_seen": self.samples_seen,
                   "config": to_dict(self.cfg), "ema": self.ema.state_dict() if self.ema else None}
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
                [s["data"] for s in self.checkpoints.read_all_rank_states(info)], info.world_size)
        log.info("resumed from %s at step %d (saved by %d ranks, now %d)", info.url, self.step,
                 info.world_size, self.dist.world_size)
        return True

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run to ``train.max_steps`` (or until asked to stop). Returns a summary, also written
        to ``<run>/result.json``; ``stopped`` is True when a signal ended the run early, after
        a checkpoint."""
        cfg = self.cfg
        self.resume()
        metrics = MetricsLogger(self.run_dir, enabled=self.dist.is_main,
                                total_steps=cfg.train.max_steps, start_step=self.step,
                                config=to_dict(cfg), wandb=cfg.run.wandb,
                                project=cfg.run.wandb_project, run_name=cfg.run.name)
        self.stop.install()
        sums: dict[str, torch.Tensor] = {}
        n, t_last, last, stopped, extra = 0, time.perf_counter(), {}, False, {}
        timing = {"data_s": 0.0, "ckpt_stall_s": 0.0}
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                batch = next(self.stream)
                timing["data_s"] += time.perf_counter() - t0
                terms = self.train_step(batch)
                self.step += 1
                self.samples_seen += self.samples_in(batch) * self.dist.world_size
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v
                n += 1
                metrics.advance()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    last = self._summarise(sums, n, time.perf_counter() - t_last, timing)
                    metrics.log(self.step, last)
                    sums, n, t_last = {}, 0, time.perf_counter()
                    timing = {"data_s": 0.0, "ckpt_stall_s": 0.0}
                self.after_step(metrics)
                if self.stop.agreed(self.device):
                    stopped = True
                    break
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    timing["ckpt_stall_s"] += self.save()
            latest = self.checkpoints.latest()
            if stopped or latest is None or latest.step != self.step:
                self.save(blocking=True)
            self.checkpoints.wait()
            if not stopped:
                extra = self.finish(metrics)
            metrics.close()
            if self.dist.is_main and not self.storage.local:
                sync_run_files(self.run_dir, self.storage)
        finally:
            self.stop.uninstall()
            metrics.close()
        latest = self.checkpoints.latest()
        result = {"step": self.step, "metrics": last, "run_dir": self.storage.url,
                  "checkpoint": latest.url if latest else None, "stopped": stopped,
                  "save": dict(self.checkpoints.last_save), **extra}
        if self.dist.is_main:
            self.storage.write_text("result.json", json.dumps(result, indent=1))
        return result

    def _summarise(self, sums: dict, n: int, dt: float, timing: dict) -> dict[str, float]:
        keys = sorted(sums)
        # One reduction for all loss terms: their means over ranks.
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) / n
                           for k in keys])
        vec = all_reduce_sum(vec) / self.dist.world_size
        out = {f"loss/{k}": float(v) for k, v in zip(keys, vec.tolist())}
        out.update(self.extra_metrics(n, dt))
        out["lr"] = next(iter(self.engines.values())).get_lr()[0]
        out["data_wait_frac"] = timing["data_s"] / max(dt, 1e-9)
        if hasattr(self.stream, "metrics"):
            out.update({f"data/{k}": float(v) for k, v in self.stream.metrics().items()})
        if timing["ckpt_stall_s"]:
            out["ckpt/stall_s"] = timing["ckpt_stall_s"]
        if "save_s" in self.checkpoints.last_save:
            out["ckpt/save_s"] = self.checkpoints.last_save["save_s"]
        out.update(memory_stats(self.device))
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
