"""The options of ``moetrain bench train``, apart from the benchmark so that building the
command-line parser imports neither torch nor the trainer."""

from __future__ import annotations

import argparse

from moetrain.utils.argtypes import at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moetrain bench train``."""
    parser.add_argument("--config", required=True, help="YAML recipe whose model and batch are measured")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="config overrides, as for `moetrain train`")
    parser.add_argument("--steps", type=at_least(1), default=20, help="timed optimizer steps per run (default: 20)")
    parser.add_argument("--warmup", type=at_least(0), default=5, help="untimed steps first (default: 5)")
    parser.add_argument("--task", default=None, metavar="MODULE:CLASS",
                        help="task class to use instead of the recipe's task (e.g. a custom task)")
    parser.add_argument("--threads-per-rank", type=at_least(1), default=None, metavar="N",
                        help="CPU only: torch threads per rank (default: cores / ranks, so both runs use every "
                             "core; 1 avoids OpenMP slowdowns on a machine busy with other work)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--keep", metavar="DIR", default=None, help="keep the two runs' directories under DIR")
