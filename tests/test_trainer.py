"""The DeepSpeed tokenizer trainer, end to end on the sample photos (real engines, CPU, gloo)."""

from __future__ import annotations

import json

import pytest
import torch

from glotok.config import load_config
from glotok.train.checkpoint import MANIFEST, CheckpointManager, read_manifest
from glotok.utils.storage import Storage


def make_cfg(repo, run_dir, *overrides):
    return load_config(repo / "configs/tokenizer/sample.yaml", [
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", "run.wandb=disabled",
        "train.image_every=0", "data.num_workers=1", *overrides])


def train(cfg):
    from glotok.train.tokenizer_trainer import TokenizerTrainer

    trainer = TokenizerTrainer(cfg)
    result = trainer.train()
    return trainer, result


def read_metrics(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_short_run_lowers_reconstruction_loss_and_uses_both_codebooks(repo, tmp_path):
    run = tmp_path / "short"
    cfg = make_cfg(repo, run, "train.max_steps=60", "train.log_every=10", "loss.gan_start_step=50",
                   "checkpoint.every=0", "train.image_every=30")
    _, result = train(cfg)
    m = read_metrics(run)
    assert m[60]["loss/rec"] < 0.7 * m[10]["loss/rec"]
    for book, size in (("visual", 512), ("semantic", 256)):
        assert m[60][f"codebook/{book}_usage"] * size >= 8, f"{book} codebook collapsed"
        assert m[60][f"codebook/{book}_perplexity"] > 4
    # Every term of the objective was computed, the GAN from its start step on.
    assert {"loss/perceptual", "loss/hist", "loss/residual", "loss/commit"} <= set(m[10])
    assert "loss/gan_g" not in m[50] and "loss/gan_g" in m[60] and "loss/disc" in m[60]
    assert m[60]["img_per_s"] > 0
    # It leaves a resolved config, a complete checkpoint and the reconstruction grids.
    assert load_config(run / "config.yaml").train.max_steps == 60
    assert read_manifest(Storage(run / "checkpoints"), "step_00000060") is not None
    assert (run / "reconstructions.png").stat().st_size > 0
    assert (run / "images" / "step_00000030.png").is_file()
    assert result["checkpoint"].endswith("step_00000060")


@pytest.mark.slow
def test_resume_continues_exactly_like_the_uninterrupted_run(repo, tmp_path):
    common = ["train.log_every=1", "loss.gan_start_step=2", "train.ema=true",
              "train.ema_decay=0.9", "checkpoint.every=3", "data.batch_size=4"]
    full = tmp_path / "full"
    t_full, _ = train(make_cfg(repo, full, "train.max_steps=6", *common))
    part = tmp_path / "part"
    train(make_cfg(repo, part, "train.max_steps=3", *common))
    t_resumed, _ = train(make_cfg(repo, part, "train.max_steps=6", *common))

    a, b = read_metrics(full), read_metrics(part)
    for step in (4, 5, 6):
        for key in ("loss/total", "loss/rec", "loss/disc", "loss/hist"):
            assert a[step][key] == b[step][key], (step, key)
    for name in ("g_engine", "d_engine"):
        sa = getattr(t_full, name).module.state_dict()
        sb = getattr(t_resumed, name).module.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert all(torch.equal(t_full.ema.shadow[k], t_resumed.ema.shadow[k]) for k in t_full.ema.shadow)


def test_half_written_checkpoint_is_never_the_latest(tmp_path):
    storage = Storage(tmp_path)
    mgr = CheckpointManager(storage, tmp_path / ".staging")

    def fake_save(step, data, commit=True):
        name = f"step_{step:08d}"
        storage.write_bytes(f"{name}/x/w.pt", data)
        storage.write_text(f"{name}/.ranks/rank_00000.json", json.dumps(
            {"files": {"x/w.pt": {"size": len(data), "sha256": "-"}}}))
        if commit:
            mgr._commit(step, name)

    fake_save(10, b"1234")
    fake_save(20, b"12", commit=False)  # a save killed before its manifest
    fake_save(30, b"123456")
    storage.write_bytes("step_00000030/x/w.pt", b"123")  # a file cut short after the manifest
    assert mgr.latest().step == 10
    assert storage.exists(f"step_00000030/{MANIFEST}")
