"""The ``moetrain`` command line.

    moetrain train     CONFIG [--set key=value ...] [--output-dir DIR]
    moetrain evaluate  CONFIG ...      moetrain translate CONFIG ...
    moetrain export    CONFIG ...      moetrain finetune  CONFIG ...
    moetrain config    CONFIG [--set key=value ...]      # print the resolved config
    moetrain bench moe-layer [--experts 8 32 128] [--json FILE] ...

Commands that do work share one shape: they load and validate the config first
(errors are one line on stderr, exit code 2), then create the run directory and
write ``config.yaml`` there (:func:`prepare_run`), then call their target.

Adding a command: put an entry in :data:`COMMANDS` (or call :func:`register_command`).
Targets are ``"module:function"`` strings imported only when the command runs, so
``moetrain --help`` stays fast and a command whose module is not written yet says so
instead of failing at import. A work target is called as
``function(cfg: RunConfig, out_dir: Path, args: argparse.Namespace) -> int | None``.

Multi-process runs go through DeepSpeed's launcher, which adds ``--local_rank=N``
before the command; it is accepted and ignored (the rank comes from the environment):

    deepspeed --num_gpus 8 --module moetrain.cli train configs/x.yaml --output-dir runs/x
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moetrain import __version__
from moetrain.commands.export import add_export_arguments, main_export
from moetrain.config import ConfigError, RunConfig, config_to_yaml, load_config, save_config
from moetrain.utils.rundir import create_run_dir, default_run_dir, process_rank, world_size

__all__ = ["COMMANDS", "Command", "CommandUnavailable", "register_command", "add_run_arguments",
           "prepare_run", "build_parser", "main"]

EXIT_USAGE = 2  # argparse's own code for bad usage; config errors use it too


class CommandUnavailable(Exception):
    """The module or function behind a command does not exist in this version."""

    def __init__(self, command: str):
        super().__init__(f"moetrain {command}: not available in this version")


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


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, *, output_dir: bool = True) -> None:
    """``CONFIG [--set key=value ...] [--output-dir DIR]``, shared by every work command."""
    parser.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
        help="override config values, e.g. --set moe.num_experts=16 train.lr=1e-3 "
             "(values are parsed as YAML; repeatable; applied after the file)")
    if output_dir:
        parser.add_argument(
            "--output-dir", metavar="DIR", default=None,
            help="run directory (default: runs/<config-stem>-<YYYYmmdd-HHMMSS>); created if "
                 "needed, receives config.yaml, logs and checkpoints. Required with several ranks.")


def prepare_run(args: argparse.Namespace, cfg: RunConfig | None = None) -> tuple[RunConfig, Path]:
    """Load the config (unless given), create the run directory, write ``config.yaml``.

    Args:
        args: parsed arguments with ``config``, ``overrides`` and ``output_dir``.
        cfg: an already loaded config (saves loading twice).

    Returns:
        ``(cfg, out_dir)``. Only rank 0 writes ``config.yaml``; every rank gets the path.

    Raises:
        ConfigError: invalid config, or several ranks without ``--output-dir``.
    """
    if cfg is None:
        cfg = load_config(args.config, args.overrides)
    output_dir = getattr(args, "output_dir", None)
    if output_dir is not None:
        out_dir = create_run_dir(output_dir, fresh=False)
    elif world_size() > 1:
        # Each rank would stamp its own time and pick a different directory.
        raise ConfigError(f"{args.config}: --output-dir is required when {world_size()} processes run "
                          "(each rank would otherwise pick its own timestamped directory)")
    else:
        out_dir = create_run_dir(default_run_dir(args.config), fresh=True)
    if process_rank() == 0:
        _write_run_config(cfg, out_dir / "config.yaml")
    return cfg, out_dir


def _write_run_config(cfg: RunConfig, path: Path) -> None:
    """Write ``config.yaml``; a different one already there (an earlier run in the same
    directory, e.g. before a resume) is kept as ``config.<its mtime>.yaml``, never lost."""
    text = config_to_yaml(cfg)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        import datetime as _dt

        stamp = _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        kept = path.with_name(f"config.{stamp}.yaml")
        n = 1
        while kept.exists():
            kept, n = path.with_name(f"config.{stamp}-{n}.yaml"), n + 1
        path.rename(kept)
    save_config(cfg, path)


def _resolve(target: str, command: str) -> Callable:
    """Import ``"package.module:function"``; CommandUnavailable if either is missing."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only the target itself (or a parent package) missing means "not written yet";
        # a missing dependency inside an existing module is a real error and propagates.
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise CommandUnavailable(command) from None
        raise
    function = getattr(module, attr, None)
    if not callable(function):
        raise CommandUnavailable(command)
    return function


def work_command(target: str, command: str) -> Callable[[argparse.Namespace], int | None]:
    """The run function of a work command whose implementation is ``target``."""

    def run(args: argparse.Namespace) -> int | None:
        cfg = load_config(args.config, args.overrides)  # fail fast, before heavy imports
        function = _resolve(target, command)
        cfg, out_dir = prepare_run(args, cfg)
        return function(cfg, out_dir, args)

    return run


