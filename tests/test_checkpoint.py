"""Checkpoint durability: a killed save, weights-only loading, resuming on fewer ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from glotok.train.checkpoint import (CheckpointManager, SafeCheckpointEngine,
                                     _deepspeed_safe_globals, read_manifest)
from glotok.utils.storage import Storage
from tests.helpers import FAST, REPO, SAMPLE, cli_env, metrics_by_step, run_cli


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_as_the_resume_point(tmp_path):
    args = ["train", str(SAMPLE), f"run.output_dir={tmp_path}", "run.name=killed",
            "checkpoint.every=2", "--no-ray", *FAST]
    r = run_cli(*args, "train.max_steps=6", GLOTOK_FAULT="after_first_upload@4")
    assert r.returncode == 137, r.stderr[-3000:]
    ckpts = Storage(tmp_path / "killed" / "checkpoints")
    mgr = CheckpointManager(ckpts, tmp_path / "staging")
    assert mgr.latest().step == 2
    assert ckpts.exists("step_00000004") and read_manifest(ckpts, "step_00000004") is None

    r = run_cli(*args, "train.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    assert mgr.latest().step == 6
    assert [c.step for c in mgr.complete()] == [4, 6]  # keep_last=2; the broken 4 was redone


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank_with_optimizer_state(tmp_path):
    # Two ranks under torchrun, ZeRO-1: each rank holds half of the optimizer state.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", "29531", "-m", "launcher.cli",
           "train", str(SAMPLE), f"run.output_dir={tmp_path}", "run.name=two",
           "train.max_steps=3", "checkpoint.every=3", *FAST]
    r = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "two" / "checkpoints" / "step_00000003"
    saved = torch.load(ckpt / "generator/state/mp_rank_00_model_states.pt", weights_only=True,
                       map_location="cpu")["module"]

    from glotok.config import load_config
    from glotok.train.tokenizer_trainer import TokenizerTrainer

    cfg = load_config(SAMPLE, [f"run.output_dir={tmp_path}", "run.name=two",
                               "train.max_steps=4", *FAST])
    trainer = TokenizerTrainer(cfg)
    assert trainer.universal and trainer.resume_from.world_size == 2
    assert trainer.resume()
    assert trainer.step == 3
    now = trainer.g_engine.module.state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    # Universal loading restores the Adam moments of both ranks' partitions (not zeros): the
    # total squared norm of exp_avg equals the sum over the two saved partitions.
    saved_sq = 0.0
    for r in (0, 1):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            part = torch.load(ckpt / f"generator/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                              weights_only=True, map_location="cpu")
        saved_sq += _sum_sq(part, "exp_avg")
    loaded_sq = sum(float(st["exp_avg"].double().pow(2).sum())
                    for st in trainer.g_engine.optimizer.optimizer.state.values())
    assert saved_sq > 0 and loaded_sq == pytest.approx(saved_sq, rel=1e-6)
    result = trainer.train()
    assert result["step"] == 4
    assert metrics_by_step(tmp_path / "two")[4]["loss/total"] > 0


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_files_with_code_are_refused_not_executed(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        SafeCheckpointEngine(None).load(str(tmp_path / "evil.pt"))
    assert not os.path.exists(marker)
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "fine.pt")
    assert torch.equal(SafeCheckpointEngine(None).load(str(tmp_path / "fine.pt"))["module"]["w"],
                       torch.ones(2))


def _sum_sq(obj, key: str) -> float:
    """Sum of squares of every tensor stored under ``key`` anywhere in a nested state."""
    if isinstance(obj, dict):
        return sum(float(v.double().pow(2).sum()) if k == key and torch.is_tensor(v)
                   else _sum_sq(v, key) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_sum_sq(v, key) for v in obj)
    return 0.0
