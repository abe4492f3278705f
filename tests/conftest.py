"""Shared pytest fixtures. Keep this small: what one file uses lives in that file.

Tests that start a process group take their port from ``moetrain.utils.net.free_port``, the
helper the trainer and the benchmark use too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Every test module runs torch on one intra-op thread.

    The tensors in these tests are tiny: a second thread only adds synchronisation, which made
    small matmuls 10-50x slower on a busy 2-core machine. Processes a test starts are not
    affected (they get ``OMP_NUM_THREADS`` from the test where it matters).
    """
    import torch  # here, not at the top: test_config and test_cli need no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo_root() -> Path:
    """The repository root (configs/, moetrain/, tests/)."""
    return REPO_ROOT


@pytest.fixture
def tiny_config_path() -> Path:
    """configs/tiny.yaml: the smallest runnable recipe."""
    return REPO_ROOT / "configs" / "tiny.yaml"
