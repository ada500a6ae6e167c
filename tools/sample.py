#!/usr/bin/env python
"""Draw class-balanced samples from a trained FAR generator: the images gFID is computed on.

Each Ray worker (an embedded local Ray by default, a cluster with --ray-address) loads the
generator and its tokenizer once and generates chunks of --batch-size images with a KV cache,
classifier-free guidance, temperature, top-k and top-p; the tokenizer decodes them. Image j has
class j % num_classes (50k images: 50 per ImageNet class); chunk c is seeded by (--seed, c), so
the images are the same whatever the number of workers.

Output (OUTPUT: a local directory or s3://...):
  OUTPUT/chunks/chunk_XXXXXX.npz   one per chunk, written whole (a rerun skips finished ones)
  OUTPUT/samples.npz               arr_0 (N, H, W, 3) uint8 + arr_1 labels: the ADM evaluator's
                                   layout, input of `tools/evaluate.py generation`
  OUTPUT/grid.png                  the first 64 images
  OUTPUT/samples.json              the checkpoints and settings that made them

Defaults for the sampling settings come from the generator's config (its `sample` section);
the tokenizer defaults to the one its token shards were made with.

Example:
  python tools/sample.py --generator runs/far-sample --output runs/far-sample/samples \\
      --num-images 64
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glotok.utils.parallel import add_ray_arguments, ray_options_from_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True,
                   help="FAR run directory (newest complete checkpoint) or checkpoint directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer run or checkpoint (default: the one recorded in the "
                        "generator's token-shard manifest)")
    p.add_argument("--output", required=True, help="directory or s3://... for the samples")
    p.add_argument("--num-images", type=int, default=None, help="default: sample.num_images")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per chunk (default: sample.batch_size)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: sample.cfg_scale)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    add_ray_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from glotok.data.tokens import read_token_manifest
    from glotok.eval.samples import (SampleSettings, SampleWorker, done_chunks, write_adm_npz,
                                     write_metadata)
    from glotok.train.export import read_run_config
    from glotok.utils.images import make_grid, save_png
    from glotok.utils.parallel import run_shard_tasks
    from glotok.utils.storage import Storage

    cfg = read_run_config(args.generator)
    s = cfg["sample"]
    tokenizer = args.tokenizer
    if tokenizer is None:
        try:
            tokenizer = read_token_manifest(cfg["data"]["source"])["tokenizer"]["checkpoint"]
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"sample.py: could not find the generator's tokenizer from its "
                             f"token shards ({e}); pass --tokenizer RUN")
    pick = lambda a, k: s[k] if a is None else a  # noqa: E731
    settings = SampleSettings(
        num_images=pick(args.num_images, "num_images"), num_classes=cfg["model"]["num_classes"],
        chunk_size=pick(args.batch_size, "batch_size"), cfg_scale=pick(args.cfg_scale, "cfg_scale"),
        temperature=pick(args.temperature, "temperature"), top_k=pick(args.top_k, "top_k"),
        top_p=pick(args.top_p, "top_p"), seed=pick(args.seed, "seed"))
    out = Storage(args.output)
    done = done_chunks(out, settings)
    tasks = [c for c in range(settings.num_chunks) if c not in done]
    if tasks:
        from dataclasses import asdict

        run_shard_tasks(SampleWorker, dict(generator=args.generator, tokenizer=tokenizer,
                                           output=out.url, settings=asdict(settings),
                                           ema=not args.no_ema),
                        tasks, ray_options_from_args(args), desc="sample",
                        total=settings.num_images,
                        initial=sum(len(settings.chunk_labels(c)) for c in done))
    local = Path(out.path("samples.npz")) if out.local else Path(tempfile.mkdtemp()) / "samples.npz"
    n = write_adm_npz(out, settings, local)
    if not out.local:
        out.put(local, "samples.npz", move=True)
    import io

    import numpy as np
    import torch

    first = np.load(io.BytesIO(out.read_bytes("chunks/chunk_000000.npz")))["images"][:64]
    grid = make_grid(torch.from_numpy(first).permute(0, 3, 1, 2).float() / 127.5 - 1, ncol=8)
    if out.local:
        save_png(grid, out.path("grid.png"))
    else:
        tmp = save_png(grid, Path(tempfile.mkdtemp()) / "grid.png")
        out.put(tmp, "grid.png", move=True)
    write_metadata(out, settings, args.generator, tokenizer)
    print(f"sample.py: {n} images -> {out.url_of('samples.npz')} (grid: {out.url_of('grid.png')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
