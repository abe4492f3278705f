"""Every expected user error is one clear line with exit code 2, found before anything is created
(issue 12, item 9); relative recipe paths resolve against the working directory and the run keeps
them absolute (item 10); what a run writes follows the umask (item 11).

Each case runs ``moetrain`` in a fresh process, as a user would, and checks: exit code 2, exactly
one ``moetrain COMMAND: ...`` line on stderr naming the key or flag, no traceback, and no file
left in the working directory or the output directory.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "configs" / "tiny.yaml"
SHARED = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT / "tests"))

from launch_env import child_env  # noqa: E402


def moetrain(*argv: str, cwd: Path, umask: int | None = None, timeout: int = 300, **env: str):
    """``moetrain argv`` in a fresh process (the console script's code path)."""
    full_env = child_env(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **env)
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "moetrain", *argv], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec)


def snapshot(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs if d.exists() for p in d.rglob("*")}


def assert_one_line_error(result, command: str, *needles: str) -> str:
    """Exit 2, one ``moetrain COMMAND: ...`` line holding every needle, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("moetrain ")]
    assert len(lines) == 1, result.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"moetrain {command}: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty working directory; tests check that nothing appears in it."""
    d = tmp_path / "cwd"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory) -> Path:
    """An untrained tiny run directory with one checkpoint (tests/checkpoint_fixture.py)."""
    from checkpoint_fixture import write_checkpoint

    run = tmp_path_factory.mktemp("fixture") / "run"
    write_checkpoint(run)
    return run


# --- item 9: one line, exit 2, nothing created -----------------------------------------------


def test_missing_data_file_names_key_and_resolved_path(work):
    (work / "x.de").write_text("hallo\n")
    before = snapshot(work)
    result = moetrain("train", str(TINY), "--set", "data.source=files", "data.train_src=data/missing.en",
                      "data.train_tgt=x.de", cwd=work)
    assert_one_line_error(result, "train", "data.train_src", str(work / "data" / "missing.en"))
    assert snapshot(work) == before  # no runs/ directory


def test_empty_data_file_is_refused(work):
    (work / "x.en").write_text("")
    (work / "x.de").write_text("hallo\n")
    before = snapshot(work)
    result = moetrain("train", str(TINY), "--set", "data.source=files", "data.train_src=x.en", "data.train_tgt=x.de",
                      cwd=work)
    assert_one_line_error(result, "train", "data.train_src", str(work / "x.en"), "is empty")
    assert snapshot(work) == before


def test_vocabulary_larger_than_model_says_which_key(work):
    result = moetrain("config", str(TINY), "--set", "model.vocab_size=100", cwd=work)
    assert_one_line_error(result, "config", "model.vocab_size", "raise model.vocab_size to at least 500")


def test_given_tokenizer_larger_than_model_is_refused_before_the_run(work, fixture_run):
    before = snapshot(work)
    result = moetrain("train", str(TINY), "--set", f"data.tokenizer={fixture_run / 'tokenizer'}",
                      "model.vocab_size=8", "data.vocab_size=8", cwd=work)
    assert_one_line_error(result, "train", "model.vocab_size", "has 12 tokens", "at least 12")
    assert snapshot(work) == before


def test_fp16_without_gpu(work):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine can run fp16")
    before = snapshot(work)
    result = moetrain("train", str(TINY), "--set", "train.precision=fp16", "parallel.zero_stage=1", cwd=work)
    assert_one_line_error(result, "train", "train.precision", "fp16 needs a CUDA GPU")
    assert snapshot(work) == before


def test_fp16_at_zero_0_is_a_config_error(work):
    result = moetrain("config", str(TINY), "--set", "train.precision=fp16", cwd=work)
    assert_one_line_error(result, "config", "train.precision", "parallel.zero_stage 1 or 2")


