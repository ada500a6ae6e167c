"""Tokens/s and MFU of one FAR training step (forward, backward, AdamW), with a baseline.

    python benchmarks/ar_step.py                                  # configs/ar/sample.yaml, CPU
    python benchmarks/ar_step.py --config configs/ar/far-b.yaml   # the default on a GPU (bf16)

The step is what training runs: teacher-forced forward, the mean of the two cross-entropies,
backward, gradient clipping and AdamW, on random token maps (throughput does not depend on the
values). bf16 autocast over fp32 weights on a GPU, fp32 on CPU. A token is one grid position
(a visual + semantic index pair): tokens/s = batch x grid^2 / median step time.

FLOPs per step are counted by torch's FLOP counter on a meta-device copy of the step and
cross-checked against the analytic count (glotok.utils.flops.far_train_flops); MFU divides by
the peak table of glotok.utils.flops, so it is null on CPU, with the reason. On CPU the script
also measures a dense fp32 matmul at the same thread count and reports the step's fraction of
it (``mfu_vs_matmul_peak``), the nearest CPU analogue.

On CPU the default is one thread: on the shared 2-core machine this was written on, 2 OpenMP
threads made the step 6x slower (6.1 s vs 1.0 s), a measure of the neighbours' load rather than
of the step. ``--threads`` overrides it; the JSON records it.

Baseline, same run: the same step without the factorised head, i.e. a LlamaGen-style model
whose trunk output feeds both output layers directly. It shows what FAR's head costs in
throughput (it runs head_layers blocks over 2 sub-steps per position). ``torch.compile`` was
the other candidate; on a 2-core CPU its compile time dwarfs a benchmark of seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glotok.config_ar import load_ar_config  # noqa: E402
from glotok.models.far import SEMANTIC, VISUAL, FARTransformer  # noqa: E402
from glotok.utils.flops import count_flops, far_train_flops, mfu, peak_flops  # noqa: E402


def far_loss(model: FARTransformer, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(idx, labels)["loss"]


def headless_loss(model: FARTransformer, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The baseline: both indices of position t predicted from the trunk output h_t alone."""
    idx = model.flatten_indices(idx)
    v, s = idx[:, VISUAL], idx[:, SEMANTIC]
    h = model.norm(model.trunk(model.embed_sequence(model.drop_labels(labels), v[:, :-1],
                                                    s[:, :-1])))
    return (F.cross_entropy(model.visual_output(h).float().flatten(0, 1), v.flatten())
            + F.cross_entropy(model.semantic_output(h).float().flatten(0, 1), s.flatten())) / 2


def make_step(model, loss_fn, cfg, device, dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")

    def step(idx, labels):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model, idx, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()

    return step


def time_steps(step, idx, labels, n: int, device) -> list[float]:
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(idx, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def meta_flops(cfg, loss_fn, batch: int) -> int:
    with torch.device("meta"):
        model = FARTransformer(cfg.model).train()
        g = cfg.model.grid_size
        idx = torch.zeros(batch, 2, g, g, dtype=torch.long)
        labels = torch.zeros(batch, dtype=torch.long)
    # The optimizer's elementwise update is not counted: MFU counts model FLOPs only.
    return count_flops(lambda: loss_fn(model, idx, labels).backward())


def matmul_tflops(device, dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None,
                    help="default: configs/ar/far-b.yaml on CUDA, configs/ar/sample.yaml on CPU")
    ap.add_argument("--batch", type=int, default=None,
                    help="per-device batch (default: data.global_batch_size on CPU, 32 on GPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    path = args.config or str(REPO / "configs/ar" / ("far-b.yaml" if device.type == "cuda"
                                                     else "sample.yaml"))
    cfg = load_ar_config(path, args.overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (32 if device.type == "cuda" else cfg.data.global_batch_size)
    g = cfg.model.grid_size
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randint(0, cfg.model.visual_vocab_size, (batch, g, g), generator=gen),
                       torch.randint(0, cfg.model.semantic_vocab_size, (batch, g, g),
                                     generator=gen)], dim=1).to(device)
    labels = torch.randint(0, cfg.model.num_classes, (batch,), generator=gen).to(device)

    results = {}
    for name, loss_fn in (("far", far_loss), ("no_head", headless_loss)):
        torch.manual_seed(0)
        model = FARTransformer(cfg.model).to(device).train()
        step = make_step(model, loss_fn, cfg, device, dtype)
        time_steps(step, idx, labels, args.warmup, device)
        seconds = statistics.median(time_steps(step, idx, labels, args.steps, device))
        results[name] = (seconds, meta_flops(cfg, loss_fn, batch))
        attention = model.attention_backend(dtype)
        del model, step

    seconds, flops = results["far"]
    analytic = far_train_flops(cfg.model, batch)
    peak, peak_note = peak_flops(device, dtype)
    tokens = batch * g * g
    out = {
        "tokens_per_s": round(tokens / seconds, 1),
        "mfu": None if peak is None else round(mfu(flops, seconds, peak), 4),
        "mfu_reason": None if peak is not None else peak_note,
        "baseline_tokens_per_s": round(tokens / results["no_head"][0], 1),
        "baseline": "same step without the factorised head (trunk output -> both output layers)",
        "head_cost": round(1 - results["no_head"][0] / seconds, 4),
        "baseline_flops_per_step": results["no_head"][1],
        "step_ms": round(seconds * 1e3, 2),
        "flops_per_step_counted": flops,
        "flops_per_step_analytic": analytic,
        "counted_over_analytic": round(flops / analytic, 4),
        "achieved_tflops": round(flops / seconds / 1e12, 4),
        "config": Path(path).name, "batch": batch, "positions": g * g,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "attention": attention,
        "torch_threads": torch.get_num_threads(), "steps": args.steps,
    }
    if device.type == "cpu":
        ref = matmul_tflops(device, dtype)
        out["matmul_peak_tflops"] = round(ref, 4)
        out["mfu_vs_matmul_peak"] = round(flops / seconds / 1e12 / ref, 4)
    print(f"{out['config']} on {out['device']} ({out['dtype']}), batch {batch} x {g * g} "
          f"positions, attention {attention}")
    print(f"  FAR step         : {seconds * 1e3:8.1f} ms  {out['tokens_per_s']:10.1f} tokens/s  "
          f"{out['achieved_tflops']:.4f} TFLOP/s")
    print(f"  without the head : {results['no_head'][0] * 1e3:8.1f} ms  "
          f"{out['baseline_tokens_per_s']:10.1f} tokens/s")
    print(f"  FLOPs/step counted {flops:.4e}, analytic {analytic:.4e}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
