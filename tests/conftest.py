"""Test-wide environment: everything on loopback, everything written under a temp dir.

Nothing here is mocked. The variables keep real components (DeepSpeed, gloo, wandb, Ray) off
the network and out of the home directory (STACK.md P2, P10, P12).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="glotok-tests-"))

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ["WANDB_DIR"] = str(_SESSION_TMP / "wandb")
os.environ["WANDB_CACHE_DIR"] = str(_SESSION_TMP / "wandb-cache")
os.environ["WANDB_CONFIG_DIR"] = str(_SESSION_TMP / "wandb-config")
os.environ["TORCH_EXTENSIONS_DIR"] = str(_SESSION_TMP / "torch_extensions")
# The built-in sample shards and teacher are built once per test session, not in ~/.cache.
os.environ["GLOTOK_CACHE"] = str(_SESSION_TMP / "cache")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def sample_shards() -> list[str]:
    from glotok.data.sample import ensure_sample_shards

    return ensure_sample_shards()
