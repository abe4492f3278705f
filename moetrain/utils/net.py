"""A process group's rendezvous: a free TCP port, and a child environment without the parent's
(no torch import here)."""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "LAUNCHER_VARS", "child_env"]

#: What a launcher (or moetrain's own single-process ``init_distributed``) puts in the environment.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without :data:`LAUNCHER_VARS`, plus ``extra``: a child that inherited them
    would take itself for a rank of the parent's group (and may hit EADDRINUSE on its port)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra)
    return env


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now.

    Another process may take it before the caller binds it; for a single-node rendezvous
    started a moment later that is rare enough to accept.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
