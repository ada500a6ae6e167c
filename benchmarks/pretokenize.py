"""Images/s of ``pretokenize`` against a bare loop of tokenizer forward passes, in one run.

    python benchmarks/pretokenize.py [--config configs/tokenizer/glotok-b.yaml] [--copies 1]
                                     [--variants center,flip] [--batch-size 32] [--repeats 2]

- ``bare_forward``: the images are decoded and cropped into their variants beforehand (not
  timed), cut into the batches pretokenize forms (``batch_size // variants`` images, all their
  variants), and only ``model.encode`` runs in the timed loop: the model's own speed, the
  ceiling.
- ``pretokenize``: :func:`glotok.data.pretokenize.pretokenize` end to end over the same
  shards, in this process (``workers=0``: one worker, no Ray start-up in the figure): read the
  shard, decode + crop in a DataLoader process, encode, build and write the token shard and its
  receipt, then the manifest. Decoding and writing must overlap the model for the ratio to
  approach 1.

Both use one tokenizer with the architecture of ``--config`` (default glotok-b at 256 px, the
model pre-tokenization is for) and seeded random weights
(throughput does not depend on the weights), written as an EMA-only checkpoint so pretokenize
loads it as it loads a trained one. Shards: ``--copies`` copies of the built-in sample photos
(JPEGs of 224-1024 px), ``--shard-size`` images each. Each figure is the best of ``--repeats``
passes (the machine may be shared). Figures are images/s where an image is one variant of one
photo (a forward-pass input).

On a CPU-only machine decoding can only overlap the model by taking cores from it, so the
ratio there is about ``model time / (model time + decode time)``: close to 1 for glotok-b
(~1 s of CPU per image vs ~2 ms to decode), ~0.75 for the tiny 64 px sample model
(``--config configs/tokenizer/sample.yaml --copies 16``), whose forward pass costs only a few
times a JPEG decode. On a GPU the decode processes run on CPU cores the model does not use.

Last line: one JSON object with ``pretokenize``, ``bare_forward`` (images/s) and ``ratio``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from glotok.config import load_config, to_dict
from glotok.data.pretokenize import pretokenize
from glotok.data.sample import ensure_sample_shards
from glotok.data.variants import CropVariants, parse_variants
from glotok.data.wds import iter_records, tar_bytes
from glotok.models.tokenizer import GloTokTokenizer
from glotok.utils.parallel import RayOptions


def write_shards(directory: Path, copies: int, shard_size: int) -> tuple[str, list[bytes]]:
    """``copies`` x the sample photos as shards + manifest; returns the manifest path and the
    image bytes in shard order."""
    photos = [(k, m) for s in ensure_sample_shards() for k, m in iter_records(Path(s).read_bytes())]
    samples = [(f"{k}_c{c}", m) for c in range(copies) for k, m in photos]
    shards, images = [], []
    for i in range(0, len(samples), shard_size):
        chunk = samples[i:i + shard_size]
        data = tar_bytes((f"{k}.{ext}", v) for k, m in chunk for ext, v in m.items())
        name = f"bench-{i // shard_size:06d}.tar"
        (directory / name).write_bytes(data)
        shards.append({"name": name, "num_samples": len(chunk), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        images += [m["jpg"] for _, m in chunk]
    (directory / "manifest.json").write_text(json.dumps({"shards": shards}))
    return str(directory / "manifest.json"), images


def write_random_checkpoint(config: str, directory: Path, seed: int = 0) -> str:
    """A checkpoint of a seeded random tokenizer: ``trainer.pt`` (config + EMA weights) and
    ``MANIFEST.json``, which is all ``load_tokenizer`` reads when a checkpoint has an EMA."""
    cfg = load_config(config, ["loss.hist_weight=0", "loss.perceptual_weight=0",
                               "loss.perceptual.backbone=none"])
    torch.manual_seed(seed)
    model = GloTokTokenizer(cfg.model)
    ckpt = directory / "checkpoints" / "step_00000000"
    ckpt.mkdir(parents=True)
    shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    torch.save({"step": 0, "samples_seen": 0, "config": to_dict(cfg),
                "ema": {"decay": 0.0, "shadow": shadow}}, ckpt / "trainer.pt")
    size = (ckpt / "trainer.pt").stat().st_size
    (ckpt / "MANIFEST.json").write_text(json.dumps(
        {"step": 0, "world_size": 1, "files": {"trainer.pt": {"size": size}}}))
    return str(ckpt)


@torch.no_grad()
def bare_forward(checkpoint: str, images: list[bytes], variants: list[str],
                 batch_size: int) -> tuple[float, int]:
    """(seconds, images) of model.encode alone over the pre-decoded batches."""
    from glotok.train.export import load_tokenizer

    model, cfg, _ = load_tokenizer(checkpoint)
    crop = CropVariants(tuple(variants), cfg.model.image_size)
    per_batch = max(1, batch_size // len(variants))
    batches = [torch.stack([crop(str(i), b) for i, b in enumerate(images[j:j + per_batch])])
               .flatten(0, 1) for j in range(0, len(images), per_batch)]
    model.encode(batches[0].float() / 127.5 - 1)  # warm-up: allocator, kernels
    start = time.perf_counter()
    for x in batches:  # the same uint8 -> [-1, 1] conversion pretokenize does
        model.encode(x.float().div_(127.5).sub_(1.0))
    return time.perf_counter() - start, sum(x.shape[0] for x in batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tokenizer/glotok-b.yaml")
    p.add_argument("--copies", type=int, default=1, help="copies of the 37 sample photos")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--variants", default="center,flip")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    variants = parse_variants(args.variants)

    with tempfile.TemporaryDirectory(prefix="glotok-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        source, images = write_shards(tmp / "shards", args.copies, args.shard_size)
        checkpoint = write_random_checkpoint(args.config, tmp / "run")
        bare, piped = 0.0, 0.0
        for r in range(args.repeats):
            seconds, n = bare_forward(checkpoint, images, variants, args.batch_size)
            bare = max(bare, n / seconds)
            start = time.perf_counter()
            manifest = pretokenize(source, str(tmp / f"tokens-{r}"), checkpoint,
                                   variants=args.variants, batch_size=args.batch_size,
                                   decode_workers=args.decode_workers,
                                   ray=RayOptions(workers=0), progress=False)
            seconds = time.perf_counter() - start
            assert manifest["num_records"] == n, (manifest["num_records"], n)
            piped = max(piped, n / seconds)
            print(f"pass {r}: {n} images ({len(images)} photos x {len(variants)} variants): "
                  f"bare forward {bare:.2f} img/s, pretokenize {n / seconds:.2f} img/s")

    print(f"{args.config}, {torch.get_num_threads()} torch threads, batch {args.batch_size}, "
          f"{args.decode_workers} decode process(es), best of {args.repeats}")
    result = {"pretokenize": round(piped, 2), "bare_forward": round(bare, 2),
              "ratio": round(piped / bare, 3)}
    assert all(math.isfinite(v) for v in result.values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