# ---------------------------------------------------------------------------
# Commands available now
# ---------------------------------------------------------------------------


def _run_config(args: argparse.Namespace) -> int:
    sys.stdout.write(config_to_yaml(load_config(args.config, args.overrides)))
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="bench_target", metavar="TARGET", title="targets", required=True)
    layer = targets.add_parser(
        "moe-layer", help="forward+backward time of one MoE FFN layer vs a dense FFN",
        description="Time forward+backward of one MoE FFN layer for several expert counts, "
                    "against a dense FFN over the same tokens (ratios printed as a table).")
    from moetrain.bench.moe_layer_options import add_arguments as add_bench_moe_layer_arguments  # no torch import

    add_bench_moe_layer_arguments(layer)
    layer.set_defaults(bench_run=lambda args: _resolve("moetrain.bench.moe_layer:main", "bench moe-layer")(args))
    from moetrain.bench.train import add_arguments as add_bench_train_arguments  # no torch import

    train = targets.add_parser(
        "train", help="training tokens/s: 1 rank vs expert parallelism 2 on 2 ranks",
        description="Train a recipe for a few steps on 1 rank and with EP=2 on 2 ranks, side by side, "
                    "and print tokens/s and the scaling ratio.")
    add_bench_train_arguments(train)
    train.set_defaults(bench_run=lambda args: _resolve("moetrain.bench.train:main", "bench train")(args))


def _run_bench(args: argparse.Namespace) -> int | None:
    return args.bench_run(args)


register_command(
    "train", "train a model from a recipe",
    "Train from a YAML recipe with DeepSpeed (ZeRO 1/2, expert parallelism): periodic "
    "validation, checkpoints and metrics in the run directory. For several ranks launch "
    "`deepspeed --module moetrain.cli train CONFIG --output-dir DIR`.",
    add_run_arguments, work_command("moetrain.train.trainer:main_train", "train"))
def _checkpoint_command(module: str, name: str) -> tuple[Callable, Callable]:
    """(add_arguments, run) of a command that takes a checkpoint rather than a recipe."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _resolve(f"{module}:add_{name}_arguments", name)(parser)

    def run(args: argparse.Namespace) -> int | None:
        return _resolve(f"{module}:main_{name}", name)(args)

    return add_arguments, run


register_command(
    "evaluate", "score a checkpoint: sacreBLEU on a test set",
    "Translate a test set with beam search and print detokenised sacreBLEU with its signature "
    "(optionally tokenised BLEU with compound splitting); metrics are also written as JSON. "
    "CHECKPOINT is a run directory, a checkpoint, a portable checkpoint or an HF directory.",
    *_checkpoint_command("moetrain.tasks.translation", "evaluate"))
register_command(
    "translate", "translate a file with a trained model",
    "Translate a file line by line with beam search (the checkpoint's train.beam_size, "
    "train.length_penalty, train.max_decode_length unless overridden).",
    *_checkpoint_command("moetrain.tasks.translation", "translate"))
register_command(
    "export", "export to a Hugging Face SwitchTransformers directory",
    "Export a checkpoint to a stock Hugging Face SwitchTransformers directory "
    "(safetensors shards, config.json, tokenizer); see the export section of the config.",
    add_export_arguments, main_export)
register_command(
    "finetune", "fine-tune a pretrained encoder on a GLUE task",
    "Fine-tune a pretrained Switch encoder on one GLUE task and report its metric.",
    add_run_arguments, work_command("moetrain.tasks.glue:main_finetune", "finetune"))
register_command(
    "config", "print the resolved config of a recipe",
    "Load a recipe exactly as `train` would (preset, file, --set overrides, validation) "
    "and print the resolved config as YAML. Nothing is created.",
    lambda parser: add_run_arguments(parser, output_dir=False), _run_config)
register_command(
    "bench", "micro-benchmarks",
    "Micro-benchmarks of moetrain's building blocks on the current device.",
    _add_bench_arguments, _run_bench)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`.

    With ``only``, just that command's options are defined: some commands take their
    options from modules that import torch (seconds), which `--help` and the other
    commands should not pay for.
    """
    parser = argparse.ArgumentParser(
        prog="moetrain",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=32),
        description="Train, evaluate and export sparse Mixture-of-Experts Switch Transformers "
                    "with pluggable router gradient estimators, on DeepSpeed.",
        epilog="Example: moetrain train configs/demo.yaml --set moe.estimator=reinmax. "
               "Run `moetrain COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"moetrain {__version__}")
    # Added by the deepspeed launcher before the command; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.description)
        if only is None or name == only:
            command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    tokens = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=next((t for t in tokens if t in COMMANDS), None))
    args = parser.parse_args(tokens)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    label = args.command + (f" {args.bench_target}" if args.command == "bench" else "")
    try:
        return int(args.run(args) or 0)
    except ConfigError as err:
        print(f"moetrain {label}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CommandUnavailable as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"moetrain {label}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the importable module so that registrations made by other modules
    # (which import moetrain.cli) land in the same COMMANDS dict.
    from moetrain.cli import main as _main

    sys.exit(_main())
