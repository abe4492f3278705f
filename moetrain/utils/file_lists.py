"""Comma-separated file lists with glob patterns (``news*.en,extra.en``), as config keys take them.

One reading for every key that accepts such a list; each caller decides what a part that names no
file means for it (an error for training data, "report it later" for a preflight check).
"""

from __future__ import annotations

import glob
import os

__all__ = ["expand_file_list"]


def expand_file_list(spec: str) -> list[tuple[str, list[str]]]:
    """Each non-empty comma-separated part of ``spec`` with the paths it names.

    ``~`` is expanded. A glob pattern names its matches, sorted (none when nothing matches); any
    other part names itself, whether or not it exists.
    """
    out: list[tuple[str, list[str]]] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        path = os.path.expanduser(part)
        out.append((part, sorted(glob.glob(path)) if glob.has_magic(path) else [path]))
    return out
