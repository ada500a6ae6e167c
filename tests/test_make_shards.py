"""tools/make_shards.py and glotok.data.writer: image trees -> WebDataset shards + manifest."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from glotok.data import storage
from glotok.data.sample import sample_photo_paths
from glotok.data.stream import ShardStream
from glotok.data.wds import iter_records
from glotok.data.writer import EncodeOptions, make_shards

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_shards.py"


def _jpegs() -> list[tuple[str, bytes]]:
    """The real JPEG photos of the sample set: 20 ImageNet validation images and 4 others."""
    return [(p.key, Path(p.path).read_bytes()) for p in sample_photo_paths()
            if Path(p.path).read_bytes()[:3] == b"\xff\xd8\xff"]


def imagenet_train(root: Path, copies: int = 1) -> dict[str, tuple[str, bytes]]:
    """``root/<wnid>/<wnid>_<n>.JPEG`` over 4 classes; returns ``{key: (wnid, bytes)}``."""
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    made = {}
    for c in range(copies):
        for i, (_, data) in enumerate(_jpegs()):
            wnid = wnids[i % len(wnids)]
            key = f"{wnid}_{c * 100 + i}"
            (root / wnid).mkdir(parents=True, exist_ok=True)
            (root / wnid / f"{key}.JPEG").write_bytes(data)
            made[key] = (wnid, data)
    return made


def read_shards(dst: str) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """The manifest, and every sample of its shards as ``{key: {ext: bytes}}`` (keys must not
    repeat)."""
    manifest = json.loads(storage.read_bytes(storage.join(dst, "manifest.json")))
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        for key, members in iter_records(storage.read_bytes(storage.join(dst, shard["name"]))):
            assert key not in samples, f"{key} is in two shards"
            samples[key] = members
    return manifest, samples


def test_imagenet_train_tree_becomes_shards_holding_every_image_once_byte_for_byte(tmp_path):
    made = imagenet_train(tmp_path / "train")
    manifest = make_shards(str(tmp_path / "train"), str(tmp_path / "out"), samples_per_shard=5,
                           workers=1)
    _, samples = read_shards(str(tmp_path / "out"))
    assert manifest["classes"] == sorted({w for w, _ in made.values()})
    assert set(samples) == set(made) and manifest["num_samples"] == len(made)
    for key, (wnid, data) in made.items():
        assert samples[key]["jpg"] == data
        assert int(samples[key]["cls"]) == manifest["classes"].index(wnid)
    assert [s["num_samples"] for s in manifest["shards"]] == [5] * (len(made) // 5) + (
        [len(made) % 5] if len(made) % 5 else [])
    for shard in manifest["shards"]:
        assert (tmp_path / "out" / shard["name"]).stat().st_size == shard["bytes"]


def test_flat_val_with_a_label_file_gets_the_train_class_indices(tmp_path):
    train = imagenet_train(tmp_path / "train")
    train_manifest = make_shards(str(tmp_path / "train"), str(tmp_path / "train-out"), workers=1)
    val = tmp_path / "val"
    val.mkdir()
    lines = ["ImageId,PredictionString"]  # Kaggle's LOC_val_solution.csv layout
    for n, (key, (wnid, data)) in enumerate(sorted(train.items())[:6]):
        name = f"ILSVRC2012_val_{n:08d}"
        (val / f"{name}.JPEG").write_bytes(data)
        lines.append(f"{name},{wnid} 10 20 30 40")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")

    manifest = make_shards(str(val), str(tmp_path / "val-out"), workers=1,
                           labels=str(tmp_path / "LOC_val_solution.csv"),
                           classes=train_manifest["classes"])
    _, samples = read_shards(str(tmp_path / "val-out"))
    assert manifest["classes"] == train_manifest["classes"]
    expected = {f"ILSVRC2012_val_{n:08d}": train_manifest["classes"].index(wnid)
                for n, (_, (wnid, _)) in enumerate(sorted(train.items())[:6])}
    assert {k: int(m["cls"]) for k, m in samples.items()} == expected


def test_unreadable_images_are_left_out_and_reported(tmp_path, caplog):
    made = imagenet_train(tmp_path / "train")
    wnid_dir = tmp_path / "train" / "n01440764"
    good = next(wnid_dir.iterdir()).read_bytes()
    (wnid_dir / "n01440764_cut.JPEG").write_bytes(good[: len(good) // 2])
    (wnid_dir / "n01440764_text.JPEG").write_text("not an image")
    with caplog.at_level("WARNING", logger="glotok.data.writer"):
        manifest = make_shards(str(tmp_path / "train"), str(tmp_path / "out"), workers=1)
    rejected = {r["path"]: r["reason"] for r in manifest["rejects"]}
    assert set(rejected) == {"n01440764/n01440764_cut.JPEG", "n01440764/n01440764_text.JPEG"}
    assert all("decode" in reason for reason in rejected.values())
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "n01440764_cut.JPEG" in logged and "n01440764_text.JPEG" in logged
    _, samples = read_shards(str(tmp_path / "out"))
    assert "n01440764_cut" not in samples and len(samples) == manifest["num_samples"] == len(made)


def test_png_is_reencoded_to_jpeg_and_max_size_downscales(tmp_path):
    photos = {p.key: p.path for p in sample_photo_paths()}
    tree = tmp_path / "tree" / "cls"
    tree.mkdir(parents=True)
    (tree / "chelsea.png").write_bytes(Path(photos["skimage_chelsea"]).read_bytes())  # 451x300
    (tree / "retina.jpg").write_bytes(Path(photos["skimage_retina"]).read_bytes())  # 1411^2
    small = Path(photos["foolbox_imagenet_00"]).read_bytes()  # 512^2
    (tree / "small.jpg").write_bytes(small)
    make_shards(str(tmp_path / "tree"), str(tmp_path / "out"), workers=1,
                encode=EncodeOptions(max_size=600))
    _, samples = read_shards(str(tmp_path / "out"))
    png = Image.open(io.BytesIO(samples["cls_chelsea"]["jpg"]))
    assert (png.format, png.size) == ("JPEG", (451, 300))
    assert Image.open(io.BytesIO(samples["cls_retina"]["jpg"])).size == (600, 600)
    assert samples["cls_small"]["jpg"] == small


def test_rerun_after_sigkill_finishes_without_duplicates(tmp_path):
    made = imagenet_train(tmp_path / "train", copies=6)  # 144 images, one shard each
    out = tmp_path / "out"
    cmd = [sys.executable, str(TOOL), str(tmp_path / "train"), str(out), "--workers", "1",
           "--samples-per-shard", "1", "-q"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list((out / "_progress").glob("*.json"))) < 10:
            assert proc.poll() is None, "make_shards ended before it could be killed"
            assert time.monotonic() < deadline, "make_shards wrote nothing in 60 s"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # mid-run: the whole process group, no cleanup
        proc.wait()
    assert not (out / "manifest.json").exists()
    receipted = {p.name.removesuffix(".json") for p in (out / "_progress").glob("*.json")}
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in receipted}
    assert 10 <= len(finished) < len(made)

    subprocess.run(cmd, check=True, timeout=120)
    manifest, samples = read_shards(str(out))
    assert {k: m["jpg"] for k, m in samples.items()} == {k: d for k, (_, d) in made.items()}
    assert manifest["num_samples"] == len(made)  # read_shards found no key twice
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        [s["name"] for s in manifest["shards"]] + ["manifest.json"])  # no temp files left
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in finished.items())  # skipped


def test_shards_written_to_s3_stream_back(tmp_path, s3):
    made = imagenet_train(tmp_path / "train")
    dst = f"{s3}/imagenet/train"
    manifest = make_shards(str(tmp_path / "train"), dst, samples_per_shard=7, workers=2)
    _, samples = read_shards(dst)
    assert {k: m["jpg"] for k, m in samples.items()} == {k: d for k, (_, d) in made.items()}
    stream = ShardStream(storage.join(dst, "manifest.json"), 32, 5, train=False, num_workers=0)
    batches = list(stream)
    labels = {k: int(m["cls"]) for k, m in samples.items()}
    streamed = {k: int(c) for b in batches for k, c in zip(b["key"], b["label"])}
    assert streamed == labels and sum(len(b["key"]) for b in batches) == manifest["num_samples"]


def test_help_explains_layouts_outputs_and_options():
    text = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                          check=True).stdout
    for needle in ("class per folder", "--labels", "manifest.json", "rejects", "AWS_ENDPOINT_URL",
                   "--max-size", "--samples-per-shard", "--workers", "skips every shard"):
        assert needle in text, needle
