"""``moetrain config CONFIG [--set ...] [--ranks N]``: print the resolved config; nothing is created."""

from __future__ import annotations

import argparse
import sys

from moetrain.config import config_to_yaml, load_config
from moetrain.utils.argtypes import at_least
from moetrain.utils.rundir import world_size

from .common import add_run_arguments, check_ranks

__all__ = ["add_config_arguments", "main_config"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [--set ...] [--ranks N]``."""
    add_run_arguments(parser, output_dir=False)
    parser.add_argument("--ranks", type=at_least(1), default=None, metavar="N",
                        help="also check the recipe for N processes (parallel.ep_size must divide N; "
                             "default: WORLD_SIZE when a launcher set it)")


def main_config(args: argparse.Namespace) -> int:
    """Load the recipe exactly as ``train`` would and print it as YAML."""
    cfg = load_config(args.config, args.overrides)
    ranks = args.ranks if args.ranks is not None else world_size()
    if args.ranks is not None or ranks > 1:
        check_ranks(cfg, ranks, args.config)
    elif cfg.parallel.ep_size > 1:
        print(f"moetrain config: note: parallel.ep_size={cfg.parallel.ep_size} needs a multiple of "
              f"{cfg.parallel.ep_size} ranks (pass --ranks N to check)", file=sys.stderr)
    sys.stdout.write(config_to_yaml(cfg))
    return 0
