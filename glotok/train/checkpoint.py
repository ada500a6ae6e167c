"""Checkpoints that a crash can never half-publish, on local disk or object storage.

Layout under ``<run>/checkpoints/`` (a local directory or ``s3://...``)::

    step_00001000/
        generator/state/...          DeepSpeed engine: every rank's ZeRO shards + client state
        discriminator/state/...
        rank_00000.pt ...            per rank: RNG states, data-stream position
        trainer.pt                   step, samples seen, EMA weights, resolved config (rank 0)
        .ranks/rank_00000.json ...   per rank: the files it uploaded, with sizes and sha256
        MANIFEST.json                written last: every file with its size and sha256
    latest                           name of the newest complete checkpoint

Saving, on every rank:
  1. DeepSpeed and our own state are written to a *local* staging directory of this rank
     (training is blocked only for this local write);
  2. a background thread uploads the rank's files (a move on local disk), hashes them and
     writes the rank's ``.ranks/rank_N.json`` marker;
  3. rank 0's thread waits for all markers, then writes ``MANIFEST.json`` -- the commit point --
     then the ``latest`` pointer, then removes checkpoints beyond ``keep_last``.

The background threads use no collectives (they would race the training loop's), only files.
A checkpoint is *complete* exactly when its manifest exists and every listed file has the
listed size. An incomplete one (a save killed midway) is never resumed from and is removed
by a later save.

Everything we write holds only tensors and plain values (``torch.load(weights_only=True)``),
and DeepSpeed's own files are loaded through :class:`SafeCheckpointEngine`, also weights-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from glotok.train.distributed import barrier
from glotok.utils.storage import Storage

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "latest"
RANK_MARKERS = ".ranks"
DS_TAG = "state"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RANK_SHARD = re.compile(r"(?:zero_pp_rank_|rank_)(\d+)")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    name: str
    url: str
    world_size: int

    @property
    def path(self) -> Path:
        """The local path of a checkpoint on local storage."""
        return Path(self.url)


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def read_manifest(storage: Storage, name: str) -> Optional[dict]:
    """The manifest of checkpoint ``name`` if it is complete, else None."""
    try:
        manifest = json.loads(storage.read_text(f"{name}/{MANIFEST}"))
        sizes = storage.sizes(name)
        for rel, meta in manifest["files"].items():
            if sizes.get(rel) != meta["size"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fault(point: str, step: int) -> None:
    """Test hook: ``GLOTOK_FAULT=<point>@<step>`` kills this process at that point of the save
    of that step, as a preemption would. Only tests set it."""
    if os.environ.get("GLOTOK_FAULT") == f"{point}@{step}":
        log.warning("GLOTOK_FAULT=%s@%d: killing the process", point, step)
        os._exit(137)


class SafeCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine so that its files load with ``weights_only=True``:
    a checkpoint from untrusted storage cannot run code. DeepSpeed pickles a few of its own
    enum and config types; they are allowed explicitly."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


# DeepSpeed's optimizer states pickle these plain types of its own besides tensors.
_DS_GLOBALS = ("deepspeed.runtime.zero.config:ZeroStageEnum",
               "deepspeed.runtime.fp16.loss_scaler:LossScaler",
               "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
               "deepspeed.utils.tensor_fragment:fragment_address")


def _deepspeed_safe_globals() -> list:
    import importlib

    found = []
    for spec in _DS_GLOBALS:
        module, name = spec.split(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def _to_universal(src: Path, dst: Path) -> None:
    import subprocess
    import sys

    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(src), "--output_folder", str(dst), "--num_extract_workers", "1",
           "--num_merge_workers", "1", "--inject_missing_state"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"converting {src} to a universal checkpoint failed:\n{r.stderr[-2000:]}")


def make_engine_loads_safe(engine) -> None:
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)


class CheckpointManager:
    """Saves and finds the checkpoints of one run. :meth:`save` is collective (all ranks call
    it: DeepSpeed writes each rank's shards); uploads and the commit run in the background."""

    def __init__(self, storage: Storage, staging_dir: Path, keep_last: int = 3, rank: int = 0,
                 world_size: int = 1, async_upload: bool = True):
        self.storage = storage
        self.staging_dir = Path(staging_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.async_upload = async_upload
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_save: dict[str, float] = {}

    # ---- discovery ---------------------------------------------------------------------------

    def _step_names(self) -> list[tuple[int, str]]:
        found = []
        for name in self.storage.listdir():
            m = _STEP_DIR.match(name)
            if m:
                found.append((int(m.group(1)), name))
        return sorted(found)

    def complete(self) -> list[CheckpointInfo]:
        """All complete checkpoints, oldest first."""
        out = []
        for step, name in self._step_names():
            manifest = read_manifest(self.storage, name)
            if manifest is not None:
                out.append(CheckpointInfo(step, name, self.storage.url_of(name),
                                          manifest["world_size"]))
        return out

    def latest(self) -> Optional[CheckpointInfo]:
        """The newest complete checkpoint, or None. Found by listing, so a stale or missing
        ``latest`` pointer (a crash between manifest and pointer) cannot mislead it."""
        done = self.complete()
        return done[-1] if done else None

    # ---- save --------------------------------------------------------------------------------

    def save(self, step: int, engines: dict[str, Any], trainer_state: dict, rank_state: dict,
             blocking: bool = False) -> float:
        """Write checkpoint ``step``. Returns the seconds training was blocked (the stall)."""
        t0 = time.perf_counter()
        self.wait()  # the previous save's upload and commit
        name = step_name(step)
        stage = self.staging_dir / f"rank_{self.rank:05d}" / name
        shutil.rmtree(stage, ignore_errors=True)
        if self.rank == 0 and self.storage.exists(name):
            self.storage.rm(name)  # an earlier, unfinished save of this step
        barrier()
        for eng_name, engine in engines.items():
            engine.save_checkpoint(str(stage / eng_name), tag=DS_TAG, save_latest=False)
        atomic_torch_save(rank_state, stage / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            atomic_torch_save(trainer_state, stage / "trainer.pt")
        barrier()
        self.last_save = {"started": t0}
        self._thread = threading.Thread(target=self._upload_and_commit, args=(step, name, stage),
                                        name=f"ckpt-upload-{name}", daemon=True)
        self._thread.start()
        if blocking or not self.async_upload:
            self.wait()
        self.last_save["stall_s"] = time.perf_counter() - t0
        return self.last_save["stall_s"]

    def wait(self) -> None:
        """Block until this rank's last upload (and, on rank 0, the commit) is done."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload to {self.storage.url} failed") from err

    def _upload_and_commit(self, step: int, name: str, stage: Path) -> None:
        try:
            files = {}
            for i, f in enumerate(sorted(p for p in stage.rglob("*") if p.is_file())):
                rel = str(f.relative_to(stage))
                files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
                self.storage.put(f, f"{name}/{rel}", move=True)
                if i == 0:
                    _fault("after_first_upload", step)
            self.storage.write_text(f"{name}/{RANK_MARKERS}/rank_{self.rank:05d}.json",
                                    json.dumps({"files": files}))
            shutil.rmtree(stage, ignore_errors=True)
            if self.rank == 0:
                self._commit(step, name)
                self._retain()
            self.last_save["save_s"] = time.perf_counter() - self.last_save["started"]
            log.info("checkpoint %s committed by rank %d in %.2fs", self.storage.url_of(name),
                     self.rank, self.last_save["save_s"])
        except BaseException as e:  # surfaced by wait() in the training thread
            self._error = e

    def _commit(self, step: int, name: str, timeout_s: float = 3600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            markers = self.storage.listdir(f"{name}/{RANK_MARKERS}")
            if len(markers) >= self.world_size:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {name}: only {len(markers)} of {self.world_size} "
                                   f"ranks finished uploading within {timeout_s:.0f}s")
            time.sleep(0.2)
        files = {}
        for m in markers:
            files.update(json.loads(self.storage.read_text(f"{name}/{RANK_MARKERS}/{m}"))["files"])
        _fault("before_manifest", step)
        manifest = {"step": step, "world_size": self.world_size, "time": time.time(),
                    "files": files}
        self.storage.write_text(f"{name}/{MANIFEST}", json.dumps(manifest, indent=1))
        self.storage.write_text(LATEST, name + "\n")

    def _retain(self) -> None:
        done = self.complete()
        keep = {c.name for c in done[-self.keep_last:]}
        newest = done[-1].step if done else -1
        for step, name in self._step_names():
            # Complete checkpoints beyond keep_last, and unfinished ones older than the newest
            # complete one (debris of killed saves), go.
            if name not in keep and step <= newest:
                self.storage.rm(name)

    # ---- load --------------------------------------------------------------------------------

    def _local_copy(self, info: CheckpointInfo, manifest: dict, all_ranks: bool) -> Path:
        """A local directory holding the checkpoint's files that this rank reads."""
        if self.storage.local:
            return Path(self.storage.path(info.name))
        dest = self.staging_dir / f"restore_rank_{self.rank:05d}" / info.name
        for rel, meta in manifest["files"].items():
            m = _RANK_SHARD.search(rel.rsplit("/", 1)[-1])
            if not all_ranks and m and int(m.group(1)) != self.rank:
                continue  # another rank's shard: not read by this rank
            target = dest / rel
            if not (target.exists() and target.stat().st_size == meta["size"]):
                self.storage.get(f"{info.name}/{rel}", target)
        return dest

    def load(self, info: CheckpointInfo, engines: dict[str, Any],
             load_optimizer_states: bool = True, tag: str = DS_TAG) -> tuple[dict, dict]:
        """Restore ``engines`` in place; returns (trainer_state, this rank's rank_state)."""
        manifest = read_manifest(self.storage, info.name)
        if manifest is None:
            raise RuntimeError(f"checkpoint {info.url} is incomplete (no valid {MANIFEST}); "
                               f"it cannot be resumed from")
        local = self._local_copy(info, manifest, all_ranks=tag != DS_TAG)
        for name, engine in engines.items():
            make_engine_loads_safe(engine)
            load_path, _ = engine.load_checkpoint(
                str(local / name), tag=tag, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load '{name}' from {info.url}/{name}")
        trainer_state = torch.load(local / "trainer.pt", map_location="cpu", weights_only=True)
        rank_file = local / f"rank_{self.rank:05d}.pt"
        rank_state = (torch.load(rank_file, map_location="cpu", weights_only=True)
                      if rank_file.exists() else {})
        return trainer_state, rank_state

    def read_all_rank_states(self, info: CheckpointInfo) -> list[dict]:
        """Every rank's saved state (RNG, data position), in rank order: what a resume on a
        different number of ranks re-partitions."""
        import io

        return [torch.load(io.BytesIO(self.storage.read_bytes(f"{info.name}/rank_{r:05d}.pt")),
                           map_location="cpu", weights_only=True)
                for r in range(info.world_size)]

    def prepare_universal(self, info: CheckpointInfo, engine_names: list[str]) -> str:
        """Convert each engine's ZeRO checkpoint to DeepSpeed's universal format, which loads on
        any number of ranks (with optimizer state). Collective; returns the tag to load."""
        tag = f"{DS_TAG}_universal"
        manifest = read_manifest(self.storage, info.name)
        local = self._local_copy(info, manifest, all_ranks=True)
        # On shared local storage one rank converts in place; from object storage every rank
        # has its own downloaded copy and converts that.
        if not self.storage.local or self.rank == 0:
            for name in engine_names:
                src, dst = local / name / DS_TAG, local / name / tag
                if not (dst / "zero").exists():
                    _to_universal(src, dst)
        barrier()
        return tag

    def read_trainer_state(self, info: CheckpointInfo) -> dict:
        data = self.storage.read_bytes(f"{info.name}/trainer.pt")
        import io

        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
