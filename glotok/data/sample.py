"""The built-in sample set: real photos shipped inside installed packages, as WebDataset shards.

Tests, smoke runs and the sample configs need real photographs without a network or an ImageNet
copy. Three packages of the ``glotok[sample]`` extra ship some:

- ``foolbox``: 20 ImageNet validation JPEGs, ``foolbox/data/imagenet_NN_LABEL.jpg``, whose
  ImageNet-1k class index is the number after the last underscore;
- ``scikit-image``: nine colour photos and six greyscale ones (converted to RGB);
- ``scikit-learn``: ``china.jpg`` and ``flower.jpg``.

:func:`ensure_sample_shards` writes them once into ``<cache>/sample/v1/`` as WebDataset tars::

    sample-000000.tar     <key>.jpg  JPEG bytes (the source file's own bytes when it is a JPEG,
    sample-000001.tar                else re-encoded with PIL at quality 95)
    ...                   <key>.cls  ImageNet-1k class index as ASCII, -1 when none fits
    manifest.json         shards (name, samples, bytes, sha256) and per-key class + source

The tars are byte-for-byte reproducible (fixed member metadata), so two processes that race to
build the set write identical files; a file lock keeps them from interleaving anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Iterator, NamedTuple

logger = logging.getLogger(__name__)

SAMPLE_SET_VERSION = 1
SHARD_PATTERN = "sample-{:06d}.tar"
MANIFEST_NAME = "manifest.json"
_INSTALL_HINT = "pip install 'glotok[sample]'"

# Our labels, not the packages': the ImageNet-1k class index we assign to each non-foolbox photo,
# or -1 where no 1k class fits (textures, micrographs, astronomy). Format: file, class, reason.
SKIMAGE_PHOTOS: tuple[tuple[str, int, str], ...] = (
    ("astronaut.png", -1, "portrait of astronaut Eileen Collins; no 1k class for a person"),
    ("chelsea.png", 281, "tabby, tabby cat"),
    ("coffee.png", 967, "espresso"),
    ("hubble_deep_field.jpg", -1, "galaxies"),
    ("ihc.png", -1, "immunohistochemistry micrograph"),
    ("motorcycle_left.png", 670, "motor scooter: the closest class, 1k has no 'motorcycle'"),
    ("motorcycle_right.png", 670, "motor scooter: the closest class, 1k has no 'motorcycle'"),
    ("retina.jpg", -1, "fundus photograph"),
    ("rocket.jpg", 657, "missile: how 1k classifiers label a launch vehicle on its pad"),
    # Greyscale photos, converted to RGB before encoding.
    ("camera.png", 872, "tripod: the cameraman's camera stands on one"),
    ("brick.png", -1, "brick wall texture"),
    ("grass.png", -1, "grass texture"),
    ("gravel.png", -1, "gravel texture"),
    ("moon.png", -1, "lunar surface"),
    ("coins.png", -1, "coins; 1k has no coin class"),
)
SKLEARN_PHOTOS: tuple[tuple[str, int, str], ...] = (
    ("china.jpg", 698, "palace: the Summer Palace's Tower of Buddhist Incense"),
    ("flower.jpg", 985, "daisy: an orange dahlia, the daisy family's closest 1k class"),
)


class SamplePhoto(NamedTuple):
    """One photo of the sample set: a stable key, the absolute file path, its class (-1: none)."""

    key: str
    path: str
    label: int


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (foolbox pulls in a lot)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the built-in sample set reads photos shipped with the '{package}' package, "
            f"which is not installed: {_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, package: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed '{package}' package; reinstall it: "
            f"pip install --force-reinstall 'glotok[sample]'"
        )
    return str(path)


def sample_photo_paths() -> list[SamplePhoto]:
    """All photos of the sample set, in a fixed order, each as ``(key, path, label)``.

    Keys are stable across machines and versions (``foolbox_imagenet_00``, ``skimage_chelsea``,
    ``sklearn_china``) so shards, teachers and caches built from them agree.

    Raises:
        ImportError: a package of the ``glotok[sample]`` extra is missing.
        FileNotFoundError: a package is installed without its data files.
    """
    photos: list[SamplePhoto] = []

    foolbox_data = _package_dir("foolbox") / "data"
    foolbox_files = sorted(foolbox_data.glob("imagenet_*_*.jpg"))
    if not foolbox_files:
        raise FileNotFoundError(
            f"no imagenet_NN_LABEL.jpg files under {foolbox_data}: the installed foolbox lacks "
            f"its sample images; {_INSTALL_HINT}"
        )
    for path in foolbox_files:
        _, index, label = path.stem.split("_")  # imagenet_NN_LABEL
        photos.append(SamplePhoto(f"foolbox_imagenet_{index}", str(path), int(label)))

    skimage_data = _package_dir("skimage") / "data"
    for name, label, _ in SKIMAGE_PHOTOS:
        path = _require_file(skimage_data / name, "scikit-image")
        photos.append(SamplePhoto(f"skimage_{Path(name).stem}", path, label))

    sklearn_images = _package_dir("sklearn") / "datasets" / "images"
    for name, label, _ in SKLEARN_PHOTOS:
        path = _require_file(sklearn_images / name, "scikit-learn")
        photos.append(SamplePhoto(f"sklearn_{Path(name).stem}", path, label))
    return photos


def sample_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Absolute directory of the sample shards: ``<cache>/sample/v<N>``.

    ``<cache>`` is ``cache_dir``, else ``$GLOTOK_CACHE``, else ``~/.cache/glotok``.
    """
    root = cache_dir or os.environ.get("GLOTOK_CACHE") or Path.home() / ".cache" / "glotok"
    return Path(root).expanduser().resolve() / "sample" / f"v{SAMPLE_SET_VERSION}"


