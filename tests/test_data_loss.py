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
         "train.plot=false",
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


def test_export_check_report_and_exports_made_before_the_marker_stay_replaceable(tmp_path, fixture_run, capsys):
    """`train` adds moetrain_export_check.json to its export (recorded in the marker), and an export
    written before the marker existed (moetrain_export.json, known names only) is still replaced
    with --overwrite, so a resumed run with export.after_train can export again."""
    pytest.importorskip("transformers")
    from moetrain.export import MARKER_FILE, record_export_file

    out = tmp_path / "hf"
    assert export(capsys, str(fixture_run), "--out", str(out))[0] == 0
    (out / "moetrain_export_check.json").write_text("{}")
    record_export_file(out, "moetrain_export_check.json")
    assert export(capsys, str(fixture_run), "--out", str(out), "--overwrite")[0] == 0
    (out / MARKER_FILE).unlink()  # as an older moetrain wrote it
    (out / "moetrain_export_check.json").write_text("{}")
    assert export(capsys, str(fixture_run), "--out", str(out), "--overwrite")[0] == 0
    assert (out / MARKER_FILE).is_file()
    (out / MARKER_FILE).unlink()
    (out / "notes.txt").write_text("mine")
    code, err = export(capsys, str(fixture_run), "--out", str(out), "--overwrite")
    assert code == 2 and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


# -- 2. a restart into a run directory never overwrites the earlier run ------------------------------


