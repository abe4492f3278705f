"""A free TCP port for a process group's rendezvous (no torch import here)."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now.

    Another process may take it before the caller binds it; for a single-node rendezvous
    started a moment later that is rare enough to accept.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
