#!/usr/bin/env python
"""Shard an image tree (ImageNet or any class-per-folder tree) into WebDataset tars + a manifest.

Input layouts (SRC is one split's directory):
  class per folder   SRC/<class>/**/<image>      ImageNet train/, a sorted val/, any ImageFolder
                                                  tree; class index = rank of the sorted folder
                                                  name (n01440764 -> 0), or --class-map
  flat + labels      SRC/<image> and --labels F  F holds '<file name> <label>' lines (space, tab
                                                  or comma; the name may omit its extension;
                                                  label = class name or index; LOC_val_solution.csv
                                                  works as is). Without --labels: label -1.

Output (DST is a directory or s3://bucket/prefix):
  DST/<prefix>-000000.tar ...   members <key>.jpg (image) and <key>.cls (class index, ASCII)
  DST/_progress/<shard>.json    receipt of each finished shard (plan digest, size, sha256, rejects)
  DST/manifest.json             written last: shards (name, num_samples, bytes, sha256), classes
                                (index -> name), rejects (path, reason), options

Behaviour:
  - The plan is deterministic: files sorted, shuffled with --shuffle-seed, cut into shards of
    --samples-per-shard. Each shard is published whole (local temp file + rename; on S3 one PUT
    or one completed multipart upload). Rerunning the same command skips every shard whose
    receipt matches the plan and whose size matches (--verify: also its sha256), so a killed
    run finishes where it stopped, without duplicates.
  - JPEGs are stored byte for byte. Other formats are re-encoded to JPEG (--quality), unless
    --keep-non-jpeg; with --max-size, images whose short side is longer are downscaled.
  - An image that cannot be read or decoded is left out, logged with its path and reason, and
    listed in the manifest's "rejects". The run still succeeds.

S3 and S3-compatible stores: credentials come from the standard AWS environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws), never from
the command line (it would leak into shell history and ps). The endpoint comes from
--endpoint-url or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.

Examples:
  export AWS_PROFILE=data AWS_ENDPOINT_URL=https://minio.internal:9000
  python tools/make_shards.py /data/imagenet/train s3://bucket/imagenet/train --workers 32
  python tools/make_shards.py /data/imagenet/val s3://bucket/imagenet/val \\
      --labels /data/imagenet/LOC_val_solution.csv \\
      --class-map s3://bucket/imagenet/train/manifest.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from glotok.data import storage
from glotok.data.imagetree import read_class_list
from glotok.data.storage import StorageOptions
from glotok.data.writer import EncodeOptions, make_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the split's directory, e.g. /data/imagenet/train")
    p.add_argument("dst", help="output directory or s3://bucket/prefix")
    p.add_argument("--labels", help="label file of a flat SRC ('<file name> <label>' lines)")
    p.add_argument("--class-map", help="class names in index order: a manifest.json (its "
                   "'classes'; local or s3://), a JSON list or {name: index}, or a text file "
                   "with one name per line. Use the train manifest for val so indices agree. "
                   "Default: sorted folder names (or label-file classes)")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="samples per shard (default 1000: ~110 MB of ImageNet JPEGs)")
    p.add_argument("--prefix", help="shard name prefix (default: the name of SRC)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="processes writing shards (default: all CPUs; 1 = in this process)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the fixed shuffle that mixes classes across shards (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted order")
    p.add_argument("--max-size", type=int,
                   help="downscale images whose short side exceeds this many pixels "
                        "(re-encoded as JPEG); default: keep every size")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--keep-non-jpeg", action="store_true",
                   help="store PNG/WebP/... as they are instead of re-encoding them to JPEG")
    p.add_argument("--verify", action="store_true",
                   help="re-hash finished shards on a rerun before skipping them")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / "
                   "AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    options = StorageOptions(endpoint_url=args.endpoint_url, profile=args.profile)
    classes = None
    if args.class_map:
        classes = read_class_list(storage.read_bytes(args.class_map, options).decode())
    manifest = make_shards(
        args.src, args.dst, labels=args.labels, classes=classes,
        samples_per_shard=args.samples_per_shard, prefix=args.prefix, workers=args.workers,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
        encode=EncodeOptions(args.max_size, args.quality, args.keep_non_jpeg),
        options=options, verify=args.verify)
    print(f"{storage.join(args.dst, 'manifest.json')}: {manifest['num_samples']} samples in "
          f"{manifest['num_shards']} shards, {len(manifest['rejects'])} rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
