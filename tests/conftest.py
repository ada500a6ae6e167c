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


# --- S3: a real S3 API (moto's server) on loopback --------------------------------------------


class MotoS3:
    """moto's S3 server on 127.0.0.1 at a free port. The objects live in this process's moto
    backend, not in the server thread, so :meth:`stop` + :meth:`start` is an outage a client
    really sees (connections reset, then refused) after which the data is back, as with a
    restarted MinIO."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # werkzeug closes the listening socket: the port is free again
            self._server = None


@pytest.fixture(scope="session")
def s3_server():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """A fresh bucket on the session's S3 server, as ``s3://<bucket>``; the AWS_* variables
    point at the server for this test only."""
    import uuid

    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    bucket = f"glotok-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True,
                      client_kwargs={"endpoint_url": s3_server.endpoint}).mkdir(bucket)
    return f"s3://{bucket}"


# --- a trained sample tokenizer, for the offline tools' tests ---------------------------------


@pytest.fixture(scope="session")
def sample_tokenizer(sample_shards) -> Path:
    """Run directory of a sample tokenizer trained for 3 steps through the real
    ``glotok train --no-ray`` (about 30 s), once per session."""
    import subprocess
    import sys

    out = _SESSION_TMP / "runs"
    run = out / "tok"
    if not (run / "checkpoints" / "latest").is_file():
        cmd = [sys.executable, "-m", "launcher.cli", "train", "configs/tokenizer/sample.yaml",
               f"run.output_dir={out}", "run.name=tok", "train.max_steps=3", "checkpoint.every=3",
               "data.batch_size=4", "train.image_every=0", "run.wandb=disabled",
               "data.num_workers=1", "--no-ray"]
        from tests.helpers import cli_env

        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=cli_env())
        assert proc.returncode == 0, f"training the sample tokenizer failed:\n{proc.stderr[-3000:]}"
    return run
