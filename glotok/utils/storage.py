"""A directory on local disk or on object storage, with the few operations runs need.

``Storage("runs/x")`` and ``Storage("s3://bucket/runs/x")`` behave the same. Object stores have
no atomic rename (STACK.md P6), so nothing here relies on one: a single ``write_text`` or
``put`` is atomic on S3 (a PUT, or a completed multipart upload), and on local disk it goes
through a temporary name and ``os.replace``.

S3 credentials, profile and endpoint come from the standard AWS environment (AWS_PROFILE,
AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, an instance role, ...); nothing is stored in a config.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from glotok.data.storage import filesystem as remote_filesystem
from glotok.data.storage import is_remote, with_retries


def filesystem(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a URL such as ``s3://bucket/key``; the
    remote clients are :mod:`glotok.data.storage`'s (endpoint and profile from the AWS
    environment)."""
    url = str(url)
    if is_remote(url):
        return remote_filesystem(url)
    return fsspec.core.url_to_fs(url)


class Storage:
    """Files under one root directory, addressed by paths relative to it."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url).rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def child(self, rel: str) -> "Storage":
        return Storage(self.url_of(rel))

    # ---- reading -------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes. A missing file raises FileNotFoundError at once (it is an answer,
        e.g. an unfinished checkpoint); other remote errors are retried with backoff."""
        path = self.path(rel)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except Exception:
            if self.local:
                raise
            return with_retries(lambda: self.fs.cat_file(path), self.url_of(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and directories); [] if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def sizes(self, rel: str) -> dict[str, int]:
        """{relative path: size} of every file under ``rel``, in one listing."""
        base = self.path(rel).rstrip("/")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(base) + 1:]: int(info["size"]) for p, info in found.items()
                if info.get("type", "file") == "file"}

    def get(self, rel: str, local_path: str | os.PathLike) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(self.path(rel), str(local_path))

    # ---- writing -------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            dest = Path(self.path(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        else:
            with_retries(lambda: self.fs.pipe_file(self.path(rel), data), self.url_of(rel))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def put(self, local_path: str | os.PathLike, rel: str, move: bool = False) -> None:
        """Copy (or, on local disk, move) a local file to ``rel``, atomically."""
        if self.local:
            dest = Path(self.path(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            if move:
                shutil.move(str(local_path), tmp)
            else:
                shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        else:
            with_retries(lambda: self.fs.put_file(str(local_path), self.path(rel)),
                         self.url_of(rel))
            if move:
                os.remove(local_path)

    def rm(self, rel: str, recursive: bool = True) -> None:
        p = self.path(rel)
        if self.local:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
            return
        try:
            self.fs.rm(p, recursive=recursive)
        except FileNotFoundError:
            pass


def local_cache_dir(name: str, base: Optional[str] = None) -> Path:
    """A per-run local scratch directory (staging for uploads, restored checkpoints)."""
    root = Path(base or os.environ.get("GLOTOK_LOCAL_DIR") or Path.home() / ".cache/glotok/local")
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path
