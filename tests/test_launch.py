"""Launchers, Dockerfile and the documented commands.

Static checks run everywhere; the ``dist`` tests start the real ``moetrain`` command line under
torchrun and ``accelerate launch`` (2 CPU ranks, gloo) with the toy task standing in for
translation, and the real tiny recipe through launch/deepspeed.sh once the translation task exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moetrain.utils.net import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["deepspeed.sh", "deepspeed_multinode.sh", "torchrun.sh", "accelerate.sh", "slurm.sbatch"]
TOY_CONFIG = """\
name: toy
task: translation
model: {vocab_size: 64, d_model: 16, d_ff: 32, d_kv: 8, num_heads: 2, num_layers: 2, num_decoder_layers: 2,
        dropout_rate: 0.0}
moe: {num_experts: 4, estimator: sparsemixer, capacity_factor: null, balance_coef: 0.0}
data: {vocab_size: 64}
train: {max_steps: 3, lr: 1.0e-2, warmup_steps: 1, log_every: 1, eval_every: 0, save_every: 2, keep_last: 1}
parallel: {ep_size: 2, zero_stage: 1}
"""


LAUNCH_VARS = ("NGPUS", "NPROC", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE",
               "LAUNCHER", "ACCEL_CONFIG")


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    # Only the variables a test sets: other tests in the session may leave MASTER_PORT and co. behind.
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, capture_output=True, text=True,
                          env={**clean, "DRY_RUN": "1", **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_print_usage(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
    if script != "slurm.sbatch":
        proc = subprocess.run(["bash", str(LAUNCH / script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "CONFIG OUT_DIR" in proc.stderr


def test_deepspeed_single_node_command():
    cmd = dry_run("deepspeed.sh", "configs/demo.yaml", "runs/x", "--set", "parallel.ep_size=8", NGPUS="8")
    assert cmd == ["deepspeed", "--num_gpus", "8", "--master_port", "29500", "--module", "moetrain.cli", "train",
                   "configs/demo.yaml", "--output-dir", "runs/x", "--set", "parallel.ep_size=8"]


def test_deepspeed_multinode_command_reads_hostfile():
    cmd = dry_run("deepspeed_multinode.sh", "c.yaml", "runs/x")
    assert cmd[:9] == ["deepspeed", "--hostfile", "launch/hostfile.example", "--launcher", "pdsh",
                       "--master_addr", "node-001", "--master_port", "29500"]
    assert cmd[9:] == ["--module", "moetrain.cli", "train", "c.yaml", "--output-dir", "runs/x"]
    hosts = [line for line in (LAUNCH / "hostfile.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert hosts and all(re.fullmatch(r"\S+ slots=\d+", line) for line in hosts)


def test_torchrun_commands():
    single = dry_run("torchrun.sh", "c.yaml", "runs/x", NPROC_PER_NODE="4")
    assert single == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "moetrain.cli", "train", "c.yaml",
                      "--output-dir", "runs/x"]
    multi = dry_run("torchrun.sh", "c.yaml", "runs/x", NPROC_PER_NODE="8", NNODES="2", NODE_RANK="1",
                    MASTER_ADDR="node-001")
    assert multi[:9] == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node-001",
                         "--master_port", "29500"]


def test_accelerate_command_and_plugin_config():
    cmd = dry_run("accelerate.sh", "c.yaml", "runs/x", NPROC="2")
    assert cmd[:4] == ["accelerate", "launch", "--config_file", "launch/accelerate_deepspeed.yaml"]
    config = yaml.safe_load((LAUNCH / "accelerate_deepspeed.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] in (1, 2)


def test_slurm_script_resumes_and_uses_torchrun():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "--requeue" in text
    assert "torchrun" in text and "-m moetrain.cli train" in text and "train.resume=latest" in text


def test_dockerfile_pins_deepspeed_like_pyproject():
    docker = (REPO / "docker" / "Dockerfile").read_text()
    pin = re.search(r'"deepspeed==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"ARG DEEPSPEED_VERSION={pin}" in docker
    assert re.search(r"ARG BASE_IMAGE=pytorch/pytorch:\S+-cuda\S+-devel", docker)
    assert 'ENTRYPOINT ["moetrain"]' in docker and "pip install ." in docker


def test_training_doc_mentions_existing_files():
    doc = (REPO / "docs" / "training.md").read_text()
    for path in set(re.findall(r"\b((?:launch|docker|configs)/[\w./-]+\w)", doc)):
        assert (REPO / path).exists(), path


# -- real launches (2 CPU ranks) ------------------------------------------------------------


def _run(cmd: list[str], tmp_path: Path, timeout: int = 240, extra_path: str = "") -> subprocess.CompletedProcess:
    # `make test` runs .venv/bin/python without activating the venv: put its bin/ on PATH for the
    # launchers that the scripts call by name (deepspeed, torchrun, accelerate, python).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), extra_path and str(REPO / extra_path)]))
    env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["timeout", "-s", "KILL", str(timeout), *cmd], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _check_run_dir(out: Path, steps: int) -> None:
    assert (out / "config.yaml").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, steps + 1))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"


@pytest.mark.dist
def test_cli_under_accelerate_with_deepspeed_plugin(tmp_path):
    (tmp_path / "toy.yaml").write_text(TOY_CONFIG)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate_deepspeed.yaml", "--num_processes", "2",
          "--main_process_port", str(free_port()), "tests/dist_scripts/cli_toy.py", "train", str(tmp_path / "toy.yaml"),
          "--output-dir", str(tmp_path / "run")], tmp_path)
    _check_run_dir(tmp_path / "run", 3)
    # keep_last 1: step 2 was pruned once step 3 was complete
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000003"]


@pytest.mark.dist
@pytest.mark.slow  # three fresh processes (~50 s); the trainer itself is covered by test_distributed.py
def test_bench_train_prints_both_runs_and_the_ratio(tmp_path):
    (tmp_path / "toy.yaml").write_text(TOY_CONFIG)
    proc = _run([sys.executable, "-m", "moetrain.bench.train", "--config", str(tmp_path / "toy.yaml"),
                 "--steps", "2", "--warmup", "1", "--task", "toy_task:ToyTask", "--json", str(tmp_path / "b.json")],
                tmp_path, extra_path="tests/dist_scripts")
    runs = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert [(r["ranks"], r["ep_size"], r["steps"]) for r in runs] == [(1, 1, 2), (2, 2, 2)]
    assert all(r["tokens_per_second"] > 0 for r in runs) and "scaling ratio" in proc.stdout


@pytest.mark.dist
@pytest.mark.skipif(importlib.util.find_spec("moetrain.tasks.translation") is None,
                    reason="moetrain.tasks.translation not written yet")
def test_tiny_recipe_through_deepspeed_script(tmp_path):
    env_cmd = ["env", "NGPUS=2", f"MASTER_PORT={free_port()}", "bash", "launch/deepspeed.sh", "configs/tiny.yaml",
               str(tmp_path / "run"), "--set", "parallel.ep_size=2", "parallel.zero_stage=1", "train.max_steps=2",
               "train.eval_every=0", "train.save_every=0", "train.log_every=1",
               "data.synthetic_num_valid=8", "train.beam_size=1", "train.max_decode_length=8"]
    _run(env_cmd, tmp_path, timeout=300)
    _check_run_dir(tmp_path / "run", 2)
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "portable" / "model.safetensors").exists()

