"""Checkpoints that a crash can never half-publish.

Layout of ``<run>/checkpoints/``::

    step_00001000/
        generator/state/...          DeepSpeed engine (all ranks' ZeRO shards + client state)
        discriminator/state/...
        rank_00000.pt ...            per rank: RNG states, data-stream position
        trainer.pt                   step, samples seen, EMA weights, resolved config (rank 0)
        MANIFEST.json                written last: every file with its size and sha256
    latest                           name of the newest complete checkpoint (a hint)

A checkpoint is *complete* exactly when its ``MANIFEST.json`` exists and every file it lists has
the listed size. Writing the manifest last is the commit point: it works the same on a local
disk and on object storage, which has no atomic rename. A directory without a valid manifest
(a save killed midway) is never resumed from, and is removed by the next save.

Every file we write ourselves holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from glotok.train.distributed import barrier

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "latest"
DS_TAG = "state"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def _sha256(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_manifest(ckpt_dir: Path, verify_hashes: bool = False) -> Optional[dict]:
    """The manifest of a complete checkpoint, or None if ``ckpt_dir`` is not complete."""
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
        for rel, meta in manifest["files"].items():
            f = ckpt_dir / rel
            if f.stat().st_size != meta["size"]:
                return None
            if verify_hashes and _sha256(f) != meta["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


class CheckpointManager:
    """Saves and finds checkpoints of one run. Every rank calls :meth:`save` (it is collective:
    DeepSpeed writes each rank's shards); rank 0 commits."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, rank: int = 0,
                 world_size: int = 1):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- discovery ---------------------------------------------------------------------------

    def _step_dirs(self) -> list[CheckpointInfo]:
        found = []
        for p in self.root.iterdir() if self.root.exists() else []:
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append(CheckpointInfo(int(m.group(1)), p))
        return sorted(found, key=lambda c: c.step)

    def complete(self) -> list[CheckpointInfo]:
        """All complete checkpoints, oldest first."""
        return [c for c in self._step_dirs() if read_manifest(c.path) is not None]

    def latest(self) -> Optional[CheckpointInfo]:
        """The newest complete checkpoint, or None. The ``latest`` pointer is trusted only if
        the checkpoint it names is complete and no newer complete one exists."""
        done = self.complete()
        return done[-1] if done else None

    # ---- save --------------------------------------------------------------------------------

    def save(self, step: int, engines: dict[str, Any], trainer_state: dict,
             rank_state: dict) -> CheckpointInfo:
        """Write a checkpoint of ``step``. Collective: all ranks call it with their own
        ``rank_state``; ``trainer_state`` is written by rank 0 only."""
        t0 = time.perf_counter()
        path = self.root / f"step_{step:08d}"
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, unfinished save of this step
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(path / name), tag=DS_TAG, save_latest=False)
        atomic_torch_save(rank_state, path / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            atomic_torch_save(trainer_state, path / "trainer.pt")
        barrier()
        if self.rank == 0:
            self._commit(path, step)
            self._retain()
        barrier()
        log.info("saved checkpoint %s in %.2fs", path, time.perf_counter() - t0)
        return CheckpointInfo(step, path)

    def _commit(self, path: Path, step: int) -> None:
        files = {}
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.name != MANIFEST:
                files[str(f.relative_to(path))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {"step": step, "world_size": self.world_size, "time": time.time(),
                    "files": files}
        atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write_text(self.root / LATEST, path.name + "\n")

    def _retain(self) -> None:
        done = self.complete()
        keep = {c.path for c in done[-self.keep_last:]}
        newest = done[-1].step if done else -1
        for c in self._step_dirs():
            # Older complete checkpoints beyond keep_last, and unfinished ones older than the
            # newest complete one (debris of killed saves), are removed.
            if c.path not in keep and c.step <= newest:
                shutil.rmtree(c.path, ignore_errors=True)

    # ---- load --------------------------------------------------------------------------------

    def load(self, info: CheckpointInfo, engines: dict[str, Any],
             load_optimizer_states: bool = True) -> tuple[dict, dict]:
        """Restore ``engines`` in place; returns (trainer_state, this rank's rank_state)."""
        manifest = read_manifest(info.path)
        if manifest is None:
            raise RuntimeError(f"checkpoint {info.path} is incomplete (no valid {MANIFEST}); "
                               f"it cannot be resumed from")
        if manifest["world_size"] != self.world_size:
            raise RuntimeError(
                f"checkpoint {info.path} was written by {manifest['world_size']} ranks but this "
                f"run has {self.world_size}; resume with the same number of workers")
        for name, engine in engines.items():
            load_path, _ = engine.load_checkpoint(
                str(info.path / name), tag=DS_TAG, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load '{name}' from {info.path / name}")
        trainer_state = torch.load(info.path / "trainer.pt", map_location="cpu",
                                   weights_only=True)
        rank_state = torch.load(info.path / f"rank_{self.rank:05d}.pt", map_location="cpu",
                                weights_only=True)
        return trainer_state, rank_state
