"""The built-in sample set (glotok.data.sample) and the shard reader (glotok.data.shards)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glotok.data import sample as sample_module
from glotok.data import shards as shards_module
from glotok.data.sample import ensure_sample_shards, sample_photo_paths
from glotok.data.shards import (
    ImageDecodeError,
    center_crop_arr,
    decode_image,
    expand_shards,
    random_crop_arr,
    random_hflip,
)


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> list[str]:
    return ensure_sample_shards(tmp_path_factory.mktemp("cache"))


def _read_members(shards: list[str]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.name != ".lock"}


def test_sample_shards_hold_every_photo_as_a_decodable_jpeg(sample_shards):
    photos = sample_photo_paths()
    assert len(photos) >= 30
    members = _read_members(sample_shards)
    assert sorted(members) == sorted(p.key for p in photos)
    for photo in photos:
        jpg = members[photo.key]["jpg"]
        assert jpg[:3] == b"\xff\xd8\xff", photo.key
        assert decode_image(jpg).mode == "RGB"
        assert int(members[photo.key]["cls"]) == photo.label
        if photo.path.endswith(".jpg"):  # JPEG sources are stored untouched
            assert jpg == Path(photo.path).read_bytes()

    manifest = json.loads((Path(sample_shards[0]).parent / "manifest.json").read_text())
    assert manifest["num_samples"] == len(photos)
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(photos)
    assert [s["bytes"] for s in manifest["shards"]] == [os.path.getsize(p) for p in sample_shards]
    assert manifest["samples"]["skimage_chelsea"]["cls"] == 281
    assert manifest["samples"]["skimage_chelsea"]["source"] == "skimage/data/chelsea.png"


def test_foolbox_labels_come_from_file_names():
    foolbox = [p for p in sample_photo_paths() if p.key.startswith("foolbox_")]
    assert len(foolbox) == 20
    for photo in foolbox:
        assert photo.label == int(Path(photo.path).stem.rsplit("_", 1)[1])
        assert isinstance(photo.label, int) and 0 <= photo.label < 1000


def test_other_labels_are_imagenet_indices_or_minus_one():
    for photo in sample_photo_paths():
        assert type(photo.label) is int and -1 <= photo.label < 1000


def test_shard_paths_are_sorted_absolute_and_layout_is_stable(sample_shards):
    assert sample_shards == sorted(sample_shards)
    assert all(os.path.isabs(p) for p in sample_shards)
    assert [Path(p).name for p in sample_shards][0] == "sample-000000.tar"
    assert Path(sample_shards[0]).parent.parts[-2:] == ("sample", "v1")


def test_ensure_sample_shards_twice_does_not_rewrite(tmp_path):
    first = ensure_sample_shards(tmp_path)
    before = _mtimes(tmp_path / "sample" / "v1")
    assert ensure_sample_shards(tmp_path, verify_sha256=True) == first
    assert _mtimes(tmp_path / "sample" / "v1") == before


def test_truncated_shard_is_detected_and_rebuilt(tmp_path):
    shards = ensure_sample_shards(tmp_path)
    good = Path(shards[1]).read_bytes()
    with open(shards[1], "r+b") as f:
        f.truncate(len(good) // 2)
    assert ensure_sample_shards(tmp_path) == shards
    assert Path(shards[1]).read_bytes() == good


def test_same_size_corruption_needs_the_sha256_check(tmp_path):
    shards = ensure_sample_shards(tmp_path)
    good = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(good[:-1] + b"x")  # the end of the tar padding: same size
    ensure_sample_shards(tmp_path)
    assert Path(shards[0]).read_bytes() != good
    ensure_sample_shards(tmp_path, verify_sha256=True)
    assert Path(shards[0]).read_bytes() == good


def test_other_shard_size_rebuilds_without_stale_shards(tmp_path):
    assert len(ensure_sample_shards(tmp_path, samples_per_shard=8)) == 5
    shards = ensure_sample_shards(tmp_path, samples_per_shard=20)
    assert len(shards) == 2
    assert sorted(p.name for p in (tmp_path / "sample" / "v1").glob("*.tar")) == [
        Path(p).name for p in shards
    ]


def _build_in_child(cache: str) -> None:
    ensure_sample_shards(cache)


def test_concurrent_builds_leave_a_valid_set(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    directory = tmp_path / "sample" / "v1"
    before = _mtimes(directory)
    assert not list(directory.glob(".*.tmp"))
    ensure_sample_shards(tmp_path, verify_sha256=True)  # verifies, so rewrites nothing
    assert _mtimes(directory) == before


def test_missing_package_names_the_install_command(monkeypatch):
    real = sample_module.importlib.util.find_spec
    monkeypatch.setattr(
        sample_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "skimage" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'glotok\[sample\]'"):
        sample_photo_paths()


def test_cache_dir_defaults_to_glotok_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GLOTOK_CACHE", str(tmp_path))
    assert sample_module.sample_cache_dir() == tmp_path.resolve() / "sample" / "v1"


# --- decoding and transforms -----------------------------------------------------------------


def test_decode_image_gives_rgb_for_grey_cmyk_and_png():
    for mode, color in (("L", 90), ("CMYK", (0, 50, 100, 0))):
        buf = io.BytesIO()
        Image.new(mode, (40, 30), color).save(buf, format="JPEG")
        img = decode_image(buf.getvalue())
        assert (img.mode, img.size) == ("RGB", (40, 30))
    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).mode == "RGB"


@pytest.mark.parametrize("simplejpeg", [True, False])
def test_decode_image_reduces_large_jpegs_but_not_below_min_size(monkeypatch, simplejpeg):
    if not simplejpeg:  # the PIL fallback, with its draft-mode reduction
        monkeypatch.setitem(sys.modules, "simplejpeg", None)
    data = _jpeg((10, 200, 30), size=(640, 480))
    assert decode_image(data).size == (640, 480)
    small = decode_image(data, min_size=100)
    assert small.size == (160, 120)  # 1/4 scale: both sides still >= 100
    assert decode_image(data, min_size=300).size == (640, 480)  # 1/2 would be < 300


def test_decode_image_rejects_garbage_and_truncated_jpegs():
    with pytest.raises(ImageDecodeError):
        decode_image(b"\xff\xd8 not a jpeg at all" * 4)
    data = _jpeg((0, 0, 0), size=(256, 256))
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_center_crop_is_deterministic_and_centred():
    arr = np.zeros((200, 300, 3), np.uint8)
    arr[:, 140:160] = 255  # a white stripe in the middle column band
    img = Image.fromarray(arr)
    a, b = center_crop_arr(img, 64), center_crop_arr(img, 64)
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    cols = np.asarray(a)[32, :, 0]
    assert cols[32] > 200 and cols[0] < 50 and cols[-1] < 50


def test_random_crop_covers_the_crop_range(monkeypatch):
    short_sides = []
    real = shards_module._resize_short_side

    def spy(img, short_side):
        short_sides.append(short_side)
        return real(img, short_side)

    monkeypatch.setattr(shards_module, "_resize_short_side", spy)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 180, 3), np.uint8))
    rng = random.Random(0)
    crops = [random_crop_arr(img, 64, 1.25, rng) for _ in range(300)]
    assert set(short_sides) == set(range(64, 81))  # every integer in [64, int(64 * 1.25)]
    assert all(c.size == (64, 64) for c in crops)
    assert len({np.asarray(c).tobytes() for c in crops}) > 100

    a, b = (random_crop_arr(img, 64, 1.25, random.Random(7)) for _ in range(2))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_random_hflip_flips_about_half_the_time():
    img = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(1, 4, 3))
    rng = random.Random(0)
    flips = sum(random_hflip(img, rng).getpixel((0, 0)) != img.getpixel((0, 0)) for _ in range(400))
    assert 150 < flips < 250


def test_expand_shards_brace_pattern_comma_list_directory_and_glob(tmp_path):
    paths = [_write_tar(tmp_path / f"train-{i:06d}.tar", []) for i in range(4)]
    assert expand_shards(str(tmp_path / "train-{000000..000003}.tar")) == paths
    assert expand_shards(f"{paths[2]},{paths[0]}") == [paths[2], paths[0]]
    assert expand_shards([str(tmp_path / "train-{000001..000002}.tar"), paths[0]]) == [
        paths[1], paths[2], paths[0]
    ]
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(str(tmp_path / "train-*.tar")) == paths
    spec = str(tmp_path / "train-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match="train-"):
        expand_shards(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        expand_shards(str(tmp_path / "empty"))


def test_brace_fallback_matches_braceexpand():
    braceexpand = pytest.importorskip("braceexpand").braceexpand
    for pattern in ["d/x-{000..011}.tar", "a{1,2}b{08..10}", "s3://b/p-{0..3}.tar,", "plain"]:
        assert shards_module._brace_expand_fallback(pattern) == list(braceexpand(pattern))


def test_expand_shards_reads_a_manifest(sample_shards):
    manifest = str(Path(sample_shards[0]).parent / "manifest.json")
    assert expand_shards(manifest) == sample_shards


