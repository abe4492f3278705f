"""Bounded work whatever the input (issue 12, items 5 and 6).

- ``moetrain translate`` / ``evaluate`` cut source lines to ``--max-source-length`` tokens (default:
  the run's ``data.max_length``) with one warning that counts them, so one 10k-word line no longer
  takes gigabytes; a blank line translates to a blank line.
- Numeric options are checked by argparse: a bad value exits with code 2 and one line naming the
  flag and what it expects, instead of being replaced by a default or failing later.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

#: Peak resident memory allowed for translating the 10k-word line (the process alone imports
#: torch, deepspeed and transformers: ~300 MB; main needed several GB for this input).
PEAK_MB = 1200

_MEASURED = (
    "import resource, runpy, sys\n"
    "sys.argv = ['moetrain'] + sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module('moetrain.cli', run_name='__main__')\n"
    "finally:\n"
    "    print(f'PEAK_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
)


def _run_measured(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``moetrain argv`` in a fresh process; returns the result and its peak RSS in MB."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", _MEASURED, *argv], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK_KB ")]
    return result, (int(peak[-1].split()[1]) / 1024 if peak else float("nan"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained tiny translation run (word-level vocabulary w3..w11, data.max_length 32)."""
    from checkpoint_fixture import write_checkpoint

    run = tmp_path_factory.mktemp("limits") / "run"
    write_checkpoint(run)
    return run


def _long_line(words: int) -> str:
    rng = random.Random(0)
    return " ".join(f"w{rng.randint(3, 11)}" for _ in range(words))


def test_translate_truncates_a_10k_word_line_with_one_warning(tiny_run, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("w3 w4 w5\n" + _long_line(10_000) + "\n" + _long_line(2_000) + "\nw6\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    result, peak_mb = _run_measured("translate", str(tiny_run), "--input", str(src), "--output", str(out),
                                    "--max-length", "4", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "truncated" in line]
    assert warnings == ["moetrain: warning: 2 of 4 source lines were longer than 32 tokens and were truncated "
                        "to it (--max-source-length)"], result.stderr[-3000:]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4
    assert peak_mb < PEAK_MB, f"peak RSS {peak_mb:.0f} MB"


def test_max_source_length_flag_sets_the_cap(tiny_run, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text(_long_line(100) + "\n" + _long_line(5) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    result, _ = _run_measured("translate", str(tiny_run), "--input", str(src), "--output", str(out),
                              "--max-source-length", "8", "--max-length", "4", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 2 source lines were longer than 8 tokens" in result.stderr


def test_evaluate_truncates_arbitrary_files_too(tiny_run, tmp_path):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("w3 w4\n" + _long_line(10_000) + "\n", encoding="utf-8")
    ref.write_text("w5 w6\nw7\n", encoding="utf-8")
    result, peak_mb = _run_measured("evaluate", str(tiny_run), "--src", str(src), "--ref", str(ref),
                                    "--json", str(tmp_path / "m.json"), "--max-length", "4", "--no-progress",
                                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 2 source lines were longer than 32 tokens" in result.stderr
    assert peak_mb < PEAK_MB, f"peak RSS {peak_mb:.0f} MB"


def test_blank_lines_translate_to_blank_lines(tiny_run, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("w3 w4\n\n   \nw5 w6 w7\n\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    result, _ = _run_measured("translate", str(tiny_run), "--input", str(src), "--output", str(out),
                              "--max-length", "4", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 6 and lines[-1] == ""  # 5 lines, each ended by a newline
    assert [i for i, line in enumerate(lines[:5]) if line == ""] == [1, 2, 4]


# --- numeric options ---------------------------------------------------------------------------

_T = ["translate", "no-such-checkpoint", "--input", "in.txt", "--output", "out.txt"]
_E = ["evaluate", "no-such-checkpoint"]
_L = ["bench", "moe-layer", "--experts", "2", "--d-model", "8", "--d-ff", "8", "--tokens", "16", "--repeats", "1"]
_B = ["bench", "train", "--config", str(REPO_ROOT / "configs" / "tiny.yaml")]

BAD_OPTIONS = [
    (_T + ["--beam", "0"], "--beam", "an integer >= 1"),
    (_T + ["--beam", "two"], "--beam", "an integer >= 1"),
    (_T + ["--max-length", "0"], "--max-length", "an integer >= 1"),
    (_T + ["--max-tokens", "0"], "--max-tokens", "an integer >= 1"),
    (_T + ["--max-source-length", "0"], "--max-source-length", "an integer >= 2"),
    (_T + ["--lenpen", "-1"], "--lenpen", "a number >= 0"),
    (_T + ["--lenpen", "nan"], "--lenpen", "a number >= 0"),
    (_T + ["--average-last", "-1"], "--average-last", "an integer >= 0"),
    (_E + ["--beam", "0"], "--beam", "an integer >= 1"),
    (_E + ["--max-length", "-3"], "--max-length", "an integer >= 1"),
    (_E + ["--max-tokens", "-1"], "--max-tokens", "an integer >= 1"),
    (_E + ["--average-last", "-2"], "--average-last", "an integer >= 0"),
    (["export", "no-such-checkpoint", "--out", "hf", "--max-shard-size", "12"], "--max-shard-size", "a size like"),
    (_L + ["--experts", "0"], "--experts", "an integer >= 1"),
    (_L + ["--experts", "8", "-1"], "--experts", "an integer >= 1"),
    (_L + ["--tokens", "-5"], "--tokens", "an integer >= 1"),
    (_L + ["--d-model", "0"], "--d-model", "an integer >= 1"),
    (_L + ["--d-ff", "0"], "--d-ff", "an integer >= 1"),
    (_L + ["--repeats", "0"], "--repeats", "an integer >= 1"),
    (_L + ["--threads", "0"], "--threads", "an integer >= 1"),
    (_B + ["--steps", "0"], "--steps", "an integer >= 1"),
    (_B + ["--warmup", "-1"], "--warmup", "an integer >= 0"),
    (_B + ["--threads-per-rank", "0"], "--threads-per-rank", "an integer >= 1"),
]


@pytest.mark.parametrize("argv,flag,expected", BAD_OPTIONS, ids=[" ".join(a[-2:]) + f" ({a[0]})" for a, _, _ in BAD_OPTIONS])
def test_bad_numeric_option_is_one_line_exit_2(argv, flag, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("w3\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    assert f"argument {flag}" in err and f"expected {expected}" in err, err
    assert not (tmp_path / "out.txt").exists()


def test_every_numeric_option_has_a_checked_type():
    """A new ``type=int``/``type=float`` option without bounds would bring the silent defaults back."""
    import argparse

    parser = cli.build_parser()
    unchecked = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{prefix} {name}")
            elif action.type in (int, float) and action.help != argparse.SUPPRESS:
                unchecked.append(f"{prefix} {action.option_strings}")

    walk(parser, "moetrain")
    assert unchecked == []
