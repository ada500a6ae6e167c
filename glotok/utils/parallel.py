"""Offline jobs over shards: one task per shard on Ray workers (or in this process), with a
progress bar.

``tools/build_teacher.py``, ``tools/pretokenize.py`` and ``tools/evaluate.py`` share one shape:
a model that is costly to build, a list of input shards, and per shard one result written to
storage. A :class:`ShardWorker` is built once per worker (a Ray actor holding its models) and
handles each shard it is given in three phases::

    fetch(task)             -> data     read the input (I/O)
    compute(task, data)     -> output   decode + model; one shard at a time per worker
    commit(task, output)    -> result   write the output (I/O); a small dict for the driver

Every worker runs up to ``in_flight`` shards at once (a threaded actor) and only ``compute``
holds its lock, so the next shard's download and the last one's upload hide behind the model.
:func:`run_shard_tasks` deals the shards out as workers free up and streams the results into a
tqdm bar counting images (throughput in img/s).

``workers=0`` runs one worker in this process through the same three phases (threads, no Ray):
for debugging, benchmarks and small jobs. Otherwise Ray is the embedded single-machine one
(loopback only, STACK.md P2) or the cluster at ``address`` (``auto`` inside a Ray job). Tasks
are idempotent (every output is published whole), so a worker lost to a node failure is
restarted and its shards retried; a killed driver is resumed by re-running the command.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)


class ShardWorker:
    """Base class of the per-worker half of a shard job; subclasses take their settings as
    keyword arguments (they travel to Ray workers by pickle) and build their models in
    ``__init__``."""

    def fetch(self, task: Any) -> Any:
        return None

    def compute(self, task: Any, data: Any) -> Any:
        raise NotImplementedError

    def commit(self, task: Any, output: Any) -> dict:
        return output


@dataclass(frozen=True)
class RayOptions:
    """Where the shard tasks run.

    Attributes:
        address: None: start an embedded single-machine Ray; ``auto`` or ``HOST:PORT``: join
            that cluster (inside ``ray job submit`` use ``auto``).
        workers: Ray workers (each holds one copy of the models). None: one per GPU of the
            cluster, else one per ``cpus_per_worker`` CPUs. 0: one worker in this process.
        cpus_per_worker: CPUs each worker reserves (torch threads + decode processes). None:
            the cluster's CPUs per GPU (at most 8) with GPUs, else 1.
        gpus_per_worker: None: 1 when the cluster has GPUs, else 0.
        in_flight: shards a worker holds at once (>= 2 overlaps I/O with compute).
    """

    address: Optional[str] = None
    workers: Optional[int] = None
    cpus_per_worker: Optional[float] = None
    gpus_per_worker: Optional[float] = None
    in_flight: int = 2


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--ray-address/--workers/--cpus-per-worker/--gpus-per-worker`` options every tool
    takes (see :class:`RayOptions`)."""
    g = parser.add_argument_group("where it runs (Ray)")
    g.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to run on ('auto' inside `ray job submit`, or HOST:PORT; "
                        "default: $RAY_ADDRESS, else an embedded local Ray on 127.0.0.1)")
    g.add_argument("--workers", type=int, default=None,
                   help="Ray workers, each with its own copy of the model (default: one per "
                        "GPU, else one per CPU); 0 runs everything in this process without Ray")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker: torch threads plus image-decoding processes "
                        "(default: CPUs per GPU up to 8 with GPUs, else 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    return RayOptions(address=args.ray_address, workers=args.workers,
                      cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)


