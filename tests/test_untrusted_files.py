"""Checkpoint files a user hands in (issue 12): nothing is unpickled, and a truncated, empty or
missing file is one line naming the file and the checkpoint's step, never a traceback.

One tiny training run (``configs/tiny.yaml``, 2 steps, DeepSpeed at ZeRO-0) makes a checkpoint
with DeepSpeed's engine files; each test damages a copy of it and resumes through the real
command line. Portable files are also checked on the small fixture checkpoint of
``tests/checkpoint_fixture.py`` through ``moetrain export`` (no DeepSpeed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_fixture import write_checkpoint
from launch_env import child_env

from moetrain import cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BASE = ["train.save_every=2", "train.keep_last=0", "train.eval_every=0", "export.after_train=false"]
STEP = "step_00000002"


def train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moetrain.cli", "train", str(TINY), "--output-dir", str(out), "--set", *BASE,
           *overrides]
    return subprocess.run(["timeout", "-s", "KILL", "300", *cmd], cwd=REPO, capture_output=True, text=True,
                          env=child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))


def one_error_line(proc: subprocess.CompletedProcess, command: str = "train") -> str:
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("moetrain ")]
    assert len(lines) == 1 and lines[0].startswith(f"moetrain {command}: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = train(out, "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run directory."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


class Payload:
    """Unpickling this creates a directory: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "layer_0_expert_1_mp_rank_00_model_states.pt",
                                  "expp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_refuses_a_pickle_payload_in_an_engine_file(run, tmp_path, name):
    """main: DeepSpeed loaded the engine files with weights_only=False: the payload ran (the marker
    directory appeared) and training went on."""
    marker = tmp_path / "payload-ran"
    engine_file = run / "checkpoints" / STEP / "engine" / name
    state = torch.load(engine_file, weights_only=True)
    state["innocent_looking_key"] = Payload(marker)
    torch.save(state, engine_file)
    proc = train(run, "train.resume=latest", "train.max_steps=3")
    assert not marker.exists(), "the payload ran"
    line = one_error_line(proc)
    assert str(engine_file) in line and "checkpoint step 2" in line and "pickled" in line and "mkdir" in line
    assert f"--set train.resume={run / 'checkpoints' / STEP / 'portable'}" in line


def test_broken_engine_file_names_it_and_offers_the_portable_copy(run):
    """main: a traceback from inside DeepSpeed (PytorchStreamReader / EOFError)."""
    engine = run / "checkpoints" / STEP / "engine"
    optim = engine / "expp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])  # truncated
    line = one_error_line(train(run, "train.resume=latest", "train.max_steps=3"))
    assert line.startswith(f"moetrain train: {optim} (checkpoint step 2) is truncated or corrupt")
    portable = run / "checkpoints" / STEP / "portable"
    assert f"portable copy of the same step is intact: resume from it with --set train.resume={portable}" in line
    (engine / "layer_1_expert_3_mp_rank_00_model_states.pt").write_bytes(b"")  # empty
    line = one_error_line(train(run, "train.resume=latest", "train.max_steps=3"))
    assert "layer_1_expert_3_mp_rank_00_model_states.pt (checkpoint step 2) is empty (0 bytes)" in line
    # The suggested setting works: the portable copy resumes the same step.
    proc = train(run, f"train.resume={portable}", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed at step 2 from {portable}" in proc.stdout


def test_broken_portable_files_on_resume(run):
    """main: tracebacks (SafetensorError, EOFError, JSONDecodeError) or, for an empty config.yaml,
    a run that resumed with every setting at its default."""
    portable = run / "checkpoints" / STEP / "portable"
    damage = [("optimizer.pt", b""), ("model.safetensors", b"\x08\x00"), ("trainer_state.json", b'{"step": 2, "da'),
              ("config.yaml", b"")]
    for name, content in damage:
        original = (portable / name).read_bytes()
        (portable / name).write_bytes(content)
        line = one_error_line(train(run, f"train.resume={portable}", "train.max_steps=3"))
        assert line.startswith(f"moetrain train: {portable / name} (checkpoint step 2) is "), line
        (portable / name).write_bytes(original)


@pytest.mark.parametrize("name, cut", [("model.safetensors", 0), ("model.safetensors", 0.5), ("config.yaml", 0)])
def test_export_of_a_truncated_portable_checkpoint_is_one_line(tmp_path, capsys, name, cut):
    """main: SafetensorError traceback, and an empty config.yaml exported a default-config model."""
    pytest.importorskip("transformers")
    step_dir = write_checkpoint(tmp_path / "run")
    path = step_dir / "portable" / name
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    code = cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"moetrain export: {path} (checkpoint step 3) is "), err
    assert not (tmp_path / "hf").exists()


def test_nothing_in_the_package_unpickles_what_a_user_hands_in():
    """Every torch.load in moetrain passes weights_only=True; nothing imports pickle (a guard for
    the code as it is now: DeepSpeed's own loads are covered by the payload test above)."""
    offenders = []
    for path in (REPO / "moetrain").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if ("torch.load(" in code and "weights_only=True" not in code) or "import pickle" in code \
                    or "pickle.load" in code:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders


class ByName:
    """Pickles as ``getattr(owner, name)``: how some Python builds (3.11.2) pickle an enum member."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_engine_loader_takes_enum_members_by_name_and_nothing_else_through_getattr(tmp_path):
    """CI (Python 3.11.2): DeepSpeed's ZeRO optimizer files hold the stage enum as
    getattr(ZeroStageEnum, 'optimizer_states'), which the weights-only loader refused, so an exact
    ZeRO-1 resume failed. The stand-in for getattr accepts only that enum's members."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from moetrain.checkpoint_format import CheckpointError
    from moetrain.train.checkpoint import safe_engine_loads

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace())
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"zero_stage": ByName(ZeroStageEnum, "optimizer_states")}, good)
    torch.save({"x": ByName(LossScaler, "__init__")}, bad)
    with safe_engine_loads(engine):
        assert engine.checkpoint_engine.load(good) == {"zero_stage": ZeroStageEnum.optimizer_states}
        with pytest.raises(CheckpointError, match="refuses it"):
            engine.checkpoint_engine.load(bad)
    assert not hasattr(engine.checkpoint_engine, "load")
