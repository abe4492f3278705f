"""Run directories: ``runs/<recipe-stem>-<YYYYmmdd-HHMMSS>`` unless the user names one.

Every command that does work gets one directory, created before anything else, holding
``config.yaml`` (the resolved config), logs, checkpoints and exports.

NOTE: under a multi-process launcher (``deepspeed``, ``torchrun``) every rank runs the
CLI, and each rank's clock may fall on a different second. A timestamped default would
then differ between ranks, so several ranks require an explicit ``--output-dir``.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

__all__ = ["default_run_dir", "create_run_dir", "process_rank", "world_size"]


def process_rank() -> int:
    """Global rank set by the launcher (``RANK``), 0 when run as a single process."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Number of processes set by the launcher (``WORLD_SIZE``), 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def default_run_dir(config_path: str | os.PathLike, root: str | os.PathLike = "runs",
                    now: _dt.datetime | None = None) -> Path:
    """``<root>/<config stem>-<YYYYmmdd-HHMMSS>`` (local time)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{Path(config_path).stem}-{stamp}"


def create_run_dir(path: str | os.PathLike, *, fresh: bool) -> Path:
    """Create the run directory and return it.

    Args:
        path: the directory wanted.
        fresh: True for a generated default name: never reuse an existing directory;
            a clash (two runs in the same second) gets a ``-2``, ``-3``... suffix.
            False for a name the user gave: reuse it (e.g. to resume in place).
    """
    path = Path(path)
    if not fresh:
        path.mkdir(parents=True, exist_ok=True)
        return path
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")