def test_ep_size_larger_than_ranks(work):
    before = snapshot(work)
    result = moetrain("train", str(TINY), "--set", "parallel.ep_size=2", "parallel.zero_stage=1", cwd=work)
    assert_one_line_error(result, "train", "parallel.ep_size", "1 process runs")
    assert snapshot(work) == before
    result = moetrain("config", str(TINY), "--set", "parallel.ep_size=2", "parallel.zero_stage=1", "--ranks", "1",
                      cwd=work)
    assert_one_line_error(result, "config", "parallel.ep_size")
    ok = moetrain("config", str(TINY), "--set", "parallel.ep_size=2", "parallel.zero_stage=1", "--ranks", "4",
                  cwd=work)
    assert ok.returncode == 0, ok.stderr


def test_latest_naming_a_missing_step(work, fixture_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fixture_run, run)
    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    result = moetrain("evaluate", str(run), cwd=work)
    assert_one_line_error(result, "evaluate", "latest", "'step_00000099', which does not exist", "step_00000003")
    before = snapshot(work, run)
    result = moetrain("train", str(TINY), "--output-dir", str(run), "--set", "train.resume=latest", cwd=work)
    assert_one_line_error(result, "train", "'step_00000099', which does not exist")
    assert snapshot(work, run) == before


@pytest.mark.parametrize("command,recipe,hint", [
    ("train", REPO_ROOT / "configs" / "glue_rte.yaml", "moetrain finetune"),
    ("finetune", TINY, "moetrain train"),
])
def test_task_of_another_command_points_to_it(work, command, recipe, hint):
    result = moetrain(command, str(recipe), cwd=work)
    assert_one_line_error(result, command, "task", hint)
    assert snapshot(work) == set()


@pytest.mark.skipif(not (SHARED / "glue-rte").is_dir(), reason="no ../shared/data/glue-rte")
def test_offline_hub_names_the_local_copy(work):
    result = moetrain("finetune", str(REPO_ROOT / "configs" / "glue_rte.yaml"), "--set", "glue.source=hub",
                      "glue.pretrained=null", "--output-dir", str(work / "run"), cwd=work, HF_HUB_OFFLINE="1")
    assert_one_line_error(result, "finetune", "glue.hub_name", "glue-rte", "glue.source: files")
    assert snapshot(work) == set()  # the run directory made before the load is gone again


def test_output_dir_that_is_a_file(work):
    (work / "taken").write_text("not a directory\n")
    before = snapshot(work)
    result = moetrain("train", str(TINY), "--output-dir", "taken", cwd=work)
    assert_one_line_error(result, "train", "--output-dir taken", "is a file")
    assert snapshot(work) == before


@pytest.mark.parametrize("text", ["", "# a comment only\n"])
def test_empty_or_comment_only_recipe(work, text):
    (work / "empty.yaml").write_text(text)
    result = moetrain("train", "empty.yaml", cwd=work)
    assert_one_line_error(result, "train", "empty.yaml", "empty or holds only comments")
    assert snapshot(work) == {str(work / "empty.yaml")}


def test_invalid_yaml_is_one_line(work):
    (work / "bad.yaml").write_text("model:\n  d_model: [1, 2\n")
    result = moetrain("config", "bad.yaml", cwd=work)
    assert_one_line_error(result, "config", "bad.yaml", "invalid YAML: line")


@pytest.mark.parametrize("argv,needle", [
    (["translate", "{run}", "--input", "missing.txt", "--output", "out.txt"], "--input: no such file"),
    (["translate", "{run}", "--input", "in.txt", "--output", "."], "--output: . is a directory"),
    (["evaluate", "{run}", "--src", "in.txt"], "give both --src and --ref"),
    (["evaluate", "{run}", "--src", "in.txt", "--ref", "two.txt"], "--ref: two.txt has 2 lines"),
    (["evaluate", "{run}", "--average-last", "5"], "--average-last 5"),
    (["translate", "{run}", "--input", "in.txt", "--output", "out.txt", "--device", "nonsense"], "--device"),
])
def test_translation_command_errors(work, fixture_run, argv, needle):
    (work / "in.txt").write_text("w3 w4\n")
    (work / "two.txt").write_text("w3\nw4\n")
    before = snapshot(work)
    result = moetrain(*[a.format(run=fixture_run) for a in argv], cwd=work)
    assert_one_line_error(result, argv[0], needle)
    assert snapshot(work) == before


