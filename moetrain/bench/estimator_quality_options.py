"""The options of ``moetrain bench estimator-quality``, apart from the measurement so that building
the command-line parser imports no torch."""

from __future__ import annotations

import argparse

from moetrain.utils.argtypes import at_least

#: Kept here (torch-free) for the help text; the same tuple as ``moetrain.moe.grad_quality``.
DEFAULT_ESTIMATORS = ("switch", "sparsemixer", "st", "stgs", "reinmax")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moetrain bench estimator-quality``."""
    parser.add_argument("source", metavar="CHECKPOINT_OR_CONFIG",
                        help="a portable checkpoint / run directory (trained weights), or a YAML recipe "
                             "(a freshly initialised model)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="config overrides, as for `moetrain train` (recipes only)")
    parser.add_argument("--layer", default=None, metavar="NAME",
                        help="the MoE layer to probe, by module name (e.g. encoder.layers.1.ffn; "
                             "default: the first MoE layer)")
    parser.add_argument("--batches", type=at_least(1), default=4, metavar="N",
                        help="training batches to average over (default: 4)")
    parser.add_argument("--draws", type=at_least(1), default=8, metavar="N",
                        help="noise draws per estimator and batch (default: 8)")
    parser.add_argument("--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS), metavar="NAME",
                        help=f"top-1 estimators to compare (default: {' '.join(DEFAULT_ESTIMATORS)})")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the per-batch tables and their mean and std as JSON")
