"""Write an image tree as WebDataset shards plus a manifest, locally or to ``s3://``, resumably.

The plan is a pure function of the tree and the options: images sorted by path, shuffled with a
fixed seed (so every shard mixes classes), cut into shards of ``samples_per_shard``. Shard ``i``
always holds the same images, so a rerun knows what each shard should contain.

Each shard is built in memory, validated image by image, and published whole
(:func:`glotok.data.storage.write_bytes`: temp + ``os.replace``, or one PUT / multipart
upload). Then a receipt ``_progress/<shard>.json`` records its plan digest, size, sha256 and
rejects. A rerun skips every shard whose receipt matches its plan and whose object has the
receipt's size (``verify=True`` also re-hashes it), and rewrites the rest, so a run killed at
any point finishes without duplicates. The manifest is written last: it exists only when every
shard does.

Images are kept byte for byte when they are JPEGs that decode and, with ``max_size``, whose
short side is at most ``max_size``; others are re-encoded to RGB JPEG (``quality``), downscaled
to ``max_size`` where larger. An image that does not decode is left out, logged with its path
and reason, and listed under ``rejects`` in the manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Optional

from PIL import Image, UnidentifiedImageError

from glotok.data import storage
from glotok.data.imagetree import ImageTree, SourceImage, scan_tree
from glotok.data.storage import StorageOptions
from glotok.data.wds import tar_bytes

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = "_progress"
MANIFEST_VERSION = 1


class UnreadableImageError(ValueError):
    """A source image that cannot be read or decoded; the message says why."""


@dataclass(frozen=True)
class EncodeOptions:
    max_size: Optional[int] = None  # px of the short side; larger images are downscaled
    quality: int = 95  # JPEG quality of re-encoded images
    keep_non_jpeg: bool = False  # store PNG/WebP/... bytes as they are (member .png, ...)


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    images: tuple[SourceImage, ...]
    digest: str  # what the shard must contain: keys, labels, source sizes and mtimes, options


def plan_shards(tree: ImageTree, samples_per_shard: int, prefix: str,
                shuffle_seed: Optional[int], encode: EncodeOptions) -> list[ShardPlan]:
    """Cut the tree into shards: sorted, shuffled by ``shuffle_seed`` (None: sorted order)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    images = sorted(tree.images, key=lambda im: im.path)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(images)
    plans = []
    for start in range(0, len(images), samples_per_shard):
        chunk = tuple(images[start:start + samples_per_shard])
        h = hashlib.sha256(json.dumps(asdict(encode), sort_keys=True).encode())
        for im in chunk:
            st = os.stat(im.path)
            h.update(f"{im.key}\t{im.label}\t{im.path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        index = start // samples_per_shard
        plans.append(ShardPlan(index, f"{prefix}-{index:06d}.tar", chunk, h.hexdigest()))
    return plans


def _check_decodes(data: bytes) -> Image.Image:
    """Fully decode ``data`` (the stream's decoders: simplejpeg, PIL as fallback)."""
    if data[:2] == b"\xff\xd8":
        try:
            import simplejpeg

            if simplejpeg.decode_jpeg_header(data)[2] not in ("CMYK", "YCCK"):
                # Scaled decoding still entropy-decodes every block: truncation is caught.
                simplejpeg.decode_jpeg(data, min_height=64, min_width=64, min_factor=2.0)
                return Image.open(io.BytesIO(data))  # lazily: header only
        except (ImportError, ValueError):
            pass  # PIL tolerates some warnings simplejpeg raises on; let it decide
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except UnidentifiedImageError as exc:
        raise UnreadableImageError("does not decode: not an image of a known format") from exc
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise UnreadableImageError(f"does not decode: {exc}") from exc


def prepare_image(path: str, encode: EncodeOptions) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a source image as it goes into the shard.

    Raises:
        UnreadableImageError: the file cannot be read or does not decode.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UnreadableImageError(f"cannot read the file: {exc}") from exc
    img = _check_decodes(data)
    too_big = encode.max_size is not None and min(img.size) > encode.max_size
    if img.format == "JPEG" and not too_big:
        return "jpg", data
    if img.format != "JPEG" and encode.keep_non_jpeg and not too_big and img.format:
        return img.format.lower(), data
    try:
        img = Image.open(io.BytesIO(data))
        if too_big:
            scale = encode.max_size / min(img.size)
            size = tuple(max(encode.max_size, round(x * scale)) for x in img.size)
            if img.format == "JPEG":
                img.draft("RGB", size)  # DCT-domain reduction first: faster, same quality
            img = img.convert("RGB").resize(size, Image.LANCZOS)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=encode.quality)
    except (OSError, ValueError) as exc:
        raise UnreadableImageError(f"cannot re-encode: {exc}") from exc
    return "jpg", buf.getvalue()


