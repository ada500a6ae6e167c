"""Metrics: a JSON-lines log, a progress bar and wandb (offline when there is no API key)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)


def wandb_mode(setting: str) -> str:
    """'auto' means online when an API key is configured, offline otherwise: a run never
    stalls or fails for want of a wandb login."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """Rank 0 writes ``metrics.jsonl`` (one JSON object per logged step), updates a tqdm bar and
    mirrors to wandb. Other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 config: Optional[dict] = None, wandb: str = "auto", project: str = "glotok",
                 run_name: str = "glotok"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                         dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        mode = wandb_mode(wandb)
        if mode != "disabled":
            self._wandb = self._init_wandb(mode, project, run_name, config)

    def _init_wandb(self, mode: str, project: str, run_name: str, config: Optional[dict]):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; metrics go to metrics.jsonl only")
            return None
        # The run id lives in the run directory, so a resumed run continues the same wandb run.
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(project=project, name=run_name, id=run_id, resume="allow", mode=mode,
                          dir=str(self.run_dir), config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            shown = {k: f"{v:.4g}" for k, v in metrics.items()
                     if k in ("loss/total", "loss/rec", "img_per_s") and isinstance(v, float)}
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def image(self, step: int, key: str, array: np.ndarray) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(array)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def memory_stats(device) -> dict[str, float]:
    """Peak memory of this process: accelerator memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        import torch

        return {"mem/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"mem/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def sync_run_files(run_dir: Path, storage) -> None:
    """Copy the run's small local files (metrics log, image grids) to remote run storage."""
    run_dir = Path(run_dir)
    for f in [run_dir / "metrics.jsonl", run_dir / "reconstructions.png",
              *sorted((run_dir / "images").glob("*.png"))]:
        if f.is_file():
            storage.put(f, str(f.relative_to(run_dir)))
