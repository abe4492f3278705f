"""Every command line the README shows in a code block is run, so the README cannot drift.

How each command is checked:

- A synopsis line (placeholders such as ``CONFIG`` or ``[--set ...]``) runs ``--help`` of its
  command, and every ``--flag`` it shows must be in that help.
- A ``$ command`` followed by an output line (the error samples) runs the command and compares its
  one-line error with the README's text (up to a ``...``).
- Every other command has an entry in :data:`PLAN`: ``run`` (verbatim, in a scratch directory that
  holds ``configs/`` and small stand-ins for the runs it names, sometimes with a few appended
  options that make it tiny), ``dry_run`` (a launcher with ``DRY_RUN=1``), ``config`` (a long or
  multi-GPU run: ``moetrain config`` with the same recipe, overrides and rank count checks that
  the recipe and its overrides are valid) or ``skip`` with the reason.

A new README command that is neither a synopsis nor in :data:`PLAN` fails
:func:`test_every_readme_command_is_checked`; so does an entry of :data:`PLAN` the README lost.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
SHARED = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT / "tests"))

from launch_env import child_env  # noqa: E402

#: First words that make a code-block line a command (after ``VAR=value`` assignments).
COMMAND_WORDS = ("moetrain", "make", "deepspeed", "python", "python3", "pip", "sbatch", "docker", "torchrun",
                 "accelerate")


def readme_blocks(text: str) -> list[list[str]]:
    """Lines of every shell-like fenced block, continuation lines joined."""
    blocks = []
    for match in re.finditer(r"^```([a-z]*)\n(.*?)^```", text, re.S | re.M):
        if match.group(1) not in ("", "bash", "sh", "console"):
            continue
        lines, pending = [], ""
        for line in match.group(2).split("\n"):
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            lines.append((pending + line.strip()) if pending else line)
            pending = ""
        blocks.append(lines)
    return blocks


def _is_command(line: str) -> bool:
    words = line.split()
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if not words:
        return False
    first = words[0]
    if first == "moetrain" and len(words) > 1 and words[1].endswith(":"):
        return False  # an output line: "moetrain train: configs/...: ..."
    return first in COMMAND_WORDS or first.startswith("launch/")


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """``(command, output line shown after it or None)`` for every command in the README."""
    found = []
    for lines in readme_blocks(text):
        for i, raw in enumerate(lines):
            line = raw.strip()
            prompt = line.startswith("$ ")
            if prompt:
                line = line[2:]
            if not line or line.startswith("#") or not _is_command(line):
                continue
            output = None
            if prompt and i + 1 < len(lines) and not lines[i + 1].startswith("$ "):
                output = lines[i + 1].strip() or None
            found.append((_strip_comment(line), output))
    return found


def is_synopsis(command: str) -> bool:
    """A usage line with placeholders rather than a command to run."""
    return "[" in command or re.search(r"\b(CONFIG|CHECKPOINT|COMMAND|FILE|DIR|HF_DIR)\b", command) is not None


@dataclass(frozen=True)
class Check:
    kind: str  #: run, dry_run, config, skip
    reason: str = ""
    extra: tuple[str, ...] = ()  #: options appended to make a run tiny
    ranks: int | None = None  #: for config: the rank count the command launches
    needs_shared: bool = False
    expect: str = ""  #: text the output must contain


TINY_ELECTRA = ("--set", "train.max_steps=2", "train.eval_every=0", "train.save_every=2", "train.log_every=1",
                "electra.synthetic_num_documents=200", "electra.valid_sequences=8")
TINY_GLUE = ("glue.num_seeds=1", "glue.epochs=1", "glue.max_train_examples=32", "glue.max_dev_examples=16")

PLAN: dict[str, Check] = {
    "make demo": Check("skip", "trains for ~3 minutes; tests/test_demo.py trains and exports the demo recipe"),
    "make test": Check("skip", "the test suite itself"),
    "python3 -m venv .venv && . .venv/bin/activate": Check("skip", "creates a virtualenv"),
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128":
        Check("skip", "a download from the PyTorch index"),
    "pip install -e .": Check("skip", "installs the package"),
    "deepspeed --num_gpus 8 --module moetrain.cli train configs/demo.yaml --output-dir runs/demo-8gpu "
    "--set parallel.ep_size=8 parallel.zero_stage=1":
        Check("config", "needs 8 GPUs", ranks=8),
    "NGPUS=8 launch/deepspeed.sh configs/demo.yaml runs/demo --set parallel.ep_size=8 parallel.zero_stage=1":
        Check("dry_run", expect="deepspeed --num_gpus 8"),
    "HOSTFILE=launch/hostfile.example launch/deepspeed_multinode.sh configs/demo.yaml /shared/runs/demo "
    "--set parallel.ep_size=8 parallel.zero_stage=1": Check("dry_run", expect="--hostfile launch/hostfile.example"),
    "launch/torchrun.sh configs/demo.yaml runs/demo": Check("dry_run", expect="torchrun"),
    "sbatch --nodes 4 launch/slurm.sbatch configs/demo.yaml /shared/runs/demo --set parallel.ep_size=8 "
    "parallel.zero_stage=1": Check("skip", "needs SLURM; tests/test_launch.py checks the script"),
    "NPROC=8 launch/accelerate.sh configs/demo.yaml runs/demo": Check("dry_run", expect="accelerate launch"),
    "docker build -f docker/Dockerfile -t moetrain . && docker run --gpus all --ipc=host -v "
    "$PWD/runs:/opt/moetrain/runs moetrain train configs/demo.yaml --output-dir runs/demo":
        Check("skip", "needs docker, the network and a GPU"),
    "deepspeed --num_gpus 2 --module moetrain.cli train configs/tiny.yaml --output-dir runs/tiny "
    "--set parallel.ep_size=2 parallel.zero_stage=1":
        Check("config", "two DeepSpeed ranks for ~1 minute; tests/test_launch.py runs it through "
                        "launch/deepspeed.sh (marked dist)", ranks=2),
    "moetrain train configs/wmt14_ende_sparsemixer.yaml --output-dir runs/wmt14-sm":
        Check("config", "downloads WMT'14 from the Hub and trains for days"),
    "moetrain evaluate runs/wmt14-sm --average-last 5 --tokenized-bleu": Check("run", expect="sacreBLEU"),
    "moetrain translate runs/wmt14-sm --input news.en --output news.de": Check("run", expect="translations: news.de"),
    "moetrain train configs/multi30k_switch.yaml --output-dir runs/m30k":
        Check("config", "a 60-minute run (train.max_minutes)"),
    "moetrain train configs/wmt_news_switch.yaml --output-dir runs/wmt-news":
        Check("config", "a 60-minute run (train.max_minutes)"),
    "moetrain train configs/electra_tiny.yaml --output-dir runs/electra-tiny":
        Check("run", extra=TINY_ELECTRA, expect="checkpoint"),
    "moetrain finetune configs/glue_rte.yaml --set glue.pretrained=runs/electra-tiny":
        Check("run", extra=TINY_GLUE, needs_shared=True),
    "moetrain finetune configs/glue_rte.yaml --set glue.pretrained=runs/electra-tiny glue.random_init=true":
        Check("run", extra=TINY_GLUE, needs_shared=True),
    "deepspeed --num_gpus 8 --module moetrain.cli train configs/electra_small_switch.yaml "
    "--output-dir runs/electra-small": Check("config", "needs 8 GPUs and Wikipedia from the Hub", ranks=8),
    "moetrain export runs/demo --out hf/demo --verify": Check("run", expect="max |moetrain - HF|"),
    "moetrain bench moe-layer --json bench.json": Check("run", extra=("--quick",)),
    "moetrain bench step --config configs/multi30k_switch.yaml --json step.json":
        Check("run", extra=("--batch-size", "2", "--src-len", "4", "--tgt-len", "4", "--repeats", "1", "--warmup", "0",
                            "--matmul-size", "64", "--threads", "1"), expect="moetrain / HF tokens/s"),
    "moetrain bench estimator-quality configs/tiny.yaml": Check("run", extra=("--batches", "1", "--draws", "2"),
                                                                 expect="reinmax"),
    "moetrain plot runs/demo": Check("run", expect="runs/demo/plots/expert_load_encoder.layers.1.ffn.png"),
    "moetrain compare configs/tiny.yaml --estimators switch,sparsemixer --seeds 2":
        Check("run", extra=("--seeds", "1", "--set", "train.max_steps=2", "train.eval_every=1", "train.log_every=1",
                            "train.plot=false"), expect="moetrain compare: report runs/compare-tiny/report.md"),
    "moetrain bench train --config configs/tiny.yaml":
        Check("skip", "two DeepSpeed launches (1 and 2 ranks, ~1 minute); tests/test_launch.py runs the benchmark "
                      "(marked slow); its --help is checked with the synopsis"),
}


def _commands() -> list[tuple[str, str | None]]:
    return readme_commands(README.read_text(encoding="utf-8"))


def test_every_readme_command_is_checked():
    commands = [c for c, _ in _commands()]
    assert commands, "no commands found in README.md"
    unplanned = [c for c, out in _commands() if not is_synopsis(c) and out is None and c not in PLAN]
    assert unplanned == [], "README commands neither run nor listed in PLAN (add them, with a reason to skip)"
    stale = [c for c in PLAN if c not in commands]
    assert stale == [], "PLAN entries the README no longer shows"


def test_skips_give_a_reason():
    assert all(check.reason for check in PLAN.values() if check.kind in ("skip", "config"))


#: `make test` runs .venv/bin/python without activating the venv; the launch scripts call `python`
#: and `torchrun` from PATH as a user's activated shell would, so put the venv's bin/ first.
VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _moetrain(argv: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    full_env = child_env(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "moetrain", *argv], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# --- synopsis lines: --help knows every flag --------------------------------------------------


SYNOPSES = [c for c, _ in _commands() if is_synopsis(c)]


@pytest.mark.parametrize("line", SYNOPSES)
def test_synopsis_matches_help(line, tmp_path):
    words = shlex.split(line.replace("[", " ").replace("]", " "))[1:]
    command = [w for w in words[:2] if re.fullmatch(r"[a-z][a-z-]*", w)]
    if command[1:] and command[0] != "bench":
        command = command[:1]
    result = _moetrain([*command, "--help"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
        assert flag in result.stdout, f"{flag} of README line {line!r} is not in `moetrain {' '.join(command)} --help`"


# --- sample outputs: the real error text --------------------------------------------------------


SAMPLES = [(c, out) for c, out in _commands() if out is not None]


@pytest.mark.parametrize("command,shown", SAMPLES)
def test_readme_sample_output_is_the_real_one(command, shown, tmp_path):
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    result = _moetrain(shlex.split(command)[1:], tmp_path, timeout=120)
    real = [line for line in result.stderr.splitlines() + result.stdout.splitlines()
            if line.startswith(shown.split(":")[0] + ":")]
    assert real, result.stderr[-2000:]
    prefix = shown.split("...")[0] if "..." in shown else shown
    assert real[0].startswith(prefix), f"README: {shown}\nreal:   {real[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]  # nothing created


# --- commands from PLAN ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working directory with ``configs/`` and stand-ins for the runs the README names:
    ``runs/demo`` and ``runs/wmt14-sm`` (tiny untrained translation runs; the latter with 5
    checkpoints for ``--average-last 5``; the former with two logged steps and an evaluation in
    its metrics.jsonl), ``news.en``, and ``../shared`` when the data is there."""
    from checkpoint_fixture import write_checkpoint

    from moetrain.train.metrics import MetricsLogger

    root = tmp_path_factory.mktemp("readme") / "repo"
    root.mkdir()
    (root / "configs").symlink_to(REPO_ROOT / "configs")
    if SHARED.is_dir():  # the recipes' ../shared/data/... paths, as from the repository root
        (root.parent / "shared").symlink_to(SHARED.parent)
    write_checkpoint(root / "runs" / "demo")
    log = MetricsLogger(root / "runs" / "demo", is_main=True, max_steps=2, start_step=0,
                        layer_names=["encoder.layers.1.ffn"])
    for step in (1, 2):
        log.log_train(step, {"loss": 3.0 / step, "lr": 1e-3, "tokens_per_second": 100.0, "moe": [
            {"load": [0.75, 0.25], "dropped_fraction": 0.0, "router_entropy": 0.6, "balance_loss": 1.0, "z_loss": 2.0}]})
    log.log_eval(2, {"loss": 1.4, "bleu": 3.5})
    log.close()
    wmt = root / "runs" / "wmt14-sm"
    write_checkpoint(wmt)
    ckpts = wmt / "checkpoints"
    (step,) = ckpts.glob("step_*")
    for n in (1, 2, 4, 5):
        shutil.copytree(step, ckpts / f"step_{n:08d}")
    (ckpts / "latest").write_text("step_00000005")
    (root / "news.en").write_text("w3 w4 w5\nw6\n", encoding="utf-8")
    return root


