"""Teacher histograms for the histogram relation loss: the file format, k-means, and builders.

A teacher file is a small JSON document (format_version 1)::

    {
      "format_version": 1,
      "bins": 40,                      # number of histogram bins (int >= 2)
      "alpha": 190.0,                  # kernel sharpness used to build it (float > 0)
      "bin_range": [-1.0, 1.0],        # bin centres evenly spaced on this range, ends included
      "histogram": [0.0001, ...],      # `bins` non-negative floats summing to 1 (within 1e-4)
      "provenance": {                  # how it was made; free-form extras are kept as they are
        "source": "features",          # "features" | "centroids" | "checkpoint" | ...
        "model": "dinov2_vitb14", "layer": "last", "k": 4096,
        "num_vectors": 1281167, "images_seen": 1281167, "dim": 768,
        "created": "2025-01-01T00:00:00+00:00", "glotok_version": "0.1.0"
      },
      "centroids_file": "teacher.centroids.npy"   # optional: (k, d) float32 sidecar, path
    }                                             # relative to the JSON file's directory

The histogram must have been built with the same ``bins`` and ``alpha`` as the loss that uses
it (``glotok.config`` checks this). Build one with ``build_teacher`` (vectors, optionally
k-means'd to centroids first) or ``teacher_from_codebook`` (another tokenizer's codebook).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from glotok.losses.histogram import soft_histogram

FORMAT_VERSION = 1
SUM_TOLERANCE = 1e-4
_REBUILD = "rebuild it with tools/build_teacher.py"


class TeacherFileError(ValueError):
    """A teacher histogram file that cannot be used; the message names the file and the fix."""


def _glotok_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("glotok")
    except PackageNotFoundError:  # running from a checkout that was never pip-installed
        import glotok

        return str(getattr(glotok, "__version__", "unknown"))


def _check_histogram(hist, bins: int, where: str) -> list[float]:
    """Validated copy of ``hist`` as a list of floats; ``where`` prefixes every message."""
    if not isinstance(hist, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in hist):
        raise TeacherFileError(f"{where}: 'histogram' must be a list of numbers; {_REBUILD}")
    values = [float(v) for v in hist]
    if len(values) != bins:
        raise TeacherFileError(f"{where}: 'histogram' has {len(values)} values but bins={bins}; "
                               f"{_REBUILD} with the intended number of bins")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise TeacherFileError(f"{where}: 'histogram' has negative, NaN or infinite values; "
                               f"{_REBUILD}")
    total = math.fsum(values)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise TeacherFileError(f"{where}: 'histogram' sums to {total:.8g}, not 1 (within "
                               f"{SUM_TOLERANCE}); {_REBUILD} or normalise it")
    return values


@dataclass
class TeacherHistogram:
    """A teacher histogram and how it was made.

    Attributes:
        histogram: ``bins`` non-negative floats summing to 1.
        centroids: optional (k, d) vectors the histogram was computed from, saved as a
            ``.npy`` sidecar next to the JSON file.
    """

    histogram: list[float]
    bins: int
    alpha: float
    provenance: dict = field(default_factory=dict)
    centroids: Optional[np.ndarray] = None

    def __post_init__(self):
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 2:
            raise TeacherFileError(f"teacher histogram: bins must be an int >= 2, got "
                                   f"{self.bins!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise TeacherFileError(f"teacher histogram: alpha must be > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        self.histogram = _check_histogram(list(self.histogram), self.bins, "teacher histogram")
        if not isinstance(self.provenance, dict):
            raise TeacherFileError("teacher histogram: provenance must be a dict")
        if self.centroids is not None:
            self.centroids = np.asarray(self.centroids, dtype=np.float32)
            if self.centroids.ndim != 2:
                raise TeacherFileError(f"teacher histogram: centroids must be 2-D (k, d), got "
                                       f"shape {self.centroids.shape}")

    def tensor(self, device=None) -> Tensor:
        """The histogram as a float32 (bins,) tensor."""
        return torch.tensor(self.histogram, dtype=torch.float32, device=device)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the JSON file (and the centroid sidecar first), each atomically; returns path.

        Readers never see a half-written file, and a JSON file never names a sidecar that is
        not fully on disk yet.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format_version": FORMAT_VERSION, "bins": self.bins, "alpha": self.alpha,
               "bin_range": [-1.0, 1.0], "histogram": self.histogram,
               "provenance": self.provenance}
        if self.centroids is not None:
            sidecar = path.with_name(path.stem + ".centroids.npy")
            _atomic_write(sidecar, lambda f: np.save(f, self.centroids))
            doc["centroids_file"] = sidecar.name
        try:
            text = json.dumps(doc, indent=2)
        except TypeError as e:
            raise TeacherFileError(f"cannot save {path}: provenance must hold only JSON values "
                                   f"(str, number, bool, None, list, dict): {e}") from None
        _atomic_write(path, lambda f: f.write(text.encode()))
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TeacherHistogram":
        """Read and validate a teacher file; every error names the file and how to fix it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher histogram file {path} does not exist: build it "
                                    f"with tools/build_teacher.py or fix the path")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TeacherFileError(f"teacher histogram file {path} is not valid JSON ({e}); "
                                   f"{_REBUILD}") from None
        if not isinstance(doc, dict):
            raise TeacherFileError(f"teacher histogram file {path} must hold a JSON object; "
                                   f"{_REBUILD}")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise TeacherFileError(f"teacher histogram file {path} has format_version "
                                   f"{version!r}, this glotok reads {FORMAT_VERSION}; {_REBUILD} "
                                   f"or upgrade glotok")
        for key in ("histogram", "bins", "alpha", "provenance"):
            if key not in doc:
                raise TeacherFileError(f"teacher histogram file {path} has no '{key}' key; "
                                       f"{_REBUILD}")
        bin_range = doc.get("bin_range", [-1.0, 1.0])
        if bin_range != [-1.0, 1.0] and bin_range != [-1, 1]:
            raise TeacherFileError(f"teacher histogram file {path} has bin_range {bin_range}, "
                                   f"only [-1, 1] is supported; {_REBUILD}")
        centroids = None
        if doc.get("centroids_file") is not None:
            sidecar = path.parent / doc["centroids_file"]
            try:
                centroids = np.load(sidecar, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise TeacherFileError(f"teacher histogram file {path} names centroids file "
                                       f"{sidecar}, which cannot be read ({e}); {_REBUILD} or "
                                       f"drop 'centroids_file'") from None
        try:
            return cls(histogram=doc["histogram"], bins=doc["bins"], alpha=doc["alpha"],
                       provenance=doc["provenance"], centroids=centroids)
        except TeacherFileError as e:
            msg = str(e).removeprefix("teacher histogram: ")
            raise TeacherFileError(f"teacher histogram file {path}: {msg}") from None


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same directory, then os.replace (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rows_per_batch(k: int) -> int:
    # Bound the (rows, k) score matrix at 2^24 elements (64 MB in float32).
    return max(1, (1 << 24) // k)


def _nearest(x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest centroid and the squared distance to it, in row batches.

    Args: x (n, d), c (k, d). Returns (n,) int64 indices and (n,) squared distances.
    """
    c_sq = (c * c).sum(dim=1)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _rows_per_batch(c.shape[0])
    for a in range(0, x.shape[0], step):
        xb = x[a:a + step]
        # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2): one matmul, no (rows, k, d) tensor.
        best, idx[a:a + step] = (xb @ c.T - 0.5 * c_sq).max(dim=1)
        dist[a:a + step] = ((xb * xb).sum(dim=1) - 2.0 * best).clamp_(min=0.0)
    return idx, dist


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0, spherical: bool = True,
           init_sample: int = 65536) -> Tensor:
    """Seeded k-means with k-means++ initialisation, on x's device.

    Memory is O(n * d + rows * k) for a bounded batch of rows, so n ~ 1e6, d = 768 fits.
    Clusters that empty out are re-seeded with the points farthest from their centroid.

    Args:
        x: (n, d) float vectors. With ``spherical`` rows and centroids are l2-normalised (cosine
            k-means), which matches the cosine-similarity histogram.
        init_sample: k-means++ runs on a seeded subsample of at most this many rows (it is
            sequential in k); Lloyd iterations use all rows.
    Returns:
        (k, d) centroids in float32 (float64 for float64 input); if n <= k, the (normalised)
        vectors themselves, (n, d).
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if spherical:
        x = F.normalize(x, dim=1)
    n = x.shape[0]
    if n <= k:
        return x.clone()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sample = x
    if n > max(init_sample, k):
        sample = x[torch.randperm(n, generator=gen, device=x.device)[:max(init_sample, k)]]
    c = _kmeans_pp(sample, k, gen)
    assign = None
    for _ in range(iters):
        new_assign, dist = _nearest(x, c)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        c = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        if empty.numel():
            c[empty] = x[dist.topk(empty.numel()).indices]
        if spherical:
            c = F.normalize(c, dim=1)
    return c


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    x_sq = (x * x).sum(dim=1)

    def sq_dist(i: int) -> Tensor:  # |x - x_i|^2 by one mat-vec, without an (n, d) temporary
        return (x_sq - 2.0 * (x @ x[i]) + x_sq[i]).clamp_(min=0.0)

    idx = [int(torch.randint(n, (1,), generator=gen, device=x.device))]
    d2 = sq_dist(idx[0])
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: any row will do
            nxt = int(torch.randint(n, (1,), generator=gen, device=x.device))
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        idx.append(nxt)
        d2 = torch.minimum(d2, sq_dist(nxt))
    return x[idx].clone()


def build_teacher(vectors: Union[Tensor, np.ndarray], *, bins: int = 40, alpha: float = 190.0,
                  k: Optional[int] = None, seed: int = 0, provenance: Optional[dict] = None,
                  keep_centroids: bool = False, chunk_size: int = 1024) -> TeacherHistogram:
    """Teacher histogram of a set of vectors: features, centroids, or another codebook.

    Args:
        vectors: (n, d), on any device (k-means and the histogram run there).
        k: if given and n > k, k-means (spherical, seeded) to k centroids first. Without it the
            histogram covers all n(n-1)/2 pairs: keep n to a few ten thousand.
        provenance: recorded with the histogram (model, layer, images_seen, ...). Defaults are
            filled in for ``source`` ("features"), ``num_vectors``, ``dim``, ``k``, ``seed``,
            ``created`` and ``glotok_version``; a key given here wins, so a caller passing
            precomputed centroids can record the upstream ``num_vectors`` and ``k``.
        keep_centroids: also keep the (normalised) vectors the histogram was computed from.
    """
    x = torch.as_tensor(vectors) if isinstance(vectors, np.ndarray) else vectors
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"build_teacher expects (n, d) vectors with n >= 2, got "
                         f"{getattr(x, 'shape', type(x))}")
    if not torch.is_floating_point(x) or not torch.isfinite(x).all():
        raise ValueError("build_teacher expects finite floating-point vectors")
    if k is not None and k < 2:
        raise ValueError(f"k must be >= 2 (a histogram needs pairs), got {k}")
    x = x.detach()
    n, d = x.shape
    clustered = k is not None and n > k
    points = kmeans(x, k, seed=seed) if clustered else F.normalize(x.float(), dim=1)
    with torch.no_grad():
        hist = soft_histogram(points, bins, alpha, chunk_size).double()
    prov = {"source": "features", "num_vectors": int(n), "dim": int(d),
            "k": int(k) if clustered else None, "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "glotok_version": _glotok_version(), **(provenance or {})}
    return TeacherHistogram(histogram=(hist / hist.sum()).tolist(), bins=bins, alpha=alpha,
                            provenance=prov,
                            centroids=points.cpu().float().numpy() if keep_centroids else None)


def teacher_from_codebook(codebook: Union[Tensor, np.ndarray], *, bins: int = 40,
                          alpha: float = 190.0, provenance: Optional[dict] = None,
                          keep_centroids: bool = False,
                          chunk_size: int = 1024) -> TeacherHistogram:
    """Teacher from the (n, d) semantic codebook of an already-trained tokenizer checkpoint.

    Put the checkpoint path and step in ``provenance`` (e.g. ``{"model": "ckpt/step_150000"}``).
    """
    return build_teacher(codebook, bins=bins, alpha=alpha, k=None,
                         provenance={**(provenance or {}), "source": "checkpoint"},
                         keep_centroids=keep_centroids, chunk_size=chunk_size)
