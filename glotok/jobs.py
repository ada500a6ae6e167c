"""Which kind of job a config describes, and the trainer that runs it.

A config is an AR (FAR generator) job when its model section names an AR-only key or it has a
``sample`` section; otherwise it is a tokenizer job. The launcher, the Ray workers and the
tools all go through here, so a config file is all a user hands over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

AR_ONLY_MODEL_KEYS = {"visual_vocab_size", "semantic_vocab_size", "n_layers", "head_layers"}


def kind_of_yaml(path: str | Path) -> str:
    from glotok.config import _read_yaml

    raw = OmegaConf.to_container(_read_yaml(Path(path).resolve()))
    model = raw.get("model") or {}
    return "ar" if "sample" in raw or AR_ONLY_MODEL_KEYS & set(model) else "tokenizer"


def kind_of(cfg: Any) -> str:
    from glotok.config_ar import ARJobConfig

    return "ar" if OmegaConf.get_type(cfg) is ARJobConfig else "tokenizer"


def load_job_config(path: str | Path, overrides: Optional[list[str]] = None) -> Any:
    if kind_of_yaml(path) == "ar":
        from glotok.config_ar import load_ar_config

        return load_ar_config(path, overrides)
    from glotok.config import load_config

    return load_config(path, overrides)


def job_config_from_dict(data: dict, kind: str) -> Any:
    if kind == "ar":
        from glotok.config_ar import ar_config_from_dict

        return ar_config_from_dict(data)
    from glotok.config import config_from_dict

    return config_from_dict(data)


def make_trainer(cfg: Any, stop_check: Optional[Callable[[], bool]] = None):
    if kind_of(cfg) == "ar":
        from glotok.train.ar_trainer import ARTrainer

        return ARTrainer(cfg, stop_check)
    from glotok.train.tokenizer_trainer import TokenizerTrainer

    return TokenizerTrainer(cfg, stop_check)
