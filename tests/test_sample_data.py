"""The built-in sample set (glotok.data.sample) and the shard reader (glotok.data.shards)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glotok.data import sample as sample_module
from glotok.data import shards as shards_module
from glotok.data.sample import ensure_sample_shards, sample_photo_paths
from glotok.data.shards import (
    ImageDecodeError,
    ShardImageDataset,
    center_crop_arr,
    decode_image,
    expand_shards,
    make_image_loader,
    random_crop_arr,
    random_hflip,
    to_tensor,
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


def _keys(dataset: ShardImageDataset) -> list[str]:
    return [s["key"] for s in dataset]


# --- the sample set --------------------------------------------------------------------------


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


def test_to_tensor_maps_pixels_to_minus_one_one():
    img = Image.fromarray(np.array([[[0, 255, 0]]], np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert t.flatten().tolist() == [-1.0, 1.0, -1.0]


# --- the dataset -----------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_reader_yields_normalised_images(sample_shards, train):
    dataset = ShardImageDataset(sample_shards, 32, train=train, loop=False)
    samples = list(dataset)
    assert len(samples) == len(sample_photo_paths())
    for s in samples:
        assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
        assert -1.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["label"].dtype == torch.int64 and s["label"].dim() == 0
    assert dataset.skipped == 0


@pytest.mark.parametrize("samples_per_shard", [8, 16])  # 5 shards >= 4 readers; 3 < 4: modulo
def test_one_pass_over_two_ranks_and_two_workers_sees_every_key_once(tmp_path, samples_per_shard):
    shards = ensure_sample_shards(tmp_path, samples_per_shard=samples_per_shard)
    keys: Counter[str] = Counter()
    for rank in range(2):
        dataset = ShardImageDataset(shards, 16, rank=rank, world_size=2, loop=False, seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        rank_keys = [s["key"] for s in loader]
        assert rank_keys, f"rank {rank} got no data"
        keys.update(rank_keys)
    assert keys == Counter({p.key: 1 for p in sample_photo_paths()})


def test_order_is_fixed_by_seed_and_changes_with_epoch(sample_shards):
    def run(seed, epoch):
        return _keys(ShardImageDataset(sample_shards, 16, seed=seed, epoch=epoch, loop=False))

    first = run(0, 0)
    assert run(0, 0) == first
    assert run(0, 1) != first and sorted(run(0, 1)) == sorted(first)
    assert run(1, 0) != first

    a = next(iter(ShardImageDataset(sample_shards, 16, seed=5, loop=False)))
    b = next(iter(ShardImageDataset(sample_shards, 16, seed=5, loop=False)))
    assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_eval_reads_in_shard_order(sample_shards):
    keys = _keys(ShardImageDataset(sample_shards, 16, train=False, loop=False))
    assert keys == list(_read_members(sample_shards))


def test_loop_runs_on_into_the_next_epoch(sample_shards):
    n = len(sample_photo_paths())
    it = iter(ShardImageDataset(sample_shards, 16, loop=True))
    keys = [next(it)["key"] for _ in range(2 * n)]
    assert Counter(keys) == Counter({k: 2 for k in keys[:n]})
    assert keys[:n] != keys[n:]  # epoch 1 is reshuffled


def test_loop_feeds_readers_beyond_the_sample_count(tmp_path):
    shard = _write_tar(tmp_path / "s.tar", [(f"k{i}.jpg", _jpeg((i, i, i))) for i in range(3)])
    # Reader 4 of 5 has no record in epoch 0 (indices 0-2); it gets index 4, in epoch 1.
    sample = next(iter(ShardImageDataset([shard], 16, rank=4, world_size=5, loop=True)))
    assert sample["key"] in {"k0", "k1", "k2"}
    assert sample["label"].item() == -1  # no .cls member


def test_corrupt_images_are_skipped_counted_and_logged_once(tmp_path, caplog):
    truncated = _jpeg((9, 9, 9), size=(128, 128))
    shard = _write_tar(
        tmp_path / "bad.tar",
        [
            ("a.jpg", _jpeg((255, 0, 0))), ("a.cls", b"1"),
            ("b.jpg", b"\xff\xd8 corrupt"), ("b.cls", b"2"),
            ("c.jpg", truncated[: len(truncated) // 2]), ("c.cls", b"3"),
            ("d.jpg", _jpeg((0, 0, 255))), ("d.cls", b"not a number"),
            ("e.jpg", _jpeg((0, 255, 0))), ("e.cls", b"5"),
        ],
    )
    dataset = ShardImageDataset([shard], 16, loop=False)
    with caplog.at_level("WARNING", logger="glotok.data.shards"):
        samples = list(dataset)
        list(dataset)  # a second pass counts again but does not log again
    assert sorted(s["key"] for s in samples) == ["a", "e"]
    assert sorted(s["label"].item() for s in samples) == [1, 5]
    assert dataset.skipped == 6
    assert len(caplog.records) == 3
    assert all("bad.tar" in r.getMessage() for r in caplog.records)
    assert {r.getMessage().split()[1] for r in caplog.records} == {"b", "c", "d"}


def test_truncated_tar_does_not_crash_the_epoch(tmp_path):
    members = [(f"k{i}.jpg", _jpeg((i * 40, 0, 0), size=(96, 96))) for i in range(4)]
    broken = _write_tar(tmp_path / "broken.tar", members)
    with tarfile.open(broken) as tar:
        k2 = tar.getmember("k2.jpg")
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[: k2.offset_data + k2.size // 2])  # cut inside k2.jpg
    intact = _write_tar(tmp_path / "intact.tar", [("z.jpg", _jpeg((0, 0, 0)))])

    dataset = ShardImageDataset([broken, intact], 16, train=False, loop=False)
    assert _keys(dataset) == ["k0", "k1", "z"]
    assert dataset.skipped == 1


def test_endless_stream_of_unusable_samples_raises(tmp_path):
    shard = _write_tar(tmp_path / "bad.tar", [("a.jpg", b"garbage")])
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(ShardImageDataset([shard], 16, loop=True)))


# --- shard specs and the loader ------------------------------------------------------------------


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


def test_make_image_loader_batches(sample_shards):
    n = len(sample_photo_paths())
    train = make_image_loader(sample_shards, 16, 8, num_workers=0, seed=1)
    it = iter(train)
    batches = [next(it) for _ in range(n // 8 + 2)]  # more than one epoch: it loops
    assert all(b["image"].shape == (8, 3, 16, 16) for b in batches)
    assert batches[0]["label"].dtype == torch.int64 and len(batches[0]["key"]) == 8

    manifest = str(Path(sample_shards[0]).parent / "manifest.json")
    val = make_image_loader(manifest, 16, 8, num_workers=0, train=False)
    sizes = [len(b["key"]) for b in val]
    assert sum(sizes) == n and sizes[-1] == n % 8
