"""The environment for a child process a test launches.

In-process training (``init_distributed`` for one plain process) writes ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` into ``os.environ`` and may keep a store listening on that
port. A child that inherited them would take itself for rank 0 of that group and fail with
EADDRINUSE, depending on which tests ran before it; children start without them.
"""

from __future__ import annotations

from moetrain.utils.net import LAUNCHER_VARS, child_env

__all__ = ["LAUNCHER_VARS", "child_env"]
