"""The offline tools end to end: teacher histogram, pre-tokenization, reconstruction evaluation.

Real components throughout: the trained sample tokenizer, the sample photos, the shipped
EfficientNet-Lite0 and TF Inception, a randomly initialised DINOv2 saved with save_pretrained,
and a real embedded Ray where a tool runs as users run it (a subprocess, killed for real).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from glotok.data.sample import ensure_sample_shards
from glotok.data.tokens import iter_token_records, read_token_manifest
from glotok.data.wds import iter_records, tar_bytes
from glotok.losses.teacher import TeacherHistogram
from glotok.utils.parallel import RayOptions
from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.slow

IN_PROCESS = RayOptions(workers=0)


def tool(name: str):
    """A tools/ script as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ray_tmp():
    """Ray's session files under a short, unique /tmp path (its sockets need one); afterwards
    no process of this Ray may be left running."""
    d = Path(f"/tmp/gt{os.getpid()}-{random.randrange(10**6)}")
    d.mkdir()
    yield d
    leftovers = running_under(d)
    for p in leftovers:
        p.kill()
    subprocess.run(["rm", "-rf", str(d)])
    assert not leftovers, f"Ray processes outlived their driver: {leftovers}"


def running_under(directory: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``directory`` (zombies have exited already)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if (p.info["status"] != psutil.STATUS_ZOMBIE
                and str(directory) in " ".join(p.info["cmdline"] or [])):
            found.append(p)
    return found


@pytest.fixture
def ray_head(ray_tmp):
    """A real single-node Ray cluster on loopback (``ray start --head``), as a tool finds it
    with ``--ray-address``; stopped by PID afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = ray_tmp / "head"
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=false",
                    "--dashboard-agent-listen-port=0", "--disable-usage-stats"],
                   env=cli_env(), check=True, capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}"
    for p in running_under(temp):
        p.terminate()
    deadline = time.monotonic() + 3
    while running_under(temp) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in running_under(temp):  # gcs_server and raylet may ignore SIGTERM (STACK.md)
        p.kill()


def run_tool(name: str, *args: str, ray_tmp: Path, timeout: float = 300):
    proc = subprocess.run([sys.executable, f"tools/{name}.py", *args, "--no-progress"],
                          cwd=REPO, env=cli_env(GLOTOK_RAY_TMPDIR=str(ray_tmp)),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def sample_records() -> list[tuple[str, dict]]:
    return [r for s in ensure_sample_shards() for r in iter_records(Path(s).read_bytes())]


def write_shard_set(directory: Path, copies: int, per_shard: int = 8) -> Path:
    """``copies`` x the sample photos (keys suffixed) as shards + a manifest with sha256s."""
    directory.mkdir(parents=True)
    samples = [(f"{k}_c{c}", m) for c in range(copies) for k, m in sample_records()]
    shards = []
    for i in range(0, len(samples), per_shard):
        data = tar_bytes((f"{k}.{e}", v) for k, m in samples[i:i + per_shard]
                         for e, v in m.items())
        name = f"set-{i // per_shard:06d}.tar"
        (directory / name).write_bytes(data)
        shards.append({"name": name, "num_samples": len(samples[i:i + per_shard]),
                       "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (directory / "manifest.json").write_text(json.dumps({"shards": shards}))
    return directory / "manifest.json"


def token_records(out: Path) -> list:
    return [r for tar in sorted(out.glob("*.tar")) for r in iter_token_records(tar.read_bytes())]


# --- teacher -----------------------------------------------------------------------------------


def test_teacher_from_efficientnet_lite0_on_the_sample_photos(tmp_path, ray_tmp):
    from glotok.data.sample_teacher import ensure_sample_teacher
    from glotok.teacher.build import teacher_from_features

    out = tmp_path / "teacher.json"
    run_tool("build_teacher", "--source", "sample", "--model", "efficientnet_lite0", "--k", "128",
             "--output", str(out), "--keep-centroids", "--workers", "2", ray_tmp=ray_tmp)
    teacher = TeacherHistogram.load(out)
    prov = teacher.provenance
    assert (teacher.bins, teacher.alpha) == (40, 190.0)
    assert "efficientnet_lite0" in prov["model"] and "stride-16" in prov["layer"]
    assert (prov["k"], prov["images_seen"], prov["num_vectors"], prov["dim"]) == (128, 37, 592,
                                                                                 112)
    assert teacher.centroids.shape == (128, 112)
    assert np.allclose(np.linalg.norm(teacher.centroids, axis=1), 1, atol=1e-5)
    # The same recipe as the built-in sample teacher (which crops with PIL, in another order):
    # the histograms agree closely.
    builtin = TeacherHistogram.load(ensure_sample_teacher(k=128))
    assert np.abs(np.subtract(teacher.histogram, builtin.histogram)).sum() < 0.05
    assert Image.open(tmp_path / "teacher.png").size == (960, 540)

    # A rerun finds every shard's features done: nothing is re-extracted, same teacher.
    features = sorted((tmp_path / "teacher.work").glob("*.npy"))
    assert len(features) == 5
    stamps = [f.stat().st_mtime_ns for f in features]
    again = teacher_from_features("sample", str(tmp_path / "again.json"),
                                  model="efficientnet_lite0", model_kwargs={"tap": 3, "pool": 4},
                                  k=128, work_dir=str(tmp_path / "teacher.work"), ray=IN_PROCESS)
    assert [f.stat().st_mtime_ns for f in features] == stamps
    assert again.histogram == teacher.histogram


def test_teacher_from_a_random_dinov2_saved_with_save_pretrained(tmp_path):
    from transformers import Dinov2Config

    from glotok.teacher import DinoV2Features

    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          patch_size=14, image_size=224)
    DinoV2Features.from_config(config, seed=0).model.save_pretrained(tmp_path / "dinov2-tiny")
    out = tmp_path / "teacher.json"
    # More vectors (592) than --init-sample: k-means init on a subsample, then mini-batches.
    assert tool("build_teacher").main([
        "--source", "sample", "--model", "dinov2", "--model-path", str(tmp_path / "dinov2-tiny"),
        "--k", "16", "--init-sample", "200", "--kmeans-batch-size", "64", "--output", str(out),
        "--workers", "0", "--no-progress"]) == 0
    prov = TeacherHistogram.load(out).provenance
    assert prov["model"] == str(tmp_path / "dinov2-tiny")
    assert prov["layer"] == "last_hidden_state, 4x4 avg-pooled" and prov["dim"] == 64
    assert (prov["k"], prov["images_seen"], prov["num_vectors"]) == (16, 37, 592)
    assert prov["kmeans"]["method"] == "minibatch"


def test_teacher_from_a_checkpoint_is_its_semantic_codebook(sample_tokenizer, tmp_path):
    from glotok.losses.histogram import soft_histogram
    from glotok.train.export import load_tokenizer

    out = tmp_path / "from-ckpt.json"
    assert tool("build_teacher").main(["--from-checkpoint", str(sample_tokenizer), "--output",
                                       str(out), "--student", str(sample_tokenizer)]) == 0
    teacher = TeacherHistogram.load(out)
    assert teacher.provenance["source"] == "checkpoint" and teacher.provenance["k"] == 256
    assert teacher.provenance["model"].endswith("step_00000003")
    model, _, _ = load_tokenizer(str(sample_tokenizer))
    want = soft_histogram(model.semantic.quantizer.codebook().detach(), 40, 190.0)
    assert np.allclose(teacher.histogram, want.numpy(), atol=1e-6)
    assert Image.open(tmp_path / "from-ckpt.png").size == (960, 540)


def test_minibatch_kmeans_moves_rough_seeds_to_the_cluster_means():
    from glotok.teacher.build import minibatch_kmeans

    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 32, generator=gen), dim=1)
    points = centres.repeat(500, 1) + 0.1 * torch.randn(4000, 32, generator=gen)
    seeds = points[:8]  # one noisy point of each cluster, as k-means++ would pick
    assert (centres * torch.nn.functional.normalize(seeds, dim=1)).sum(1).max() < 0.95
    shuffled = points[torch.randperm(4000, generator=gen)]
    found = minibatch_kmeans(lambda: iter(shuffled.split(1000)), seeds, epochs=2,
                             batch_size=256, seed=0)
    assert (centres * found).sum(1).min() > 0.995  # centroid i is cluster i's mean direction


# --- pre-tokenization --------------------------------------------------------------------------


def test_variants_are_center_flip_ten_crop_and_seeded_random_crops():
    from glotok.data.augment import center_crop, decode_rgb
    from glotok.data.variants import CropVariants, parse_variants

    names = parse_variants("center,flip,tencrop,randcrop", random_crops=2)
    assert names[:3] == ["center", "flip", "tencrop-tl"] and len(names) == 14
    key, members = sample_records()[0]
    crops = dict(zip(names, CropVariants(tuple(names), 64, crop_range=1.25)(key, members["jpg"])))
    assert torch.equal(crops["center"], center_crop(decode_rgb(members["jpg"], 64), 64))
    assert torch.equal(crops["flip"], crops["center"].flip(-1))
    big = center_crop(decode_rgb(members["jpg"], 80), 80)  # LlamaGen: crop at 64 * 1.25 first
    assert torch.equal(crops["tencrop-tl"], big[:, :64, :64])
    assert torch.equal(crops["tencrop-br"], big[:, 16:, 16:])
    assert torch.equal(crops["tencrop-c"], big[:, 8:72, 8:72])
    assert torch.equal(crops["tencrop-tl-flip"], big.flip(-1)[:, :64, :64])
    again = CropVariants(tuple(names), 64, crop_range=1.25)(key, members["jpg"])
    assert torch.equal(again[-1], crops["randcrop-1"])  # seeded by (seed, key, variant)
    assert not torch.equal(crops["randcrop-0"], crops["randcrop-1"])
    with pytest.raises(ValueError, match="tencrop"):
        parse_variants("center,tenkrop")


def test_token_shards_round_trip_and_read_with_webdataset(tmp_path):
    import webdataset as wds

    from glotok.data.tokens import (TokenRecord, iter_token_samples, token_dtype,
                                    token_shard_bytes)

    assert token_dtype(12288, 4096) == np.uint16 and token_dtype(70000, 4096) == np.int32
    tokens = np.arange(2 * 2 * 4 * 4, dtype=np.uint16).reshape(2, 2, 4, 4)
    records = [TokenRecord("n01_1", v, 7, t) for v, t in zip(("center", "flip"), tokens)]
    (tmp_path / "t.tar").write_bytes(token_shard_bytes(records))
    back = list(iter_token_records((tmp_path / "t.tar").read_bytes()))
    assert [(r.key, r.variant, r.label) for r in back] == [("n01_1", "center", 7),
                                                           ("n01_1", "flip", 7)]
    assert back[1].tokens.dtype == np.uint16 and np.array_equal(back[1].tokens, tokens[1])
    (sample,) = iter_token_samples((tmp_path / "t.tar").read_bytes())
    assert sample.variants == ("center", "flip") and np.array_equal(sample.tokens, tokens)
    ds = wds.WebDataset(str(tmp_path / "t.tar"), shardshuffle=False).decode()
    first = next(iter(ds))
    assert first["__key__"] == "n01_1/center" and first["cls"] == 7
    assert first["variant.txt"] == "center" and np.array_equal(first["tokens.npy"], tokens[0])


def test_pretokenize_killed_midway_then_rerun_gives_one_record_per_sample_and_variant(
        sample_tokenizer, tmp_path, ray_tmp, ray_head):
    source = write_shard_set(tmp_path / "images", copies=3)  # 111 photos in 14 shards
    out = tmp_path / "tokens"
    proc = subprocess.Popen(
        [sys.executable, "tools/pretokenize.py", "--source", str(source), "--checkpoint",
         str(sample_tokenizer), "--output", str(out), "--workers", "2", "--no-progress"],
        cwd=REPO, env=cli_env(GLOTOK_RAY_TMPDIR=str(ray_tmp)), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list((out / "_progress").glob("*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no shard was finished in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and its workers, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert len(list((out / "_progress").glob("*.json"))) < 14, "the run ended before the kill"

    # The same command again, this time on a Ray cluster that was already running.
    run_tool("pretokenize", "--source", str(source), "--checkpoint", str(sample_tokenizer),
             "--output", str(out), "--ray-address", ray_head, ray_tmp=ray_tmp)
    manifest = read_token_manifest(str(out))
    records = token_records(out)
    keys = [k for k, _ in sample_records()]
    want = sorted((f"{k}_c{c}", v) for c in range(3) for k in keys for v in ("center", "flip"))
    assert sorted((r.key, r.variant) for r in records) == want  # each exactly once
    assert manifest["num_records"] == len(want) == 222 and manifest["num_images"] == 111
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]

    # The codes are the tokenizer's own: encode of the center crop and of its mirror image.
    from glotok.data.augment import center_crop, decode_rgb
    from glotok.train.export import load_tokenizer

    model, _, _ = load_tokenizer(str(sample_tokenizer))
    key, members = sample_records()[5]
    x = center_crop(decode_rgb(members["jpg"], 64), 64).float()[None] / 127.5 - 1
    got = {r.variant: r.tokens for r in records if r.key == f"{key}_c1"}
    assert np.array_equal(got["center"], model.encode(x)[0].numpy())
    assert np.array_equal(got["flip"], model.encode(x.flip(-1))[0].numpy())


def test_pretokenize_rerun_repairs_every_kind_of_interrupted_state(sample_tokenizer, tmp_path):
    from glotok.data.pretokenize import pretokenize

    out = tmp_path / "tokens"
    first = pretokenize("sample", str(out), str(sample_tokenizer), ray=IN_PROCESS, progress=False)
    names = [s["name"] for s in first["shards"]]
    # A kill can leave: an output without its receipt, a torn write (another size than the
    # receipt's), a temp file, no manifest; an older plan can leave outputs of other names.
    (out / "_progress" / f"{names[0]}.json").unlink()
    (out / names[1]).write_bytes((out / names[1]).read_bytes()[:1000])
    (out / f".{names[2]}.tmp-123").write_bytes(b"partial")
    (out / "old-000000.tar").write_bytes((out / names[3]).read_bytes())
    (out / "_progress" / "old-000000.tar.json").write_text('{"plan": "another"}')
    (out / "manifest.json").unlink()
    untouched = (out / names[4]).stat().st_mtime_ns

    manifest = pretokenize("sample", str(out), str(sample_tokenizer), ray=IN_PROCESS,
                           progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "_progress",
                                                            "manifest.json"])
    assert (out / names[4]).stat().st_mtime_ns == untouched
    pairs = [(r.key, r.variant) for r in token_records(out)]
    assert len(pairs) == len(set(pairs)) == 74 == manifest["num_records"]
    assert manifest["shards"] == first["shards"]  # rebuilt shards are byte-identical

    # Other settings are another plan: every shard is redone, none is mixed.
    manifest = pretokenize("sample", str(out), str(sample_tokenizer), variants="center",
                           ray=IN_PROCESS, progress=False)
    assert {r.variant for r in token_records(out)} == {"center"}
    assert manifest["num_records"] == 37


# --- evaluation --------------------------------------------------------------------------------


def test_evaluate_end_to_end_on_the_sample_tokenizer(sample_tokenizer, tmp_path, ray_tmp):
    from glotok.data.augment import center_crop, decode_rgb
    from glotok.eval.fid import load_reference
    from glotok.eval.metrics import psnr
    from glotok.train.export import load_tokenizer

    out, ref = tmp_path / "eval", tmp_path / "ref.npz"
    proc = run_tool("evaluate", "--source", "sample", "--checkpoint", str(sample_tokenizer),
                    "--output", str(out), "--reference", str(ref), "--tsne-perplexity", "5",
                    "--workers", "2", ray_tmp=ray_tmp)
    report = json.loads((out / "report.json").read_text())
    summary = next(line for line in proc.stdout.splitlines() if line.startswith('{"rfid"'))
    assert json.loads(summary)["rfid"] == report["rfid"]
    assert report["checkpoint"]["checkpoint"].endswith("step_00000003")
    assert report["data"]["num_images"] == 37 and report["data"]["skipped"] == []
    assert np.isfinite(report["rfid"]) and report["rfid"] > 0
    assert report["lpips"] is None and "lpips" in report["lpips_unavailable"]
    # The reference was computed in this pass, saved, and is named with its hash.
    assert report["reference"]["computed_in_this_pass"] and report["reference"]["count"] == 37
    assert report["reference"]["path"] == str(ref)
    assert report["reference"]["sha256"] == load_reference(ref, expected_hash=None).source_sha256
    assert report["inception"]["weights_sha256"]
    for book, size in (("visual", 512), ("semantic", 256)):
        c = report["codebook"][book]
        assert c["size"] == size and 1 <= c["used"] <= size and 1 <= c["perplexity"] <= c["used"]
    u = report["uniformity"]
    assert u["num_vectors"] == 37 and 0 <= u["gini"] < 1 and 0 < u["normalized_entropy"] <= 1
    assert Image.open(out / "grid.png").size == (8 * 66 + 2, 2 * 66 + 2)  # 8 pairs of 64 px

    # Merged over 2 workers and 5 shards, the metrics equal one pass in this process.
    model, _, _ = load_tokenizer(str(sample_tokenizer))
    x = torch.stack([center_crop(decode_rgb(m["jpg"], 64), 64) for _, m in sample_records()])
    x = x.float() / 127.5 - 1
    indices = model.encode(x)
    recon = model.decode(indices).clamp(-1, 1)
    assert report["psnr"] == pytest.approx(psnr(x, recon).mean().item(), abs=1e-6)
    assert report["codebook"]["semantic"]["used"] == indices[:, 1].unique().numel()

    # Killed mid-pass (a shard's partial never written): the rerun redoes that shard alone and,
    # with the reference now cached, reports the same numbers against the same reference.
    from glotok.eval.reconstruction import evaluate_reconstruction

    (out / "partials" / "sample-000002.npz").unlink()
    (out / "report.json").unlink()
    kept = (out / "partials" / "sample-000003.npz").stat().st_mtime_ns
    again = evaluate_reconstruction("sample", str(sample_tokenizer), str(out), reference=str(ref),
                                    tsne_perplexity=5, ray=IN_PROCESS, progress=False)
    assert (out / "partials" / "sample-000003.npz").stat().st_mtime_ns == kept
    assert not again["reference"]["computed_in_this_pass"]
    assert again["reference"]["sha256"] == report["reference"]["sha256"]
    assert again["data"]["num_images"] == 37
    assert again["rfid"] == pytest.approx(report["rfid"], rel=1e-4)
    assert again["psnr"] == pytest.approx(report["psnr"], abs=1e-9)
    assert again["codebook"] == report["codebook"]


def test_evaluate_refuses_a_cached_reference_with_another_hash(sample_tokenizer, tmp_path,
                                                               capsys):
    from glotok.eval.fid import GaussianStats, save_reference

    ref = tmp_path / "ref.npz"
    save_reference(ref, GaussianStats(2048).update(torch.randn(4, 2048)),
                   {"shards": "some other val set"})
    rc = tool("evaluate").main(["--source", "sample", "--checkpoint", str(sample_tokenizer),
                                "--output", str(tmp_path / "eval"), "--reference", str(ref),
                                "--workers", "0", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refused" in err and str(ref) in err and "current source hashes to" in err
    assert not (tmp_path / "eval").exists()  # refused before any image was processed
