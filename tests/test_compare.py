"""``moetrain compare`` (issue 15): one run per (estimator, seed), resumable, and its report.

One real comparison (``configs/tiny.yaml``, switch vs sparsemixer, one seed, 4 steps, through the
real command line) is shared by the module: it is written, rerun (skipped), extended (resumed) and
refused with a changed config. The rest is in-process: planning, errors, the report's arithmetic
on hand-written eval records, and what runs of one seed share.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_env import child_env

from moetrain import cli
from moetrain.train.compare_report import steps_to_reach, summarize_run, task_metric
from moetrain.train.plots import RunMetrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
DEMO = REPO / "configs" / "demo.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK = ["train.max_steps=4", "train.eval_every=2", "train.log_every=1", "train.save_every=2", "train.plot=false",
         "export.after_train=false"]


def compare(out: Path, *args: str, estimators: str = "switch,sparsemixer", steps: int = 4,
            timeout: int = 400, config: Path = TINY) -> subprocess.CompletedProcess:
    quick = [q for q in QUICK if not q.startswith("train.max_steps")] + [f"train.max_steps={steps}"]
    argv = [sys.executable, "-m", "moetrain.cli", "compare", str(config), "--estimators", estimators, "--seeds", "1",
            "--out", str(out), "--set", *quick, *args]
    return subprocess.run(["timeout", "-s", "KILL", str(timeout), *argv], cwd=REPO, capture_output=True, text=True,
                          env=child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))


def first_table(report: str) -> list[str]:
    """The rows of the per-estimator table (before the per-run one)."""
    head = report.split("## Runs")[0]
    return [line for line in head.splitlines() if line.startswith("| `")]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    proc = compare(out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


# -- end to end ----------------------------------------------------------------------------------


def test_compare_writes_runs_report_figures_and_csvs(comparison):
    assert sorted(p.name for p in comparison.iterdir() if p.is_dir()) == ["sparsemixer-seed1", "switch-seed1"]
    for run in ("switch-seed1", "sparsemixer-seed1"):
        status = json.loads((comparison / run / "compare_status.json").read_text())
        assert status["exit_code"] == 0 and status["step"] == 4 and status["peak_rss_mib"] > 50
        estimator = yaml_value(comparison / run / "config.yaml", "moe", "estimator")
        assert estimator == run.split("-")[0]
    report = (comparison / "report.md").read_text()
    rows = first_table(report)
    assert [row.split("|")[1].strip() for row in rows] == ["`switch`", "`sparsemixer`"]
    # The baseline reaches its own final dev loss, at the latest at its last evaluation: ratio 1.
    assert rows[0].split("|")[8].strip() == "1.00"
    assert "final bleu" in report  # translation: the task metric is BLEU
    for name in ("train_loss", "dev_loss", "bleu"):
        assert (comparison / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
        lines = (comparison / f"{name}.csv").read_text().splitlines()
        assert lines[0] == "estimator,step,seconds,mean,std,min,max,seeds"
        assert {line.split(",")[0] for line in lines[1:]} == {"switch", "sparsemixer"}
    dev = [line.split(",") for line in (comparison / "dev_loss.csv").read_text().splitlines()[1:]]
    assert [(row[0], row[1]) for row in dev] == [("switch", "2"), ("switch", "4"), ("sparsemixer", "2"),
                                                  ("sparsemixer", "4")]
    assert all(float(row[2]) > 0 for row in dev)  # training seconds at that step
    runs = [line.split("|") for line in report.split("## Runs")[1].splitlines() if line.startswith("| `")]
    assert len(runs) == 2
    for row in runs:  # train seconds, then the share of the CPUs other processes used meanwhile
        assert float(row[9]) > 0
        assert row[10].strip().endswith("%") and 0 <= float(row[10].strip()[:-1]) <= 100


def test_compare_runs_the_shipped_demo_recipe_end_to_end(tmp_path):
    """The demo recipe as shipped (its synthetic data and tokenizer), two estimators, a few steps."""
    out = tmp_path / "cmp"
    proc = compare(out, f"data.cache_dir={tmp_path / 'cache'}", config=DEMO, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = first_table((out / "report.md").read_text())
    assert [row.split("|")[1].strip() for row in rows] == ["`switch`", "`sparsemixer`"]
    for name in ("train_loss", "dev_loss", "bleu"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert len((out / f"{name}.csv").read_text().splitlines()) > 2  # header + rows of both estimators


def test_rerun_skips_finished_runs_even_without_compare_status(comparison):
    before = {p: p.read_bytes() for p in comparison.glob("*/metrics.jsonl")}
    (comparison / "switch-seed1" / "compare_status.json").unlink()  # e.g. trained from --print-commands lines
    proc = compare(comparison)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skips = [line for line in proc.stdout.splitlines() if ": skip, finished" in line]
    assert len(skips) == 2 and "step 4 of 4" in skips[0]
    assert "finished at step" not in proc.stdout  # no child trained
    assert {p: p.read_bytes() for p in comparison.glob("*/metrics.jsonl")} == before


def test_changed_config_of_an_existing_run_is_refused(comparison):
    before = (comparison / "switch-seed1" / "metrics.jsonl").read_bytes()
    proc = compare(comparison, "train.lr=1e-3")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moetrain compare:")]
    assert len(lines) == 1 and "holds a run of another config (train.lr" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (comparison / "switch-seed1" / "metrics.jsonl").read_bytes() == before


def test_a_key_newer_than_the_saved_run_at_its_default_is_no_change(tmp_path):
    """A run saved before a config key existed (e.g. train.compile) still counts as the same
    config while the key holds its default; set to something else, it is a change."""
    import yaml

    from moetrain.commands.compare import CompareError, run_finished
    from moetrain.config import config_to_yaml, load_config

    cfg = load_config(TINY, ["train.max_steps=4"])
    saved = yaml.safe_load(config_to_yaml(cfg))
    del saved["train"]["compile"]  # as written by a version without the key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "compare_status.json").write_text(json.dumps({"exit_code": 1}))
    assert run_finished(tmp_path, cfg) is None  # not refused; no checkpoint, so not finished either
    with pytest.raises(CompareError, match="train.compile"):
        run_finished(tmp_path, load_config(TINY, ["train.max_steps=4", "train.compile=true"]))


def test_more_steps_resume_a_finished_run_from_its_checkpoint(comparison):
    """The last test on the shared comparison: it extends the switch run to 6 steps."""
    run = comparison / "switch-seed1"
    before = (run / "metrics.jsonl").read_text()
    proc = compare(comparison, estimators="switch", steps=6)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "switch-seed1: resume from its latest checkpoint" in proc.stdout
    assert "resumed at step 4" in proc.stdout
    after = (run / "metrics.jsonl").read_text()
    assert after.startswith(before)  # steps 1-4 untouched
    steps = [json.loads(line)["step"] for line in after[len(before):].splitlines()]
    assert steps and min(steps) == 5 and max(steps) == 6
    status = json.loads((run / "compare_status.json").read_text())
    assert status["step"] == 6 and status["attempts"] == 1  # the status of step 4 was removed above
    assert [row.split("|")[1].strip() for row in first_table((comparison / "report.md").read_text())] == ["`switch`"]


def yaml_value(path: Path, *keys: str):
    import yaml

    tree = yaml.safe_load(path.read_text())
    for key in keys:
        tree = tree[key]
    return tree


# -- in-process: planning and errors ----------------------------------------------------------------


def test_print_commands_prints_one_launch_line_per_run_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["compare", str(TINY), "--estimators", "switch,sparsemixer_v2", "--seeds", "2",
                     "--set", "train.max_steps=7", "--print-commands"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4
    words = shlex.split(lines[2])
    assert words[:4] == ["moetrain", "train", str(TINY), "--output-dir"]
    assert words[4] == "runs/compare-tiny/sparsemixer_v2-seed1"
    assert words[6:] == ["train.max_steps=7", "moe.estimator=sparsemixer_v2", "train.seed=1", "moe.top_k=2",
                         "train.resume=latest"]
    assert "train.seed=2" in lines[1] and "moe.top_k" not in lines[1]
    assert "sparsemixer_v2 is defined for moe.top_k=2" in err  # the automatic top_k, said once
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,expected", [
    (["--estimators", "switch,nosuch"], "--estimators: unknown estimator 'nosuch'; known: switch, topk, sparsemixer"),
    (["--estimators", "switch", "--set", "train.lr=-1"], "train.lr: must be > 0"),
    (["--estimators", "switch", "--set", "moe.estimator=st"], "--set moe.estimator=st: compare sets moe.estimator"),
])
def test_bad_requests_are_one_line_errors_that_create_nothing(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["compare", str(TINY), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("moetrain compare: ") and expected in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_seeds_below_one_is_refused_by_the_parser(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", str(TINY), "--estimators", "switch", "--seeds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert "argument --seeds: expected an integer >= 1, got '0'" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_estimator_exits_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moetrain", "compare", str(TINY), "--estimators", "swich"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=child_env(PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("moetrain compare: --estimators: unknown estimator 'swich'")
    assert list(tmp_path.iterdir()) == []


# -- what runs of one seed share ----------------------------------------------------------------


def initial_state(estimator: str, seed: int, out: Path) -> tuple[dict, dict]:
    """The model and first batch as the trainer's ``setup`` makes them (seed, task, model)."""
    from moetrain.config import load_config
    from moetrain.tasks import build_task
    from moetrain.train.trainer import _seed

    cfg = load_config(TINY, [f"moe.estimator={estimator}", f"train.seed={seed}"])
    out.mkdir(parents=True, exist_ok=True)
    _seed(cfg.train.seed)
    task = build_task(cfg, out)
    return task.build_model(ep_size=1).state_dict(), next(iter(task.train_batches(0, 1, 0)))


