"""Writes that a crash cannot leave half done: a file via a synced temporary file, a directory
via a temporary sibling that is renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["write_text_synced", "atomic_dir", "umask", "publish_modes"]


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the modes a plain
    ``open``/``mkdir`` would have given it under the current umask: files ``0o666 & ~umask``,
    directories ``0o777 & ~umask`` (0644/0755 under umask 022).

    ``tempfile.mkstemp``/``mkdtemp`` and safetensors' writer create 0600/0700 whatever the
    umask; every atomic write calls this before its rename, so a run's files are readable
    by the group and others exactly when the user's umask says so.
    """
    mask = umask()
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def write_text_synced(path: Path, text: str) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename).

    The fsync matters for pointer files such as ``checkpoints/latest``: after a power loss the
    pointer must not name a directory whose files never reached the disk.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    publish_modes(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` when the block succeeds.

    On an exception the temporary directory is removed and ``out_dir`` is left as it was. The
    caller decides beforehand whether an existing ``out_dir`` may be replaced at all.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    publish_modes(tmp)  # mkdtemp makes 0700; the result should look like a mkdir
    try:
        yield tmp
        publish_modes(tmp)  # files inside too (safetensors writes 0600)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
