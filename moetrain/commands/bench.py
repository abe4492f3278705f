"""``moetrain bench TARGET ...``: side-by-side measurements (:mod:`moetrain.bench`).

    moetrain bench moe-layer [--experts 8 32 128] [--json FILE] ...
    moetrain bench train --config configs/tiny.yaml [--steps 20] ...
    moetrain bench step --config configs/multi30k_switch.yaml [--repeats 10] [--profile DIR] ...
    moetrain bench estimator-quality CHECKPOINT_OR_CONFIG [--layer NAME] [--batches N] ...
"""

from __future__ import annotations

import argparse

from moetrain.bench import estimator_quality_options, moe_layer_options, step_options, train_options

__all__ = ["add_bench_arguments", "main_bench"]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per benchmark; each records the function that runs it."""
    targets = parser.add_subparsers(dest="bench_target", metavar="TARGET", title="targets", required=True)
    layer = targets.add_parser(
        "moe-layer", help="forward+backward time of one MoE FFN layer vs a dense FFN",
        description="Time forward+backward of one MoE FFN layer for several expert counts, "
                    "against a dense FFN over the same tokens (ratios printed as a table).")
    moe_layer_options.add_arguments(layer)
    layer.set_defaults(bench_run=_run_moe_layer)
    train = targets.add_parser(
        "train", help="training tokens/s: 1 rank vs expert parallelism 2 on 2 ranks",
        description="Train a recipe for a few steps on 1 rank and with EP=2 on 2 ranks, side by side, "
                    "and print tokens/s and the scaling ratio.")
    train_options.add_arguments(train)
    train.set_defaults(bench_run=_run_train)
    step = targets.add_parser(
        "step", help="one training step: moetrain's model vs stock HF SwitchTransformers, tokens/s and GFLOP/s",
        description="Time forward + backward + AdamW of a recipe's translation model and of HF's "
                    "SwitchTransformersForConditionalGeneration with the same weights, interleaved in one process "
                    "(after checking that both compute the same loss); print median and min tokens/s, their ratio, "
                    "and the achieved GFLOP/s next to one large fp32 matmul's.")
    step_options.add_arguments(step)
    step.set_defaults(bench_run=_run_step)
    quality = targets.add_parser(
        "estimator-quality", help="router-gradient cosine / relative error of each estimator vs the exact gradient",
        description="On real batches, compare each estimator's router-logit gradient for one MoE layer with the "
                    "exact gradient of the expected layer output (all experts evaluated; docs/estimators.md, "
                    "'Gradient quality').")
    estimator_quality_options.add_arguments(quality)
    quality.set_defaults(bench_run=_run_estimator_quality)


def main_bench(args: argparse.Namespace) -> int | None:
    return args.bench_run(args)


def _run_moe_layer(args: argparse.Namespace) -> int | None:
    from moetrain.bench.moe_layer import main

    return main(args)


def _run_train(args: argparse.Namespace) -> int | None:
    from moetrain.bench.train import main

    return main(args)


def _run_step(args: argparse.Namespace) -> int | None:
    from moetrain.bench.step import main

    return main(args)


def _run_estimator_quality(args: argparse.Namespace) -> int | None:
    from moetrain.bench.estimator_quality import main

    return main(args)
