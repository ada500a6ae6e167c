"""Run a training config on Ray: an embedded local Ray by default, or an existing cluster.

Every Ray Train worker runs the library's trainer; DeepSpeed uses the process group Ray creates.
A failed worker group is restarted by Ray (``cluster.max_failures``) and resumes from the newest
complete checkpoint, exactly as a re-run of the same command does.

SIGTERM/SIGINT to this driver (preemption of the head, ``ray job stop``, Ctrl-C) is forwarded
to the workers through a small actor; they agree on a step, checkpoint it and return.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

from glotok.config import to_dict
from glotok.jobs import job_config_from_dict, kind_of

log = logging.getLogger(__name__)

STOP_ACTOR_NAMESPACE = "glotok"
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped after a checkpoint; re-run to resume
RESULT_FILE = "result.json"


def connect(address: Optional[str], cfg: Any) -> None:
    """Connect to ``address``, or start an embedded single-machine Ray on loopback with room
    for the config's workers, and its dashboard on 127.0.0.1."""
    from glotok.utils.parallel import connect as connect_ray

    c = cfg.cluster
    need = int(c.num_workers * c.cpus_per_worker + 0.999)
    connect_ray(address, num_cpus=max(os.cpu_count() or 1, need), dashboard=True)


def _use_gpu(setting: str) -> bool:
    if setting.lower() != "auto":
        return setting.lower() == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _storage_for_ray(cfg) -> tuple[str, Any]:
    """Ray Train keeps a little bookkeeping of its own beside our run directory."""
    from glotok.utils.storage import filesystem, is_remote

    url = f"{cfg.run.output_dir.rstrip('/')}/{cfg.run.name}/ray"
    if not is_remote(url):
        Path(url).mkdir(parents=True, exist_ok=True)
        return str(Path(url).resolve()), None
    import pyarrow.fs

    fs, path = filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _worker_loop(loop_config: dict) -> None:
    import ray

    from glotok.jobs import make_trainer

    cfg = job_config_from_dict(loop_config["config"], loop_config["kind"])
    actor = None
    if loop_config.get("stop_actor"):
        try:
            actor = ray.get_actor(loop_config["stop_actor"], namespace=STOP_ACTOR_NAMESPACE)
        except ValueError:
            actor = None
    last_poll, requested = [0.0], [False]

    def stop_check() -> bool:
        # Polled after every step; asks the actor at most every 2 s.
        if actor is None or requested[0] or time.monotonic() - last_poll[0] < 2.0:
            return requested[0]
        last_poll[0] = time.monotonic()
        try:
            requested[0] = bool(ray.get(actor.requested.remote(), timeout=30))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # the driver is gone or busy: train on; a lost driver ends the job anyway
        return requested[0]

    make_trainer(cfg, stop_check=stop_check).train()


def run(cfg: Any, address: Optional[str] = None) -> dict:
    """Train ``cfg`` on Ray (blocking). Returns the final metrics reported by rank 0."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_local_paths(cfg)
    connect(address, cfg)

    @ray.remote(num_cpus=0)
    class StopRequest:
        def __init__(self):
            self.flag = False

        def request(self):
            self.flag = True

        def requested(self):
            return self.flag

    actor_name = f"stop-{cfg.run.name}-{os.getpid()}-{int(time.time())}"
    # Pinned to the driver's node: the node whose loss ends the job anyway. Anywhere else, a
    # lost node would take the actor with it and fail the restarted workers.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    stop_actor = StopRequest.options(name=actor_name, namespace=STOP_ACTOR_NAMESPACE,
                                     scheduling_strategy=here).remote()
    received = []

    def forward_signal(signum, frame):
        log.warning("signal %d: asking the workers to checkpoint and stop", signum)
        received.append(signum)
        stop_actor.request.remote()

    previous = {s: signal.signal(s, forward_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    c = cfg.cluster
    use_gpu = _use_gpu(c.use_gpu)
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if use_gpu else {})}
    storage_path, storage_fs = _storage_for_ray(cfg)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": to_dict(cfg), "kind": kind_of(cfg), "stop_actor": actor_name},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=c.placement_strategy),
        run_config=RunConfig(name="train", storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    try:
        trainer.fit()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        ray.kill(stop_actor)
    import json

    from glotok.utils.storage import Storage

    # Rank 0 leaves the run's outcome in its run directory (Ray Train V2 keeps reported
    # metrics only together with Ray checkpoints, which we do not use).
    run_storage = Storage(f"{cfg.run.output_dir.rstrip('/')}/{cfg.run.name}")
    return json.loads(run_storage.read_text(RESULT_FILE))


def absolute_local_paths(cfg: Any) -> Any:
    """Ray workers do not share the driver's working directory: local paths in the config
    are made absolute here, where they were meant."""
    from glotok.utils.storage import is_remote

    data = to_dict(cfg)
    if not is_remote(data["run"]["output_dir"]):
        data["run"]["output_dir"] = str(Path(data["run"]["output_dir"]).resolve())
    src = data.get("data", {}).get("source", "")
    if src and src != "sample" and not is_remote(src) and not src.startswith("/"):
        data["data"]["source"] = str(Path(src).resolve())
    teacher = data.get("loss", {}).get("hist", {}).get("teacher")
    if teacher and ":" not in teacher and not teacher.startswith("/"):
        data["loss"]["hist"]["teacher"] = str(Path(teacher).resolve())
    return job_config_from_dict(data, kind_of(cfg))
