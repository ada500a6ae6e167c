"""The ``glotok`` command.

    glotok train CONFIG [key=value ...]     train on this machine
    glotok config CONFIG [key=value ...]    validate and print the resolved config

Configs are validated in full before anything is built, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from glotok.config import ConfigError, load_config, to_yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glotok", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train a tokenizer from a config"),
                        ("config", "validate a config and print it resolved")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML file, e.g. configs/tokenizer/sample.yaml")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"glotok: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    from glotok.train.tokenizer_trainer import TokenizerTrainer

    result = TokenizerTrainer(cfg).train()
    print(f"\nglotok: trained to step {result['step']}\n"
          f"  run directory : {result['run_dir']}\n"
          f"  checkpoint    : {result['checkpoint']}\n"
          f"  metrics log   : {result['run_dir']}/metrics.jsonl\n"
          f"  reconstructions (original | reconstruction pairs): {result['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
