"""The ``glotok`` command.

    glotok train CONFIG [key=value ...]            train on an embedded local Ray (or --ray-address)
    glotok submit CONFIG --address URL [k=v ...]   submit the same job to a Ray cluster
    glotok status|logs|stop JOB_ID --address URL   follow or stop a submitted job
    glotok config CONFIG [key=value ...]           validate and print the resolved config

Configs are validated in full before anything starts, so a typo costs nothing. Re-running the
same `glotok train` (same run.name) continues from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from glotok.config import ConfigError, to_yaml
from glotok.jobs import load_job_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glotok", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train from a config"),
                        ("submit", "submit a training job to a Ray cluster"),
                        ("config", "validate a config and print it resolved")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML file, e.g. configs/tokenizer/sample.yaml")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
        if name == "train":
            s.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                           help="an existing Ray cluster ('auto' inside a Ray job); default: "
                                "start an embedded local Ray")
            s.add_argument("--no-ray", action="store_true",
                           help="run the trainer in this process (one rank, or under torchrun)")
        if name == "submit":
            s.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), required=False,
                           help="Ray dashboard address, e.g. http://HEAD:8265 (or RAY_ADDRESS)")
            s.add_argument("--follow", action="store_true", help="stream the job's logs")
            s.add_argument("--job-id", default=None, help="submission id (default: generated)")
    for name in ("status", "logs", "stop"):
        s = sub.add_parser(name, help=f"{name} of a submitted job")
        s.add_argument("job_id")
        s.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
        if name == "logs":
            s.add_argument("--follow", action="store_true")
    return p


def _print_result(result: dict) -> None:
    if result.get("stopped"):
        print(f"\nglotok: stopped at step {result['step']} after writing a checkpoint.\n"
              f"  checkpoint    : {result['checkpoint']}\n"
              f"  re-run the same command to continue.")
        return
    run = result["run_dir"]
    print(f"\nglotok: trained to step {result['step']}\n"
          f"  run directory : {run}\n"
          f"  checkpoint    : {result['checkpoint']}\n"
          f"  metrics log   : {run}/metrics.jsonl")
    if result.get("grid"):
        print(f"  reconstructions (original | reconstruction pairs): {result['grid']}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`train CFG --no-ray a=1 b=2`): argparse
    # cannot intermix positionals with subcommands, so leftover key=value items join them.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("status", "logs", "stop"):
        from launcher import submit

        if not args.address:
            print("glotok: pass --address http://HEAD:8265 or set RAY_ADDRESS", file=sys.stderr)
            return 2
        if args.command == "logs":
            submit.logs(args.address, args.job_id, follow=args.follow)
        else:
            getattr(submit, args.command)(args.address, args.job_id)
        return 0
    try:
        cfg = load_job_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"glotok: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    if args.command == "submit":
        from launcher import submit

        if not args.address:
            print("glotok: pass --address http://HEAD:8265 or set RAY_ADDRESS", file=sys.stderr)
            return 2
        submit.submit(args.address, Path(args.config), args.overrides, follow=args.follow,
                      job_id=args.job_id, stop_grace_s=cfg.checkpoint.sigterm_grace_s)
        return 0
    if args.no_ray or "LOCAL_RANK" in os.environ:  # in-process, or one rank under torchrun
        from glotok.jobs import make_trainer

        result = make_trainer(cfg).train()
    else:
        from launcher import ray_train

        metrics = ray_train.run(cfg, args.ray_address)
        result = {**metrics, "metrics": metrics}
    _print_result(result)
    return exit_code(result)


def exit_code(result: dict) -> int:
    from launcher.ray_train import EXIT_STOPPED

    return EXIT_STOPPED if result.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
