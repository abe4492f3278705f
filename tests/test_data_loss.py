"""Nothing a user owns is ever lost (issue 12): export targets, restarts into a run directory, two
processes on one run directory, metrics after a resume, the exit code of a SIGTERM stop.

Training runs go through the real command line (``python -m moetrain.cli train``) on
``configs/tiny.yaml`` with a few steps; export runs on the small fixture checkpoint of
``tests/checkpoint_fixture.py`` (no DeepSpeed needed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_fixture import write_checkpoint
from launch_env import child_env

from moetrain import cli
from moetrain import checkpoint_format as fmt

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
#: A few quick steps: save every 2, keep everything, no export, evaluation only at the end.
QUICK = ["train.max_steps=4", "train.save_every=2", "train.keep_last=0", "train.eval_every=0", "train.log_every=1",
         "export.after_train=false"]


def train_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "moetrain.cli", "train", str(TINY), "--output-dir", str(out),
            "--set", *QUICK, *overrides]


def run_train(out: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-s", "KILL", str(timeout), *train_cmd(out, *overrides)], cwd=REPO,
                          env=child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), capture_output=True, text=True)


def one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The single line a user error prints (no traceback), checked to start with ``prefix``."""
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("moetrain ")]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


# -- 1. export never wipes what it did not write ---------------------------------------------------


@pytest.fixture
def fixture_run(tmp_path) -> Path:
    write_checkpoint(tmp_path / "run")
    return tmp_path / "run"


def export(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["export", *argv])
    return code, capsys.readouterr().err.strip()


def test_export_refuses_a_directory_it_did_not_write(tmp_path, fixture_run, capsys):
    """main: a directory holding a config.json was wiped, sub-directories and notes included."""
    pytest.importorskip("transformers")
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.bin").write_bytes(b"\0" * 10)
    before = snapshot(mine)
    code, err = export(capsys, str(fixture_run), "--out", str(mine))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("moetrain export: ") and "not an earlier export of moetrain" in err
    assert snapshot(mine) == before
    code, err = export(capsys, str(fixture_run), "--out", str(mine), "--overwrite")  # not even with --overwrite
    assert code == 2 and snapshot(mine) == before


def test_export_into_a_checkpoint_or_run_directory_is_refused(tmp_path, fixture_run, capsys):
    """main: --out the checkpoint's own portable/ replaced the checkpoint by the export."""
    pytest.importorskip("transformers")
    portable = fixture_run / "checkpoints" / "step_00000003" / "portable"
    before = snapshot(fixture_run)
    for target in (portable, portable.parent, portable / "hf", fixture_run, fixture_run / "checkpoints" / "new"):
        for flags in ([], ["--overwrite"]):
            code, err = export(capsys, str(fixture_run), "--out", str(target), *flags)
            assert code == 2 and len(err.splitlines()) == 1, (target, err)
            assert "checkpoint" in err or "earlier export" in err, err
            assert snapshot(fixture_run) == before
    assert snapshot(fixture_run) == before
    assert fmt.read_portable(fixture_run).state.step == 3


def test_export_replaces_its_own_export_only_with_overwrite(tmp_path, fixture_run, capsys):
    """main: a second export silently replaced the first (no --overwrite flag existed)."""
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    (out).mkdir()  # an empty directory is fine
    assert export(capsys, str(fixture_run), "--out", str(out))[0] == 0
    marker = json.loads((out / ".moetrain-export.json").read_text())
    assert "config.json" in marker["files"] and "model.safetensors" in marker["files"]
    code, err = export(capsys, str(fixture_run), "--out", str(out))
    assert code == 2 and "--overwrite" in err and len(err.splitlines()) == 1
    assert export(capsys, str(fixture_run), "--out", str(out), "--overwrite")[0] == 0
    (out / "README.md").write_text("my model card")  # the user added something: never replaced
    code, err = export(capsys, str(fixture_run), "--out", str(out), "--overwrite")
    assert code == 2 and "README.md" in err
    assert (out / "README.md").read_text() == "my model card"
