"""WebDataset image shards: shard specs, JPEG decoding, and PIL crops.

A shard is a tar whose members are grouped by key (``<key>.jpg`` + ``<key>.cls``), as written
by ``tools/make_shards.py`` and :func:`glotok.data.sample.ensure_sample_shards`; training reads
them through :class:`glotok.data.stream.ShardStream`.

Crops follow ADM/LlamaGen (guided-diffusion ``image_datasets.py``): box-halve large images,
bicubic-resize the short side, crop.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re

from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # webdataset's key/extension split
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


# --- shard specs -----------------------------------------------------------------------------


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside braces: 'a-{0..3}.tar,b.tar' -> ['a-{0..3}.tar', 'b.tar']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _brace_expand_fallback(pattern: str) -> list[str]:
    """Bash-style brace expansion: zero-padded numeric ranges ``{000..127}`` and ``{a,b}``."""
    open_at = pattern.find("{")
    if open_at < 0:
        return [pattern]
    depth = 0
    for close_at in range(open_at, len(pattern)):
        depth += pattern[close_at] == "{"
        depth -= pattern[close_at] == "}"
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
    head, body, tail = pattern[:open_at], pattern[open_at + 1 : close_at], pattern[close_at + 1 :]
    if m := _RANGE.match(body):
        lo, hi = int(m[1]), int(m[2])
        width = len(m[1]) if m[1].startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        choices = _split_top_level(body)
    return [x for c in choices for x in _brace_expand_fallback(head + c + tail)]


def _brace_expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand  # installed with webdataset
    except ImportError:
        return _brace_expand_fallback(pattern)
    return list(braceexpand(pattern))


def _expand_one(spec: str) -> list[str]:
    if "://" in spec:  # remote URLs cannot be listed or checked here; the stream opens them
        return _brace_expand(spec)
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not found:
            raise FileNotFoundError(f"shard directory {spec!r} holds no *.tar files")
        return [os.path.abspath(p) for p in found]
    if spec.endswith(".json"):
        return _shards_from_manifest(spec)
    paths = [p for pat in _brace_expand(spec) for p in (sorted(glob.glob(pat)) or [pat])]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"shard spec {spec!r}: {len(missing)} of {len(paths)} shards do not exist "
            f"(first: {missing[0]!r}); check the path, range and zero padding"
        )
    return [os.path.abspath(p) for p in paths]


def _shards_from_manifest(path: str) -> list[str]:
    # Entries are names relative to the manifest or URLs, bare or as {"name"|"path"|"url": ...}.
    try:
        with open(path) as f:
            entries = json.load(f)["shards"]
        names = [e if isinstance(e, str) else e.get("name") or e.get("path") or e["url"]
                 for e in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FileNotFoundError(
            f"shard manifest {path!r} is unreadable or has no 'shards' list of names ({exc!r}); "
            "rebuild it (glotok.data.sample.ensure_sample_shards or tools/make_shards.py)"
        ) from exc
    root = os.path.dirname(os.path.abspath(path))
    return [n if "://" in n else os.path.join(root, n) for n in names]


def expand_shards(spec: str | list[str]) -> list[str]:
    """Turn a shard spec into a list of shard paths (local ones absolute), in spec order.

    ``spec`` is one of, or a list / comma-separated string of:
    a brace pattern ``dir/train-{000000..000127}.tar``; a glob ``dir/*.tar``; a directory (its
    ``*.tar``, sorted); a ``manifest.json`` (its ``shards`` list, relative to the manifest);
    an ``s3://...`` URL (expanded, not checked).

    Raises:
        FileNotFoundError: a local shard does not exist, or nothing matched, naming the spec.
    """
    specs = spec if isinstance(spec, (list, tuple)) else _split_top_level(spec)
    shards = [p for s in specs if s.strip() for p in _expand_one(s.strip())]
    if not shards:
        raise FileNotFoundError(f"shard spec {spec!r} matched no shards")
    return shards


# --- decoding and transforms -----------------------------------------------------------------


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image (corrupt, truncated or an unknown format)."""


def decode_image(data: bytes, *, min_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    JPEGs go through simplejpeg (libjpeg-turbo) when installed. With ``min_size``, a JPEG at
    least twice that size is decoded at 1/2, 1/4 or 1/8 scale in the DCT, keeping both sides
    ``>= min_size``: several times faster than a full decode, and the crops box-halve large
    images anyway. Other formats, CMYK/YCCK JPEGs (Adobe inversion) and failures go to PIL.

    Raises:
        ImageDecodeError: neither decoder could read the bytes.
    """
    side = min_size or 0
    if data[:2] == b"\xff\xd8":
        try:
            import simplejpeg

            if simplejpeg.decode_jpeg_header(data)[2] not in ("CMYK", "YCCK"):
                arr = simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_height=side, min_width=side, min_factor=2.0
                )
                return Image.fromarray(arr)
        except (ImportError, ValueError):
            pass  # PIL decides, and reports, whether the bytes are really broken
    try:
        img = Image.open(io.BytesIO(data))
        if side and img.format == "JPEG":
            img.draft("RGB", (side, side))  # PIL's own DCT-domain downscale
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode {len(data)}-byte image: {exc}") from exc


def _resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    # Box-halve first: bicubic alone aliases when shrinking a lot (ADM's reason for this loop).
    while min(img.size) >= 2 * short_side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = short_side / min(img.size)
    size = tuple(max(short_side, round(x * scale)) for x in img.size)
    return img.resize(size, resample=Image.BICUBIC)


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: short side resized to ``size``, then the central ``size x size``."""
    img = _resize_short_side(img, size)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop_arr(
    img: Image.Image, size: int, crop_range: float, rng: random.Random
) -> Image.Image:
    """LlamaGen's random crop: resize the short side to a random integer in
    ``[size, int(size * crop_range)]``, then take a uniformly placed ``size x size`` crop."""
    if crop_range < 1:
        raise ValueError(f"crop_range must be >= 1 (1 = no scale jitter), got {crop_range}")
    img = _resize_short_side(img, rng.randint(size, max(size, int(size * crop_range))))
    top, left = rng.randint(0, img.height - size), rng.randint(0, img.width - size)
    return img.crop((left, top, left + size, top + size))


def random_hflip(img: Image.Image, rng: random.Random, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability ``p``."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img
