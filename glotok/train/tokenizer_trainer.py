"""The GloTok tokenizer trainer: a generator engine and a discriminator engine under DeepSpeed.

The loop, checkpoints, resume and stopping are :class:`glotok.train.base.Trainer`'s; this file
builds the models and the image stream and defines the step, the codebook metrics and the
reconstruction grids.

GAN step (works at ZeRO 0-3, see STACK.md §2.5): the generator step calls the discriminator
through ``d_engine.module`` with its parameters frozen, so the discriminator engine's hooks see
no gradient; the discriminator step then runs through its own engine on ``sg[recon]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from glotok.losses.tokenizer_loss import TokenizerObjective
from glotok.models.quantizer import code_statistics
from glotok.models.tokenizer import GloTokTokenizer
from glotok.train.base import Trainer
from glotok.train.distributed import DistInfo, all_reduce_sum
from glotok.train.ema import EMA
from glotok.train.metrics import MetricsLogger
from glotok.utils.images import reconstruction_grid, save_png

log = logging.getLogger(__name__)


def _adam(params, lr: float, cfg, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")


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


class TokenizerTrainer(Trainer):
    def __init__(self, cfg: Any, stop_check: Optional[Callable[[], bool]] = None):
        super().__init__(cfg, stop_check)
        hist = None
        if cfg.loss.hist_weight > 0:
            from glotok.losses.histogram import HistogramRelationLoss

            h = cfg.loss.hist
            hist = HistogramRelationLoss(build_teacher_tensor(h), bins=h.bins, alpha=h.alpha,
                                         chunk_size=h.chunk_size)
        self.seed_model_init()
        model = GloTokTokenizer(cfg.model, hist_loss=hist)
        self.g_engine = self.build_engine(
            "generator", model, _adam(model.parameters(), cfg.optim.lr, cfg.optim, self.device),
            cfg.data.batch_size)
        self.d_engine = None
        if cfg.loss.gan_weight > 0:
            from glotok.models.discriminator import PatchGANDiscriminator

            self.seed_model_init(offset=1)
            disc = PatchGANDiscriminator(3, cfg.loss.disc.ndf, cfg.loss.disc.n_layers)
            self.d_engine = self.build_engine(
                "discriminator", disc,
                _adam(disc.parameters(), cfg.optim.disc_lr or cfg.optim.lr, cfg.optim, self.device),
                cfg.data.batch_size)
        perceptual = None
        if cfg.loss.perceptual_weight > 0:
            from glotok.models.perceptual import build_perceptual

            p = cfg.loss.perceptual
            perceptual = build_perceptual(p.backbone, p.vgg_path, p.lin_path).to(self.device)
        self.objective = TokenizerObjective(cfg.loss, perceptual)
        self.ema = EMA(self.g_engine.module, cfg.train.ema_decay) if cfg.train.ema else None
        self.stream = build_image_loader(cfg.data, cfg.model.image_size, self.dist)
        self.seed_rank()
        self._reset_usage()

    # ---- one step ------------------------------------------------------------------------------

    def samples_in(self, batch: dict) -> int:
        return batch["image"].shape[0]

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        g, d = self.g_engine, self.d_engine
        x = batch["image"].to(self.device, non_blocking=True)
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

    # ---- metrics and images --------------------------------------------------------------------

    def _reset_usage(self) -> None:
        for q in self.g_engine.module.quantizers.values():
            q.reset_usage()

    def extra_metrics(self, steps: int, dt: float) -> dict[str, float]:
        out = {}
        for name, q in self.g_engine.module.quantizers.items():
            stats = code_statistics(all_reduce_sum(q.usage.clone()))
            out[f"codebook/{name}_usage"] = stats["usage"]
            out[f"codebook/{name}_perplexity"] = stats["perplexity"]
        self._reset_usage()
        images = steps * self.cfg.data.batch_size * self.dist.world_size
        out["img_per_s"] = images / max(dt, 1e-9)
        out["img_per_s_per_worker"] = out["img_per_s"] / self.dist.world_size
        return out

    def after_step(self, metrics: MetricsLogger) -> None:
        every = self.cfg.train.image_every
        if every and self.step % every == 0:
            self.write_grid(metrics, f"images/step_{self.step:08d}.png")

    def finish(self, metrics: MetricsLogger) -> dict:
        self.write_grid(metrics, "reconstructions.png")
        return {"grid": f"{self.storage.url}/reconstructions.png"}

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
