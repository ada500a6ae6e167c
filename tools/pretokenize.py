#!/usr/bin/env python
"""Tokenize image shards with a trained GloTok tokenizer: the codes the AR generator trains on.

One task per input shard, spread over Ray workers (an embedded local Ray by default, a cluster
with --ray-address); each worker loads the tokenizer once, decodes images in background
processes while the model encodes on the GPU (CPU without one), and writes one token shard per
input shard, named like it.

Output (OUTPUT is a directory or s3://bucket/prefix):
  OUTPUT/<input shard name>.tar   WebDataset tar, one record per image and variant:
                                    <key>/<variant>.tokens.npy  (2, h, w) visual + semantic indices
                                                                (uint16 when codebooks <= 65536)
                                    <key>/<variant>.cls         class index
                                    <key>/<variant>.key.txt     the image's key
                                    <key>/<variant>.variant.txt the variant's name
  OUTPUT/_progress/<name>.json    receipt of each finished shard
  OUTPUT/manifest.json            written last: tokenizer checkpoint, variants, dtype, per-shard
                                  record counts and sha256, skipped images
  The format is documented in glotok/data/tokens.py (the AR trainer reads it).

Variants (--variants, a comma list of groups):
  center    ADM center crop at the tokenizer's image size
  flip      the center crop mirrored
  tencrop   LlamaGen's ten-crop: center crop at size * --crop-range, its 4 corners and centre,
            and those of the mirrored image (10 variants)
  randcrop  --random-crops LlamaGen training crops (scale jitter up to --crop-range, random
            mirror), seeded by --seed and the image's key

Resuming: re-run the same command after a kill or a failure. Finished shards (receipt matches
the plan, size matches; with --verify also sha256 and record count) are skipped, the rest are
rewritten whole, and the manifest is written when all are done: exactly one record per image
and variant. Changing the checkpoint, variants or crops redoes every shard.

Progress: a bar of images done and images/s (on a terminal; in a job's log one line every 30 s;
--no-progress turns it off).

Examples:
  python tools/pretokenize.py --source sample --checkpoint runs/sample --output runs/sample-tokens
  python tools/pretokenize.py --source s3://bucket/imagenet/train/manifest.json \\
      --checkpoint s3://bucket/runs/glotok-b --output s3://bucket/imagenet-tokens/train \\
      --variants center,flip,tencrop --ray-address auto
"""

from __future__ import annotations

import argparse
import logging
import sys

from glotok.data.pretokenize import pretokenize
from glotok.data.storage import StorageOptions
from glotok.utils.parallel import add_ray_arguments, ray_options_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pretokenize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help="image shards: 'sample' (the built-in photos), a manifest.json from "
                        "tools/make_shards.py (local or s3://), a directory or a brace pattern")
    p.add_argument("--checkpoint", required=True,
                   help="tokenizer run directory (its newest complete checkpoint is used) or a "
                        "checkpoint directory runs/NAME/checkpoints/step_XXXXXXXX; local or s3://")
    p.add_argument("--output", required=True, help="directory or s3://bucket/prefix for the "
                   "token shards")
    p.add_argument("--variants", default="center,flip",
                   help="comma list of variant groups: center, flip, tencrop, randcrop "
                        "(default: center,flip)")
    p.add_argument("--random-crops", type=int, default=1,
                   help="crops of the randcrop group (default 1)")
    p.add_argument("--crop-range", type=float, default=1.1,
                   help="scale jitter of tencrop/randcrop: crops come from the image resized to "
                        "size * crop_range (LlamaGen's 1.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass (default 64)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="image-decoding processes per Ray worker (default: with a GPU, its "
                        "CPUs but one; on CPU 1)")
    p.add_argument("--generator-weights", action="store_true",
                   help="use the generator's weights even when the checkpoint has an EMA")
    p.add_argument("--verify", action="store_true",
                   help="on a rerun, re-hash and re-count finished shards before skipping them")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / "
                   "AWS_ENDPOINT_URL); credentials come from the AWS environment")
    p.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = pretokenize(
        args.source, args.output, args.checkpoint, variants=args.variants,
        random_crops=args.random_crops, crop_range=args.crop_range, seed=args.seed,
        batch_size=args.batch_size, ema=not args.generator_weights,
        decode_workers=args.decode_workers, verify=args.verify,
        options=StorageOptions(args.endpoint_url, args.profile),
        ray=ray_options_from_args(args), progress=not args.no_progress)
    print(f"{args.output}: {manifest['num_images']} images x {len(manifest['variants'])} "
          f"variants = {manifest['num_records']} records in {len(manifest['shards'])} shards "
          f"({len(manifest['skipped'])} skipped) from {manifest['tokenizer']['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
