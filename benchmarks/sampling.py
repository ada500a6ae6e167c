"""Sampling throughput of the FAR generator with and without the KV cache, at 16x16 = 256
positions.

    python benchmarks/sampling.py                     # CPU: a mid-size FAR (15.6M), 1 thread
    python benchmarks/sampling.py --model far-b       # the default on a GPU: FAR-B in bf16

Both runs draw the same images from the same seed (and the script checks that the indices are
identical): the cached run prefills the class token and then runs the trunk on one new token
per position; the uncached run recomputes the whole prefix at every position. A "token" here
is one grid position, i.e. one (visual, semantic) index pair; tokens/s = images x 256 / time.
Guidance is on (scale 2.0, the default), so the model runs on twice the batch. The last line is
one JSON object: ``cached``, ``uncached`` (tokens/s), ``speedup`` and the setting.

On CPU the default is one thread: a cached step is a few small matmuls, and on a shared 2-core
machine OpenMP hand-offs between 2 threads made it 10x slower (208 vs 19.5 ms per position),
which measures the machine's load rather than the cache. ``--threads`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glotok.config_ar import load_ar_config  # noqa: E402
from glotok.models.far import FARTransformer  # noqa: E402
from glotok.sampling import generate  # noqa: E402

# A FAR small enough to sample 256 positions without a cache on one CPU core in a few minutes,
# with FAR-B's grid, vocabularies and 2-D layout.
CPU_MODEL = ["model.dim=256", "model.n_layers=6", "model.n_heads=4", "model.head_layers=2"]


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["auto", "cpu-mid", "far-b"], default="auto",
                    help="auto: far-b on CUDA, cpu-mid otherwise")
    ap.add_argument("--batch", type=int, default=None, help="images (default 8 CPU, 32 GPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    which = args.model
    if which == "auto":
        which = "far-b" if device.type == "cuda" else "cpu-mid"
    cfg = load_ar_config(REPO / "configs/ar/far-b.yaml", CPU_MODEL if which == "cpu-mid" else [])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (32 if device.type == "cuda" else 8)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = FARTransformer(cfg.model).to(device=device, dtype=dtype).eval()
    labels = torch.arange(batch, device=device) % cfg.model.num_classes

    def run(use_cache: bool) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(args.seed)
        return generate(model, labels, cfg_scale=args.cfg_scale, generator=g, use_cache=use_cache)

    # Warm-up: kernels, allocator, and (on GPU) the flash_attn import.
    generate(model, labels[:1], cfg_scale=args.cfg_scale)
    t_cached, cached = timed(lambda: run(True), device)
    t_uncached, uncached = timed(lambda: run(False), device)

    tokens = batch * model.seq_len
    result = {
        "cached": round(tokens / t_cached, 2),
        "uncached": round(tokens / t_uncached, 2),
        "speedup": round(t_uncached / t_cached, 2),
        "identical_indices": bool(torch.equal(cached, uncached)),
        "unit": "grid positions (visual+semantic index pairs) per second",
        "positions": model.seq_len, "batch": batch, "cfg_scale": args.cfg_scale,
        "model": which, "params_m": round(model.num_params() / 1e6, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "attention": model.attention_backend(),
        "torch_threads": torch.get_num_threads(),
        "seconds": {"cached": round(t_cached, 3), "uncached": round(t_uncached, 3)},
    }
    print(f"{which} ({result['params_m']}M) on {result['device']}, {batch} images x "
          f"{model.seq_len} positions, cfg {args.cfg_scale}, attention {result['attention']}")
    print(f"  KV cache   : {t_cached:8.2f} s  {result['cached']:10.1f} tokens/s")
    print(f"  no cache   : {t_uncached:8.2f} s  {result['uncached']:10.1f} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
