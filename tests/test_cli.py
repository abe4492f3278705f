"""moetrain.cli: help, the config command, error exits, run directories, registered commands."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from moetrain import cli
from moetrain.commands.common import add_run_arguments, prepare_run, work_command
from moetrain.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "configs" / "tiny.yaml"


def run_cli(*argv: str, cwd: Path, module: str = "moetrain.cli", env: dict | None = None):
    """Run ``python -m <module> argv`` in a fresh process (as the console script would)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    for key in ("RANK", "WORLD_SIZE"):
        full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60)


def fake_module(monkeypatch, name: str, **functions) -> None:
    """Install an importable module ``name`` holding ``functions``."""
    module = types.ModuleType(name)
    for key, value in functions.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


# --- help and entry points -----------------------------------------------------------------


@pytest.mark.parametrize("module", ["moetrain.cli", "moetrain"])
def test_help_lists_subcommands(tmp_path, module):
    result = run_cli("--help", cwd=tmp_path, module=module)
    assert result.returncode == 0, result.stderr
    for name in ["train", "evaluate", "translate", "export", "finetune", "config", "bench"]:
        assert f"    {name}" in result.stdout
    assert "usage: moetrain" in result.stdout


def test_subcommand_help(tmp_path):
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--output-dir" in result.stdout and "--set" in result.stdout and "CONFIG" in result.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().err


# --- config command ------------------------------------------------------------------------


def test_config_prints_resolved_values_with_overrides(tmp_path):
    result = run_cli("config", str(TINY), "--set", "moe.num_experts=16", "train.lr=1e-3",
                     "--set", "parallel.backend=gloo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["moe"]["num_experts"] == 16
    assert resolved["train"]["lr"] == 0.001
    assert resolved["parallel"]["backend"] == "gloo"
    assert resolved["model"]["d_model"] == 64  # from the switch-tiny preset
    assert not (tmp_path / "runs").exists()  # `config` creates nothing


def test_config_accepts_deepspeed_local_rank(capsys):
    assert cli.main(["--local_rank=0", "config", str(TINY)]) == 0
    assert "name: tiny" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["config", str(TINY), "--set", "moe.num_expert=4"], "did you mean 'moe.num_experts'?"),
    (["config", str(TINY), "--set", "train.max_steps=abc"], "train.max_steps: expected an integer"),
    (["config", "missing.yaml"], "missing.yaml: cannot read config file"),
    (["train", str(TINY), "--set", "moe.top_k=9"], "moe.top_k: must be between 1"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, argv, fragment):
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"moetrain {argv[0]}: ") and fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing created for an invalid config


# --- run directories -------------------------------------------------------------------------


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_prepare_run_writes_config_into_output_dir(tmp_path):
    out = tmp_path / "a" / "b"
    cfg, out_dir = prepare_run(parse("train", str(TINY), "--output-dir", str(out), "--set", "train.max_steps=7"))
    assert out_dir == out and cfg.train.max_steps == 7
    assert load_config(out / "config.yaml") == cfg
    # Reusing a named directory (e.g. to resume) is allowed; the earlier config is kept aside.
    cfg2, _ = prepare_run(parse("train", str(TINY), "--output-dir", str(out)))
    assert load_config(out / "config.yaml") == cfg2 != cfg
    [kept] = out.glob("config.*.yaml")
    assert load_config(kept) == cfg
    prepare_run(parse("train", str(TINY), "--output-dir", str(out)))  # same config: nothing new kept
    assert len(list(out.glob("config.*.yaml"))) == 1


def test_default_run_dir_is_stem_and_timestamp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    _, first = prepare_run(parse("train", str(TINY)))
    _, second = prepare_run(parse("train", str(TINY)))
    assert first.parent == Path("runs") and first.name.startswith("tiny-")
    stamp = first.name.removeprefix("tiny-")
    assert len(stamp) == 15 and stamp[8] == "-" and stamp.replace("-", "").isdigit()
    assert second != first  # same second: a suffix, never a shared directory
    assert (first / "config.yaml").is_file() and (second / "config.yaml").is_file()


def test_several_ranks_need_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--output-dir is required"):
        prepare_run(parse("train", str(TINY)))
    monkeypatch.setenv("RANK", "1")  # only rank 0 writes config.yaml
    _, out_dir = prepare_run(parse("train", str(TINY), "--output-dir", "run"))
    assert out_dir.is_dir() and not (out_dir / "config.yaml").exists()


def test_work_command_writes_config_before_calling_target(tmp_path, monkeypatch):
    seen = {}

    def target(cfg, out_dir, args):
        seen["config_written"] = (out_dir / "config.yaml").is_file()
        seen["cfg"], seen["out_dir"] = cfg, out_dir
        return 0

    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("fake", "fake", add_run_arguments, work_command(target)))
    out = tmp_path / "run"
    assert cli.main(["fake", str(TINY), "--output-dir", str(out), "--set", "moe.num_experts=4"]) == 0
    assert seen["config_written"] and seen["out_dir"] == out and seen["cfg"].moe.num_experts == 4


# --- bench -------------------------------------------------------------------------------------


def test_bench_passes_its_arguments(tmp_path, monkeypatch):
    seen = {}
    fake_module(monkeypatch, "moetrain.bench.moe_layer", main=lambda args: seen.update(vars(args)) or 0)
    report = tmp_path / "bench.json"
    assert cli.main(["bench", "moe-layer", "--experts", "8", "16", "--tokens", "128", "--json", str(report)]) == 0
    assert seen["experts"] == [8, 16] and seen["tokens"] == 128 and seen["json"] == str(report)
    assert (seen["d_model"], seen["d_ff"], seen["repeats"]) == (512, 2048, 5)
