"""The environment for a child process a test launches.

In-process training (``init_distributed`` for one plain process) writes ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` into ``os.environ`` and may keep a store listening on that
port. A child that inherited them would take itself for rank 0 of that group and fail with
EADDRINUSE, depending on which tests ran before it; children start without them.
"""

from __future__ import annotations

import os

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without the launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra)
    return env