def test_same_seed_gives_identical_dense_init_and_data_across_estimators(tmp_path):
    switch, switch_batch = initial_state("switch", 1, tmp_path / "a")
    mixer, mixer_batch = initial_state("sparsemixer", 1, tmp_path / "b")
    other, other_batch = initial_state("switch", 2, tmp_path / "c")
    # SparseMixer adds only its omega (one per sparse layer), which starts at 1.
    extra = sorted(set(mixer) - set(switch))
    assert extra and all(k.endswith(".estimator.omega") for k in extra) and set(switch) <= set(mixer)
    assert all(torch.equal(mixer[k], torch.ones_like(mixer[k])) for k in extra)
    assert [k for k in switch if not torch.equal(switch[k], mixer[k])] == []
    assert sum(not torch.equal(switch[k], other[k]) for k in switch) > len(switch) // 2  # the seed matters
    assert all(torch.equal(switch_batch[k], mixer_batch[k]) for k in switch_batch)
    assert not torch.equal(switch_batch["input_ids"], other_batch["input_ids"])


# -- the report's arithmetic --------------------------------------------------------------------


def evals(*points: tuple[int, float]) -> list[dict]:
    return [{"type": "eval", "step": step, "loss": loss} for step, loss in points]


def test_steps_to_reach_interpolates_between_evaluations():
    records = evals((100, 5.0), (200, 4.0), (300, 3.0))
    assert steps_to_reach(records, 3.5) == pytest.approx(250.0)
    assert steps_to_reach(records, 4.0) == 200.0  # exactly at an eval point
    assert steps_to_reach(records, 6.0) == 100.0  # already below at the first evaluation
    assert steps_to_reach(records, 2.9) is None  # not reached
    # A loss that goes up again: the first crossing counts, interpolated from the point before it.
    assert steps_to_reach(evals((10, 4.0), (20, 2.0), (30, 5.0), (40, 1.0)), 3.0) == pytest.approx(15.0)
    assert steps_to_reach([{"step": 5, "loss": None}, *evals((10, 1.0))], 2.0) == 10.0  # records without a loss


