"""What every command that does work shares: its ``CONFIG [--set ...] [--output-dir DIR]``
arguments and its run directory.

A work command loads and validates the config first (errors are one line on stderr, exit
code 2, nothing created), then creates the run directory, takes its lock (rank 0; a second process
on the same directory exits with 2), refuses a directory with checkpoints and no ``train.resume``
(``train``), writes ``config.yaml`` there, then calls its function as ``function(cfg, out_dir, args)``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
from pathlib import Path
from typing import Callable

from moetrain.config import ConfigError, RunConfig, config_to_yaml, load_config, save_config
from moetrain.utils.rundir import create_run_dir, default_run_dir, process_rank, world_size
from moetrain.utils.runlock import RunLock

__all__ = ["add_run_arguments", "prepare_run", "refuse_restart", "work_command"]


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


def prepare_run(args: argparse.Namespace, cfg: RunConfig | None = None, *,
                resumable: bool = False) -> tuple[RunConfig, Path]:
    """Load the config (unless given), create the run directory, write ``config.yaml``.

    Args:
        args: parsed arguments with ``config``, ``overrides`` and ``output_dir``.
        cfg: an already loaded config (saves loading twice).
        resumable: the command continues from ``checkpoints/`` (``train``): refuse a directory
            that holds checkpoints unless ``train.resume`` says what to do with them.

    Returns:
        ``(cfg, out_dir)``. Only rank 0 writes ``config.yaml``; every rank gets the path.

    Raises:
        ConfigError: invalid config, several ranks without ``--output-dir``, or (``resumable``)
            a run directory with checkpoints and no ``train.resume``.
    """
    if cfg is None:
        cfg = load_config(args.config, args.overrides)
    out_dir = _run_dir(args)
    _write_config(cfg, out_dir, resumable)
    return cfg, out_dir


def _run_dir(args: argparse.Namespace) -> Path:
    output_dir = getattr(args, "output_dir", None)
    if output_dir is not None:
        return create_run_dir(output_dir, fresh=False)
    if world_size() > 1:
        # Each rank would stamp its own time and pick a different directory.
        raise ConfigError(f"{args.config}: --output-dir is required when {world_size()} processes run "
                          "(each rank would otherwise pick its own timestamped directory)")
    return create_run_dir(default_run_dir(args.config), fresh=True)


def _write_config(cfg: RunConfig, out_dir: Path, resumable: bool) -> None:
    if resumable:
        refuse_restart(cfg, out_dir)
    if process_rank() == 0:
        _write_run_config(cfg, out_dir / "config.yaml")


def refuse_restart(cfg: RunConfig, out_dir: Path) -> None:
    """A run directory with checkpoints and no ``train.resume``: training would start again at
    step 1 and then prune and repoint the earlier run's checkpoints. Refuse, naming both ways on."""
    from moetrain import checkpoint_format as fmt

    if cfg.train.resume is not None:
        return
    saved = fmt.list_checkpoints(out_dir / "checkpoints")
    if saved:
        raise ConfigError(f"{out_dir} already holds checkpoints of an earlier run (newest: {saved[-1].name}); "
                          f"nothing was changed: continue it with --set train.resume=latest, or start a new run "
                          f"with another --output-dir")


def _write_run_config(cfg: RunConfig, path: Path) -> None:
    """Write ``config.yaml``; a different one already there (an earlier run in the same
    directory, e.g. before a resume) is kept as ``config.<its mtime>.yaml``, never lost."""
    text = config_to_yaml(cfg)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        stamp = _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        kept = path.with_name(f"config.{stamp}.yaml")
        n = 1
        while kept.exists():
            kept, n = path.with_name(f"config.{stamp}-{n}.yaml"), n + 1
        path.rename(kept)
    save_config(cfg, path)


def work_command(function: Callable[[RunConfig, Path, argparse.Namespace], int | None], *,
                 resumable: bool = False) -> Callable[[argparse.Namespace], int | None]:
    """The run function of a work command: config, run directory, then ``function``.

    Rank 0 holds the run directory's lock (:class:`~moetrain.utils.runlock.RunLock`) from before
    ``config.yaml`` is written until ``function`` returns: a second process on the same directory
    stops with one line naming the holder and exit code 2, before it changes anything.
    """

    def run(args: argparse.Namespace) -> int | None:
        cfg = load_config(args.config, args.overrides)  # fails fast
        out_dir = _run_dir(args)
        with RunLock(out_dir) if process_rank() == 0 else contextlib.nullcontext():
            _write_config(cfg, out_dir, resumable)
            return function(cfg, out_dir, args)

    return run
