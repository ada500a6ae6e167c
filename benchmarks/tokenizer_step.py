"""Images/s of one tokenizer training step (generator + discriminator), DeepSpeed vs plain torch.

    python benchmarks/tokenizer_step.py                       # sample.yaml on CPU
    python benchmarks/tokenizer_step.py --config configs/tokenizer/glotok-b.yaml \
        loss.hist.teacher=/path/teacher.json                  # on a GPU

Both loops run the same model, losses and batch (real sample photos, GAN active, histogram loss
on): the DeepSpeed step is what glotok trains with; the baseline is the same step written with
plain torch.optim, to show what the engines cost. Steps are timed after warm-up, alternating
between the two loops, with a device sync per step; medians are reported. The last line is one JSON object: ``images_per_s`` (DeepSpeed step),
``baseline_images_per_s``, ``overhead`` (1 - ratio), and the setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glotok.config import load_config  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step_fn, batch, n: int, device) -> list[float]:
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step_fn(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def plain_torch_step_fn(trainer):
    """The same step as TokenizerTrainer.train_step, with two torch optimisers and no engine."""
    import copy

    g = copy.deepcopy(trainer.g_engine.module)
    d = copy.deepcopy(trainer.d_engine.module) if trainer.d_engine is not None else None
    cfg = trainer.cfg
    g_opt = torch.optim.Adam(g.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             fused=trainer.device.type == "cuda")
    d_opt = torch.optim.Adam(d.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             fused=trainer.device.type == "cuda") if d is not None else None
    obj = trainer.objective

    def step(batch):
        x = batch["image"].to(trainer.device)
        x_in = x.to(trainer.dtype)
        out = g(x_in)
        logits_fake = None
        if d is not None:
            d.requires_grad_(False)
            logits_fake = d(out["recon"])
        loss, _ = obj.generator_loss(x, out, logits_fake)
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(g.parameters(), cfg.optim.grad_clip)
        g_opt.step()
        if d is not None:
            d.requires_grad_(True)
            d_loss, _ = obj.discriminator_loss(d(x_in), d(out["recon"].detach()))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(d.parameters(), cfg.optim.grad_clip)
            d_opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/tokenizer/sample.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from glotok.train.tokenizer_trainer import TokenizerTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"run.output_dir={tmp}", "run.wandb=disabled",
                                        "loss.gan_start_step=0", "data.source=sample"]
                          + args.overrides)
        trainer = TokenizerTrainer(cfg)
        batch = next(trainer.stream)
        trainer.step = cfg.loss.gan_start_step  # GAN active: the full step
        base_fn = plain_torch_step_fn(trainer)
        time_steps(trainer.train_step, batch, args.warmup, trainer.device)
        time_steps(base_fn, batch, args.warmup, trainer.device)
        # Interleaved, so that load from other processes hits both loops alike.
        ds, base = [], []
        for _ in range(args.steps):
            ds += time_steps(trainer.train_step, batch, 1, trainer.device)
            base += time_steps(base_fn, batch, 1, trainer.device)

    b = batch["image"].shape[0]
    ips, base_ips = b / statistics.median(ds), b / statistics.median(base)
    print(f"{Path(args.config).name} on {trainer.device} ({trainer.dtype}), batch {b}, "
          f"ZeRO-{cfg.train.zero_stage}")
    print(f"  DeepSpeed step : {statistics.median(ds) * 1e3:8.1f} ms  {ips:8.2f} img/s")
    print(f"  plain torch    : {statistics.median(base) * 1e3:8.1f} ms  {base_ips:8.2f} img/s")
    print(json.dumps({
        "images_per_s": round(ips, 3), "baseline_images_per_s": round(base_ips, 3),
        "overhead": round(1 - ips / base_ips, 4), "config": Path(args.config).name,
        "device": str(trainer.device), "dtype": str(trainer.dtype).replace("torch.", ""),
        "batch_size": b, "zero_stage": cfg.train.zero_stage, "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
