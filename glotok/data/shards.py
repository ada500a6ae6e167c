"""A simple reader of WebDataset image shards: shard specs, JPEG decoding, crops, the dataset.

A shard is a tar whose members are grouped by key (``<key>.jpg`` + ``<key>.cls``), as written
by ``tools/make_shards.py`` and :func:`glotok.data.sample.ensure_sample_shards`. This reader
opens local files with the stdlib ``tarfile``; a later resumable S3 stream replaces
:class:`ShardImageDataset` behind the same yield format and :func:`make_image_loader`.

Crops follow ADM/LlamaGen (guided-diffusion ``image_datasets.py``): box-halve large images,
bicubic-resize the short side, crop. Images become float32 ``(3, H, W)`` tensors in [-1, 1].
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
from typing import Any, Iterator

import numpy as np
import torch
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


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor ``(3, H, W)`` in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# --- the dataset -----------------------------------------------------------------------------


class ShardImageDataset(torch.utils.data.IterableDataset):
    """Stream ``{"image", "label", "key"}`` samples from tar shards, split over ranks and workers.

    Each DataLoader worker of each rank is one of ``world_size * num_workers`` readers. When
    there are at least that many shards, the epoch's shard order is split between them
    round-robin. With fewer shards (small eval or sample sets) every reader reads every shard
    and keeps the records whose stream index modulo the reader count is its own; with ``loop``
    that index runs on across epochs, so even a reader past the sample count gets data. Either
    way each sample goes to exactly one reader per epoch; readers may get unequal counts.

    Order is a pure function of ``(seed, epoch)`` and the reader layout: shard order is shuffled
    per epoch, samples pass a ``shuffle_buffer``-deep shuffle buffer, and a sample's crop and
    flip draw from an RNG seeded by ``(seed, epoch, key)``. ``train=False`` reads in order and
    center-crops. With ``loop=True`` the stream runs on through epochs ``epoch, epoch + 1, ...``.

    A corrupt image, bad label or truncated tar is skipped, counted in ``self.skipped`` (per
    worker process) and logged once; the epoch goes on.

    Yields:
        ``image``: float32 ``(3, image_size, image_size)`` in [-1, 1]; ``label``: int64 scalar
        (-1 for a sample without ``.cls``); ``key``: str.
    """

    def __init__(
        self,
        shards: list[str],
        image_size: int,
        *,
        train: bool = True,
        crop_range: float = 1.1,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        loop: bool = True,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("ShardImageDataset needs at least one shard; see expand_shards()")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if crop_range < 1:
            raise ValueError(f"crop_range must be >= 1, got {crop_range}")
        self.shards = list(shards)
        self.image_size = image_size
        self.train, self.crop_range, self.random_flip = train, crop_range, random_flip
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.seed, self.rank, self.world_size, self.epoch, self.loop = (
            seed, rank, world_size, epoch, loop,
        )
        self.skipped = 0
        self._logged: set[tuple[str, str]] = set()

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next ``iter()``; reaches workers only if they are (re)started after it."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _skip(self, shard: str, key: str, reason: object) -> None:
        self.skipped += 1
        if (shard, key) not in self._logged:
            self._logged.add((shard, key))
            logger.warning("skipping %s in shard %s: %s", key or "<rest>", shard, reason)

    def _read_tar(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Yield ``(key, {ext: bytes})`` groups of consecutive members; stop at damage."""
        key, group = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    m = _KEY_EXT.match(member.name)
                    if not member.isfile() or m is None:
                        continue
                    if m[1] != key:
                        if key is not None:
                            yield key, group
                        key, group = m[1], {}
                    group[m[2].lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            # Truncated or corrupt tar: a group cut short is dropped, the epoch goes on.
            self._skip(shard, key or "", f"unreadable tar ({exc})")
            return
        if key is not None:
            yield key, group

    def _records(
        self, epoch: int, reader: int, readers: int, stream_index: Iterator[int]
    ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """This reader's ``(shard, key, members)`` records of one epoch, before shuffling."""
        order = list(self.shards)
        if self.train:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        if len(order) >= readers:
            for shard in order[reader::readers]:
                for key, group in self._read_tar(shard):
                    yield shard, key, group
            return
        # Fewer shards than readers: all read everything and keep every readers-th record.
        # ``stream_index`` runs on across epochs, so with ``loop`` even a reader beyond the
        # sample count gets data (in a later pass) and the endless stream stays exactly-once.
        for shard in order:
            for key, group in self._read_tar(shard):
                if next(stream_index) % readers == reader:
                    yield shard, key, group

    def _shuffled(self, records: Iterator, rng: random.Random) -> Iterator:
        buffer: list = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], record = record, buffer[i]
            yield record
        rng.shuffle(buffer)
        yield from buffer

    def _sample(self, shard: str, key: str, group: dict, epoch: int) -> dict[str, Any] | None:
        data = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
        if data is None:
            self._skip(shard, key, f"no image member (has {sorted(group)})")
            return None
        size = self.image_size
        try:
            label = int(group["cls"].decode("ascii").strip()) if "cls" in group else -1
            if self.train:
                img = decode_image(data, min_size=int(size * self.crop_range))
                rng = random.Random(f"aug:{self.seed}:{epoch}:{key}")
                img = random_crop_arr(img, size, self.crop_range, rng)
                if self.random_flip:
                    img = random_hflip(img, rng)
            else:
                img = center_crop_arr(decode_image(data, min_size=size), size)
        except (ImageDecodeError, ValueError, UnicodeDecodeError) as exc:
            self._skip(shard, key, exc)
            return None
        label_t = torch.tensor(label, dtype=torch.int64)
        return {"image": to_tensor(img), "label": label_t, "key": key}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self._reader()
        stream_index = itertools.count()
        epoch, idle_epochs = self.epoch, 0
        while True:
            records = self._records(epoch, reader, readers, stream_index)
            if self.shuffle_buffer > 1:
                rng = random.Random(f"buffer:{self.seed}:{epoch}:{reader}:{readers}")
                records = self._shuffled(records, rng)
            idle_epochs += 1
            for shard, key, group in records:
                sample = self._sample(shard, key, group, epoch)
                if sample is not None:
                    idle_epochs = 0
                    yield sample
            if not self.loop:
                return
            # A reader may legitimately wait up to ``readers`` passes for its first modulo
            # record; beyond that, looping on would spin forever without yielding.
            if idle_epochs > readers:
                raise RuntimeError(
                    f"reader {reader} of {readers} (rank {self.rank}) got no usable sample from "
                    f"{len(self.shards)} shards in {idle_epochs} epochs: check the shards "
                    "(see the warnings above)"
                )
            epoch += 1


def make_image_loader(
    shards: str | list[str],
    image_size: int,
    batch_size: int,
    *,
    num_workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    crop_range: float = 1.1,
    random_flip: bool = True,
    train: bool = True,
    shuffle_buffer: int = 1000,
) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ShardImageDataset`: endless and shuffled for ``train``, else
    one in-order, center-cropped pass per ``iter()``.

    Batches are ``{"image": (B, 3, S, S) float32, "label": (B,) int64, "key": list[str]}``.
    Train drops the last partial batch so every step has ``batch_size`` samples.
    """
    dataset = ShardImageDataset(
        expand_shards(shards),
        image_size,
        train=train,
        crop_range=crop_range,
        random_flip=random_flip,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        loop=train,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
    )
