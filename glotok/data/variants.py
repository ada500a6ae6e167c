"""Augmentation variants of one image for pre-tokenization: center, flip, ten-crop, random crops.

The AR generator trains on codes of augmented images (FAR/LlamaGen ``extract_codes_c2i.py``):
the codes of every variant are computed once, offline. Variant groups and the names of the
variants they produce, in this order:

- ``center``: ADM's center crop (short side to S, central S x S): the evaluation crop.
- ``flip``: the center crop mirrored left-right.
- ``tencrop``: LlamaGen's ``--ten-crop``: the center crop at C = int(S * crop_range), then
  torchvision's ``TenCrop(S)`` of it: corners and centre (``tencrop-tl, -tr, -bl, -br, -c``),
  then the same five of the mirrored image (``tencrop-tl-flip``, ...).
- ``randcrop``: ``n`` LlamaGen training crops (short side to a random integer in [S, C], a
  uniformly placed S x S crop, a coin-flip mirror): ``randcrop-0`` ... ``randcrop-{n-1}``, drawn
  from a generator seeded by ``(seed, key, i)``, so a rerun reproduces them exactly.

Decoding and resizing are the shard stream's (:mod:`glotok.data.augment`), so ``center`` is
pixel for pixel the crop the evaluation stream and ``tools/evaluate.py`` see.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from glotok.data.augment import center_crop, decode_rgb, random_crop

GROUPS = ("center", "flip", "tencrop", "randcrop")
_FIVE = ("tl", "tr", "bl", "br", "c")


def parse_variants(spec: str | list[str], random_crops: int = 1) -> list[str]:
    """Variant names from groups (``"center,flip,tencrop"``), in the order given.

    Raises:
        ValueError: an unknown or repeated group, or ``random_crops`` < 1 with ``randcrop``.
    """
    groups = [g.strip() for g in (spec.split(",") if isinstance(spec, str) else spec)
              if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups or len(set(groups)) != len(groups):
        raise ValueError(f"variants {spec!r}: give a comma list of distinct groups out of "
                         f"{', '.join(GROUPS)} (unknown: {unknown})")
    names = []
    for g in groups:
        if g in ("center", "flip"):
            names.append(g)
        elif g == "tencrop":
            names += [f"tencrop-{p}" for p in _FIVE] + [f"tencrop-{p}-flip" for p in _FIVE]
        else:
            if random_crops < 1:
                raise ValueError(f"random_crops must be >= 1 with randcrop, got {random_crops}")
            names += [f"randcrop-{i}" for i in range(random_crops)]
    return names


def five_crop(image: torch.Tensor, size: int) -> list[torch.Tensor]:
    """torchvision's ``five_crop`` of a ``(3, H, W)`` tensor: tl, tr, bl, br, centre (the centre
    offset rounded as torchvision's ``center_crop`` does)."""
    h, w = image.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"five_crop of {size} from a {h}x{w} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return [image[:, :size, :size], image[:, :size, w - size:], image[:, h - size:, :size],
            image[:, h - size:, w - size:], image[:, top:top + size, left:left + size]]


@dataclass(frozen=True)
class CropVariants:
    """``(key, image bytes) -> (V, 3, S, S)`` uint8, one row per name of ``names``."""

    names: tuple[str, ...]
    size: int
    crop_range: float = 1.1
    seed: int = 0

    def __post_init__(self):
        if self.crop_range < 1:
            raise ValueError(f"crop_range must be >= 1, got {self.crop_range}")

    @property
    def large(self) -> int:
        return max(self.size, int(self.size * self.crop_range))

    def __call__(self, key: str, data: bytes) -> torch.Tensor:
        out: dict[str, torch.Tensor] = {}
        decoded: dict[int, object] = {}  # decode once per scale the variants need

        def arr(min_size: int):
            if min_size not in decoded:
                decoded[min_size] = decode_rgb(data, min_size)
            return decoded[min_size]

        if "center" in self.names or "flip" in self.names:
            center = center_crop(arr(self.size), self.size)
            out["center"], out["flip"] = center, center.flip(-1)
        if any(n.startswith("tencrop-") for n in self.names):
            big = center_crop(arr(self.large), self.large)
            for flip, image in (("", big), ("-flip", big.flip(-1))):
                for pos, crop in zip(_FIVE, five_crop(image, self.size)):
                    out[f"tencrop-{pos}{flip}"] = crop
        for name in self.names:
            if name.startswith("randcrop-"):
                rng = random.Random(f"pretokenize:{self.seed}:{key}:{name}")
                out[name] = random_crop(arr(self.large), self.size, self.crop_range, rng)
        return torch.stack([out[n].contiguous() for n in self.names])