def write_shard(plan: ShardPlan, dst: str, root: str, encode: EncodeOptions,
                options: StorageOptions) -> dict:
    """Build, publish and receipt one shard; returns the receipt (rejects included)."""
    members, rejects = [], []
    for im in plan.images:
        try:
            ext, data = prepare_image(im.path, encode)
        except UnreadableImageError as exc:
            rejects.append({"path": os.path.relpath(im.path, root), "reason": str(exc),
                            "shard": plan.name})
            continue
        members += [(f"{im.key}.{ext}", data), (f"{im.key}.cls", str(im.label).encode())]
    data = tar_bytes(members)
    storage.write_bytes(storage.join(dst, plan.name), data, options)
    receipt = {"name": plan.name, "num_samples": len(members) // 2, "bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), "plan": plan.digest,
               "rejects": rejects}
    receipt_url = storage.join(storage.join(dst, PROGRESS_DIR), plan.name + ".json")
    storage.write_bytes(receipt_url, json.dumps(receipt).encode(), options)
    return receipt


def _finished(plans: list[ShardPlan], dst: str, options: StorageOptions,
              verify: bool) -> dict[str, dict]:
    """Receipts of shards a previous run completed for this very plan."""
    sizes = storage.list_sizes(dst, options)
    have = storage.list_sizes(storage.join(dst, PROGRESS_DIR), options)
    candidates = [p for p in plans if p.name in sizes and p.name + ".json" in have]

    def check(plan: ShardPlan) -> Optional[dict]:
        url = storage.join(storage.join(dst, PROGRESS_DIR), plan.name + ".json")
        try:
            receipt = json.loads(storage.read_bytes(url, options))
        except (ValueError, storage.StorageUnavailableError):
            return None
        if receipt.get("plan") != plan.digest or receipt.get("bytes") != sizes[plan.name]:
            return None
        if verify:
            data = storage.read_bytes(storage.join(dst, plan.name), options)
            if hashlib.sha256(data).hexdigest() != receipt.get("sha256"):
                return None
        return receipt

    with cf.ThreadPoolExecutor(16) as pool:  # receipts are small: latency-bound on S3
        results = pool.map(check, candidates)
    return {p.name: r for p, r in zip(candidates, results) if r is not None}


def _remove_stale(dst: str, prefix: str, keep: set[str], options: StorageOptions) -> None:
    """Drop shards of an earlier plan with this prefix, so a directory glob never sees a sample
    twice, and temp files of killed runs. One writer per destination at a time."""
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    progress = storage.join(dst, PROGRESS_DIR)
    for name in storage.list_sizes(dst, options):
        if pattern.match(name) and name not in keep:
            logger.info("removing %s: not in the current plan", storage.join(dst, name))
            storage.remove(storage.join(dst, name), options)
            storage.remove(storage.join(progress, name + ".json"), options)
    for directory in (dst, progress):  # temp files of a killed run (local only; S3 has none)
        for name in storage.list_sizes(directory, options):
            if name.startswith(".") and ".tmp-" in name:
                storage.remove(storage.join(directory, name), options)


