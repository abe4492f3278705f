"""The options of ``moetrain bench step``, apart from the benchmark so that building the
command-line parser imports neither torch nor the trainer."""

from __future__ import annotations

import argparse

from moetrain.utils.argtypes import at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moetrain bench step``."""
    parser.add_argument("--config", required=True,
                        help="YAML recipe of a translation model (encoder-decoder) whose training step is measured")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="config overrides, as for `moetrain train` (dropout 0, dropless routing, no jitter "
                             "and no label smoothing are applied after them)")
    parser.add_argument("--batch-size", type=at_least(1), default=64, metavar="N",
                        help="sentences per step (default: 64)")
    parser.add_argument("--src-len", type=at_least(1), default=24, metavar="N",
                        help="source tokens per sentence (default: 24)")
    parser.add_argument("--tgt-len", type=at_least(2), default=24, metavar="N",
                        help="target tokens per sentence (default: 24)")
    parser.add_argument("--repeats", type=at_least(1), default=10, metavar="N",
                        help="timed steps per model, interleaved; median and min are reported (default: 10)")
    parser.add_argument("--warmup", type=at_least(0), default=3, metavar="N",
                        help="untimed steps per model first (default: 3)")
    parser.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                        help="torch intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--matmul-size", type=at_least(1), default=2048, metavar="N",
                        help="the reference matmul is N x N @ N x N, in the --precision dtype (default: 2048)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast over fp32 weights for both models (as moetrain's trainer at "
                             "ZeRO-0 and HF's Trainer with bf16=True run); the reference matmul uses the same "
                             "dtype (default: fp32)")
    parser.add_argument("--no-hf", action="store_true",
                        help="time moetrain alone (no Hugging Face model, no agreement check, no ratio)")
    parser.add_argument("--profile", metavar="DIR_OR_FILE", default=None,
                        help="also profile one step of each model with torch.profiler: print the top operators "
                             "by self time and write the tables to this .txt file (or DIR/step_profile.txt)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
