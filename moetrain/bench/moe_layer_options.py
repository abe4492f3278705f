"""The options of ``moetrain bench moe-layer``, apart from the benchmark so that building the
command-line parser imports no torch."""

from __future__ import annotations

import argparse

from moetrain.utils.argtypes import at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moetrain bench moe-layer``."""
    parser.add_argument("--experts", type=at_least(1), nargs="+", default=[8, 32, 128], metavar="E",
                        help="expert counts to measure (default: 8 32 128)")
    parser.add_argument("--tokens", type=at_least(1), default=4096, help="tokens per batch (default: 4096)")
    parser.add_argument("--d-model", type=at_least(1), default=512, help="model width (default: 512)")
    parser.add_argument("--d-ff", type=at_least(1), default=2048, help="expert hidden width (default: 2048)")
    parser.add_argument("--repeats", type=at_least(1), default=5, metavar="N",
                        help="timed rounds per expert count; the median is reported (default: 5)")
    parser.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                        help="torch intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--grads", choices=["both", "steady", "fresh"], default="both",
                        help="gradient buffers: steady (kept, zeroed in place: a trainer's steady state), fresh "
                             "(dropped and allocated anew each step), or both, reported separately (default: both)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one round, a smoke test (overrides the size options)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the results as a JSON list of "
                             "{impl, num_experts, ms, peak_mb, ratio_to_dense}")