def test_debug_shows_the_traceback_of_a_user_error(work):
    for argv in (["--debug", "config", "missing.yaml"], ["config", "missing.yaml", "--debug"]):
        result = moetrain(*argv, cwd=work)
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "ConfigError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("moetrain config: missing.yaml: cannot read")


def test_internal_errors_keep_their_traceback(monkeypatch):
    from moetrain import cli

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.register_command("boom", "x", "x", lambda parser: None, boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["boom"])


# --- items 10 and 11: relative paths, absolute in the run; modes under the umask ----------------


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run trained from a recipe whose data paths are relative to the working directory,
    under umask 022. Returns ``(working directory, run directory)``."""
    from moetrain.data.synthetic import generate_pairs

    root = tmp_path_factory.mktemp("relative")
    (root / "data").mkdir()
    src, tgt, _ = generate_pairs(1, 120, "train")
    for split, (s, t) in {"train": (src[:100], tgt[:100]), "test": (src[100:], tgt[100:])}.items():
        (root / "data" / f"{split}.en").write_text("".join(x + "\n" for x in s), encoding="utf-8")
        (root / "data" / f"{split}.de").write_text("".join(x + "\n" for x in t), encoding="utf-8")
    recipe = yaml.safe_load(TINY.read_text())
    recipe["data"].update(source="files", train_src="data/train.en", train_tgt="data/train.de",
                          test_src="data/test.en", test_tgt="data/test.de", max_length_ratio=4.0)
    recipe["train"].update(max_steps=2, log_every=1, eval_every=0, save_every=2)
    (root / "recipes").mkdir()
    (root / "recipes" / "rel.yaml").write_text(yaml.safe_dump(recipe))
    result = moetrain("train", "recipes/rel.yaml", "--output-dir", "runs/rel", cwd=root, umask=0o022, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, root / "runs" / "rel"


def test_saved_config_holds_absolute_paths(relative_run):
    root, run = relative_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["train_src"] == str(root / "data" / "train.en")
    assert saved["data"]["test_tgt"] == str(root / "data" / "test.de")


def test_evaluate_from_another_working_directory(relative_run, tmp_path):
    _, run = relative_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = moetrain("evaluate", str(run), "--max-length", "8", "--no-progress", "--json", str(tmp_path / "m.json"),
                      cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sacreBLEU" in result.stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_files_follow_umask_022(relative_run, tmp_path):
    _, run = relative_run
    assert _mode(run / "config.yaml") == 0o644
    assert _mode(run / "tokenizer") == 0o755
    assert {_mode(p) for p in (run / "tokenizer").iterdir()} == {0o644}
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert _mode(step) == 0o755
    assert _mode(step / "portable" / "model.safetensors") == 0o644
    assert _mode(step / "portable" / "config.yaml") == 0o644
    out = tmp_path / "hf"
    result = moetrain("export", str(run), "--out", str(out), cwd=tmp_path, umask=0o022)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _mode(out) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {_mode(p) for p in files} == {0o644}, {str(p): oct(_mode(p)) for p in files}


def test_atomic_writes_follow_a_strict_umask_too(tmp_path):
    from moetrain.utils.atomic import atomic_dir
    from moetrain.utils.dataclass_yaml import write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "c.yaml", "a: 1\n")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
            os.chmod(d / "f", 0o600)  # as safetensors leaves its files
    finally:
        os.umask(old)
    assert _mode(tmp_path / "c.yaml") == 0o640
    assert _mode(tmp_path / "d") == 0o750 and _mode(tmp_path / "d" / "f") == 0o640


def test_evaluate_names_a_missing_test_file_of_the_checkpoint(work, fixture_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fixture_run, run)
    (config,) = run.glob("checkpoints/step_*/portable/config.yaml")
    saved = yaml.safe_load(config.read_text())
    saved["data"].update(source="files", train_src=str(tmp_path / "gone.en"), train_tgt=str(tmp_path / "gone.de"),
                         test_src=str(tmp_path / "gone-test.en"), test_tgt=str(tmp_path / "gone-test.de"))
    config.write_text(yaml.safe_dump(saved, sort_keys=False))
    result = moetrain("evaluate", str(run), cwd=work)
    assert_one_line_error(result, "evaluate", "data.test_src", str(tmp_path / "gone-test.en"), "--src and --ref")
