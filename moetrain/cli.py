"""The ``moetrain`` command line: a parser with one registered entry per command.

    moetrain train     CONFIG [--set key=value ...] [--output-dir DIR]
    moetrain evaluate  CHECKPOINT ...  moetrain translate CHECKPOINT ...
    moetrain export    CHECKPOINT ...  moetrain finetune  CONFIG ...
    moetrain config    CONFIG [--set key=value ...]      # print the resolved config
    moetrain plot      RUN_DIR [RUN_DIR ...] [--out DIR]  # PNG figures of metrics.jsonl
    moetrain compare   CONFIG --estimators A,B [--seeds N] [--set ...] [--out DIR] [--print-commands]
    moetrain bench moe-layer [--experts 8 32 128] [--json FILE] ...

This module only registers commands; what each one does is in :mod:`moetrain.commands`
(one small module per command). Work commands (``train``, ``finetune``) share one shape
(:func:`moetrain.commands.common.work_command`): the config is loaded and validated first
(errors are one line on stderr, exit code 2, nothing created), then the run directory is
created with ``config.yaml`` in it, then the command runs.

Adding a command: write its module under ``moetrain/commands/`` and call
:func:`register_command` (or put an entry in :data:`COMMANDS`) before :func:`build_parser`.

Multi-process runs go through DeepSpeed's launcher, which adds ``--local_rank=N``
before the command; it is accepted and ignored (the rank comes from the environment):

    deepspeed --num_gpus 8 --module moetrain.cli train configs/x.yaml --output-dir runs/x
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from moetrain import __version__
from moetrain.commands.bench import add_bench_arguments, main_bench
from moetrain.commands.common import add_run_arguments, work_command
from moetrain.commands.compare import add_compare_arguments, main_compare
from moetrain.commands.export import add_export_arguments, main_export
from moetrain.commands.finetune import main_finetune
from moetrain.commands.plot import add_plot_arguments, main_plot
from moetrain.commands.print_config import add_config_arguments, main_config
from moetrain.commands.train import main_train
from moetrain.commands.translation import add_evaluate_arguments, add_translate_arguments, main_evaluate, main_translate
from moetrain.utils.errors import UserError

__all__ = ["COMMANDS", "Command", "register_command", "build_parser", "main"]

EXIT_USAGE = 2  # argparse's own code for bad usage; every user error (UserError) uses it too


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong and where the help is
    (argparse's default prints the whole usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: its help texts, how to add its arguments, and what runs."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


#: name -> Command. Insertion order is the order in ``moetrain --help``.
COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, description: str,
                     add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int | None]) -> None:
    """Add or replace a subcommand (call before :func:`build_parser`)."""
    COMMANDS[name] = Command(help, description, add_arguments, run)


register_command(
    "train", "train a model from a recipe",
    "Train from a YAML recipe with DeepSpeed (ZeRO 1/2, expert parallelism): periodic "
    "validation, checkpoints and metrics in the run directory. For several ranks launch "
    "`deepspeed --module moetrain.cli train CONFIG --output-dir DIR`.",
    add_run_arguments, work_command(main_train, "train", resumable=True))
register_command(
    "evaluate", "score a checkpoint: sacreBLEU on a test set",
    "Translate a test set with beam search and print detokenised sacreBLEU with its signature "
    "(optionally tokenised BLEU with compound splitting); metrics are also written as JSON. "
    "CHECKPOINT is a run directory, a checkpoint, a portable checkpoint or an HF directory.",
    add_evaluate_arguments, main_evaluate)
register_command(
    "translate", "translate a file with a trained model",
    "Translate a file line by line with beam search (the checkpoint's train.beam_size, "
    "train.length_penalty, train.max_decode_length unless overridden).",
    add_translate_arguments, main_translate)
register_command(
    "export", "export to a Hugging Face SwitchTransformers directory",
    "Export a checkpoint to a stock Hugging Face SwitchTransformers directory "
    "(safetensors shards, config.json, tokenizer); see the export section of the config.",
    add_export_arguments, main_export)
register_command(
    "finetune", "fine-tune a pretrained encoder on a GLUE task",
    "Fine-tune a pretrained Switch encoder on one GLUE task and report its metric.",
    add_run_arguments, work_command(main_finetune, "finetune"))
register_command(
    "config", "print the resolved config of a recipe",
    "Load a recipe exactly as `train` would (preset, file, --set overrides, validation) "
    "and print the resolved config as YAML. Nothing is created.",
    add_config_arguments, main_config)
register_command(
    "plot", "PNG figures of runs' metrics.jsonl",
    "Draw loss, eval metrics, learning rate, tokens/s and one expert-load heatmap per MoE layer from "
    "each run's metrics.jsonl as PNG files. Several runs overlay their curves (one line per run).",
    add_plot_arguments, main_plot)
register_command(
    "compare", "train one recipe per estimator and seed, then a report",
    "Train the same recipe once per (estimator, seed), one run directory each under --out, one after "
    "another; then write report.md (final/best dev loss and task metric, steps to reach the first "
    "estimator's final dev loss, tokens/s, peak RSS; mean ± std over seeds), PNG curves and their CSVs. "
    "Rerunning skips finished runs and resumes interrupted ones. See docs/compare.md.",
    add_compare_arguments, main_compare)
register_command(
    "bench", "micro-benchmarks",
    "Micro-benchmarks of moetrain's building blocks on the current device.",
    add_bench_arguments, main_bench)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = OneLineParser(
        prog="moetrain",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=32),
        description="Train, evaluate and export sparse Mixture-of-Experts Switch Transformers "
                    "with pluggable router gradient estimators, on DeepSpeed.",
        epilog="Example: moetrain train configs/demo.yaml --set moe.estimator=reinmax. "
               "Run `moetrain COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"moetrain {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of user errors too (bad config, missing file, ...); "
                             "internal errors always show theirs")
    # Added by the deepspeed launcher before the command; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.description)
        command.add_arguments(child)
        # `moetrain train --debug ...` works as well as `moetrain --debug train ...`.
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        child.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    label = args.command + (f" {args.bench_target}" if args.command == "bench" else "")
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        # Expected errors (bad config, missing data, absent checkpoint): one line, exit 2.
        # Anything else is a bug and keeps its traceback.
        if args.debug:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"moetrain {label}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"moetrain {label}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the importable module so that registrations made by other modules
    # (which import moetrain.cli) land in the same COMMANDS dict.
    from moetrain.cli import main as _main

    sys.exit(_main())
