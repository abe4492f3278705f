"""Shared pytest fixtures. Keep this small: fixtures used by one file live in that file."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    """The repository root (configs/, moetrain/, tests/)."""
    return REPO_ROOT


@pytest.fixture
def tiny_config_path() -> Path:
    """configs/tiny.yaml: the smallest runnable recipe."""
    return REPO_ROOT / "configs" / "tiny.yaml"
