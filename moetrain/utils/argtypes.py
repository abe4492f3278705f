"""``type=`` functions for numeric command-line options: a bad value is refused by argparse
(exit code 2, one line naming the flag and what it expects), never replaced by a default.

    parser.add_argument("--beam", type=at_least(1), ...)
    # moetrain translate: argument --beam: expected an integer >= 1, got '0'
"""

from __future__ import annotations

import argparse
import re
from typing import Callable

#: A byte size as ``export.max_shard_size`` takes it: ``500MB``, ``2GB``, ``1.5GiB``.
SIZE_PATTERN = r"\d+(\.\d+)?\s*([KMGT]i?)?B"

__all__ = ["at_least", "float_at_least", "float_above", "size_text", "SIZE_PATTERN"]


def at_least(low: int) -> Callable[[str], int]:
    """An integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got '{text}'")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _float(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'")
    return value


def float_at_least(low: float) -> Callable[[str], float]:
    """A finite number ``>= low``."""

    def parse(text: str) -> float:
        value = _float(text, f"a number >= {low:g}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low:g}, got '{text}'")
        return value

    parse.__name__ = f"number >= {low:g}"
    return parse


def float_above(low: float) -> Callable[[str], float]:
    """A finite number ``> low``."""

    def parse(text: str) -> float:
        value = _float(text, f"a number > {low:g}")
        if value <= low:
            raise argparse.ArgumentTypeError(f"expected a number > {low:g}, got '{text}'")
        return value

    parse.__name__ = f"number > {low:g}"
    return parse


def size_text(text: str) -> str:
    """A size such as ``500MB`` or ``2GB`` (kept as text)."""
    if re.fullmatch(SIZE_PATTERN, text, re.IGNORECASE) is None:
        raise argparse.ArgumentTypeError(f"expected a size like '500MB' or '2GB', got '{text}'")
    return text
