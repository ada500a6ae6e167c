"""Benchmark: naive vs chunked soft histogram (forward + backward of the KL loss).

Run from the repository root (or with glotok installed)::

    python -m benchmarks.histogram_loss --device auto --sizes 1024,4096 --big 16384

For each n in ``--sizes``: median time of fwd+bwd, peak memory, and the max abs difference of
the loss value and of the codebook gradient between the two. Then the chunked version alone at
``--big``. Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` above what the inputs
hold; on CPU each case runs in a fresh subprocess that resets its peak RSS (``/proc/self/
clear_refs``) after building the inputs and reports VmHWM - VmRSS, so allocator caches and
earlier cases cannot hide or inflate it. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glotok.losses.histogram import soft_histogram, soft_histogram_naive

REPO = Path(__file__).resolve().parents[1]
BINS, ALPHA, EPS = 40, 190.0, 1e-8


def _inputs(n: int, dim: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g).to(device)
    teacher = torch.rand(BINS, generator=g) + 0.1
    return x, (teacher / teacher.sum()).to(device)


def _step(impl: str, x: torch.Tensor, teacher: torch.Tensor, chunk_size: int):
    """One forward + backward of KL(P_t || P_s); returns (loss, grad of x)."""
    x = x.detach().requires_grad_(True)
    if impl == "naive":
        hist = soft_histogram_naive(x, BINS, ALPHA)
    else:
        hist = soft_histogram(x, BINS, ALPHA, chunk_size)
    loss = F.kl_div(torch.log(hist + EPS), teacher, reduction="sum")
    loss.backward()
    return loss.detach(), x.grad


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1))


def _measure(impl: str, n: int, dim: int, device: str, chunk_size: int, repeats: int) -> dict:
    """Time ``repeats`` fwd+bwd runs and measure their peak memory, in this process."""
    x, teacher = _inputs(n, dim, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status_kb("VmRSS") * 1024
    times, first = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = _step(impl, x, teacher, chunk_size)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if first is None:
            first = out
        del out
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else _status_kb("VmHWM") * 1024)
    return {"ms": 1e3 * statistics.median(times), "peak_mb": (peak - base) / 2**20,
            "loss": first[0].cpu(), "grad": first[1].cpu()}


def _run_case(impl: str, n: int, args, device: str) -> dict:
    """On CPU, one fresh subprocess per case so peak RSS belongs to that case alone."""
    if device == "cuda":
        return _measure(impl, n, args.dim, device, args.chunk_size, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        spec = {"impl": impl, "n": n, "dim": args.dim, "chunk_size": args.chunk_size,
                "repeats": args.repeats, "threads": args.threads, "out": str(out)}
        subprocess.run([sys.executable, "-m", "benchmarks.histogram_loss", "--worker",
                        json.dumps(spec)], cwd=REPO, check=True)
        return torch.load(out)


def _worker(spec: str) -> None:
    s = json.loads(spec)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    result = _measure(s["impl"], s["n"], s["dim"], "cpu", s["chunk_size"], s["repeats"])
    torch.save(result, s["out"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--sizes", default="1024,4096", help="n values for naive vs chunked")
    p.add_argument("--big", type=int, default=16384, help="n for the chunked-only run")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    if device == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise SystemExit("CPU peak memory is read from /proc (Linux only); use --device cuda")

    hw = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"device {hw}, torch {torch.__version__}, d={args.dim}, bins={BINS}, alpha={ALPHA}, "
          f"chunk_size={args.chunk_size}, median of {args.repeats} fwd+bwd runs")
    sizes, max_diff = {}, 0.0
    for n in [int(v) for v in args.sizes.split(",") if v]:
        naive = _run_case("naive", n, args, device)
        chunked = _run_case("chunked", n, args, device)
        value_diff = (naive["loss"] - chunked["loss"]).abs().item()
        grad_diff = (naive["grad"] - chunked["grad"]).abs().max().item()
        grad_rel = grad_diff / naive["grad"].abs().max().item()
        max_diff = max(max_diff, value_diff, grad_diff)
        sizes[str(n)] = {"naive_ms": round(naive["ms"], 1), "chunked_ms": round(chunked["ms"], 1),
                         "naive_peak_mb": round(naive["peak_mb"], 1),
                         "chunked_peak_mb": round(chunked["peak_mb"], 1),
                         "value_max_abs_diff": value_diff, "grad_max_abs_diff": grad_diff,
                         "grad_max_rel_diff": grad_rel}
        print(f"n={n:6d}  naive {naive['ms']:9.1f} ms {naive['peak_mb']:8.1f} MB | chunked "
              f"{chunked['ms']:9.1f} ms {chunked['peak_mb']:8.1f} MB | max|dvalue| "
              f"{value_diff:.2e}  max|dgrad| {grad_diff:.2e} ({grad_rel:.1e} of max|grad|)")
    big = _run_case("chunked", args.big, args, device)
    print(f"n={args.big:6d}  chunked {big['ms']:9.1f} ms {big['peak_mb']:8.1f} MB "
          f"(naive would hold a {args.big * (args.big - 1) // 2 * BINS * 4 / 2**30:.0f} GiB "
          f"pairs x bins tensor)")
    summary = {"device": hw, "torch": torch.__version__, "dim": args.dim,
               "chunk_size": args.chunk_size, "repeats": args.repeats, "sizes": sizes,
               f"n{args.big}_ms": round(big["ms"], 1),
               f"n{args.big}_peak_mb": round(big["peak_mb"], 1), "max_abs_diff": max_diff,
               "peak_memory": "cuda max_memory_allocated" if device == "cuda"
               else "peak RSS growth in a fresh subprocess"}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