RUNS = [c for c, check in PLAN.items() if check.kind == "run"]


@pytest.mark.parametrize("command", RUNS)
def test_readme_command_runs(command, scratch):
    check = PLAN[command]
    if check.needs_shared and not SHARED.is_dir():
        pytest.skip("no ../shared/data")
    if "glue.pretrained=runs/electra-tiny" in command and not (scratch / "runs" / "electra-tiny").is_dir():
        pytest.skip("needs the electra-tiny run the README command before it makes (run the whole file)")
    # Verbatim, plus options that make it tiny (a README `--set` list is extended by them).
    result = _moetrain(shlex.split(command)[1:] + list(check.extra), scratch)
    assert result.returncode == 0, result.stderr[-4000:]
    assert check.expect in result.stdout + result.stderr


DRY_RUNS = [c for c, check in PLAN.items() if check.kind == "dry_run"]


@pytest.mark.parametrize("command", DRY_RUNS)
def test_readme_launcher_dry_run(command):
    words = shlex.split(command)
    env = {}
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    result = subprocess.run(["bash", *words], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env=child_env(DRY_RUN="1", PATH=VENV_PATH, **env))
    assert result.returncode == 0, result.stderr
    assert PLAN[command].expect in result.stdout and "moetrain.cli train configs/demo.yaml" in result.stdout


CONFIGS = [c for c, check in PLAN.items() if check.kind == "config"]


@pytest.mark.parametrize("command", CONFIGS)
def test_readme_long_run_recipe_is_valid(command, tmp_path):
    """The recipe and overrides of a run too long (or too big) for a test, with its rank count."""
    words = shlex.split(command)
    words = words[words.index("train"):]
    argv, skip = ["config"], False
    for word in words[1:]:
        if skip:
            skip = False
            continue
        if word == "--output-dir":
            skip = True
            continue
        argv.append(word)
    ranks = PLAN[command].ranks
    if ranks:
        argv += ["--ranks", str(ranks)]
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    result = _moetrain(argv, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
