"""Labelled image trees on disk: what ``tools/make_shards.py`` reads.

Two layouts, detected from the directory:

- **class per folder** (ImageNet ``train/``, a ``val/`` sorted into folders, any ImageFolder
  tree): ``ROOT/<class>/**/<image>``. Class indices are the sorted folder names (ImageNet's
  ``n01440764`` -> 0 convention) unless a class list is given.
- **flat + label file** (ImageNet's ``val/`` as distributed): ``ROOT/<image>`` and a text file
  of ``<file name> <label>`` lines, separated by spaces, tabs or a comma; ``<file name>`` may omit
  the extension, ``<label>`` is a class name (``n01751748``) or a class index, and only its first
  token counts (so Kaggle's ``LOC_val_solution.csv`` works as is). A header line
  (``ImageId,...``) and ``#`` comments are skipped. Without a label file every image gets -1.

Keys are file stems made safe for WebDataset (no dots; only ``[A-Za-z0-9_-]``), prefixed with
the class in a class-per-folder tree unless the stem already starts with it
(``n01440764/n01440764_10026.JPEG`` -> ``n01440764_10026``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_HEADER_NAMES = {"imageid", "image", "filename", "file", "name", "path"}


@dataclass(frozen=True)
class SourceImage:
    """One image to shard: absolute ``path``, sample ``key``, class index ``label`` (-1: none)."""

    path: str
    key: str
    label: int


@dataclass
class ImageTree:
    """A scanned tree: images sorted by path, the class names (index -> name), and what was
    left out before any image was opened (unlabelled files, files that are not images)."""

    root: str
    images: list[SourceImage]
    classes: list[str]
    unlabelled: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)


def _files_under(directory: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return found


def read_class_list(text: str) -> list[str]:
    """Class names in index order from the text of a manifest (its ``classes``), a JSON list,
    a JSON ``{name: index}`` map, or one name per line (first token; ``n01440764 tench``)."""
    text = text.strip()
    if text.startswith(("{", "[")):
        data = json.loads(text)
        if isinstance(data, dict) and "classes" in data:
            data = data["classes"]
        if isinstance(data, dict):
            return [name for name, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
        return [str(x) for x in data]
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _read_labels(path: str) -> dict[str, str]:
    """``{file name or stem: label token}`` from a label file."""
    labels: dict[str, str] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p for p in re.split(r"[\s,]+", line) if p]
            if len(parts) < 2:
                raise ValueError(f"label file {path}, line {n}: expected '<file name> <label>', "
                                 f"got {line!r}")
            if n == 1 and parts[0].lower() in _HEADER_NAMES:
                continue
            labels[parts[0]] = parts[1]
    return labels


def _index(token: str, lookup: dict[str, int], where: str) -> int:
    if token.lstrip("-").isdigit():
        index = int(token)
        if lookup and not -1 <= index < len(lookup):
            raise ValueError(f"{where}: class index {index} is outside the {len(lookup)} classes")
        return index
    if token not in lookup:
        raise ValueError(f"{where}: class {token!r} is not in the class list; pass the train "
                         "split's manifest as --class-map so both splits share one")
    return lookup[token]


def scan_tree(root: str, labels: Optional[str] = None,
              classes: Optional[list[str]] = None) -> ImageTree:
    """Scan ``root`` (see the module docstring for the layouts).

    Args:
        root: the split's directory, e.g. ``/data/imagenet/train``.
        labels: label file of a flat tree (ignored with class folders).
        classes: class names in index order; default: sorted folder names, or the sorted
            class names of the label file.

    Raises:
        FileNotFoundError: ``root`` or ``labels`` does not exist, or holds no images.
        ValueError: a class is not in ``classes``, a label line is malformed, or two images
            map to one key.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image tree {root} is not a directory")
    entries = sorted(os.listdir(root))
    folders = [e for e in entries
               if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
    flat = [os.path.join(root, e) for e in entries if os.path.isfile(os.path.join(root, e))]
    if folders and not any(_is_image(os.path.basename(p)) for p in flat):
        tree = _scan_folders(root, folders, classes)
        tree.not_images += flat
    else:
        tree = _scan_flat(root, flat, labels, classes)
    if not tree.images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    by_key: dict[str, str] = {}
    for img in tree.images:
        if img.key in by_key:
            raise ValueError(f"{by_key[img.key]} and {img.path} both become sample key "
                             f"{img.key!r}; rename one")
        by_key[img.key] = img.path
    return tree


def _scan_folders(root: str, folders: list[str], classes: Optional[list[str]]) -> ImageTree:
    classes = list(classes) if classes else folders
    lookup = {name: i for i, name in enumerate(classes)}
    images, not_images = [], []
    for folder in folders:
        if folder not in lookup:
            raise ValueError(f"folder {os.path.join(root, folder)} is not a class of the given "
                             f"class list ({len(classes)} classes, e.g. {classes[:3]})")
        for path in _files_under(os.path.join(root, folder)):
            if not _is_image(os.path.basename(path)):
                not_images.append(path)
                continue
            stem = _safe(os.path.splitext(os.path.basename(path))[0])
            cls = _safe(folder)
            key = stem if stem.startswith(cls + "_") else f"{cls}_{stem}"
            images.append(SourceImage(path, key, lookup[folder]))
    return ImageTree(root, images, classes, not_images=not_images)


def _scan_flat(root: str, files: list[str], labels: Optional[str],
               classes: Optional[list[str]]) -> ImageTree:
    paths = [p for p in files if _is_image(os.path.basename(p))]
    not_images = [p for p in files if not _is_image(os.path.basename(p))]
    if labels is None:
        logger.warning("%s has no class folders and no label file was given: every image gets "
                       "label -1", root)
        images = [SourceImage(p, _safe(os.path.splitext(os.path.basename(p))[0]), -1)
                  for p in paths]
        return ImageTree(root, images, list(classes or []), not_images=not_images)
    if not os.path.isfile(labels):
        raise FileNotFoundError(f"label file {labels} does not exist")
    table = _read_labels(labels)
    if classes is None:
        classes = sorted({t for t in table.values() if not t.lstrip("-").isdigit()})
    lookup = {name: i for i, name in enumerate(classes)}
    images, unlabelled = [], []
    for path in paths:
        name = os.path.basename(path)
        token = table.get(name, table.get(os.path.splitext(name)[0]))
        if token is None:
            unlabelled.append(path)
            continue
        label = _index(token, lookup, f"label file {labels}, {name}")
        images.append(SourceImage(path, _safe(os.path.splitext(name)[0]), label))
    return ImageTree(root, images, classes, unlabelled=unlabelled, not_images=not_images)
