"""From a trained FAR to gFID: tools/sample.py (class-balanced, ADM layout, resumable) and the
generation metrics against a reference batch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import FAST, REPO, SAMPLE, cli_env, run_cli
from tests.test_ar_trainer import ar_cfg, write_token_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sample tokenizer and a FAR trained on token maps of its grid and codebook sizes."""
    root = tmp_path_factory.mktemp("gen")
    r = run_cli("train", str(SAMPLE), f"run.output_dir={root}", "run.name=tok", "--no-ray",
                "train.max_steps=2", "checkpoint.every=2", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    tokens_dir = root / "tokens"
    tokens_dir.mkdir()
    from glotok.train.ar_trainer import ARTrainer

    ARTrainer(ar_cfg(write_token_shards(tokens_dir), root, "far", "train.max_steps=2",
                     "checkpoint.every=2", "sample.batch_size=4")).train()
    return root


def run_sample(root, out, *extra):
    cmd = [sys.executable, "tools/sample.py", "--generator", str(root / "far"), "--tokenizer",
           str(root / "tok"), "--output", str(out), "--num-images", "10", "--batch-size", "4",
           "--workers", "0", *extra]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)


def test_samples_are_class_balanced_in_the_adm_layout_and_resume(trained, tmp_path):
    r = run_sample(trained, tmp_path / "s")
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp_path / "s/samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (10, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 1000 for i in range(10)]
    assert (tmp_path / "s/grid.png").stat().st_size > 0
    # A rerun recomputes only a missing chunk, and the same seed gives the same images.
    (tmp_path / "s/chunks/chunk_000001.npz").unlink()
    r = run_sample(trained, tmp_path / "s")
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp_path / "s/samples.npz") as z:
        assert np.array_equal(z["arr_0"], images)


def test_generation_report_has_gfid_precision_recall_and_no_invented_is(trained, tmp_path):
    import json

    from glotok.data.sample import sample_photo_paths
    from glotok.data.shards import center_crop_arr, decode_image

    assert run_sample(trained, tmp_path / "s").returncode == 0
    ref = np.stack([np.asarray(center_crop_arr(decode_image(open(p.path, "rb").read()), 64))
                    for p in sample_photo_paths()])
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    evaluate = [sys.executable, "tools/evaluate.py", "--samples", str(tmp_path / "s/samples.npz"),
                "--reference-batch", str(tmp_path / "ref.npz"), "--output", str(tmp_path / "ev"),
                "--workers", "0"]
    r = subprocess.run(evaluate, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "no expected hash is known" in r.stderr  # unpinned: refused
    r = subprocess.run(evaluate + ["--allow-unpinned-reference"], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert np.isfinite(report["gfid"]) and report["gfid"] > 0
    assert report["num_samples"] == 10 and report["reference"]["pinned"] is False
    assert report["inception_score"] is None and "IS unavailable" in report["inception_score_note"]
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
