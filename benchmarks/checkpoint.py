"""Checkpoint cost for the sample tokenizer: save time, training stall, resume time.

    python benchmarks/checkpoint.py [--storage s3|local] [--repeats 3] [key=value ...]

One run measures, on the same trainer state:
  - background upload (the default): ``stall_s`` = how long the training loop is blocked (the
    local write), ``save_s`` = until the checkpoint is committed (manifest written);
  - the baseline, a blocking save (``checkpoint.async_upload=false``): the loop is blocked for
    the whole save, ``stall_sync_s``;
  - ``resume_s``: a new trainer loading the newest complete checkpoint (downloaded afresh).
S3 is moto's S3 server on 127.0.0.1, started and stopped here. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
    return server, "s3://bench/runs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/tokenizer/sample.yaml"))
    ap.add_argument("--storage", choices=["s3", "local"], default="s3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from glotok.config import load_config
    from glotok.train.tokenizer_trainer import TokenizerTrainer

    tmp = tempfile.mkdtemp(prefix="glotok-bench-ckpt-")
    os.environ.setdefault("GLOTOK_LOCAL_DIR", f"{tmp}/local")
    server = None
    out_dir = tmp
    if args.storage == "s3":
        server, out_dir = start_s3()

    def trainer(name: str, async_upload: bool) -> TokenizerTrainer:
        cfg = load_config(args.config, [f"run.output_dir={out_dir}", f"run.name={name}",
                                        "run.wandb=disabled", "checkpoint.keep_last=2",
                                        f"checkpoint.async_upload={async_upload}",
                                        *args.overrides])
        return TokenizerTrainer(cfg)

    results = {}
    for mode, async_upload in (("async", True), ("sync", False)):
        t = trainer(f"bench-{mode}", async_upload)
        t.train_step(next(t.stream))  # optimizer state exists, as in a real run
        stalls, saves = [], []
        for i in range(args.repeats):
            t.step = i + 1
            t0 = time.perf_counter()
            stall = t.save()
            t.checkpoints.wait()
            saves.append(time.perf_counter() - t0)
            stalls.append(stall)
        results[mode] = {"stall_s": statistics.median(stalls), "save_s": statistics.median(saves)}
        size = sum(t.checkpoints.storage.sizes(t.checkpoints.latest().name).values())

    resumes = []
    for _ in range(args.repeats):
        t = trainer("bench-async", True)
        # A cold resume: no local copy left by an earlier repeat.
        shutil.rmtree(t.checkpoints.staging_dir, ignore_errors=True)
        t0 = time.perf_counter()
        assert t.resume()
        resumes.append(time.perf_counter() - t0)
    if server is not None:
        server.stop()

    a, s = results["async"], results["sync"]
    print(f"{Path(args.config).name}, checkpoint {size / 2**20:.1f} MiB on {args.storage}")
    print(f"  background upload: stall {a['stall_s']:.3f}s, committed after {a['save_s']:.3f}s")
    print(f"  blocking save    : stall {s['stall_s']:.3f}s")
    print(f"  resume           : {statistics.median(resumes):.3f}s")
    print(json.dumps({
        "save_s": round(a["save_s"], 4), "stall_s": round(a["stall_s"], 4),
        "resume_s": round(statistics.median(resumes), 4),
        "stall_sync_s": round(s["stall_s"], 4), "save_sync_s": round(s["save_s"], 4),
        "stall_reduction": round(1 - a["stall_s"] / s["stall_s"], 4),
        "checkpoint_mib": round(size / 2**20, 2), "storage": args.storage,
        "config": Path(args.config).name, "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
