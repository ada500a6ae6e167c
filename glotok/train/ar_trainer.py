"""The FAR generator trainer: one DeepSpeed engine over pre-tokenized shards.

Everything but the model, the token stream and the step is :class:`glotok.train.base.Trainer`'s:
the same checkpoints, resume (any number of ranks), SIGTERM handling and Ray launch as the
tokenizer. Metrics add tokens/s and MFU (counted FLOPs over the device's peak; null on CPU,
where no honest peak exists).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from glotok.models.far import FARTransformer
from glotok.train.base import Trainer
from glotok.train.ema import EMA
from glotok.utils.flops import far_train_flops, mfu, peak_flops

log = logging.getLogger(__name__)


def adamw(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (LlamaGen): norms, biases and 1-D tables keep
    their scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": keep, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


class ARTrainer(Trainer):
    def __init__(self, cfg: Any, stop_check: Optional[Callable[[], bool]] = None):
        super().__init__(cfg, stop_check)
        world = self.dist.world_size
        if cfg.data.global_batch_size % world:
            raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} is not "
                             f"divisible by the {world} workers: change one of them")
        self.micro_batch = cfg.data.global_batch_size // world
        self.seed_model_init()
        model = FARTransformer(cfg.model)
        self.engine = self.build_engine("model", model, adamw(model, cfg.optim, self.device),
                                        self.micro_batch)
        self.ema = EMA(self.engine.module, cfg.train.ema_decay) if cfg.train.ema else None
        from glotok.data.token_stream import build_token_stream

        self.stream = build_token_stream(cfg.data, self.micro_batch, self.dist.rank, world)
        self.seed_rank()
        self.positions = cfg.model.grid_size ** 2
        self.flops_per_step = far_train_flops(cfg.model, self.micro_batch)
        self.peak, self.peak_name = peak_flops(self.device, self.dtype)
        log.info("FAR: %.1fM parameters, attention %s, peak %s", model.num_params() / 1e6,
                 model.attention_backend(self.dtype), self.peak_name)

    def samples_in(self, batch: dict) -> int:
        return batch["indices"].shape[0]

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        idx = batch["indices"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        # An image without a class (label -1) trains the unconditional (null-class) path.
        labels = torch.where(labels < 0, self.cfg.model.num_classes, labels)
        out = self.engine(idx, labels)
        self.engine.backward(out["loss"])
        self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.module)
        return {"total": out["loss"].detach().float(),
                "visual": out["loss_visual"].detach().float(),
                "semantic": out["loss_semantic"].detach().float()}

    def extra_metrics(self, steps: int, dt: float) -> dict[str, float]:
        per_worker = steps * self.micro_batch * self.positions / max(dt, 1e-9)
        out = {"tokens_per_s": per_worker * self.dist.world_size,
               "tokens_per_s_per_worker": per_worker}
        value = mfu(self.flops_per_step, dt / max(steps, 1), self.peak)
        if value is not None:
            out["mfu"] = value
        return out