def test_train_into_a_run_with_checkpoints_refuses_without_resume(tmp_path):
    """main: the second run restarted at step 1, pruned the first run's checkpoints (keep_last)
    and moved latest/best to its own."""
    out = tmp_path / "run"
    assert run_train(out).returncode == 0
    ckpts = out / "checkpoints"
    before = (sorted(p.name for p in fmt.list_checkpoints(ckpts)), (ckpts / "latest").read_text(),
              (out / "metrics.jsonl").read_text(), (out / "config.yaml").read_text())
    assert before[0] == ["step_00000002", "step_00000004"]
    line = one_error_line(run_train(out, "train.keep_last=1", "train.lr=1e-3"), "moetrain train: ")
    assert "--set train.resume=latest" in line and "--output-dir" in line and "step_00000004" in line
    after = (sorted(p.name for p in fmt.list_checkpoints(ckpts)), (ckpts / "latest").read_text(),
             (out / "metrics.jsonl").read_text(), (out / "config.yaml").read_text())
    assert after == before and not list(out.glob("config.*.yaml"))  # nothing changed, not even the config
    proc = run_train(out, "train.resume=latest", "train.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_after_the_time_budget_is_spent_trains_and_writes_nothing(tmp_path):
    """main: a rerun of a finished budgeted run trained one more step and wrote a checkpoint past
    the budget (the spent check came after the step)."""
    out = tmp_path / "run"
    assert run_train(out, "train.max_minutes=1e-5", "train.max_steps=50").returncode == 0
    ckpts = out / "checkpoints"
    before = snapshot(out)
    assert (ckpts / "latest").read_text() == "step_00000001"
    proc = run_train(out, "train.max_minutes=1e-5", "train.max_steps=50", "train.resume=latest")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "was already spent at step 1" in proc.stdout + proc.stderr
    after = snapshot(out)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not any(k.startswith("checkpoints/") or k == "metrics.jsonl" for k in changed), changed


def test_prune_never_deletes_a_newer_checkpoint_of_an_earlier_run(tmp_path):
    """Defence in depth: a run that restarted at step 0 in a directory holding steps 2..8 of an
    earlier run wrote step 2 and 4; pruning to 1 may delete its own step 2, never steps 6 and 8."""
    for step in (2, 4, 6, 8):
        (tmp_path / fmt.checkpoint_name(step)).mkdir()
    fmt.write_pointer(tmp_path / "latest", "step_00000004")
    fmt.prune(tmp_path, keep_last=1, own={"step_00000002", "step_00000004"})
    assert [p.name for p in fmt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006", "step_00000008"]
    fmt.prune(tmp_path, keep_last=1)  # without `own` (a caller that does not track): as before
    assert [p.name for p in fmt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000008"]


# -- 3, 4, 12. concurrent runs, kill -9 and resume, SIGTERM ---------------------------------------------


class Background:
    """A ``moetrain train`` process in the background, its output in a file."""

    def __init__(self, out: Path, *overrides: str):
        self.log = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
        self.file = open(self.log, "w")
        self.proc = subprocess.Popen(train_cmd(out, *overrides), cwd=REPO, stdout=self.file, stderr=subprocess.STDOUT,
                                     env=child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))

    def wait_for(self, condition, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def output(self) -> str:
        if not self.file.closed:
            self.file.flush()
        return self.log.read_text()

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.file.close()


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train":
            steps.append(record["step"])
    return steps


def latest_step(out: Path) -> int | None:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return None


LONG = ["train.max_steps=500", "train.save_every=5"]


def test_second_process_on_a_run_directory_is_refused(tmp_path):
    """main: both processes trained into the same directory (metrics and checkpoints interleaved)."""
    out = tmp_path / "run"
    first = Background(out, *LONG)
    try:
        first.wait_for(lambda: len(logged_steps(out)) >= 1)
        second = run_train(out, "train.resume=latest", "train.max_steps=2")
        line = one_error_line(second, "moetrain train: ")
        assert f"pid {first.proc.pid} on host {socket.gethostname()} since " in line and "in use" in line
        assert not list(out.glob("config.*.yaml"))  # the second process changed nothing
        first.proc.send_signal(signal.SIGTERM)
    finally:
        code = first.finish()
    assert code == 143, first.output()[-3000:]
    assert (out / ".moetrain.lock").read_text() == ""  # released at exit
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once, in order


def test_sigterm_stop_exits_143_and_says_where_it_stopped(tmp_path):
    """main: a SIGTERM-stopped run exited 0 and printed "finished", like a completed one."""
    out = tmp_path / "run"
    run = Background(out, *LONG)
    try:
        run.wait_for(lambda: len(logged_steps(out)) >= 2)
        run.proc.send_signal(signal.SIGTERM)
    finally:
        code = run.finish()
    output = run.output()
    assert code == 143, output[-3000:]
    step = latest_step(out)
    assert f"moetrain: stopped at step {step} of 500 by SIGTERM" in output
    assert "finished at step" not in output and not (out / "hf").exists()  # not finished, not exported


def test_kill_9_then_resume_writes_each_step_once(tmp_path):
    """main: the steps between the last checkpoint and the kill were in metrics.jsonl twice.
    The killed process also left its lock behind: the resumed run (same host) takes it over."""
    out = tmp_path / "run"
    run = Background(out, *LONG)
    try:
        def replays_ahead() -> bool:  # logged steps past the last checkpoint: the resume replays them
            steps, saved = logged_steps(out), latest_step(out)
            return saved is not None and bool(steps) and steps[-1] >= saved + 2
        while True:
            run.wait_for(replays_ahead)
            run.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.2)
            if replays_ahead():
                break
            run.proc.send_signal(signal.SIGCONT)
        run.proc.kill()
    finally:
        run.finish()
    killed_steps, restored = logged_steps(out), latest_step(out)
    assert killed_steps[-1] >= restored + 2
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 9')  # a record torn by the kill
    proc = run_train(out, "train.resume=latest", f"train.max_steps={killed_steps[-1] + 1}", *LONG[1:])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert logged_steps(out) == list(range(1, killed_steps[-1] + 2))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if r["type"] == "eval"] == [killed_steps[-1] + 1]
    assert "taking over the stale lock" in proc.stderr and f"pid {run.proc.pid}" in proc.stderr


def test_lock_of_another_host_is_refused_and_released_lock_is_free(tmp_path, monkeypatch):
    """A lock file nobody holds that names another host cannot be checked from here: refused with
    the file to delete; the same SLURM job (a requeue) takes it over."""
    from moetrain.utils.runlock import LOCK_FILE, RunDirLocked, RunLock

    holder = {"pid": 4242, "host": "elsewhere-node-17", "since": "2026-12-01T10:00:00+00:00", "slurm_job_id": "77"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunDirLocked,
                       match=r"pid 4242 on host elsewhere-node-17 since 2026-12-01.*delete .*\.moetrain\.lock"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with RunLock(tmp_path):  # an emptied lock is free
        with pytest.raises(RunDirLocked, match=f"in use by another moetrain process \\(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a second holder, even in the same process


def test_lock_without_flock_support_relies_on_the_recorded_holder(tmp_path, monkeypatch):
    """Some cluster file systems refuse flock (ENOSYS/ENOLCK): a live pid on this host still holds
    the directory, a dead one is taken over."""
    import errno

    from moetrain.utils import runlock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": sleeper.pid, "host": socket.gethostname(), "since": "2026-12-01T10:00:00+00:00"}
        (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(holder))
        with pytest.raises(runlock.RunDirLocked, match=f"in use by another moetrain process \\(pid {sleeper.pid}"):
            runlock.RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with runlock.RunLock(tmp_path):  # that pid is gone now
        assert json.loads((tmp_path / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
