"""Frechet Inception Distance: mergeable Gaussian statistics, the distance, reference files.

A distributed FID pass: each rank or worker feeds its pool3 features to its own
``GaussianStats``; the driver ``merge``s them (or all-reduces ``sum``, ``sum_outer`` and
``count``), then ``frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())``.

Reference statistics are cached as ``.npz`` files (format_version 1, no pickled objects)::

    mu             (D,) float64      mean of the reference features
    sigma          (D, D) float64    unbiased covariance (np.cov(rowvar=False))
    count          int64             number of feature vectors
    source_json    str               canonical JSON describing what they were computed from
    source_sha256  str               sha256 of source_json's UTF-8 bytes
    created        str               ISO-8601 UTC time of writing
    format_version int64             1

``source`` should name everything the statistics depend on: the data (a manifest and its hash,
or shard names and checksums), the preprocessing (crop, size) and the feature network (e.g.
``InceptionFeatures.description()``). ``load_reference`` refuses a file whose ``source_sha256``
is not the hash of the current source, so a stale cache can never be compared silently.

The generation reference is ADM's batch (``VIRTUAL_imagenet256_labeled.npz``), read by
``load_adm_reference_batch``, pinned by sha256 (see ``ADM_REFERENCE_SHA256``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GaussianStats",
    "frechet_distance",
    "ReferenceStats",
    "ReferenceMismatchError",
    "source_hash",
    "save_reference",
    "load_reference",
    "ADM_REFERENCE_SHA256",
    "AdmReferenceBatch",
    "load_adm_reference_batch",
]

PathLike = Union[str, os.PathLike]
REFERENCE_FORMAT_VERSION = 1


class GaussianStats:
    """Running mean and covariance of feature vectors, exactly mergeable across ranks.

    Keeps float64 ``sum`` (D,), ``sum_outer`` (D, D) = sum of x x^T, and ``count``; merging adds
    them, so merged statistics equal single-pass ones up to float64 summation order. The
    covariance is the unbiased one (divisor n - 1), as np.cov in pytorch-fid and ADM's evaluator.
    With pool3 features (entries O(1), D = 2048) the one-pass formula loses nothing measurable in
    float64 at 50k samples.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"GaussianStats dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.count = 0

    def update(self, feats: Union[Tensor, np.ndarray]) -> "GaussianStats":
        """feats: (N, dim) features, any float dtype and device (reduced in float64 there)."""
        x = torch.as_tensor(feats).detach()
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"GaussianStats(dim={self.dim}).update takes (N, {self.dim}) "
                             f"features, got shape {tuple(x.shape)}")
        x = x.double()
        if not torch.isfinite(x).all():
            raise ValueError("GaussianStats.update got NaN or infinite features: check the "
                             "images fed to the feature network")
        self.sum += x.sum(0).cpu().numpy()
        self.sum_outer += (x.T @ x).cpu().numpy()
        self.count += int(x.shape[0])
        return self

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        """Adds another pass's statistics (another rank's, worker's or shard's) in place."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge GaussianStats of dims {self.dim} and {other.dim}")
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        self.count += other.count
        return self

    def mean(self) -> np.ndarray:
        """(dim,) float64."""
        if self.count < 1:
            raise ValueError("GaussianStats.mean of no features: nothing was added")
        return self.sum / self.count

    def cov(self) -> np.ndarray:
        """(dim, dim) float64, unbiased (divisor count - 1)."""
        if self.count < 2:
            raise ValueError(f"GaussianStats.cov needs at least 2 features, has {self.count}")
        mu = self.mean()
        cov = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2  # exact symmetry; rounding in the sum can break it slightly


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``.

    pytorch-fid's and ADM's evaluator's procedure (from TTUR): ``scipy.linalg.sqrtm`` of the
    product; if that is not finite (near-singular product) retry with ``eps`` added to both
    diagonals; drop an imaginary part that numerical error leaves, unless a diagonal entry's
    exceeds 1e-3 (then the inputs are not covariances and this raises).

    Args:
        mu1, mu2: (D,) means; sigma1, sigma2: (D, D) covariances. Converted to float64.

    Returns:
        The distance, a float >= 0 up to rounding (FID when the inputs are pool3 statistics).
    """
    from scipy import linalg

    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the diagonal of "
                      f"both covariances")
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}: the sigmas are not valid "
                             f"covariance matrices (symmetric positive semi-definite)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------- reference files


class ReferenceMismatchError(ValueError):
    """A cached reference (statistics or batch) is not the one expected: hashes differ."""


