"""``glotok submit|status|logs|stop``: jobs on a Ray cluster through the job submission API.

The job ships this repository as its working directory (code and configs), so the cluster runs
exactly the code that was submitted; the cluster's image provides the dependencies. Nothing
secret is put in the runtime environment: the cluster reaches object storage through its own
credentials (an instance role, a mounted profile).
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", ".git", "runs", "wandb", "**/__pycache__", "*.egg-info", ".pytest_cache",
            ".ci-tmp", "bench-out"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def entrypoint(config: Path, overrides: list[str]) -> str:
    try:
        rel = config.resolve().relative_to(REPO)
    except ValueError:
        raise SystemExit(f"glotok submit: config {config} is outside the repository {REPO}; "
                         f"the job ships the repository, so put the config under configs/")
    return " ".join(["python", "-m", "launcher.cli", "train", shlex.quote(str(rel)),
                     *map(shlex.quote, overrides), "--ray-address", "auto"])


def submit(address: str, config: Path, overrides: list[str], follow: bool = False,
           job_id: str | None = None, stop_grace_s: float = 120.0) -> str:
    """Submit; ``stop_grace_s``: how long `glotok stop` lets the job checkpoint after SIGTERM
    before Ray kills it (Ray's own default is 3 s)."""
    client = _client(address)
    env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s) + 15)}
    kwargs = dict(entrypoint=entrypoint(config, overrides), submission_id=job_id,
                  runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env},
                  metadata={"glotok_config": str(config), "overrides": " ".join(overrides)})
    # A head that has just started answers before its job agent is up: wait for it (bounded).
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job = client.submit_job(**kwargs)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"submitted job {job}\n  follow : glotok logs {job} --address {address} --follow\n"
          f"  status : glotok status {job} --address {address}\n"
          f"  stop   : glotok stop {job} --address {address}")
    if follow:
        logs(address, job, follow=True)
    return job


def status(address: str, job_id: str) -> str:
    info = _client(address).get_job_info(job_id)
    print(f"{job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return str(info.status)


def logs(address: str, job_id: str, follow: bool = False) -> None:
    client = _client(address)
    if not follow:
        print(client.get_job_logs(job_id), end="")
        return
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def stop(address: str, job_id: str, wait_s: float = 0) -> str:
    client = _client(address)
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    state = str(client.get_job_status(job_id))
    while state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        state = str(client.get_job_status(job_id))
    print(f"{job_id}: {state}", file=sys.stderr)
    return state
