"""Shared helpers for the end-to-end tests: run the real `glotok` command as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "configs/tokenizer/sample.yaml"

# Small and fast, yet every part of the objective runs (the GAN from step 2).
FAST = ["data.batch_size=4", "train.log_every=1", "train.image_every=0", "loss.gan_start_step=2",
        "run.wandb=offline", "data.num_workers=1"]


def glotok_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


# Set in this process by in-process trainer tests (a world of one); a child must not inherit
# them, or it would join this process's group instead of starting its own.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOTOK_RAY_DASHBOARD="0")
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(glotok_cmd(*args), cwd=REPO, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """The last record of each step (a step re-run after a crash is logged twice)."""
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[r["step"]] = r
    return out
