"""What every command that does work shares: its ``CONFIG [--set ...] [--output-dir DIR]``
arguments and its run directory.

A work command loads and validates the config first, then checks what the recipe alone cannot
tell (:func:`preflight`: the task fits the command, input files exist and are not empty, the
output directory is not a file, enough ranks for ``parallel.ep_size``, a device for the
precision, a ``latest`` pointer names a checkpoint). Errors are one line on stderr, exit code 2,
and nothing is created. Then it creates the run directory, takes its lock (rank 0; a second
process on the same directory exits with 2), refuses a directory with checkpoints and no
``train.resume`` (``train``), writes ``config.yaml`` there (:func:`prepare_run`), then calls its
function as ``function(cfg, out_dir, args)``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import shutil
from pathlib import Path
from typing import Callable

from moetrain.config import TASKS, ConfigError, RunConfig, config_to_yaml, load_config, save_config
from moetrain.utils.errors import UserError
from moetrain.utils.rundir import create_run_dir, default_run_dir, process_rank, world_size
from moetrain.utils.runlock import RunLock

__all__ = ["add_run_arguments", "prepare_run", "refuse_restart", "work_command", "preflight", "check_ranks",
           "input_paths"]


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


def work_command(function: Callable[[RunConfig, Path, argparse.Namespace], int | None],
                 command: str | None = None, *, resumable: bool = False) -> Callable[[argparse.Namespace], int | None]:
    """The run function of a work command: config, checks, run directory, then ``function``.

    ``command`` (``train``, ``finetune``) is the name the user typed; a recipe whose task another
    command runs is refused with that command's name. Rank 0 holds the run directory's lock
    (:class:`~moetrain.utils.runlock.RunLock`) from before ``config.yaml`` is written until
    ``function`` returns: a second process on the same directory stops with one line naming the
    holder and exit code 2, before it changes anything. ``resumable`` (``train``): a directory
    with checkpoints needs ``train.resume`` (:func:`refuse_restart`).
    """

    def run(args: argparse.Namespace) -> int | None:
        cfg = load_config(args.config, args.overrides)  # fails fast
        preflight(cfg, args, command)
        given = getattr(args, "output_dir", None)
        existed = given is not None and Path(given).exists()
        parent_existed = Path(given or "runs").parent.exists() if given else Path("runs").exists()
        out_dir = _run_dir(args)
        rank0 = process_rank() == 0
        with RunLock(out_dir) if rank0 else contextlib.nullcontext():
            try:
                _write_config(cfg, out_dir, resumable)
                return function(cfg, out_dir, args)
            except UserError:
                # Refused after the directory was made (e.g. an unreachable Hub dataset): a
                # directory this command created (and holds the lock of) with no checkpoint goes
                # again, so nothing is left behind.
                if not existed and rank0 and not _has_checkpoint(out_dir):
                    shutil.rmtree(out_dir, ignore_errors=True)
                    if not parent_existed:
                        with contextlib.suppress(OSError):
                            out_dir.parent.rmdir()  # only when empty
                raise

    return run


def _has_checkpoint(out_dir: Path) -> bool:
    root = out_dir / "checkpoints"
    return root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())


# --- checks before anything is created ------------------------------------------------------


def preflight(cfg: RunConfig, args: argparse.Namespace, command: str | None) -> None:
    """Everything a valid recipe can still get wrong on this machine, before the run directory
    exists (so a refused run leaves nothing behind).

    Raises:
        ConfigError: one line naming the recipe, the key (or flag) and what to do.
    """
    src = args.config
    wanted = TASKS.get(cfg.task)
    if command is not None and wanted is not None and wanted != command:
        raise ConfigError(f"{src}: task: '{cfg.task}' is run by `moetrain {wanted}`, not `moetrain {command}`: "
                          f"moetrain {wanted} {src}")
    out = getattr(args, "output_dir", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--output-dir {out}: is a file, not a directory; give a directory (it is created if needed)")
    for key, path, kind in input_paths(cfg):
        _check_input(src, key, path, kind)
    if cfg.data.tokenizer and cfg.task != "glue":  # glue takes the pretrained run's size
        _check_tokenizer_size(cfg, src)
    if command == "train":
        check_ranks(cfg, world_size(), src)
        _check_precision(cfg, src)
        if out is not None and cfg.train.resume in ("latest", "auto"):
            from moetrain.checkpoint_format import resolve_resume

            resolve_resume(cfg.train.resume, Path(out) / "checkpoints")  # a dangling `latest` fails here


def input_paths(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """``(key, path, kind)`` of every local input the run will read; kind is ``file`` (must be a
    non-empty file; globs and comma lists expanded) or ``path`` (a file or directory)."""
    found: list[tuple[str, str, str]] = []

    def files(key: str, spec: str | None) -> None:
        if spec:
            found.extend((key, part, "file") for part in _expand(spec))

    if cfg.task == "translation":
        d = cfg.data
        if d.source in ("files", "tsv", "jsonl") or (d.source == "hub" and d.train_src):
            for split in ("train", "valid", "test"):
                files(f"data.{split}_src", getattr(d, f"{split}_src"))
                if d.source in ("files", "hub"):
                    files(f"data.{split}_tgt", getattr(d, f"{split}_tgt"))
    if cfg.task == "electra" and cfg.electra.source == "files":
        files("electra.train_files", cfg.electra.train_files)
        files("electra.valid_files", cfg.electra.valid_files)
    if cfg.task == "glue":
        if cfg.glue.source == "files":
            files("glue.train_file", cfg.glue.train_file)
            files("glue.dev_file", cfg.glue.dev_file)
        if cfg.glue.pretrained:
            found.append(("glue.pretrained", cfg.glue.pretrained, "path"))
    if cfg.data.tokenizer:
        found.append(("data.tokenizer", cfg.data.tokenizer, "path"))
    if cfg.train.init_from_hf:
        found.append(("train.init_from_hf", cfg.train.init_from_hf, "path"))
    return found


def _expand(spec: str) -> list[str]:
    """A comma list / glob as paths; a pattern that matches nothing stays as the pattern."""
    from moetrain.utils.file_lists import expand_file_list

    return [path for part, found in expand_file_list(spec) for path in (found or [part])]


def _check_input(src: str, key: str, path: str, kind: str) -> None:
    p = Path(path)
    if not p.exists():
        what = "no file matches" if any(c in path for c in "*?[") else "no such file or directory:"
        raise ConfigError(f"{src}: {key}: {what} {path} (relative paths are resolved against the working "
                          f"directory, {Path.cwd()})")
    if kind == "file":
        if p.is_dir():
            raise ConfigError(f"{src}: {key}: {path} is a directory; expected a text file")
        if p.stat().st_size == 0:
            raise ConfigError(f"{src}: {key}: {path} is empty")


def _check_tokenizer_size(cfg: RunConfig, src: str) -> None:
    """A given ``data.tokenizer`` must fit ``model.vocab_size`` (else the embedding lookup fails
    deep inside the first step)."""
    path = Path(cfg.data.tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        return  # the task's loader names what is missing
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    if size > cfg.model.vocab_size:
        raise ConfigError(f"{src}: model.vocab_size: data.tokenizer ({path}) has {size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set model.vocab_size to at least {size}")


def check_ranks(cfg: RunConfig, ranks: int, src: str) -> None:
    """``parallel.ep_size`` must fit the processes that run: at most, and dividing, their number."""
    ep = cfg.parallel.ep_size
    if ep > 1 and (ranks < ep or ranks % ep):
        raise ConfigError(
            f"{src}: parallel.ep_size: {ep} must divide the number of ranks, but {ranks} process"
            f"{'es run' if ranks != 1 else ' runs'}; launch {ep} (or a multiple), e.g. `deepspeed --num_gpus {ep} "
            f"--module moetrain.cli train {src} --output-dir DIR`, or set parallel.ep_size=1")


def _check_precision(cfg: RunConfig, src: str) -> None:
    precision = cfg.train.precision
    if precision == "fp32":
        return
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(f"{src}: train.precision: fp16 needs a CUDA GPU (loss scaling), and none is available; "
                          "use bf16 or fp32 on this machine")
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{src}: train.precision: bf16 is not supported by {torch.cuda.get_device_name()}; "
                          "use fp16 (with parallel.zero_stage 1 or 2) or fp32")
