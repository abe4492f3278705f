"""The other-processes CPU share that benchmarks print beside their timings."""

from __future__ import annotations

import subprocess
import sys
import pytest

from moetrain.utils import cpu_share
from moetrain.utils.cpu_share import CpuSample, describe, others_share, parse_proc_stat

PROC_STAT = """\
cpu  100 20 30 1000 50 5 6 7 8 9
cpu0 50 10 15 500 25 2 3 3 4 4
cpu1 50 10 15 500 25 3 3 4 4 5
intr 1 2 3
ctxt 42
"""


def test_parse_proc_stat_counts_busy_ticks_and_cpus():
    busy, cpus = parse_proc_stat(PROC_STAT)
    # user + nice + system + irq + softirq + steal; idle, iowait and guest (inside user) left out
    assert busy == 100 + 20 + 30 + 5 + 6 + 7
    assert cpus == 2


@pytest.mark.parametrize("text", ["", "intr 1 2\n", "cpu0 1 2 3 4\n"])
def test_parse_proc_stat_rejects_other_text(text):
    with pytest.raises(ValueError, match="not a Linux /proc/stat"):
        parse_proc_stat(text)


def test_others_share_subtracts_this_process():
    start = CpuSample(wall=100.0, machine_busy=1000.0, own=50.0, cpus=2)
    end = CpuSample(wall=110.0, machine_busy=1012.0, own=60.0, cpus=2)
    # 12 busy CPU-seconds in 10 s on 2 CPUs, 10 of them ours: others used 2 / 20
    assert others_share(start, end) == pytest.approx(0.1)
    # a process that used nothing itself sees all 12 as others'
    assert others_share(start, CpuSample(110.0, 1012.0, 50.0, 2)) == pytest.approx(0.6)


def test_others_share_is_clipped_and_none_without_readings():
    start = CpuSample(0.0, 0.0, 0.0, 2)
    assert others_share(start, CpuSample(1.0, 0.0, 5.0, 2)) == 0.0  # tick rounding: own > machine
    assert others_share(start, CpuSample(1.0, 10.0, 0.0, 2)) == 1.0
    assert others_share(None, start) is None and others_share(start, None) is None
    assert others_share(start, start) is None  # no time passed


def test_describe_warns_only_above_the_threshold():
    assert "not idle" in describe(cpu_share.NOTICEABLE + 0.01, 2)
    assert "not idle" not in describe(0.0, 2)
    assert "2 CPUs" in describe(0.0, 2)
    assert "unknown" in describe(None)


@pytest.mark.skipif(cpu_share.sample() is None, reason="no /proc/stat (not Linux)")
def test_a_busy_child_process_shows_as_others():
    """A child spinning one CPU for a second is seen; the parent, asleep meanwhile, adds nothing."""
    start = cpu_share.sample()
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass"])
    child.wait(timeout=60)
    end = cpu_share.sample()
    share = others_share(start, end)
    # the child kept 1 of `cpus` CPUs busy for most of the interval (interpreter start-up included)
    assert share is not None and share >= 0.5 / end.cpus
