"""Start ``torch.multiprocessing`` workers and wait for them, failing the test on a hang.

A collective that one rank never enters blocks forever; the deadline turns that into a test
failure that names what was running, instead of a suite that never ends.
"""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp


def run_workers(worker, args: tuple, what: str, nprocs: int = 2, timeout_s: float = 240, poll_s: float = 5) -> None:
    """``mp.spawn(worker, args, nprocs)``; kill them and fail after ``timeout_s``. A worker that
    raises makes ``join`` raise (its traceback is printed by the worker)."""
    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=poll_s):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} still running after {timeout_s} s (hang in a collective?)")