def make_shards(src: str, dst: str, *, labels: Optional[str] = None,
                classes: Optional[list[str]] = None, samples_per_shard: int = 1000,
                prefix: Optional[str] = None, workers: Optional[int] = None,
                shuffle_seed: Optional[int] = 0, encode: EncodeOptions = EncodeOptions(),
                options: StorageOptions = StorageOptions(), verify: bool = False) -> dict:
    """Shard the image tree ``src`` into ``dst`` (a directory or ``s3://bucket/prefix``) and
    write ``dst/manifest.json``; returns the manifest.

    Args:
        src, labels, classes: the tree (see :func:`glotok.data.imagetree.scan_tree`).
        samples_per_shard: target samples per shard (the last one may hold fewer; rejected
            images make a shard smaller, never move samples between shards).
        prefix: shard names ``<prefix>-000000.tar``; default: the name of ``src``.
        workers: processes writing shards (default: CPU count; 1: in this process).
        shuffle_seed: seed of the fixed shuffle before sharding; None keeps sorted order.
        encode: re-encoding policy; options: how to reach ``dst``.
        verify: re-hash finished shards before trusting them (reads them back).
    """
    tree = scan_tree(src, labels, classes)
    for path in tree.unlabelled:
        logger.warning("rejected %s: no label in %s", path, labels)
    if tree.not_images:
        logger.info("ignoring %d files that are not images (first: %s)", len(tree.not_images),
                    tree.not_images[0])
    prefix = prefix or os.path.basename(os.path.normpath(src))
    plans = plan_shards(tree, samples_per_shard, prefix, shuffle_seed, encode)
    done = _finished(plans, dst, options, verify)
    todo = [p for p in plans if p.name not in done]
    logger.info("%s: %d images in %d shards; %d already complete, %d to write", src,
                len(tree.images), len(plans), len(done), len(todo))
    if todo:
        storage.remove(storage.join(dst, MANIFEST_NAME), options)  # must not outlive the plan
    _remove_stale(dst, prefix, {p.name for p in plans}, options)

    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    if workers == 1:
        results = (write_shard(p, dst, tree.root, encode, options) for p in todo)
        _collect(results, done, len(plans))
    else:
        # spawn: no inherited event loops, locks or server threads from this process
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(write_shard, p, dst, tree.root, encode, options) for p in todo]
            _collect((f.result() for f in cf.as_completed(futures)), done, len(plans))

    receipts = [done[p.name] for p in plans]
    rejects = [r for rec in receipts for r in rec["rejects"]]
    rejects += [{"path": os.path.relpath(p, tree.root), "reason": f"no label in {labels}",
                 "shard": None} for p in tree.unlabelled]
    manifest = {
        "format": "webdataset", "version": MANIFEST_VERSION,
        "created_by": "tools/make_shards.py", "source": tree.root,
        "samples_per_shard": samples_per_shard,
        "num_samples": sum(r["num_samples"] for r in receipts), "num_shards": len(receipts),
        "classes": tree.classes,
        "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256", "plan")}
                   for r in receipts],
        "rejects": rejects,
        "options": {**asdict(encode), "shuffle_seed": shuffle_seed, "prefix": prefix},
    }
    storage.write_bytes(storage.join(dst, MANIFEST_NAME),
                        json.dumps(manifest, indent=1).encode(), options)
    logger.info("wrote %s: %d samples in %d shards, %d rejected", storage.join(dst, MANIFEST_NAME),
                manifest["num_samples"], len(receipts), len(rejects))
    return manifest


def _collect(results, done: dict[str, dict], total: int) -> None:
    for receipt in results:
        done[receipt["name"]] = receipt
        for r in receipt["rejects"]:
            logger.warning("rejected %s: %s", r["path"], r["reason"])
        logger.info("[%d/%d] %s: %d samples, %.1f MB", len(done), total, receipt["name"],
                    receipt["num_samples"], receipt["bytes"] / 1e6)
