"""One process per run directory: a lock file that rank 0 holds for the run's lifetime.

``<run dir>/.moetrain.lock`` is locked with ``fcntl.flock`` (released by the kernel when the holder
exits, however it exits) and holds the holder's pid, host, start time and SLURM job id as JSON, so
a second process can say who is running. On a clean exit the file is emptied.

A non-empty lock file that nobody holds was left by a process that died (``kill -9``, a node
crash). It is taken over, with a warning, when the holder is provably gone: it ran on this host
(where ``flock`` is authoritative and its pid is no longer alive), or it was this same SLURM job
(a requeue). A holder on another host that nobody can check is refused: the message names the
file to delete if that run is really gone. On a file system without ``flock`` (some Lustre or NFS
mounts) the recorded holder alone decides: a live pid on this host still holds the directory.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from moetrain.utils.dataclass_yaml import ConfigError

__all__ = ["LOCK_FILE", "RunDirLocked", "RunLock"]

LOCK_FILE = ".moetrain.lock"


class RunDirLocked(ConfigError):
    """Another live process holds the run directory; the message names it (pid, host, since when).
    A user error like a bad setting: the CLI prints it as one line and exits with 2."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}{job}"


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock (raises :class:`RunDirLocked`)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.flocked = True  # False on a file system without flock: the recorded holder decides

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunDirLocked(f"{self.path.parent} is in use by another moetrain process "
                                   f"({_describe(self._read())}); wait for it to finish or stop it, or use another "
                                   f"--output-dir") from None
            # A file system without flock (some Lustre/NFS mounts): the recorded holder decides.
            self.flocked = False
            print(f"moetrain: warning: {self.path.parent} does not support file locks ({err.strerror}); "
                  f"relying on the pid and host recorded in {self.path.name}", file=sys.stderr, flush=True)
        previous = self._read(fd)
        if previous:
            self._check_stale(previous, fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _check_stale(self, holder: dict, fd: int) -> None:
        """A holder is recorded but (with flock) nobody holds the lock: take over only when that
        holder is provably gone. Without flock a live pid on this host still holds it."""
        here = holder.get("host") == socket.gethostname()
        same_job = bool(holder.get("slurm_job_id")) and holder.get("slurm_job_id") == os.environ.get("SLURM_JOB_ID")
        pid = holder.get("pid")
        alive = here and isinstance(pid, int) and _pid_alive(pid)
        if (here and alive and not self.flocked and not same_job) or not (here or same_job):
            os.close(fd)
            if here:
                raise RunDirLocked(f"{self.path.parent} is in use by another moetrain process ({_describe(holder)}); "
                                   f"wait for it to finish or stop it, or use another --output-dir")
            raise RunDirLocked(f"{self.path.parent} was locked by {_describe(holder)}, which this host cannot "
                               f"check; if that run is gone, delete {self.path} and start again")
        why = ("the same SLURM job, requeued" if same_job and not here else
               "its pid is no longer alive" if not alive else
               "it no longer holds the lock; the pid was reused")  # flock is authoritative on one host
        print(f"moetrain: warning: taking over the stale lock {self.path} of {_describe(holder)} ({why})",
              file=sys.stderr, flush=True)

    def _read(self, fd: int | None = None) -> dict:
        try:
            if fd is not None:
                text = os.pread(fd, 4096, 0).decode(errors="replace")
            else:
                text = self.path.read_text(errors="replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # emptied, not removed: removing would race with a new holder
        finally:
            if self.flocked:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