def _jpeg_bytes(path: str) -> bytes:
    """The file's bytes when it is already a JPEG (no generation loss), else an RGB JPEG q95."""
    from PIL import Image

    data = Path(path).read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata makes the tar a pure function of its contents: concurrent or repeated
    # builds give identical bytes, so the manifest's sha256 stays valid.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temp name in the same directory, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_shards(
    directory: Path, samples_per_shard: int, verify_sha256: bool
) -> list[str] | None:
    """Shard paths if the manifest exists and every shard matches it, else None."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        if manifest["samples_per_shard"] != samples_per_shard or not manifest["shards"]:
            return None
        paths = []
        for shard in manifest["shards"]:
            path = directory / shard["name"]
            if path.stat().st_size != shard["bytes"]:
                return None
            if verify_sha256 and _sha256(path) != shard["sha256"]:
                return None
            paths.append(str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, half-written by an older version, or hand-edited: rebuild
    return sorted(paths)


@contextlib.contextmanager
def _exclusive_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``directory/.lock``; a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds are still atomic per file, just not serialised
        yield
        return
    with open(directory / ".lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _source_name(path: str) -> str:
    """Package-relative source path for the manifest ('skimage/data/chelsea.png'): portable."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("foolbox", "skimage", "sklearn"):
            return "/".join(parts[i:])
    return path


def _build(directory: Path, samples_per_shard: int) -> list[str]:
    """Write all shards, then the manifest. The caller holds the lock."""
    photos = sample_photo_paths()  # raises the install hint before anything is touched
    (directory / MANIFEST_NAME).unlink(missing_ok=True)  # a half-rebuilt set must not verify
    for stale in directory.glob(".*.tmp"):  # left by a build that crashed; we hold the lock
        stale.unlink(missing_ok=True)

    shards, samples = [], {}
    for start in range(0, len(photos), samples_per_shard):
        name = SHARD_PATTERN.format(start // samples_per_shard)
        chunk = photos[start : start + samples_per_shard]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for photo in chunk:
                _add_member(tar, f"{photo.key}.jpg", _jpeg_bytes(photo.path))
                _add_member(tar, f"{photo.key}.cls", str(photo.label).encode("ascii"))
                samples[photo.key] = {
                    "cls": photo.label,
                    "source": _source_name(photo.path),
                    "shard": name,
                }
        data = buf.getvalue()
        _write_atomically(directory / name, data)
        shards.append(
            {
                "name": name,
                "num_samples": len(chunk),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )

    names = {s["name"] for s in shards}
    for old in directory.glob("sample-*.tar"):  # from an earlier build with another shard size
        if old.name not in names:
            old.unlink()

    manifest = {
        "version": SAMPLE_SET_VERSION,
        "format": "webdataset",
        "samples_per_shard": samples_per_shard,
        "num_samples": len(photos),
        "shards": shards,
        "samples": samples,
    }
    _write_atomically(directory / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    logger.info("wrote %d sample photos in %d shards to %s", len(photos), len(shards), directory)
    return sorted(str(directory / s["name"]) for s in shards)


def ensure_sample_shards(
    cache_dir: str | Path | None = None,
    samples_per_shard: int = 8,
    *,
    verify_sha256: bool = False,
) -> list[str]:
    """Write the sample set as WebDataset shards once; return their sorted absolute paths.

    Idempotent: when ``manifest.json`` exists and every shard has the recorded size (and, with
    ``verify_sha256``, hash), nothing is written. Otherwise the set is rebuilt under a file lock:
    shards first, each via a temp file and ``os.replace``, the manifest last, so a crash or a
    concurrent reader never sees a manifest whose shards are incomplete.

    Args:
        cache_dir: cache root; the shards go to ``<cache_dir>/sample/v1/``. Defaults to
            ``$GLOTOK_CACHE`` or ``~/.cache/glotok``.
        samples_per_shard: photos per tar; a cached set with another value is rebuilt.
        verify_sha256: also hash every shard (slower; catches bit rot, not just truncation).

    Raises:
        ValueError: ``samples_per_shard`` < 1.
        ImportError: the set must be (re)built and a ``glotok[sample]`` package is missing.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    directory = sample_cache_dir(cache_dir)
    shards = _verified_shards(directory, samples_per_shard, verify_sha256)
    if shards is not None:
        return shards
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(directory):
        # Another process may have finished the build while we waited for the lock.
        shards = _verified_shards(directory, samples_per_shard, verify_sha256)
        if shards is not None:
            return shards
        return _build(directory, samples_per_shard)
