"""Trained models out of training checkpoints, for the offline tools (encode, decode, evaluate).

``load_tokenizer("runs/sample")`` takes the newest complete checkpoint of a run;
``load_tokenizer("s3://b/runs/x/checkpoints/step_00010000")`` a given one. Weights come from
the EMA when the run kept one (what evaluation should use), else the fp32 weights of the
generator engine, consolidated from the ZeRO partitions whatever the stage. Every file is
loaded weights-only.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from glotok.train.checkpoint import (DS_TAG, MANIFEST, CheckpointInfo, CheckpointManager,
                                     _deepspeed_safe_globals, read_manifest)
from glotok.utils.storage import Storage, local_cache_dir

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> tuple[Storage, str]:
    """(storage of the checkpoints directory, checkpoint name) for a run directory, a
    checkpoints directory or one checkpoint directory."""
    s = Storage(path)
    if s.exists(MANIFEST):
        parent, name = s.url.rsplit("/", 1)
        return Storage(parent), name
    for candidate in (s.child("checkpoints"), s):
        latest = CheckpointManager(candidate, Path("/nonexistent")).latest()
        if latest is not None:
            return candidate, latest.name
    raise FileNotFoundError(f"no complete checkpoint under {path}: pass a run directory "
                            f"(runs/NAME) or a checkpoint (runs/NAME/checkpoints/step_XXXXXXXX)")


@contextlib.contextmanager
def _weights_only_loads():
    """DeepSpeed's consolidation helpers call torch.load(weights_only=False); force True."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def _fp32_engine_weights(storage: Storage, name: str, manifest: dict, engine: str) -> dict:
    if storage.local:
        local = Path(storage.path(name))
    else:
        local = local_cache_dir(f"export/{name}")
        for rel, meta in manifest["files"].items():
            if rel.startswith(f"{engine}/"):
                target = local / rel
                if not (target.exists() and target.stat().st_size == meta["size"]):
                    storage.get(f"{name}/{rel}", target)
    state_dir = local / engine / DS_TAG
    if any(state_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(local / engine), tag=DS_TAG)
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        states = torch.load(state_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}


def read_run_config(path: str) -> dict:
    """The resolved config (a plain dict) saved with a run's newest (or the given) checkpoint."""
    storage, name = resolve_checkpoint(path)
    trainer = torch.load(io.BytesIO(storage.read_bytes(f"{name}/trainer.pt")),
                         map_location="cpu", weights_only=True)
    return trainer["config"]


def _load(path: str, engine: str, ema: bool, build: Callable[[dict], tuple[Any, Any]]):
    storage, name = resolve_checkpoint(path)
    manifest = read_manifest(storage, name)
    trainer = torch.load(io.BytesIO(storage.read_bytes(f"{name}/trainer.pt")),
                         map_location="cpu", weights_only=True)
    model, cfg = build(trainer["config"])
    if ema and trainer.get("ema"):
        weights, source = trainer["ema"]["shadow"], "ema"
    else:
        weights, source = _fp32_engine_weights(storage, name, manifest, engine), engine
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {storage.url_of(name)} does not match the model of its "
                           f"own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    log.info("loaded %s from %s (%s weights)", type(model).__name__, storage.url_of(name), source)
    info = CheckpointInfo(manifest["step"], name, storage.url_of(name), manifest["world_size"])
    return model, cfg, info


def load_tokenizer(path: str, *, ema: bool = True, device: str | torch.device = "cpu"
                   ) -> tuple[Any, Any, CheckpointInfo]:
    """(tokenizer in eval mode, its config, which checkpoint) from a run or checkpoint path."""
    from glotok.config import config_from_dict
    from glotok.models.tokenizer import GloTokTokenizer

    def build(config: dict):
        cfg = config_from_dict(_without_teacher(config))
        return GloTokTokenizer(cfg.model), cfg

    model, cfg, info = _load(path, "generator", ema, build)
    return model.to(device).eval(), cfg, info


def load_far(path: str, *, ema: bool = True, device: str | torch.device = "cpu"
             ) -> tuple[Any, Any, CheckpointInfo]:
    """(FAR generator in eval mode, its AR config, which checkpoint) from a run or checkpoint."""
    from glotok.config_ar import ar_config_from_dict
    from glotok.models.far import FARTransformer

    def build(config: dict):
        cfg = ar_config_from_dict(config)
        return FARTransformer(cfg.model), cfg

    model, cfg, info = _load(path, "model", ema, build)
    return model.to(device).eval(), cfg, info


def _without_teacher(cfg: dict) -> dict:
    """The tokenizer is rebuilt for inference: the loss terms (and the teacher and perceptual
    weight files they name, which need not exist where the model is used) play no part."""
    return {**cfg, "loss": {"hist_weight": 0.0, "perceptual_weight": 0.0,
                            "perceptual": {"backbone": "none"}}}