@contextlib.contextmanager
def _random_agent_port():
    """Let the embedded Ray's dashboard agent take a free port.

    ``ray.init`` (Ray 2.60) starts the agent on the fixed port 52365 and has no option to change
    it; a second embedded Ray on the same host (two tools at once, parallel test sessions)
    fails to bind, and its raylet, which shares the agent's fate, dies seconds later
    ("owner's node has crashed"). Port 0 is Ray's own "pick one" value for this port.
    """
    try:
        from ray._private import parameter
    except ImportError:  # another Ray layout: start with its defaults
        yield
        return
    original = parameter.RayParams.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def connect(address: Optional[str], *, num_cpus: Optional[int] = None,
            dashboard: bool = False) -> None:
    """Join the Ray cluster at ``address``, or start an embedded one on loopback.

    The embedded Ray binds 127.0.0.1 only (the dashboard too), has ``num_cpus`` CPUs (default:
    this machine's), keeps its session files under ``$GLOTOK_RAY_TMPDIR`` when set (a short
    path: Ray's sockets live there), and runs the dashboard when ``dashboard`` is asked for,
    unless ``GLOTOK_RAY_DASHBOARD=0`` (``=1`` turns it on for every job).
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (P2)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    flag = os.environ.get("GLOTOK_RAY_DASHBOARD")
    with _random_agent_port():
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                 include_dashboard=flag == "1" or (dashboard and flag != "0"),
                 dashboard_host="127.0.0.1",
                 _temp_dir=os.environ.get("GLOTOK_RAY_TMPDIR") or None,
                 log_to_driver=True, configure_logging=False)


class _WorkerHost:
    """One worker's three phases, ``compute`` serialised by a lock (the Ray actor's body)."""

    def __init__(self, worker_cls: type, kwargs: dict, threads: Optional[int]):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = worker_cls(**kwargs)
        self.lock = threading.Lock()

    def run(self, task: Any) -> dict:
        data = self.worker.fetch(task)
        with self.lock:
            output = self.worker.compute(task, data)
        return self.worker.commit(task, output)


def _layout(options: RayOptions, num_tasks: int) -> tuple[int, float, float]:
    """(workers, cpus, gpus per worker) on the connected cluster."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1.0), res.get("GPU", 0.0)
    per_gpu = options.gpus_per_worker if options.gpus_per_worker is not None else (
        1.0 if gpus else 0.0)
    per_cpu = options.cpus_per_worker
    if per_cpu is None:
        per_cpu = float(max(1, min(8, int(cpus // gpus)))) if per_gpu else 1.0
    if options.workers is not None:
        n = options.workers
    elif per_gpu:
        n = int(gpus // per_gpu)
    else:
        n = int(cpus // per_cpu)
    if per_gpu > gpus or n < 1:
        raise RuntimeError(f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: it cannot "
                           f"place a worker of {per_cpu:g} CPUs and {per_gpu:g} GPUs; lower "
                           "--cpus-per-worker/--gpus-per-worker or pass --workers 0 to run here")
    return min(n, num_tasks), per_cpu, per_gpu


def progress_bar(**kwargs):
    """A tqdm bar with throughput; off a terminal (a Ray job's log) one line every 30 s."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(unit_scale=True, dynamic_ncols=tty, smoothing=0.1,
                mininterval=0.5 if tty else 30.0, **kwargs)


def run_shard_tasks(worker_cls: type, worker_kwargs: dict, tasks: Sequence[Any],
                    options: RayOptions = RayOptions(), *, desc: str, total: Optional[int] = None,
                    initial: int = 0, count: Callable[[dict], int] = lambda r: r["images"],
                    progress: bool = True) -> list[dict]:
    """Run every task through ``worker_cls`` workers; return their results in task order.

    Args:
        worker_cls, worker_kwargs: the :class:`ShardWorker` and its settings.
        tasks: one per shard (small picklable values).
        options: where to run (:class:`RayOptions`).
        desc, total, initial: the progress bar's label, total images, images already done
            (by an earlier run: they do not count towards the throughput).
        count: images a result accounts for.

    Raises:
        The first exception a task raised, as its own type (outputs committed before it stay
        committed: re-running the job resumes after them).
    """
    results: list[Optional[dict]] = [None] * len(tasks)
    bar = progress_bar(total=total, initial=initial, desc=desc, unit="img", disable=not progress)
    done = [0]

    def finished(index: int, result: dict) -> None:
        results[index] = result
        done[0] += 1
        bar.update(count(result))
        bar.set_postfix_str(f"shards {done[0]}/{len(tasks)}")

    try:
        if not tasks:
            return []
        if options.workers == 0:
            _run_here(worker_cls, worker_kwargs, tasks, options.in_flight, finished)
        else:
            _run_on_ray(worker_cls, worker_kwargs, tasks, options, finished)
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def _run_here(worker_cls, kwargs, tasks, in_flight, finished) -> None:
    host = _WorkerHost(worker_cls, kwargs, threads=None)
    with cf.ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="shard") as pool:
        futures = {pool.submit(host.run, t): i for i, t in enumerate(tasks)}
        try:
            for future in cf.as_completed(futures):
                finished(futures[future], future.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _run_on_ray(worker_cls, kwargs, tasks, options: RayOptions, finished) -> None:
    import ray

    connect(options.address)
    n, cpus, gpus = _layout(options, len(tasks))
    logger.info("%d Ray workers x (%g CPUs, %g GPUs) for %d shards", n, cpus, gpus, len(tasks))
    # Tasks are idempotent, so a worker lost with its node is rebuilt and its shards retried.
    actor_cls = ray.remote(_WorkerHost).options(
        num_cpus=cpus, num_gpus=gpus, max_concurrency=max(1, options.in_flight),
        max_restarts=2, max_task_retries=2)
    actors = [actor_cls.remote(worker_cls, kwargs, max(1, int(cpus))) for _ in range(n)]
    queue = list(enumerate(tasks))
    pending: dict = {}

    def submit(actor) -> None:
        index, task = queue.pop(0)
        pending[actor.run.remote(task)] = (index, actor)

    try:
        for _ in range(max(1, options.in_flight)):
            for actor in actors:
                if queue:
                    submit(actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index, actor = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
            finished(index, result)
            if queue:
                submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
