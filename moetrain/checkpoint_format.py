"""The checkpoint format on disk. Every path, file name and pointer of it is defined here, once.

Layout under ``<run dir>/checkpoints/``::

    step_00001000/
      engine/                 DeepSpeed's own files (engine.save_checkpoint): per-rank ZeRO
                              optimizer shards, one file per global expert, the LR scheduler
      rng/rank_00000.pt       each rank's RNG states (DeepSpeed does not save them)
      trainer_state.json      step, data position, best metric, topology it was written on
      portable/               topology-free copy, read by ``moetrain export`` too:
        config.yaml             the resolved run config
        model.safetensors       full fp32 state dict as an ep_size=1 model names it
                                (expert keys carry GLOBAL ids: ...deepspeed_experts.<g>...)
        optimizer.pt            optimizer state tensors per parameter name (AdamW moments or
                                Adafactor's factored moments), step, optimizer name, LR scheduler
        trainer_state.json      as above
        tokenizer/              copy of the task's ``tokenizer_dir`` (when it has one)
    latest                    name of the newest complete checkpoint (written last)
    best                      name of the checkpoint with the best eval metric

A portable directory may also stand alone (:func:`save_portable`, e.g. written by a test or a
conversion): then it holds ``config.yaml``, ``model.safetensors`` and optionally ``tokenizer/``.

**Atomic.** A step directory is written as ``.tmp-step_X/`` and renamed by :func:`publish`,
which moves ``latest`` only afterwards, so ``latest`` always names a complete checkpoint.

Who uses this module: the trainer (:mod:`moetrain.train.checkpoint`, which adds what needs a
DeepSpeed engine) writes and restores; ``moetrain export / evaluate / translate / finetune``
read a portable checkpoint once with :func:`read_portable`. Nothing here imports DeepSpeed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Collection, Sequence

import torch
from safetensors.torch import load_file, save_file

from moetrain import __version__
from moetrain.config import ConfigError, RunConfig, load_config, save_config
from moetrain.utils.atomic import atomic_dir, publish_modes, write_text_synced
from moetrain.utils.errors import UserError

__all__ = ["ENGINE_DIR", "RNG_DIR", "PORTABLE", "CONFIG", "WEIGHTS", "OPTIMIZER", "TOKENIZER", "TRAINER_STATE",
           "CheckpointNotFound", "CheckpointError", "checkpoint_step", "file_error", "load_weights", "load_tensors",
           "read_config", "TrainerState", "PortableCheckpoint", "checkpoint_name", "list_checkpoints",
           "last_checkpoints", "publish", "prune", "remove_stale", "write_pointer", "expert_key", "global_key",
           "EXPERT_KEY", "write_portable", "save_portable", "is_replaceable", "enclosing_run_or_checkpoint",
           "portable_dir", "resolve_portable",
           "resolve_resume", "read_portable", "read_optimizer", "read_averaged", "average_checkpoints"]

ENGINE_DIR = "engine"  # also DeepSpeed's checkpoint tag
RNG_DIR = "rng"
TRAINER_STATE = "trainer_state.json"
PORTABLE = "portable"
CONFIG, WEIGHTS, OPTIMIZER, TOKENIZER = "config.yaml", "model.safetensors", "optimizer.pt", "tokenizer"
LATEST, BEST = "latest", "best"

#: A state-dict key of one expert: ``<layer>.deepspeed_moe.experts.deepspeed_experts.<id>.<rest>``.
EXPERT_KEY = re.compile(r"^(?P<layer>.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<id>\d+)\.(?P<rest>.*)$")
_STEP = re.compile(r"^step_(\d+)$")


class CheckpointNotFound(UserError, FileNotFoundError):
    """The path names no checkpoint; the message says what was expected there."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: a file truncated, corrupt, or holding pickled objects that
    could run code (one line naming the file and the checkpoint's step), or a request it cannot
    meet (more checkpoints to average than exist). Like a bad setting, the CLI prints it as is and
    exits with 2."""


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of the checkpoint ``path`` belongs to: from a ``step_N`` directory on the way up,
    else from the ``trainer_state.json`` beside it (None when neither says)."""
    path = Path(path)
    for d in (path, *path.parents):
        match = _STEP.match(d.name)
        if match:
            return int(match.group(1))
    for d in (path, path.parent):
        try:
            return int(json.loads((d / TRAINER_STATE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _unsafe_global(err: BaseException) -> str | None:
    """The global a ``weights_only`` load refused (``posix.system``), if that is why it failed."""
    match = re.search(r"(?:Unsupported global|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(err))
    return match.group(1) if "Weights only load failed" in str(err) and match else None


class UnsafePickle(ValueError):
    """Raised by moetrain's own stand-ins for pickle globals when a file asks for more than they
    allow (see ``moetrain.train.checkpoint._enum_member``)."""


def file_error(path: str | os.PathLike, err: BaseException, hint: str = "") -> CheckpointError:
    """The one-line error for an unusable checkpoint file: unsafe pickle, or truncated/corrupt."""
    path = Path(path)
    step = checkpoint_step(path)
    where = f"{path} (checkpoint step {step})" if step is not None else str(path)
    unsafe = str(err) if isinstance(err, UnsafePickle) else _unsafe_global(err)
    if unsafe is not None or "Weights only load failed" in str(err):
        what = (f"holds pickled Python objects ({unsafe or 'not tensors or plain containers'}) that would run code "
                f"when loaded; moetrain loads checkpoint files with torch.load(weights_only=True) and refuses it "
                f"(nothing was run): use a checkpoint you made or trust")
    elif not path.exists():
        what = "is missing"
    else:
        size = path.stat().st_size if path.is_file() else None
        reason = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__
        what = (f"is {'empty (0 bytes)' if size == 0 else 'truncated or corrupt'}"
                f"{f' ({size} bytes)' if size else ''}: {reason}")
    return CheckpointError(f"{where} {what}{hint}")


def load_weights(path: str | os.PathLike, hint: str = "") -> dict[str, torch.Tensor]:
    """``load_file`` of a safetensors file; a truncated or corrupt one is a :class:`CheckpointError`."""
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: the same user error
        raise file_error(path, err, hint) from None


def load_tensors(path: str | os.PathLike, hint: str = "", map_location=None) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
    Truncated, corrupt or unsafe files are a :class:`CheckpointError` naming the file and step."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ...
        raise file_error(path, err, hint) from None


def read_config(path: str | os.PathLike) -> RunConfig:
    """A checkpoint's ``config.yaml`` (an empty one is truncated, not "all defaults")."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise file_error(path, ValueError("no settings in it"))
    return load_config(path)


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue where it stopped.

    Attributes:
        step: optimizer steps completed.
        data_position: micro-batches each rank has consumed (``train_batches(start_step=...)``).
        best_metric / best_step: best evaluation so far (``metric`` decides which is best).
        metric / higher_is_better: the evaluation key that ranks checkpoints.
        topology: world_size, ep_size, zero_stage, precision the checkpoint was written with.
        train_seconds: wall-clock seconds trained so far, over all resumed runs (train.max_minutes).
        stopped_by: set by the training loop when a signal ended the run early (``"SIGTERM"``);
            a fact about this process, never written to ``trainer_state.json``.
    """

    step: int = 0
    data_position: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    metric: str = "loss"
    higher_is_better: bool = False
    topology: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    #: Not a field (never saved): set on the returned state when a signal ended the run early.
    stopped_by: ClassVar[str | None] = None

    def improves(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.higher_is_better else value < self.best_metric

    @classmethod
    def from_json(cls, path: Path) -> "TrainerState":
        """Read ``trainer_state.json``; keys written by a newer version are ignored."""
        try:
            raw = json.loads(Path(path).read_text())
        except ValueError as err:  # truncated or corrupt
            raise file_error(path, err) from None
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


# ---------------------------------------------------------------------------------------
# Step directories and the pointers to them
# ---------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete step directories under ``root``, oldest first (``.tmp-*`` never counts)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def last_checkpoints(run_dir: str | os.PathLike, n: int) -> list[Path]:
    """The ``n`` newest step directories of a run (or of its ``checkpoints/``), oldest first."""
    root = Path(run_dir)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = list_checkpoints(root)
    if len(steps) < n:
        raise CheckpointError(f"--average-last {n}: {root} holds {len(steps)} checkpoint(s); "
                              f"expected at least {n} (train.keep_last keeps that many)")
    return steps[-n:]


def write_pointer(path: Path, name: str) -> None:
    """Point ``latest`` or ``best`` at a step directory (replaced atomically, synced)."""
    write_text_synced(path, name)


def remove_stale(root: Path) -> None:
    """Remove ``.tmp-*`` directories left by a run killed while saving."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(root: Path, tmp: Path, name: str, is_best: bool) -> None:
    """Rename the finished ``tmp`` to ``root/name``, then move ``latest`` (the commit point)."""
    final = root / name
    if final.exists():  # this step was saved before (training resumed from an earlier checkpoint)
        latest = root / LATEST
        if latest.exists() and latest.read_text().strip() == name:
            # Never leave `latest` naming a directory that is being replaced.
            others = [p.name for p in list_checkpoints(root) if p.name != name]
            if others:
                write_pointer(latest, others[-1])
            else:
                latest.unlink()
        old = root / f".tmp-old-{name}"
        final.rename(old)
        shutil.rmtree(old)
    publish_modes(tmp)  # safetensors and mkstemp write 0600 whatever the umask
    tmp.rename(final)
    write_pointer(root / LATEST, name)
    if is_best:
        write_pointer(root / BEST, name)


def prune(root: Path, keep_last: int, own: Collection[str] | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (0 = keep all); ``latest`` and
    ``best`` always stay.

    ``own``: the step directories this run (this process) has written. With it, a checkpoint newer
    than the first of them that this run did not write is never deleted: it belongs to an earlier
    run in the same directory that went further (e.g. a run restarted from an earlier step).
    """
    if keep_last <= 0:
        return
    protected = {(root / ref).read_text().strip() for ref in (LATEST, BEST) if (root / ref).exists()}
    first = min((int(_STEP.match(n).group(1)) for n in own if _STEP.match(n)), default=None) if own else None
    complete = list_checkpoints(root)
    for path in complete[: max(len(complete) - keep_last, 0)]:
        if path.name in protected:
            continue
        if first is not None and path.name not in own and int(_STEP.match(path.name).group(1)) > first:
            continue  # an earlier run's newer checkpoint: not this run's to delete
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Expert keys: saved under global expert ids, whatever expert parallelism wrote them
# ---------------------------------------------------------------------------------------


def expert_key(layer: str, expert_id: int, rest: str) -> str:
    return f"{layer}.deepspeed_moe.experts.deepspeed_experts.{expert_id}.{rest}"


def global_key(key: str, layers: dict[str, Any]) -> tuple[str, Any]:
    """A rank's local state-dict key -> ``(ep_size=1 key, owning MoE layer or None)``.

    ``layers`` maps module paths to MoE layers (anything with ``ep_rank`` and
    ``num_local_experts``); local expert ``i`` of EP rank ``r`` is global ``r * local + i``.
    """
    match = EXPERT_KEY.match(key)
    if match is None or match["layer"] not in layers:
        return key, None
    layer = layers[match["layer"]]
    global_id = layer.ep_rank * layer.num_local_experts + int(match["id"])
    return expert_key(match["layer"], global_id, match["rest"]), layer


# ---------------------------------------------------------------------------------------
# Writing a portable directory
# ---------------------------------------------------------------------------------------


def write_portable(path: Path, weights: dict[str, torch.Tensor], cfg: RunConfig, *,
                   metadata: dict[str, str], state: TrainerState | None = None, optimizer: dict | None = None,
                   tokenizer: str | os.PathLike | None = None) -> None:
    """Write the files of a portable directory into ``path`` (created if needed).

    Args:
        weights: fp32 CPU tensors under ep_size=1 names (global expert ids).
        cfg: the resolved run config.
        metadata: safetensors header metadata (the trainer records the step).
        state: written as ``trainer_state.json`` when given.
        optimizer: written as ``optimizer.pt`` when given (see :func:`read_optimizer`).
        tokenizer: a tokenizer directory (or a single tokenizer file) copied to ``tokenizer/``;
            skipped when it does not exist.
    """
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / WEIGHTS), metadata=metadata)
    if optimizer is not None:
        torch.save(optimizer, path / OPTIMIZER)
    save_config(cfg, path / CONFIG)
    if state is not None:
        (path / TRAINER_STATE).write_text(state.to_json())
    if tokenizer is not None and Path(tokenizer).exists():
        src = Path(tokenizer)
        if src.is_dir():
            shutil.copytree(src, path / TOKENIZER)
        else:
            (path / TOKENIZER).mkdir()
            shutil.copy2(src, path / TOKENIZER / src.name)


def is_replaceable(path: Path) -> bool:
    """Only a missing or empty directory or a stand-alone portable checkpoint (nothing but its own
    files) may be replaced by :func:`save_portable`; never a directory a user keeps something else
    in, and never a checkpoint's ``portable/`` inside a run."""
    if not path.exists():
        return True
    if not path.is_dir() or enclosing_run_or_checkpoint(path.parent) is not None:
        return False
    names = {p.name for p in path.iterdir()}
    return not names or ({CONFIG, WEIGHTS} <= names and names <= {CONFIG, WEIGHTS, TOKENIZER, OPTIMIZER, TRAINER_STATE})


def _is_run_dir(path: Path) -> bool:
    """``config.yaml`` (written first by every run) with ``checkpoints/`` or ``metrics.jsonl``."""
    return (path / CONFIG).is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def _is_checkpoint(path: Path) -> bool:
    """A step directory, a checkpoints root (``latest`` or step directories) or a portable directory."""
    if _STEP.match(path.name) and ((path / TRAINER_STATE).is_file() or (path / PORTABLE).is_dir()):
        return True
    if (path / LATEST).is_file() or path.name == "checkpoints":
        return any(_STEP.match(p.name) and p.is_dir() for p in path.glob("step_*"))
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def enclosing_run_or_checkpoint(path: str | os.PathLike) -> tuple[str, Path] | None:
    """``("checkpoint", dir)`` when ``path`` is or lies inside a checkpoint (a step directory, a
    ``checkpoints/`` root, a portable directory); ``("run directory", dir)`` when ``path`` is a run
    directory or lies below one of its entries (a direct new child such as ``<run>/hf`` is not
    "inside": that is where ``train`` exports to). None otherwise. Only existing directories count."""
    path = Path(os.path.abspath(path))
    for i, d in enumerate([path, *path.parents]):
        if not d.is_dir():
            continue
        if _is_checkpoint(d):
            return "checkpoint", d
        if _is_run_dir(d) and i != 1:
            return "run directory", d
    return None


def save_portable(model_state_dict: dict[str, torch.Tensor], cfg: RunConfig,
                  tokenizer_dir: str | os.PathLike | None, out_dir: str | os.PathLike) -> Path:
    """Write a stand-alone portable checkpoint directory atomically (no optimizer, no trainer state).

    Args:
        model_state_dict: full state dict of the ``ep_size=1`` model (global expert ids);
            stored as float32.
        cfg: the resolved ``RunConfig`` (written as ``config.yaml``).
        tokenizer_dir: a tokenizer directory copied to ``tokenizer/`` (None: none is copied,
            and export will refuse the checkpoint).
        out_dir: the directory to create (replaced if it is an earlier portable checkpoint).
    """
    out = Path(out_dir)
    if not is_replaceable(out):
        raise FileExistsError(f"{out} exists and is not an earlier export; choose another output directory")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointNotFound(f"tokenizer directory {tokenizer_dir} does not exist")
    weights = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in model_state_dict.items()}
    with atomic_dir(out) as tmp:
        write_portable(tmp, weights, cfg, metadata={"format": "pt", "moetrain": __version__}, tokenizer=tokenizer_dir)
    return out


# ---------------------------------------------------------------------------------------
# Finding and reading checkpoints
# ---------------------------------------------------------------------------------------


def portable_dir(path: Path) -> Path:
    """A step directory's ``portable/``; a portable directory itself is returned as is."""
    return path / PORTABLE if (path / PORTABLE).is_dir() else path


def _latest(checkpoints: Path) -> Path | None:
    """``checkpoints/latest``: a symlink/directory, or a file naming the step directory."""
    latest = checkpoints / LATEST
    if latest.is_dir():
        return latest
    if latest.is_file():
        return _pointed(latest)
    return None


def _pointed(pointer: Path) -> Path:
    """The step directory a ``latest``/``best`` file names; it must exist.

    Raises:
        CheckpointNotFound: the pointer names a directory that is gone (deleted by hand, or
            copied without it), with the steps that are there.
    """
    name = pointer.read_text().strip()
    step = pointer.parent / name
    if not step.is_dir():
        there = [p.name for p in list_checkpoints(pointer.parent)]
        raise CheckpointNotFound(
            f"{pointer} names '{name}', which does not exist; "
            + (f"checkpoints there: {', '.join(there)} (write one of them into {pointer})" if there
               else f"no checkpoint is left there (remove {pointer} to start afresh)"))
    return step


def resolve_portable(path: str | os.PathLike) -> Path:
    """Find the portable checkpoint a user means by ``path``.

    Accepts a portable directory, a checkpoint directory holding ``portable/``, a run
    directory (``checkpoints/latest``) or its ``checkpoints/`` directory.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointNotFound(f"checkpoint {root} does not exist")
    candidates = [root, root / PORTABLE]
    for checkpoints in (root / "checkpoints", root):
        step = _latest(checkpoints)
        if step is not None:
            candidates += [step / PORTABLE, step]
    for c in candidates:
        if (c / CONFIG).is_file() and (c / WEIGHTS).is_file():
            return c
    raise CheckpointNotFound(f"no portable checkpoint at {root}: expected {CONFIG} + {WEIGHTS} there, in its "
                             f"{PORTABLE}/ subdirectory, or under checkpoints/latest/{PORTABLE}/ of a run directory")


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """The checkpoint directory named by ``train.resume``.

    ``latest`` (or ``auto``) reads ``root/latest`` and gives None when no checkpoint exists
    yet (a fresh run). Any other value is a step directory, a ``portable`` directory, or a
    checkpoints root holding a ``latest`` file.
    """
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        pointer = root / LATEST
        return _pointed(pointer) if pointer.exists() else None
    path = Path(resume)
    if (path / LATEST).is_file() and not (path / TRAINER_STATE).exists():
        path = _pointed(path / LATEST)
    if not path.exists():
        raise CheckpointNotFound(f"train.resume: no checkpoint at {path}")
    return path


@dataclass
class PortableCheckpoint:
    """A portable checkpoint read into memory (see :func:`read_portable`).

    Attributes:
        path: the portable directory.
        cfg: the run config it was trained with.
        weights: fp32 state dict of the ep_size=1 model (global expert ids).
        state: the trainer state, or None for a stand-alone directory without one.
    """

    path: Path
    cfg: RunConfig
    weights: dict[str, torch.Tensor]
    state: TrainerState | None = None

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer saved with the checkpoint, if any."""
        tok = self.path / TOKENIZER
        return tok if tok.is_dir() else None


def read_portable(path: str | os.PathLike) -> PortableCheckpoint:
    """Read a portable checkpoint: config, weights and trainer state (no distributed setup).

    ``path`` is anything :func:`resolve_portable` accepts: a portable, step, checkpoints or
    run directory. Commands call this once and pass the result on.
    """
    portable = resolve_portable(path)
    state_file = portable / TRAINER_STATE
    return PortableCheckpoint(portable, read_config(portable / CONFIG), load_weights(portable / WEIGHTS),
                              TrainerState.from_json(state_file) if state_file.is_file() else None)


def read_optimizer(portable: Path) -> dict:
    """``optimizer.pt``: ``{"adam_step", "optimizer", "moments": {key: {name: tensor}}, "lr_scheduler"}``.

    ``adam_step`` keeps its first name so that checkpoints written before Adafactor existed
    read the same; it is the optimizer's step count whichever optimizer wrote it.
    """
    return load_tensors(portable / OPTIMIZER)


def read_averaged(paths: Sequence[str | os.PathLike]) -> PortableCheckpoint:
    """The last of ``paths`` with its weights replaced by the element-wise mean over all of them.

    Each checkpoint is read once; the sum is kept in float64 and the result is float32.

    Raises:
        ValueError: no paths, or the checkpoints disagree on parameter names or shapes.
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    first = last = None
    for path in paths:
        last = read_portable(path)
        if first is None:
            first = last.path
            total = {k: v.double() for k, v in last.weights.items()}
            continue
        if last.weights.keys() != total.keys():
            diff = sorted(set(last.weights) ^ set(total))[:5]
            raise ValueError(f"{last.path} and {first} have different parameters (e.g. {diff})")
        for key, value in last.weights.items():
            if value.shape != total[key].shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in {last.path} but {tuple(total[key].shape)} "
                                 f"in {first}")
            total[key] += value.double()
    last.weights = {k: (v / len(paths)).float() for k, v in total.items()}
    return last


def average_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the weights of several portable checkpoints (float32 result).

    Args:
        paths: portable directories, step directories holding ``portable/``, or run dirs.
    """
    return read_averaged(paths).weights
