"""Feature extractors for the teacher histogram: pooled patch features of a frozen vision model.

GloTok's teacher (GLOTOK.md) is built from patch features of a pre-trained model, average-pooled
in 4x4 windows as VQGAN-LC does with CLIP, then k-means'd. Every extractor here maps a batch of
images to those pooled vectors:

    extractor(images (B, 3, H, W) in [-1, 1] or uint8) -> (B * g * g, d) float32

with g = grid / pool (DINOv2 ViT-B/14 at 224: grid 16, g 4, d 768), image-major, and the g x g
vectors of one image in row-major order. ``extractor.provenance()`` names the model, layer,
pooling and input for the teacher file.

Registry (``TEACHER_FEATURES``, ``build_feature_extractor(name, **kwargs)``):

- ``dinov2``: ``transformers`` DINOv2 (with or without registers) from a local directory or,
  only when the user names one, a hub id. ImageNet mean/std, images resized so the short side is
  256 then center-cropped to 224, 16x16 patches of 14 pixels. The model must be named
  (``name_or_path=``); GLOTOK.md's is ``DEFAULT_DINOV2`` = ``facebook/dinov2-base``.
- ``efficientnet_lite0``: the ImageNet EfficientNet-Lite0 that ``glotok[sample]`` ships; the
  stride-16 feature map (112 channels) of the 256x256 input, a 16x16 grid like ViT-B/14 at 224.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_DINOV2",
    "TeacherModelError",
    "TeacherFeatureExtractor",
    "DinoV2Features",
    "EfficientNetLite0Features",
    "TEACHER_FEATURES",
    "build_feature_extractor",
]

DEFAULT_DINOV2 = "facebook/dinov2-base"  # ViT-B/14, GLOTOK.md's teacher
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherModelError(RuntimeError):
    """A teacher feature model cannot be loaded; the message names it and the fix."""


def _to_unit_range(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 [0, 255] or float [-1, 1] -> float32 [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"teacher feature extractors take (B, 3, H, W) images, got "
                         f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


class TeacherFeatureExtractor(nn.Module):
    """Base: frozen backbone -> (B, d, grid, grid) feature map -> pooled vectors.

    Subclasses set ``name`` and ``layer`` and implement ``feature_map`` (input: float [-1, 1]).
    """

    name: str = ""
    layer: str = ""

    def __init__(self, pool: int = 4) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.pool = int(pool)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TeacherFeatureExtractor":
        return super().train(False)  # frozen: dropout / BatchNorm stay in eval

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [-1, 1] -> (B, d, grid, grid)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 or float in [-1, 1] -> (B * g * g, d) float32, g = grid / pool."""
        device = next(self.parameters()).device
        f = self.feature_map(_to_unit_range(images.to(device)))
        h, w = f.shape[2:]
        if h % self.pool or w % self.pool:
            raise ValueError(f"{self.name}: the {h}x{w} feature grid is not divisible by pool="
                             f"{self.pool}; feed images whose grid is (e.g. 256x256)")
        f = F.avg_pool2d(f.float(), self.pool)  # (B, d, g, g)
        return f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])

    def provenance(self) -> dict:
        """Fields for the teacher file's provenance (model, layer, pooling, input)."""
        return {"model": self.name, "layer": f"{self.layer}, {self.pool}x{self.pool} avg-pooled",
                "pool": self.pool}


# ----------------------------------------------------------------------------- DINOv2


