"""Where shards live: local paths and object-store URLs behind a few small functions.

Local paths use plain file I/O. ``s3://`` goes through s3fs (fsspec), configured by
:class:`StorageOptions` or, for every field left unset, the standard AWS environment:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (an S3-compatible store: MinIO, Ceph, moto),
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` and
``~/.aws/{config,credentials}``. Other fsspec protocols (``gs://``, ``az://``, ...) work where
their package is installed.

Object stores have no rename (STACK.md P6), so :func:`write_bytes` relies on what is atomic
everywhere: a local ``os.replace`` of a finished temp file, or one PUT / one completed multipart
upload. Readers see a whole object or none.

Every read and write is retried with exponential backoff (:func:`with_retries`): a store that
restarts, throttles or drops connections costs time, not the run.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
_JITTER = random.Random()  # private: retries must not move the global RNG a trainer checkpoints


class StorageUnavailableError(OSError):
    """An object could not be read or written within the retry budget; the message names it."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach remote storage. ``None`` fields come from the AWS environment.

    Credentials have no field on purpose: configs and command lines are saved with runs and
    visible in ``ps``; keys belong in the environment, a profile or an instance role.
    """

    endpoint_url: Optional[str] = None  # e.g. "http://minio.internal:9000"
    profile: Optional[str] = None  # a profile of ~/.aws/config

    def s3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem``."""
        endpoint = (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        kwargs: dict[str, Any] = {}
        if endpoint:
            # Never region_name here: s3fs then sends a LocationConstraint that
            # us-east-1-style stores reject on mkdir (STACK.md P5).
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        profile = self.profile or os.environ.get("AWS_PROFILE")
        if profile:
            kwargs["profile"] = profile
        return kwargs


def is_remote(url: str) -> bool:
    """True for ``scheme://...`` URLs other than ``file://``."""
    return "://" in url and not url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, options: StorageOptions, pid: int):
    # Keyed by pid: a DataLoader worker forked from a process that already holds a client
    # builds its own instead of sharing the parent's event loop and sockets.
    del pid
    import fsspec

    if protocol in ("s3", "s3a"):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **options.s3_kwargs())
    return fsspec.filesystem(protocol)


def filesystem(url: str, options: StorageOptions = StorageOptions()):
    """``(fsspec filesystem, path without the scheme)`` for a remote URL."""
    protocol, path = url.split("://", 1)
    return _filesystem(protocol, options, os.getpid()), path


@functools.lru_cache(maxsize=4)
def _s3_client(options: StorageOptions, pid: int):
    # Shard reads are the hot path: botocore's synchronous client reads a GET body with about
    # half the CPU of s3fs's aiohttp stream (1.25 vs 2.4 ms per MB measured here), and it is
    # thread-safe, so the read-ahead thread can use it directly.
    del pid
    import botocore.config
    import botocore.session

    kwargs = options.s3_kwargs()
    session = botocore.session.Session(profile=kwargs.get("profile"))
    config = botocore.config.Config(max_pool_connections=16, retries={"mode": "standard"})
    return session.create_client(
        "s3", endpoint_url=kwargs.get("client_kwargs", {}).get("endpoint_url"), config=config)


def _s3_get(url: str, options: StorageOptions) -> bytes:
    bucket, _, key = url.split("://", 1)[1].partition("/")
    body = _s3_client(options, os.getpid()).get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return body.read()
    finally:
        body.close()


def with_retries(fn: Callable[[], T], what: str, *, retries: int = 5,
                 backoff: float = 0.5, max_delay: float = 30.0) -> T:
    """Call ``fn``; on an error wait ``backoff * 2**i`` seconds (+-25% jitter, capped at
    ``max_delay``) and try again, ``retries`` times.

    Raises:
        StorageUnavailableError: every attempt failed; names ``what``, the attempts, the time
            spent and the last error. A missing object is retried too: on a network file
            system or a store being restored it may be back in a moment.
    """
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return fn()
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - network stacks raise many unrelated types
            if attempt == retries:
                raise StorageUnavailableError(
                    f"{what}: failed {attempt + 1} times over {time.monotonic() - start:.1f}s, "
                    f"last error {type(exc).__name__}: {exc}. Check that it exists and that the "
                    "endpoint and credentials (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID) "
                    "reach it; re-run tools/make_shards.py or drop it from the manifest if it "
                    "is gone") from exc
            delay = min(max_delay, backoff * 2**attempt) * _JITTER.uniform(0.75, 1.25)
            logger.warning("%s: %s: %s; retry %d/%d in %.2fs", what, type(exc).__name__, exc,
                           attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, options: StorageOptions = StorageOptions(), *, retries: int = 5,
               backoff: float = 0.5) -> bytes:
    """The whole object or file at ``url``, retried with backoff (see :func:`with_retries`)."""
    if not is_remote(url):
        path = _local(url)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return with_retries(read, url, retries=retries, backoff=backoff)
    if url.startswith(("s3://", "s3a://")):
        return with_retries(lambda: _s3_get(url, options), url, retries=retries, backoff=backoff)
    fs, path = filesystem(url, options)
    return with_retries(lambda: fs.cat_file(path), url, retries=retries, backoff=backoff)


def write_bytes(url: str, data: bytes, options: StorageOptions = StorageOptions(), *,
                retries: int = 5, backoff: float = 0.5) -> None:
    """Publish ``data`` at ``url`` whole or not at all (temp file + ``os.replace`` locally, one
    PUT or completed multipart upload remotely), creating parent directories as needed."""
    if not is_remote(url):
        path = _local(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.tmp-{os.getpid()}")

        def write() -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        with_retries(write, url, retries=retries, backoff=backoff)
        return
    fs, path = filesystem(url, options)
    with_retries(lambda: fs.pipe_file(path, data), url, retries=retries, backoff=backoff)


def list_sizes(url: str, options: StorageOptions = StorageOptions()) -> dict[str, int]:
    """``{name: bytes}`` of the files directly under the directory or prefix ``url``; empty
    when it does not exist."""
    if not is_remote(url):
        path = _local(url)
        if not os.path.isdir(path):
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(path) if e.is_file()}
    fs, path = filesystem(url, options)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def remove(url: str, options: StorageOptions = StorageOptions()) -> None:
    """Delete one file or object; a missing one is not an error."""
    try:
        if not is_remote(url):
            os.remove(_local(url))
        else:
            fs, path = filesystem(url, options)
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def join(base: str, name: str) -> str:
    """``base/name`` for a directory path or a URL prefix."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def parent(url: str) -> str:
    """The directory or prefix holding ``url``."""
    if is_remote(url):
        scheme, path = url.split("://", 1)
        return f"{scheme}://{posixpath.dirname(path)}"
    return os.path.dirname(os.path.abspath(_local(url)))