def test_task_metric_is_bleu_else_an_accuracy():
    def run(*records: dict) -> RunMetrics:
        return RunMetrics("r", Path("r/metrics.jsonl"), eval=list(records))

    assert task_metric([run({"step": 1, "loss": 1.0, "ppl": 3.0, "bleu": 2.0})]) == "bleu"
    assert task_metric([run({"step": 1, "loss": 1.0, "rtd_baseline_accuracy": 0.5, "rtd_accuracy": 0.9})]) \
        == "rtd_accuracy"
    assert task_metric([run({"step": 1, "loss": 1.0, "mlm_loss": 2.0})]) is None


def test_run_summary_sums_train_seconds_and_weights_the_cpu_share_by_them(tmp_path):
    records = [
        {"type": "train", "step": 1, "loss": 3.0, "tokens_per_second": 100.0, "seconds": 30.0, "cpu_others": 0.0},
        {"type": "train", "step": 2, "loss": 2.0, "tokens_per_second": 50.0, "seconds": 10.0, "cpu_others": 0.4},
        {"type": "train", "step": 3, "loss": 2.0, "tokens_per_second": 50.0, "seconds": 20.0},  # an older record
        {"type": "eval", "step": 3, "loss": 2.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize_run("switch", 1, tmp_path, None)
    assert summary.train_seconds == pytest.approx(60.0)
    assert summary.cpu_others == pytest.approx((30 * 0.0 + 10 * 0.4) / 40)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[2:]))
    assert summarize_run("switch", 1, tmp_path, None).cpu_others is None  # runs logged before the key existed
