"""Distributed, fault-tolerant training through the real `glotok` command on a real local Ray.

2 Ray Train workers, gloo, fp32, ZeRO-1 (CPU). Every failure here is real: a SIGKILLed worker
process, a SIGTERMed driver, a real `ray start --head` and job submission, a real S3 API.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from glotok.train.checkpoint import CheckpointManager
from glotok.utils.storage import Storage
from tests.helpers import FAST, REPO, SAMPLE, cli_env, glotok_cmd, metrics_by_step, run_cli

pytestmark = pytest.mark.slow

TWO_WORKERS = ["cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.max_failures=2"]


@pytest.fixture
def ray_env(tmp_path):
    """Ray's session files under the test's temp dir (short path: Ray's sockets need it)."""
    d = Path(f"/tmp/rt{os.getpid()}-{random.randrange(10**6)}")
    d.mkdir()
    yield {"GLOTOK_RAY_TMPDIR": str(d)}
    subprocess.run(["rm", "-rf", str(d)])


def final_generator_weights(run_dir: Path) -> dict:
    latest = CheckpointManager(Storage(run_dir / "checkpoints"), run_dir / "x").latest()
    path = latest.path / "generator/state/mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def kill_a_worker_at(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 400):
    """SIGKILL one Ray Train worker process once rank 0 has logged ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if max(metrics_by_step(run_dir), default=0) >= step:
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            assert workers, "no Ray Train worker process found"
            random.choice(workers).send_signal(signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError(f"run never reached step {step}")


def test_killed_worker_is_restarted_and_the_run_ends_as_if_never_stopped(tmp_path, ray_env):
    steps = ["train.max_steps=8", "checkpoint.every=3", *TWO_WORKERS, *FAST]
    r = run_cli("train", str(SAMPLE), f"run.output_dir={tmp_path}", "run.name=clean", *steps,
                **ray_env)
    assert r.returncode == 0, r.stderr[-3000:]

    kill_step = random.randint(4, 6)  # after the checkpoint of step 3, before the end
    proc = subprocess.Popen(glotok_cmd("train", str(SAMPLE), f"run.output_dir={tmp_path}",
                                       "run.name=crash", *steps),
                            cwd=REPO, env=cli_env(**ray_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    kill_a_worker_at(tmp_path / "crash", kill_step, proc)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out, f"killed at step {kill_step} but no resume:\n{out[-3000:]}"

    clean, crash = metrics_by_step(tmp_path / "clean"), metrics_by_step(tmp_path / "crash")
    for step in range(4, 9):  # from the resume point (step 3) on
        for key in ("loss/total", "loss/rec", "loss/disc", "loss/hist"):
            assert crash[step][key] == clean[step][key], (kill_step, step, key)
    a, b = final_generator_weights(tmp_path / "clean"), final_generator_weights(tmp_path / "crash")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_writes_a_checkpoint_and_rerunning_the_command_resumes(tmp_path, ray_env):
    args = ["train", str(SAMPLE), f"run.output_dir={tmp_path}", "run.name=term",
            "checkpoint.every=1000", *FAST]
    proc = subprocess.Popen(glotok_cmd(*args, "train.max_steps=500"), cwd=REPO,
                            env=cli_env(**ray_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while max(metrics_by_step(tmp_path / "term"), default=0) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    assert "re-run the same command" in out
    latest = CheckpointManager(Storage(tmp_path / "term/checkpoints"), tmp_path / "x").latest()
    stopped_at = latest.step
    assert 3 <= stopped_at < 500 and stopped_at == max(metrics_by_step(tmp_path / "term"))

    r = run_cli(*args, f"train.max_steps={stopped_at + 2}", **ray_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {stopped_at}" in r.stdout + r.stderr
    assert max(metrics_by_step(tmp_path / "term")) == stopped_at + 2


def test_s3_run_storage_resumes_and_no_file_or_log_holds_the_secret(s3, tmp_path, ray_env,
                                                                   monkeypatch):
    secret = f"glotok-secret-{random.randrange(10**12):012d}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any key pair
    local = tmp_path / "local"
    args = ["train", str(SAMPLE), f"run.output_dir={s3}/runs", "run.name=s3run",
            "checkpoint.every=2", *FAST]
    env = {**ray_env, "GLOTOK_LOCAL_DIR": str(local)}
    first = run_cli(*args, "train.max_steps=4", **env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*args, "train.max_steps=6", **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 4" in second.stderr

    run = Storage(f"{s3}/runs/s3run")
    assert json.loads(run.read_text("result.json"))["step"] == 6
    steps = [json.loads(line)["step"] for line in run.read_text("metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    mgr = CheckpointManager(run.child("checkpoints"), tmp_path / "x")
    assert [c.step for c in mgr.complete()] == [4, 6]

    # The secret is in no object of the bucket, no local file of the run, no Ray log, no output.
    leaks = [k for k in run.fs.find(s3[len("s3://"):]) if secret.encode() in run.fs.cat_file(k)]
    for root in (local, Path(ray_env["GLOTOK_RAY_TMPDIR"])):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink() and secret.encode() in f.read_bytes():
                leaks.append(str(f))
    for r in (first, second):
        assert secret not in r.stdout + r.stderr
    assert not leaks, leaks


def test_submit_to_a_ray_head_follow_logs_and_stop(tmp_path, ray_env):
    port, dash = 6400 + random.randrange(500), 8300 + random.randrange(500)
    address = f"http://127.0.0.1:{dash}"
    env = cli_env(**ray_env)
    start = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             "--num-cpus=2", f"--temp-dir={ray_env['GLOTOK_RAY_TMPDIR']}",
             "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        r = run_cli("submit", "configs/tokenizer/sample.yaml", "--address", address,
                    f"run.output_dir={tmp_path}", "run.name=submitted", "train.max_steps=500",
                    "checkpoint.every=1000", *FAST, **ray_env)
        assert r.returncode == 0, r.stderr[-3000:]
        job = r.stdout.split("submitted job ")[1].split()[0]
        deadline, logs = time.monotonic() + 300, ""
        while "submitted:" not in logs:  # the progress bar of the run named 'submitted'
            assert time.monotonic() < deadline, f"no training progress in the job logs:\n{logs}"
            time.sleep(2)
            logs = run_cli("logs", job, "--address", address, **ray_env).stdout
        assert ": RUNNING" in run_cli("status", job, "--address", address, **ray_env).stdout
        stop = run_cli("stop", job, "--address", address, **ray_env)
        assert stop.returncode == 0, stop.stderr
        deadline = time.monotonic() + 120
        while "STOPPED" not in run_cli("status", job, "--address", address, **ray_env).stdout:
            assert time.monotonic() < deadline, "job did not stop"
            time.sleep(2)
        # `glotok stop` sends SIGTERM: the job checkpointed the step it was at before exiting.
        latest = CheckpointManager(Storage(tmp_path / "submitted/checkpoints"), tmp_path).latest()
        assert latest is not None and latest.step == max(metrics_by_step(tmp_path / "submitted"))
    finally:
        stop_processes_under(ray_env["GLOTOK_RAY_TMPDIR"], f"127.0.0.1:{port}")


def stop_processes_under(temp_dir: str, gcs_address: str) -> None:
    """Stop this test's Ray head: the processes whose command line names its temp dir or GCS
    address (not `ray stop`, which would stop every Ray on the machine). SIGTERM, wait, then
    SIGKILL."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and (temp_dir in cmd or f"--address={gcs_address}" in cmd):
            procs.append(p)
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
