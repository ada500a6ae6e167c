"""A training job spread over two Ray nodes survives losing one of them.

Ray nodes on this machine, 1 CPU each, all on 127.0.0.1: a head and further nodes, each its own
set of processes (raylet, agents, worker processes). A 2-worker job with
``placement_strategy=SPREAD`` gets one rank on each of two nodes. The second node is then killed
the way a preempted VM disappears: SIGKILL to its raylet, agents and worker processes at once.
The job cannot continue on the 1 CPU left, so it waits; a new node joins, Ray Train restarts the
worker group over the head and the new node, the trainer resumes from the newest complete
checkpoint, and the run ends with the same losses (from the resume point on) and the same
weights as an uninterrupted run on the same cluster.

Why ``ray.cluster_utils.Cluster`` and not ``ray start --address=...`` for the second node: with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (everything on loopback, STACK.md P2) ``ray start``
refuses to add a node ("Multi-node Ray clusters are not supported on Windows and OSX"), and with
it unset Ray rewrites ``--node-ip-address=127.0.0.1`` to the machine's external address
(``ray._private.services.resolve_ip_for_localhost``). ``Cluster`` starts every node from the
same ``ray._private.node.Node`` that ``ray start`` uses, and keeps them on loopback.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import FAST, REPO, SAMPLE, cli_env, glotok_cmd, metrics_by_step, run_cli
from tests.test_ray_train import final_generator_weights

pytestmark = pytest.mark.slow

MAX_STEPS = 10
SPREAD_JOB = ["cluster.num_workers=2", "cluster.cpus_per_worker=1",
              "cluster.placement_strategy=SPREAD", "cluster.max_failures=2",
              f"train.max_steps={MAX_STEPS}", "checkpoint.every=3", *FAST]


def node_processes(node) -> list[psutil.Process]:
    """Every live process of a Ray node: those it started (raylet, agents, reaper) and all their
    descendants (worker processes and what they forked)."""
    procs = {}
    for infos in node.all_processes.values():
        for info in infos:
            try:
                p = psutil.Process(info.process.pid)
                for q in (p, *p.children(recursive=True)):
                    procs[q.pid] = q
            except psutil.NoSuchProcess:
                pass
    return list(procs.values())


def train_workers(node) -> list[psutil.Process]:
    out = []
    for p in node_processes(node):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def sigkill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


class LoopbackCluster:
    """Ray nodes of 1 CPU each on 127.0.0.1, under one short temp dir."""

    def __init__(self, temp_dir: Path):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster()
        self.node_args = {"num_cpus": 1, "temp_dir": str(temp_dir),
                          "node_ip_address": "127.0.0.1"}
        self.head = None

    def start_head(self) -> None:
        # A node that stops answering is declared dead after ~3 s instead of ~15 s.
        self.head = self.cluster.add_node(
            **self.node_args, include_dashboard=False,
            _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3})

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self):
        return self.cluster.add_node(**self.node_args)

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node)

    def kill_node(self, node) -> None:
        """SIGKILL every process of ``node`` at once, as when its machine is preempted."""
        sigkill(node_processes(node))
        self.cluster.remove_node(node, allow_graceful=False)  # reaps; kills nothing more

    def alive_nodes(self) -> int:
        return len(self.cluster.global_state._live_node_ids())

    def stop_actor_node(self, prefix: str) -> str | None:
        """The node of the live actor whose name starts with ``prefix``."""
        for a in self.cluster.global_state.actor_table(None, actor_state_name="ALIVE").values():
            if a["Name"].startswith(prefix):
                return a["Address"]["NodeID"]
        return None

    def shutdown(self) -> None:
        procs = [p for n in self.cluster.list_all_nodes() for p in node_processes(n)]
        try:
            self.cluster.shutdown()
        finally:
            sigkill(procs)  # whatever outlived the graceful shutdown: ours, by PID


@pytest.fixture
def ray_cluster(monkeypatch):
    d = Path(f"/tmp/mn{os.getpid()}-{random.randrange(10**6)}")  # short: Ray's socket paths
    (d / "ray").mkdir(parents=True)
    # Cluster writes its address file (ray_current_cluster) under $RAY_TMPDIR/ray, not /tmp/ray.
    monkeypatch.setenv("RAY_TMPDIR", str(d))
    cluster = LoopbackCluster(d)
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.shutdown()
        subprocess.run(["rm", "-rf", str(d)])


def wait_for(predicate, what: str, timeout: float = 300, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"the job exited ({proc.returncode}) waiting for {what}:\n{out}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def last_step(run_dir: Path) -> int:
    return max(metrics_by_step(run_dir), default=0)


def test_job_spread_over_two_nodes_survives_losing_one_and_ends_as_if_never_stopped(
        tmp_path, ray_cluster):
    args = ["train", str(SAMPLE), f"run.output_dir={tmp_path}", *SPREAD_JOB,
            "--ray-address", ray_cluster.address]

    # The uninterrupted run, on the same two nodes.
    first = ray_cluster.add_node()
    clean = run_cli(*args, "run.name=clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    ray_cluster.remove_node(first)

    # The job is submitted before its second node joins (as on an autoscaling cluster), so the
    # launcher's stop-request actor lives on the head, next to the driver.
    run_dir, log = tmp_path / "lost", tmp_path / "lost.log"
    with open(log, "w") as f:  # a file, not a pipe: nobody drains a pipe while we wait
        proc = subprocess.Popen(glotok_cmd(*args, "run.name=lost"), cwd=REPO, env=cli_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Attempting to start training worker group" in log.read_text(),
                 "the job to ask for its workers", proc=proc, log=log)
        second = ray_cluster.add_node()
        wait_for(lambda: last_step(run_dir) >= 1, "the first step", proc=proc, log=log)
        assert train_workers(ray_cluster.head) and train_workers(second), \
            "the 2 workers are not spread over the 2 nodes"
        assert ray_cluster.stop_actor_node("stop-lost-") == ray_cluster.head.node_id

        # Past the checkpoint of step 3, before the end: the second node is lost.
        wait_for(lambda: last_step(run_dir) >= 4, "step 4", proc=proc, log=log)
        ray_cluster.kill_node(second)
        killed_after = last_step(run_dir)
        assert killed_after < MAX_STEPS, "the run ended before the node was lost"

        # Two workers of 1 CPU cannot fit on the 1 CPU left: the job waits for capacity.
        wait_for(lambda: ray_cluster.alive_nodes() == 1, "Ray to declare the node dead", 60)
        wait_for(lambda: not train_workers(ray_cluster.head), "the surviving rank to stop", 60)
        time.sleep(3)
        assert proc.poll() is None, f"the job gave up:\n{log.read_text()[-3000:]}"
        assert last_step(run_dir) < MAX_STEPS

        # Capacity returns: a new node joins and the run continues over it and the head.
        third = ray_cluster.add_node()
        wait_for(lambda: bool(train_workers(third)), "a rank on the new node", proc=proc, log=log)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", out)
    assert resumed, f"node lost after step {killed_after}, but no resume:\n{out[-3000:]}"
    resume_step = int(resumed.group(1))
    assert 3 <= resume_step <= killed_after

    a, b = metrics_by_step(tmp_path / "clean"), metrics_by_step(run_dir)
    for step in range(resume_step + 1, MAX_STEPS + 1):
        for key in ("loss/total", "loss/rec", "loss/disc", "loss/hist"):
            assert b[step][key] == a[step][key], (resume_step, step, key)
    wa, wb = final_generator_weights(tmp_path / "clean"), final_generator_weights(run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
