"""Router health in metrics.jsonl and the figures drawn from it (issue 13): ``moetrain plot`` and
``train.plot``.

One real run (``configs/tiny.yaml``, 4 steps, through the real command line, ``train.plot`` left at
its default) is shared by the module; the other cases write metrics.jsonl by hand, through
:class:`~moetrain.train.metrics.MetricsLogger` where the record schema matters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch_env import child_env

from moetrain import cli
from moetrain.train.metrics import MetricsLogger, WindowStats, _merge_windows
from moetrain.train.plots import SOFTWARE, _figures, plot_after_training, plot_runs, read_metrics

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = ["loss.png", "eval_metrics.png", "lr.png", "tokens_per_second.png"]


def assert_png(path: Path) -> None:
    """A real PNG of a drawn figure (not an empty canvas) that says moetrain wrote it."""
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > 5000, (path, len(data))  # an empty 800x450 canvas compresses to ~2 KB
    with Image.open(path) as image:
        assert image.size == (800, 450) or path.name == "eval_metrics.png"
        assert image.text.get("Software") == SOFTWARE


def logged_run(run: Path, *, steps=(1, 2, 3), evals=(3,), layers=("encoder.layers.1.ffn",), torn: str = "") -> Path:
    """A run directory whose metrics.jsonl the real writer filled (``torn``: a half record after it)."""
    log = MetricsLogger(run, is_main=True, max_steps=max(steps), start_step=0, layer_names=list(layers))
    for step in steps:
        moe = [{"load": [0.5, 0.5, 0.0, 0.0], "dead_experts": 2, "dropped_fraction": 0.0, "router_entropy": 1.0,
                "balance_loss": 1.0, "z_loss": 1.0} for _ in layers]
        log.log_train(step, {"loss": 4.0 / step, "lr": 1e-3 * step, "tokens_per_second": 50.0 * step, "moe": moe})
        if step in evals:
            log.log_eval(step, {"loss": 3.0 / step, "bleu": 2.0 * step})
    log.close()
    if torn:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(torn)
    return run


# -- router health: dead experts are counted over the whole window on every rank ---------------


def _out(counts: list[int]) -> SimpleNamespace:
    n = sum(counts)
    stats = SimpleNamespace(tokens_per_expert=torch.tensor(counts), num_tokens=n, balance_loss=torch.tensor(1.0),
                            z_loss=torch.tensor(1.0), router_entropy=torch.tensor(1.0),
                            dropped_fraction=torch.tensor(0.0))
    return SimpleNamespace(loss=torch.tensor(1.0), num_tokens=n, logs={}, moe_stats=[stats])


def test_dead_experts_are_counted_after_the_ranks_windows_are_merged():
    """Expert 3 gets no token anywhere: dead. Expert 2 gets none on rank 0 and none in rank 1's first
    micro-batch, but some in its second: alive. Expert 1 is idle in every micro-batch but one."""
    rank0, rank1 = WindowStats(), WindowStats()
    rank0.add(_out([6, 2, 0, 0]), 1)
    rank0.add(_out([8, 0, 0, 0]), 1)
    rank1.add(_out([4, 0, 0, 0]), 1)
    rank1.add(_out([0, 0, 4, 0]), 1)
    assert _merge_windows([rank0.part()])["moe"][0]["dead_experts"] == 2  # rank 0 alone would say 2
    (layer,) = _merge_windows([rank0.part(), rank1.part()])["moe"]
    assert layer["dead_experts"] == 1
    assert layer["load"] == [18 / 24, 2 / 24, 4 / 24, 0.0]
    assert layer["max_load"] == pytest.approx(0.75) and layer["mean_load"] == pytest.approx(0.25)
    assert layer["max_load_ratio"] == pytest.approx(3.0)


def test_a_layer_that_routed_nothing_has_every_expert_dead_and_no_ratio():
    window = WindowStats()
    window.add(_out([0, 0]), 1)
    (layer,) = _merge_windows([window.part()])["moe"]
    assert layer["dead_experts"] == 2 and layer["max_load"] == 0.0 and layer["max_load_ratio"] == 0.0


def test_tensorboard_gets_router_health_and_the_load_histogram(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    window = WindowStats()
    window.add(_out([3, 1, 0, 0]), 1)
    log = MetricsLogger(tmp_path, is_main=True, max_steps=1, start_step=0, layer_names=["enc.1"])
    log.log_train(1, {"loss": 1.0, "lr": 1.0, "tokens_per_second": 1.0, "moe": _merge_windows([window.part()])["moe"]})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("moe/enc.1/dead_experts")] == [2.0]
    assert [e.value for e in events.Scalars("moe/enc.1/max_load")] == [0.75]
    assert [e.value for e in events.Scalars("moe/enc.1/load_max_x_uniform")] == [3.0]
    (hist,) = events.Histograms("moe/enc.1/load")
    # One value per expert: two at 0 (dead), 0.25 and 0.75.
    assert hist.histogram_value.num == 4 and hist.histogram_value.min == 0.0 and hist.histogram_value.max == 0.75


# -- a real run: train.plot leaves plots/, moetrain plot redraws them --------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("plot") / "tiny"
    argv = [sys.executable, "-m", "moetrain.cli", "train", str(REPO / "configs" / "tiny.yaml"),
            "--output-dir", str(out),
            "--set", "train.max_steps=4", "train.log_every=1", "train.eval_every=0", "train.save_every=4",
            "export.after_train=false"]
    proc = subprocess.run(["timeout", "-s", "KILL", "300", *argv], cwd=REPO, capture_output=True, text=True,
                          env=child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return out, proc


def _layers(run: Path) -> list[str]:
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    return [layer["layer"] for layer in train[-1]["moe"]]


def test_training_leaves_plots_and_router_health(real_run):
    run, proc = real_run
    layers = _layers(run)
    assert layers == ["encoder.layers.1.ffn", "decoder.layers.1.ffn"]  # tiny: layer 1 of each stack is sparse
    expected = CURVES + [f"expert_load_{name}.png" for name in layers]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(expected)
    for name in expected:
        assert_png(run / "plots" / name)
    assert f"plots        {run / 'plots'} (6 PNG figures)" in proc.stdout
    record = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-2]
    for layer in record["moe"]:
        assert layer["mean_load"] == pytest.approx(1 / 4) and layer["max_load"] == max(layer["load"])
        assert layer["max_load_ratio"] == pytest.approx(4 * layer["max_load"])
        assert layer["dead_experts"] == sum(1 for x in layer["load"] if x == 0)


def test_plot_command_redraws_its_own_figures_and_lists_them(real_run, capsys):
    run, _ = real_run
    before = {p.name: p.read_bytes() for p in (run / "plots").iterdir()}
    (run / "plots" / "notes.txt").write_text("mine")
    assert cli.main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"moetrain plot: 6 PNG figures in {run / 'plots'}"
    for name in before:
        assert f"  {run / 'plots' / name}" in out
        assert_png(run / "plots" / name)
    assert (run / "plots" / "notes.txt").read_text() == "mine"  # a file it did not write is left alone
    assert "no data" not in out  # the real run has eval records and MoE layers


def test_two_runs_overlay_their_curves_and_keep_their_heatmaps(real_run, tmp_path, capsys):
    run, _ = real_run
    other = logged_run(tmp_path / "other", layers=("enc.1",))
    out = tmp_path / "compare"
    assert cli.main(["plot", str(run), str(other), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(CURVES + ["other_expert_load_enc.1.png", "tiny_expert_load_decoder.layers.1.ffn.png",
                                     "tiny_expert_load_encoder.layers.1.ffn.png"])
    for name in names:
        assert_png(out / name)
    # The loss figure holds one train and one eval line per run, labelled by the run directory.
    from matplotlib.figure import Figure

    draw = dict(_figures([read_metrics(run), read_metrics(other)]))["loss.png"]
    fig = Figure()
    assert draw(fig) is None
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["tiny train", "tiny eval", "other train",
                                                                       "other eval"]


def test_several_runs_need_out(real_run, tmp_path, capsys):
    run, _ = real_run
    assert cli.main(["plot", str(run), str(logged_run(tmp_path / "b"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("moetrain plot: --out DIR is required with 2 run directories "
                   "(the default, RUN_DIR/plots, is for one run)")
    assert not (tmp_path / "b" / "plots").exists()


# -- no data, bad data, files that are not ours -------------------------------------------------


def test_no_eval_records_and_no_moe_layers_say_so(tmp_path, capsys):
    run = logged_run(tmp_path / "dense", evals=(), layers=())
    written = dict(plot_runs([run], run / "plots"))
    assert written[run / "plots" / "eval_metrics.png"].startswith("no eval records in metrics.jsonl")
    assert "no MoE layer" in written[run / "plots" / "expert_load.png"]
    assert written[run / "plots" / "loss.png"] is None  # the train loss is there
    assert cli.main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run / 'plots' / 'eval_metrics.png'}  (no data: no eval records in metrics.jsonl" in out
    for path in written:
        assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 5000


def test_a_torn_last_line_is_skipped_a_torn_middle_line_is_an_error(tmp_path, capsys):
    run = logged_run(tmp_path / "killed", torn='{"type": "train", "step": 4, "lo')
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics.train] == [1, 2, 3] and [r["step"] for r in metrics.eval] == [3]
    assert cli.main(["plot", str(run)]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('\n{"type": "eval", "step": 4, "loss": 1.0}\n')  # the torn line is now line 5 of 6
    assert cli.main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moetrain plot: {run / 'metrics.jsonl'}: line 5 is not JSON (only a torn last line is skipped)"


@pytest.mark.parametrize("content,needle", [(None, "no such file"), ("", "no train or eval records (empty file)"),
                                            ('{"type": "train", "st', "no train or eval records")])
def test_missing_or_empty_metrics_is_one_line_exit_2(tmp_path, capsys, content, needle):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert cli.main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"moetrain plot: {run / 'metrics.jsonl'}: {needle}"), err
    assert "Traceback" not in err
    assert not (run / "plots").exists()  # nothing created


def test_a_file_moetrain_did_not_write_is_never_replaced(tmp_path, capsys):
    run = logged_run(tmp_path / "run")
    out = tmp_path / "figures"
    out.mkdir()
    (out / "lr.png").write_bytes(PNG_SIGNATURE + b"someone else's figure")
    assert cli.main(["plot", str(run), "--out", str(out)]) == 2
    assert "lr.png exists and was not written by moetrain plot" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["lr.png"]  # refused before anything was written
    assert (out / "lr.png").read_bytes() == PNG_SIGNATURE + b"someone else's figure"


def test_without_matplotlib_training_prints_one_warning(tmp_path, monkeypatch, capsys):
    run = logged_run(tmp_path / "run")
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    plot_after_training(run)
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == ("moetrain: warning: no plots: matplotlib is not installed "
                                    "(pip install 'matplotlib>=3.7')")
    assert not (run / "plots").exists()