def source_hash(source: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``source`` (sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical_json(source).encode("utf-8")).hexdigest()


def _canonical_json(source: Mapping[str, Any]) -> str:
    try:
        return json.dumps(source, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"a reference source description must be JSON-serialisable (str, "
                        f"numbers, lists, dicts): {e}") from e


@dataclass(frozen=True)
class ReferenceStats:
    """Reference feature statistics and what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    source: dict
    source_sha256: str
    created: str
    path: Optional[Path] = None


def save_reference(path: PathLike, stats: GaussianStats,
                   source: Mapping[str, Any]) -> ReferenceStats:
    """Writes ``stats`` and the hash of ``source`` to ``path`` (``.npz``), atomically.

    Args:
        path: output file; its directory is created.
        stats: the reference pass's merged statistics (>= 2 vectors).
        source: JSON-serialisable description of everything the statistics depend on (data and
            its checksums, crop, size, feature network); its hash pins the file.
    """
    path = Path(path)
    source_json = _canonical_json(source)
    ref = ReferenceStats(mu=stats.mean(), sigma=stats.cov(), count=stats.count,
                         source=json.loads(source_json), source_sha256=source_hash(source),
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a str path
        np.savez(f, format_version=np.int64(REFERENCE_FORMAT_VERSION), mu=ref.mu,
                 sigma=ref.sigma, count=np.int64(ref.count), source_json=np.str_(source_json),
                 source_sha256=np.str_(ref.source_sha256), created=np.str_(ref.created))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return ref


def load_reference(path: PathLike, *, expected_hash: Optional[str]) -> ReferenceStats:
    """Reads a reference written by ``save_reference`` and checks it is the expected one.

    Args:
        path: the ``.npz`` file.
        expected_hash: ``source_hash`` of the source the caller would compute the reference
            from now. None skips the check (only for inspecting a file; an evaluation must pass
            the hash).

    Raises:
        FileNotFoundError: no such file.
        ReferenceMismatchError: the file was computed from another source (or edited).
        ValueError: not a reference file of this format.
    """
    path = Path(path)
    rebuild = (f"delete {path} and recompute the reference from the current source "
               f"(glotok.eval.fid.save_reference; tools/evaluate.py rebuilds a missing one)")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist: compute them first "
                                f"(glotok.eval.fid.save_reference; tools/evaluate.py does)")
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"])
            mu, sigma, count = z["mu"], z["sigma"], int(z["count"])
            source_json, stored = str(z["source_json"]), str(z["source_sha256"])
            created = str(z["created"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a glotok reference statistics file ({type(e).__name__}: "
                         f"{e}); {rebuild}") from e
    if version != REFERENCE_FORMAT_VERSION:
        raise ValueError(f"{path} has reference format_version {version}, this glotok reads "
                         f"{REFERENCE_FORMAT_VERSION}; {rebuild}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit; {rebuild}")
    actual = hashlib.sha256(source_json.encode("utf-8")).hexdigest()
    if actual != stored:
        raise ReferenceMismatchError(f"{path}: its source description hashes to {actual} but the "
                                     f"file records {stored}: the file was edited; {rebuild}")
    if expected_hash is not None and stored != expected_hash:
        raise ReferenceMismatchError(
            f"reference statistics {path} were computed from a source with sha256 {stored}, but "
            f"the current source hashes to {expected_hash}: the cache is stale or belongs to "
            f"other data or another feature network; {rebuild}")
    return ReferenceStats(mu=mu, sigma=sigma, count=count, source=json.loads(source_json),
                          source_sha256=stored, created=created, path=path)


# ----------------------------------------------------------------------------- ADM reference batch

# sha256 of ADM's reference batches (openai/guided-diffusion, evaluations/README.md), by file
# name. None: not pinned in this table. VIRTUAL_imagenet256_labeled.npz's hash could not be
# verified where this was written, so it is not filled in rather than guessed. Pin it once from
# a trusted download (`sha256sum VIRTUAL_imagenet256_labeled.npz`), either by passing
# ``expected_sha256=`` to load_adm_reference_batch (the CLI's --reference-sha256) or by setting
# ``ADM_REFERENCE_SHA256[name]``, and report the hash with every gFID.
ADM_REFERENCE_SHA256: dict[str, Optional[str]] = {
    "VIRTUAL_imagenet256_labeled.npz": None,
}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, leaving it at the first byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


@dataclass(frozen=True)
class AdmReferenceBatch:
    """An ADM evaluator reference batch: images (``arr_0``) and/or pool3 statistics.

    ``mu``/``sigma`` are the file's own statistics (computed by ADM with the TF graph) when it
    has them, else None. ``pinned`` is True when ``sha256`` was checked against a known hash.
    For gFID ADM uses the file's statistics when present; precision and recall need the images'
    features (``iter_images`` through ``InceptionFeatures``).
    """

    path: Path
    sha256: str
    pinned: bool
    num_images: int
    image_shape: Optional[tuple[int, ...]]
    mu: Optional[np.ndarray]
    sigma: Optional[np.ndarray]

    def iter_images(self, batch_size: int = 64, start: int = 0,
                    stop: Optional[int] = None) -> Iterator[np.ndarray]:
        """Streams ``arr_0[start:stop]`` in (b, H, W, 3) uint8 batches without loading it all,
        so workers can each read their own slice of the 10k images."""
        if self.image_shape is None:
            raise ValueError(f"{self.path} has no 'arr_0' images, only statistics")
        stop = self.num_images if stop is None else min(stop, self.num_images)
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _npy_header(f)
            row = int(np.prod(self.image_shape))  # uint8: one byte per element
            f.seek(start * row, os.SEEK_CUR)
            for i in range(start, stop, batch_size):
                n = min(batch_size, stop - i)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{self.path}: arr_0 ends early at image {i}; the file is "
                                     f"truncated: download it again")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(n, *self.image_shape)


def load_adm_reference_batch(path: PathLike, *, expected_sha256: Optional[str] = None,
                             allow_unpinned: bool = False) -> AdmReferenceBatch:
    """Opens an ADM reference batch ``.npz`` after checking its sha256.

    Layout (guided-diffusion ``evaluations/evaluator.py``): ``arr_0`` (N, H, W, 3) uint8 images,
    and optionally ``mu`` (2048,), ``sigma`` (2048, 2048) pool3 statistics (plus ``mu_s``,
    ``sigma_s`` for sFID, not read here).

    Args:
        path: the ``.npz`` file.
        expected_sha256: the hash to require; default ``ADM_REFERENCE_SHA256[file name]``.
        allow_unpinned: with no known hash for this file, open it anyway (``pinned=False``; the
            report must then say the reference was not verified). Otherwise that raises.

    Raises:
        ReferenceMismatchError: the file's sha256 differs from the expected one, or no hash is
            known and ``allow_unpinned`` is False.
        ValueError: the file is not in ADM's layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ADM reference batch {path} does not exist: download it from "
                                f"openai/guided-diffusion's evaluations/README.md")
    expected = expected_sha256 or ADM_REFERENCE_SHA256.get(path.name)
    actual = _file_sha256(path)
    if expected is None and not allow_unpinned:
        raise ReferenceMismatchError(
            f"ADM reference batch {path} has sha256 {actual}, and no expected hash is known for "
            f"'{path.name}': pin it with expected_sha256=... (CLI: --reference-sha256) after "
            f"checking it against a trusted copy, or open it unverified with allow_unpinned=True")
    if expected is not None and actual != expected.lower():
        raise ReferenceMismatchError(
            f"ADM reference batch {path} has sha256 {actual}, expected {expected.lower()}: it is "
            f"another file or a corrupt download; download it again or fix the pinned hash")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            mu = z["mu"].astype(np.float64) if "mu" in keys else None
            sigma = z["sigma"].astype(np.float64) if "sigma" in keys else None
        num_images, image_shape = 0, None
        if "arr_0" in keys:
            with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
                shape, fortran, dtype = _npy_header(f)
            if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                raise ValueError(f"arr_0 must be C-order (N, H, W, 3) uint8, got shape {shape}, "
                                 f"dtype {dtype}, fortran_order {fortran}")
            num_images, image_shape = int(shape[0]), tuple(int(s) for s in shape[1:])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not an ADM reference batch: {e}") from e
    if image_shape is None and mu is None:
        raise ValueError(f"{path} has neither 'arr_0' images nor 'mu'/'sigma' statistics "
                         f"(keys: {sorted(keys)}): not an ADM reference batch")
    if (mu is None) != (sigma is None) or (
            mu is not None and (mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2)):
        raise ValueError(f"{path}: 'mu' and 'sigma' must both be present with shapes (D,), "
                         f"(D, D)")
    return AdmReferenceBatch(path=path, sha256=actual, pinned=expected is not None,
                             num_images=num_images, image_shape=image_shape, mu=mu, sigma=sigma)
