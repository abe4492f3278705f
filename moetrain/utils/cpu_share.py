"""How much of the machine's CPU time went to *other* processes while we were timing something.

A timing on a shared CPU is only as good as the machine was quiet. The load average cannot tell:
it counts our own threads too (a benchmark running 2 threads on 2 cores sees a load of 2 on an
otherwise idle machine), and it lags by a minute. What can tell is the CPU time the whole machine
spent busy (``/proc/stat``) minus the CPU time this process spent (``os.times``), over the same
interval, as a share of all CPUs: 0 on a quiet machine, 0.5 when another job kept one of two cores
busy. Worse than the share itself, a second process makes every parallel region of a
multi-threaded step wait for a descheduled thread, so even a small share can slow a step a lot.

Linux only; elsewhere :func:`sample` returns None and callers report nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSample", "sample", "others_share", "parse_proc_stat", "describe", "NOTICEABLE"]

#: A share of the CPUs used by other processes above which timings should not be trusted.
NOTICEABLE = 0.05
_PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuSample:
    """One reading: seconds since an arbitrary origin.

    Attributes:
        wall: ``time.monotonic()``.
        machine_busy: CPU seconds all CPUs spent busy (not idle, not waiting for I/O) since boot.
        own: CPU seconds (user + system, all threads) this process spent since it started.
        cpus: CPUs counted in ``machine_busy``.
    """

    wall: float
    machine_busy: float
    own: float
    cpus: int


def parse_proc_stat(text: str) -> tuple[float, int]:
    """Busy CPU ticks (the ``cpu`` line without idle and iowait) and the number of ``cpuN`` lines.

    Guest time is already inside user time, so it is not added again.
    """
    busy, cpus = None, 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal [guest guest_nice]
            ticks = [int(x) for x in fields[1:9]]
            ticks += [0] * (8 - len(ticks))
            user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
            busy = user + nice + system + irq + softirq + steal
        elif fields[0].startswith("cpu") and fields[0][3:].isdigit():
            cpus += 1
    if busy is None or cpus == 0:
        raise ValueError("no 'cpu' summary line or no 'cpuN' lines: not a Linux /proc/stat")
    return float(busy), cpus


def sample() -> CpuSample | None:
    """A reading now, or None where ``/proc/stat`` is missing or unreadable (not Linux)."""
    try:
        ticks, cpus = parse_proc_stat(_PROC_STAT.read_text())
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    times = os.times()
    return CpuSample(wall=time.monotonic(), machine_busy=ticks / hz, own=times.user + times.system, cpus=cpus)


def others_share(start: CpuSample | None, end: CpuSample | None) -> float | None:
    """Share of all CPUs that processes other than this one kept busy between two readings, in [0, 1].

    None when either reading is missing or no time passed. The kernel's tick counters are coarse
    (1/100 s), so over less than about a second the figure is noise.
    """
    if start is None or end is None or end.wall <= start.wall:
        return None
    others = (end.machine_busy - start.machine_busy) - (end.own - start.own)
    return min(max(others / ((end.wall - start.wall) * end.cpus), 0.0), 1.0)


def describe(share: float | None, cpus: int | None = None) -> str:
    """One line for a benchmark's report; a warning when the share is :data:`NOTICEABLE`."""
    if share is None:
        return "CPU used by other processes: unknown (no /proc/stat)"
    of = f" of {cpus} CPUs" if cpus else " of the CPUs"
    text = f"CPU used by other processes during the run: {share:.1%}{of}"
    if share > NOTICEABLE:
        text += " -- the machine was not idle; timings are disturbed"
    return text