class DinoV2Features(TeacherFeatureExtractor):
    """DINOv2 patch tokens (CLS and register tokens dropped) on the 16x16 grid, pooled.

    Args:
        model: a ``transformers`` ``Dinov2Model`` or ``Dinov2WithRegistersModel``; build one
            with ``from_pretrained`` or ``from_config``.
        name: for provenance (hub id or directory).
        layer: None: ``last_hidden_state`` (after the final LayerNorm); an int i: the output of
            block i (``hidden_states[i]``, 0 = embeddings), before any LayerNorm.
        pool: average-pool window on the patch grid.
        crop: center-crop size (224: 16 patches of 14); images are first resized (bicubic,
            antialiased) so the short side is ``crop * 256 / 224``, unless it already is.
    """

    def __init__(self, model: nn.Module, *, name: str = "dinov2", layer: Optional[int] = None,
                 pool: int = 4, crop: int = 224) -> None:
        super().__init__(pool)
        self.model = model
        self.name = name
        self.layer = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"
        self._layer = layer
        self.crop = int(crop)
        self.resize = round(self.crop * 256 / 224)
        patch = int(model.config.patch_size)
        if self.crop % patch:
            raise ValueError(f"crop={crop} is not a multiple of the patch size {patch}")
        self.grid = self.crop // patch
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], *, layer: Optional[int] = None,
                        pool: int = 4, crop: int = 224, **hub_kwargs) -> "DinoV2Features":
        """Loads DINOv2 weights: from ``name_or_path`` if it is a local directory (never touching
        the network), else from the Hugging Face hub id it names (the cache first, a download
        only then). There is no default: the hub is reached only for an id the caller names
        (the tools' default is ``DEFAULT_DINOV2``).

        Raises:
            TeacherModelError: transformers missing, or the weights cannot be loaded.
        """
        try:
            from transformers import AutoModel
        except ImportError as e:
            raise TeacherModelError(f"the dinov2 teacher needs transformers ({e}): pip install "
                                    f"'glotok[teacher]'") from e
        local = Path(name_or_path).expanduser()
        kwargs = dict(hub_kwargs)
        if local.is_dir():
            kwargs["local_files_only"] = True
        try:
            model = AutoModel.from_pretrained(str(local) if local.is_dir() else str(name_or_path),
                                              **kwargs)
        except Exception as e:
            raise TeacherModelError(
                f"cannot load DINOv2 '{name_or_path}' ({type(e).__name__}: {e}). Pass a local "
                f"directory holding config.json and the weights (e.g. a `huggingface-cli "
                f"download facebook/dinov2-base` snapshot), or a hub id on a machine that can "
                f"reach the hub") from e
        if "dinov2" not in getattr(model.config, "model_type", ""):
            raise TeacherModelError(f"'{name_or_path}' is a {model.config.model_type} model, "
                                    f"not DINOv2; use another registry entry for it")
        return cls(model, name=str(name_or_path), layer=layer, pool=pool, crop=crop)

    @classmethod
    def from_config(cls, config, *, seed: int = 0, **kwargs) -> "DinoV2Features":
        """A randomly initialised DINOv2 (seeded) of ``config``: tests and smoke runs."""
        from transformers import AutoModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModel.from_config(config)
        return cls(model, name=f"random {config.model_type} (seed {seed})", **kwargs)

    def _preprocess(self, x: Tensor) -> Tensor:
        """[-1, 1] -> short side ``resize``, center ``crop``, ImageNet-normalised."""
        h, w = x.shape[2:]
        if min(h, w) != self.resize:
            s = self.resize / min(h, w)
            size = (max(self.resize, round(h * s)), max(self.resize, round(w * s)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            h, w = x.shape[2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[:, :, top:top + self.crop, left:left + self.crop]
        return ((x + 1.0) / 2.0 - self.mean) / self.std

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=self._preprocess(x),
                         output_hidden_states=self._layer is not None)
        tokens = out.last_hidden_state if self._layer is None else out.hidden_states[self._layer]
        n = self.grid * self.grid
        patches = tokens[:, -n:]  # CLS (and register tokens) come first
        return patches.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)

    def provenance(self) -> dict:
        return {**super().provenance(), "input": f"short side {self.resize}, center crop "
                f"{self.crop}, ImageNet mean/std, {self.grid}x{self.grid} patches"}


# ----------------------------------------------------------------------------- EfficientNet-Lite0


class EfficientNetLite0Features(TeacherFeatureExtractor):
    """The ImageNet EfficientNet-Lite0 of ``glotok[sample]``: one tap of its feature pyramid.

    Args:
        tap: index into ``EfficientNetPerceptual``'s taps (strides 2, 4, 8, 16, 32); 3 is the
            stride-16 map, 112 channels, 16x16 on a 256x256 image.
        pool: average-pool window on that map.

    Input: the center-cropped image as it is (256x256 for a 16x16 grid), no resize.
    """

    name = "efficientnet_lite0 (ImageNet)"

    def __init__(self, tap: int = 3, pool: int = 4) -> None:
        super().__init__(pool)
        from glotok.models.perceptual import EfficientNetPerceptual, PerceptualWeightsError

        try:
            self.net = EfficientNetPerceptual()
        except PerceptualWeightsError as e:
            raise TeacherModelError(f"the efficientnet_lite0 teacher needs the glotok[sample] "
                                    f"packages: {e}") from e
        if not 0 <= tap < len(self.net.tap_blocks):
            raise ValueError(f"tap must be in [0, {len(self.net.tap_blocks)}), got {tap}")
        self.tap = tap
        self.layer = f"stride-{2 ** (tap + 1)} feature map (tap {tap})"
        self._freeze()

    def feature_map(self, x: Tensor) -> Tensor:
        # EfficientNetPerceptual.features applies the net's own input scaling to [-1, 1] input.
        return self.net.features(x)[self.tap]


# ----------------------------------------------------------------------------- registry

TEACHER_FEATURES: dict[str, Callable[..., TeacherFeatureExtractor]] = {
    "dinov2": DinoV2Features.from_pretrained,
    "efficientnet_lite0": EfficientNetLite0Features,
}


def build_feature_extractor(name: str, **kwargs) -> TeacherFeatureExtractor:
    """The extractor registered as ``name``, built with ``kwargs`` (e.g. ``dinov2``:
    ``name_or_path=``, ``layer=``, ``pool=``; ``efficientnet_lite0``: ``tap=``, ``pool=``)."""
    if name not in TEACHER_FEATURES:
        raise ValueError(f"unknown teacher feature extractor {name!r}: choose one of "
                         f"{sorted(TEACHER_FEATURES)}")
    return TEACHER_FEATURES[name](**kwargs)
