"""The shard stream (glotok.data.stream): partitioning, exact resume, damage, S3, retries."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glotok.data import storage
from glotok.data.augment import decode_rgb, random_crop
from glotok.data.sample import ensure_sample_shards
from glotok.data.shards import decode_image, random_crop_arr, random_hflip
from glotok.data.storage import StorageUnavailableError
from glotok.data.repartition import repartition
from glotok.data.stream import ShardStream, StreamLayoutError, resolve_shards
from glotok.data.walker import ReaderState, ShardWalker
from glotok.data.wds import iter_records

SIZE = 32  # small crops keep the tests fast; the decode path is the same at any size


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    """The 37 sample photos in 10 shards of 4 (one of 1), with their manifest."""
    shards = ensure_sample_shards(tmp_path_factory.mktemp("cache"), samples_per_shard=4)
    return Path(shards[0]).parent


@pytest.fixture
def shard_copy(sample_dir, tmp_path) -> Path:
    """A private copy of the sample shards, for tests that damage them."""
    return Path(shutil.copytree(sample_dir, tmp_path / "shards"))


def stream(source, **kw) -> ShardStream:
    kw = {"train": True, "seed": 3, "shuffle_buffer": 6, "num_workers": 0, "loop": False,
          "drop_last": False, **kw}
    return ShardStream(str(source), SIZE, kw.pop("batch_size", 3), **kw)


def take(s: ShardStream, n: int | None = None) -> list[dict]:
    out = []
    for batch in s:
        out.append(batch)
        if len(out) == n:
            break
    return out


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def _manifest_keys(directory: Path) -> list[str]:
    return list(json.loads((directory / "manifest.json").read_text())["samples"])


# --- partitioning ----------------------------------------------------------------------------


@pytest.mark.parametrize("samples_per_shard", [4, 16])  # 10 shards >= 4 readers; 3 < 4: modulo
def test_one_epoch_over_two_ranks_and_two_workers_yields_every_sample_once(tmp_path,
                                                                           samples_per_shard):
    directory = Path(ensure_sample_shards(tmp_path, samples_per_shard=samples_per_shard)[0]).parent
    seen = []
    for rank in range(2):
        seen += keys(take(stream(directory / "manifest.json", rank=rank, world_size=2,
                                 num_workers=2)))
    assert Counter(seen) == Counter(_manifest_keys(directory))


def test_batches_are_normalised_crops_with_labels(sample_dir):
    batch = next(stream(sample_dir / "manifest.json", batch_size=5))
    assert batch["image"].shape == (5, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
    labels = json.loads((sample_dir / "manifest.json").read_text())["samples"]
    assert batch["label"].tolist() == [labels[k]["cls"] for k in batch["key"]]


def test_eval_stream_reads_in_manifest_order_with_center_crops(sample_dir):
    a = take(stream(sample_dir / "manifest.json", train=False, num_workers=0))
    assert keys(a) == _manifest_keys(sample_dir)
    b = take(stream(sample_dir / "manifest.json", train=False, num_workers=0, seed=99))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_order_depends_on_seed_and_epoch_only(sample_dir):
    def order(**kw):
        return keys(take(stream(sample_dir / "manifest.json", **kw)))

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)


# --- exact resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_second_half_equals_the_uninterrupted_epoch(sample_dir, workers):
    source = sample_dir / "manifest.json"
    full = take(stream(source, num_workers=workers))
    first = stream(source, num_workers=workers)
    half = take(first, 5)  # odd: with 2 workers the next batch is worker 1's
    state = first.state_dict()
    del first  # the workers and whatever they prefetched are gone, as after a crash
    resumed = stream(source, num_workers=workers)
    resumed.load_state_dict(state)
    rest = take(resumed)
    assert keys(half + rest) == keys(full)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, half + rest))


def test_endless_stream_resumes_across_the_epoch_boundary(sample_dir):
    source = sample_dir / "manifest.json"
    common = {"loop": True, "num_workers": 2, "batch_size": 4}
    full = keys(take(stream(source, **common), 30))  # 120 samples: > 3 epochs of 37
    first = stream(source, **common)
    head = keys(take(first, 11))
    state = first.state_dict()
    resumed = stream(source, **common)
    resumed.load_state_dict(state)
    assert head + keys(take(resumed, 19)) == full
    assert resumed.metrics()["epoch"] >= 2


def test_position_survives_a_weights_only_checkpoint(sample_dir, tmp_path):
    s = stream(sample_dir / "manifest.json", num_workers=2)
    take(s, 3)
    torch.save({"data": s.state_dict()}, tmp_path / "rank.pt")
    assert torch.load(tmp_path / "rank.pt", weights_only=True)["data"] == s.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_leaves_the_global_random_state_alone(sample_dir, workers):
    # The trainer checkpoints torch's and Python's RNG; a stream that drew from them (as a
    # DataLoader does for its worker seeds) would shift them on every resume.
    torch.manual_seed(0)
    random.seed(0)
    untouched = torch.rand(3), random.random()
    torch.manual_seed(0)
    random.seed(0)
    take(stream(sample_dir / "manifest.json", num_workers=workers), 3)
    assert torch.equal(torch.rand(3), untouched[0]) and random.random() == untouched[1]


def test_another_layout_needs_every_ranks_state(sample_dir):
    s = stream(sample_dir / "manifest.json", num_workers=2)
    take(s, 2)
    other = stream(sample_dir / "manifest.json", num_workers=3)
    with pytest.raises(StreamLayoutError, match=r"1 ranks x 2 readers.*data\.num_workers=2"):
        other.load_state_dict(s.state_dict())


@pytest.mark.parametrize("old,new", [((2, 2), (3, 1)), ((1, 2), (1, 1))])  # ranks x workers
def test_layout_change_deals_out_the_rest_of_the_epoch_exactly(sample_dir, old, new):
    source = sample_dir / "manifest.json"
    seen, states = [], []
    for rank in range(old[0]):
        s = stream(source, rank=rank, world_size=old[0], num_workers=old[1], batch_size=2)
        seen += keys(take(s, 3 + rank))
        states.append({"rng": None, "data": s.state_dict()})  # as the checkpoint holds them
    for rank in range(new[0]):
        s = stream(source, rank=rank, world_size=new[0], num_workers=new[1], batch_size=2)
        s.load_state_dict_repartitioned(states, old[0])
        seen += keys(take(s))
    assert Counter(seen) == Counter(_manifest_keys(sample_dir))


def test_endless_layout_change_completes_every_epoch_it_started(sample_dir):
    # Readers run ahead of each other in an endless stream; re-partitioning must still finish
    # each old reader's epochs up to the furthest one reached, each sample once per epoch.
    shards = resolve_shards(str(sample_dir / "manifest.json"))
    common = {"seed": 5, "shuffle": True, "buffer_size": 4, "loop": True}

    def walker(reader, readers, state):
        return ShardWalker(shards, storage.read_bytes, reader=reader, readers=readers,
                           state=ReaderState.from_dict(state), **common)

    seen: Counter = Counter()
    old_states = []
    for reader, n in enumerate([5, 12, 20, 31]):  # 4 readers, 37 samples: 1-2 epochs apart
        w = walker(reader, 4, ReaderState().to_dict())
        for _, rec in zip(range(n), w):
            seen[rec.epoch, rec.key] += 1
        old_states.append(w.snapshot())
    last = max(s["epoch"] for s in old_states)
    for reader, state in enumerate(repartition(old_states, 3, num_shards=len(shards), seed=5,
                                               shuffle=True, loop=True, epoch=0)):
        for rec in walker(reader, 3, state):
            if rec.epoch > last:
                break
            seen[rec.epoch, rec.key] += 1
    every = Counter((e, k) for e in range(last + 1) for k in _manifest_keys(sample_dir))
    assert last >= 1 and seen == every


# --- damage ----------------------------------------------------------------------------------


def _rewrite_member(shard: Path, key: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, payload in members:
            payload = data if name == f"{key}.jpg" else payload
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_corrupt_jpeg_is_skipped_and_counted(shard_copy, caplog):
    shard = shard_copy / "sample-000000.tar"
    with tarfile.open(shard) as tar:
        key = tar.getnames()[0].split(".")[0]
        good = tar.extractfile(tar.getnames()[0]).read()
    _rewrite_member(shard, key, good[: len(good) // 3])  # a JPEG cut off mid-scan
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("bytes")  # the rewritten tar has another size; only the image is damaged
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))

    s = stream(shard_copy / "manifest.json", batch_size=4)
    with caplog.at_level("WARNING", logger="glotok.data.stream"):
        batches = take(s)
    assert key not in keys(batches) and len(keys(batches)) == 36
    assert s.metrics()["corrupt"] == 1 and batches[-1]["skipped"] == 1
    assert any(key in r.getMessage() and "sample-000000.tar" in r.getMessage()
               for r in caplog.records)


def test_truncated_tar_keeps_its_intact_samples_and_counts_the_rest(shard_copy):
    shard = shard_copy / "sample-000003.tar"
    with tarfile.open(shard) as tar:
        in_shard = [m.name.split(".")[0] for m in tar.getmembers()][::2]
        cut = tar.getmembers()[2].offset_data + 100  # inside the second sample's image
    shard.write_bytes(shard.read_bytes()[:cut])

    s = stream(shard_copy / "manifest.json", num_workers=2)
    seen = keys(take(s))
    assert in_shard[0] in seen and not set(in_shard[1:]) & set(seen)
    assert len(seen) == 37 - 3
    m = s.metrics()
    assert (m["truncated_shards"], m["missing"], m["skipped"]) == (1, 3, 3)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_groups_members_like_tarfile_with_long_names(fmt):
    long_dir = "class_" + "x" * 70 + "/" + "y" * 60  # > 100 characters: PAX/GNU/ustar prefix
    members = [("a.jpg", b"j" * 1000), ("a.cls", b"1"), (f"{long_dir}/b.JPG", bytes(600)),
               (f"{long_dir}/b.cls", b"2"), ("c.seg.png", b"p")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(iter_records(buf.getvalue())) == [
        ("a", {"jpg": b"j" * 1000, "cls": b"1"}),
        (f"{long_dir}/b", {"jpg": bytes(600), "cls": b"2"}),
        ("c", {"seg.png": b"p"})]


def test_missing_shard_is_retried_then_fails_naming_it(shard_copy, caplog):
    (shard_copy / "sample-000002.tar").unlink()
    s = stream(shard_copy / "manifest.json", retries=2, retry_backoff=0.01, train=False)
    with caplog.at_level("WARNING", logger="glotok.data.storage"):
        with pytest.raises(StorageUnavailableError, match=r"sample-000002\.tar.*3 times"):
            take(s)
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


# --- remote storage --------------------------------------------------------------------------


def _upload(directory: Path, url: str) -> str:
    for path in sorted(directory.iterdir()):
        if path.suffix in (".tar", ".json"):
            storage.write_bytes(storage.join(url, path.name), path.read_bytes())
    return storage.join(url, "manifest.json")


def test_s3_stream_equals_the_local_stream(sample_dir, s3):
    manifest = _upload(sample_dir, f"{s3}/sample")
    remote = take(stream(manifest, num_workers=2))
    local = take(stream(sample_dir / "manifest.json", num_workers=2))
    assert keys(remote) == keys(local)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(remote, local))


def test_s3_server_restart_mid_stream_is_survived(sample_dir, s3, s3_server):
    manifest = _upload(sample_dir, f"{s3}/sample")
    s = stream(manifest, read_ahead=0, retries=6, retry_backoff=0.2, train=False)
    seen = keys(take(s, 1))
    s3_server.stop()  # the next shard read meets a closed port
    restart = threading.Timer(1.0, s3_server.start)
    restart.start()
    t0 = time.monotonic()
    try:
        seen += keys(take(s))
    finally:
        restart.join()
    assert time.monotonic() - t0 >= 0.9  # the outage was really in the way
    assert seen == _manifest_keys(sample_dir)


# --- the crop --------------------------------------------------------------------------------


def test_fast_crop_matches_the_pil_llamagen_crop():
    from glotok.data.sample import sample_photo_paths

    path = next(p.path for p in sample_photo_paths() if p.key == "sklearn_china")  # 640 x 427
    data = Path(path).read_bytes()
    for seed in range(4):
        ref_rng, rng = random.Random(seed), random.Random(seed)
        ref = random_hflip(random_crop_arr(decode_image(data), 256, 1.1, ref_rng), ref_rng)
        out = random_crop(decode_rgb(data), 256, 1.1, rng).permute(1, 2, 0).numpy()
        diff = np.abs(np.asarray(ref, dtype=np.int16) - out.astype(np.int16))
        assert diff.mean() < 0.1 and diff.max() <= 2  # same geometry; rounding only


def test_large_jpegs_decode_reduced_but_not_below_the_crop():
    buf = io.BytesIO()
    Image.new("RGB", (1024, 768), (20, 120, 200)).save(buf, format="JPEG")
    assert decode_rgb(buf.getvalue(), 281).shape == (288, 384, 3)  # 3/8: the smallest n/8 >= 281


# --- the trainer -----------------------------------------------------------------------------


def test_trainer_reads_the_sample_set_through_the_stream():
    from omegaconf import OmegaConf

    from glotok.config import DataConfig
    from glotok.train.distributed import DistInfo
    from glotok.train.tokenizer_trainer import build_image_loader

    cfg = OmegaConf.structured(DataConfig(source="sample", batch_size=4, num_workers=0))
    loader = build_image_loader(cfg, 64, DistInfo(0, 1, 0, torch.device("cpu")))
    assert isinstance(loader, ShardStream)
    batch = next(loader)
    assert batch["image"].shape == (4, 3, 64, 64)
    assert set(loader.state_dict()) >= {"workers", "next_worker", "epoch"}
