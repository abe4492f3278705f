"""PNG figures of runs' ``metrics.jsonl``: loss, eval metrics, learning rate, tokens/s, expert load.

    from moetrain.train.plots import plot_runs
    written = plot_runs([Path("runs/demo")], Path("runs/demo/plots"))   # [(path, note), ...]

``moetrain plot RUN_DIR ...`` calls it, and so does the trainer at the end of a run with
``train.plot`` (:func:`plot_after_training`). Figures, all written for every plot:

* ``loss.png``: train loss (line) and eval loss (dashed, dots) against the step;
* ``eval_metrics.png``: one panel per numeric eval key besides ``loss`` (``bleu``, GLUE scores, ...);
* ``lr.png`` and ``tokens_per_second.png``;
* ``expert_load_<layer>.png``: per run and MoE layer, a heatmap of experts x logged steps, colour =
  the expert's share of the layer's routes in that logging window (dead experts show as 0).

Several runs overlay their curves (one colour per run, labelled by the run directory's name);
heatmaps are per run, their names prefixed with ``<run>_``. A figure with nothing to show (no
eval record yet, a dense model) is still written, with one centred line saying what is missing,
so a reader never has to wonder whether a figure was forgotten; the returned note says the same.

Only moetrain's own PNGs are ever replaced: each carries ``Software: moetrain plot`` in a PNG text
chunk, and an existing file of one of our names without it stops the plot before anything is
written. Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg renderer, never
through pyplot, so no display is needed and no global backend is changed; matplotlib is imported
inside :func:`plot_runs`, so importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from moetrain.utils.errors import UserError

__all__ = ["PlotError", "RunMetrics", "read_metrics", "plot_runs", "plot_after_training", "SOFTWARE"]

#: Written into every PNG's ``Software`` text chunk: how a later plot knows a file is its own.
SOFTWARE = "moetrain plot"


class PlotError(UserError, ValueError):
    """A run directory without usable metrics, a clash in the output directory, no matplotlib."""


@dataclass
class RunMetrics:
    """One run's records, each step once (the last record of a step wins), in step order."""

    label: str  #: legend label and file-name prefix: the run directory's name
    path: Path  #: its metrics.jsonl
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)


def read_metrics(run_dir: str | os.PathLike) -> RunMetrics:
    """Read ``RUN_DIR/metrics.jsonl``.

    An unparseable *last* line is skipped: a run killed mid-write leaves one, and the resumed run
    removes it (:func:`moetrain.train.metrics.drop_records_after`). Anywhere else it is an error.

    Raises:
        PlotError: no such file, a bad line before the last, or no train or eval record at all.
    """
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file ({run} is not a run directory, or its run logged nothing yet)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records: dict[tuple[str, int], dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # torn last line
            raise PlotError(f"{path}: line {number} is not JSON (only a torn last line is skipped)") from None
        if isinstance(record, dict) and record.get("type") in ("train", "eval") and isinstance(record.get("step"), int):
            records[record["type"], record["step"]] = record  # a step logged twice (old resume): the last wins
    if not records:
        raise PlotError(f"{path}: no train or eval records ({'empty file' if not lines else 'nothing to plot'})")
    ordered = [records[key] for key in sorted(records, key=lambda k: k[1])]
    return RunMetrics(run.resolve().name, path, [r for r in ordered if r["type"] == "train"],
                      [r for r in ordered if r["type"] == "eval"])


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """Draw every figure of the runs into ``out_dir`` (created if needed).

    Returns:
        ``[(png path, note)]`` in the order written; ``note`` says why a figure has no data, else None.

    Raises:
        PlotError: see :func:`read_metrics`; ``out_dir`` is a file; a file of one of our names in
            ``out_dir`` that moetrain did not write; matplotlib is not installed. Nothing is
            written then.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is not installed (pip install 'matplotlib>=3.7')") from None
    runs = [read_metrics(d) for d in run_dirs]
    _unique_labels(runs, run_dirs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PlotError(f"--out {out} is a file; expected a directory")
    figures = _figures(runs)
    for name, _ in figures:
        if (out / name).exists() and not _written_by_us(out / name):
            raise PlotError(f"{out / name} exists and was not written by moetrain plot; move it away or "
                            "choose another --out (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in figures:
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        note = draw(fig)
        tmp = out / f".{name}.tmp"  # a killed plot never leaves a half PNG under our name
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": SOFTWARE})
        os.replace(tmp, out / name)
        written.append((out / name, note))
    return written


def plot_after_training(run_dir: Path) -> None:
    """``train.plot``: the figures into ``<run dir>/plots/``, one line either way.

    A figure is never worth a failed run: any error (matplotlib missing, a bug in a figure)
    becomes one warning line, and ``moetrain plot RUN_DIR`` can redraw later.
    """
    try:
        written = plot_runs([run_dir], run_dir / "plots")
    except Exception as err:  # noqa: BLE001 - deliberate: training has finished and must report success
        kind = "" if isinstance(err, UserError) else f"{type(err).__name__}: "
        print(f"moetrain: warning: no plots: {kind}{err}", flush=True)
        return
    print(f"  plots        {run_dir / 'plots'} ({len(written)} PNG figures)", flush=True)


# -- what is drawn ---------------------------------------------------------------------------


def _figures(runs: list[RunMetrics]) -> list[tuple[str, Callable[[Any], str | None]]]:
    """``(file name, draw(fig) -> note)`` for every figure, decided before anything is written."""
    figures = [
        ("loss.png", partial(_curves, runs=runs, series=[("train", "loss"), ("eval", "loss")], title="loss")),
        ("eval_metrics.png", partial(_eval_metrics, runs=runs)),
        ("lr.png", partial(_curves, runs=runs, series=[("train", "lr")], title="learning rate")),
        ("tokens_per_second.png", partial(_curves, runs=runs, series=[("train", "tokens_per_second")],
                                          title="training throughput (tokens/s, all ranks)")),
    ]
    for run in runs:
        prefix = "" if len(runs) == 1 else f"{_safe(run.label)}_"
        layers = _expert_loads(run)
        if not layers:
            figures.append((f"{prefix}expert_load.png",
                            partial(_say, text=f"{run.label}: no MoE layer in the train records of metrics.jsonl")))
        for layer, (steps, loads, dead) in layers.items():
            figures.append((f"{prefix}expert_load_{_safe(layer)}.png",
                            partial(_heatmap, label=run.label, layer=layer, steps=steps, loads=loads, dead=dead)))
    return figures


def _curves(fig, runs: list[RunMetrics], series: list[tuple[str, str]], title: str) -> str | None:
    """One axis: ``series`` (record type, key) of every run against the step."""
    ax = fig.add_subplot()
    drawn = 0
    for colour, run in enumerate(runs):
        for kind, key in series:
            steps, values = _points(getattr(run, kind), key)
            if not steps:
                continue
            label = run.label if len(series) == 1 else f"{run.label} {kind}"
            style = {"linestyle": "--", "marker": "o", "markersize": 3} if kind == "eval" else {}
            ax.plot(steps, values, color=f"C{colour % 10}", label=label, **style)
            drawn += 1
    if not drawn:
        wanted = " or ".join(f"{kind} {key}" for kind, key in series)
        return _say(fig, f"no {wanted} values in metrics.jsonl", ax)
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return None


def _eval_metrics(fig, runs: list[RunMetrics]) -> str | None:
    """One panel per numeric eval key other than the loss (which ``loss.png`` shows)."""
    keys: list[str] = []
    for run in runs:
        for record in run.eval:
            keys += [k for k, v in record.items() if k not in ("type", "step", "loss") and _number(v) and k not in keys]
    if not keys:
        if not any(run.eval for run in runs):
            return _say(fig, "no eval records in metrics.jsonl (no evaluation has run yet)")
        return _say(fig, "the eval records hold no metric besides the loss")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig.set_size_inches(4.2 * cols, 3.2 * rows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for colour, run in enumerate(runs):
            steps, values = _points(run.eval, key)
            if steps:
                ax.plot(steps, values, color=f"C{colour % 10}", marker="o", markersize=3, label=run.label)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 and i == 0:
            ax.legend(fontsize="small")
    fig.suptitle("evaluation")
    return None


def _heatmap(fig, label: str, layer: str, steps: list[int], loads, dead: int | None) -> None:
    """Experts (rows) x logged steps (columns); colour = share of the layer's routes."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 2.5
    experts = np.arange(loads.shape[1])
    # nearest: each cell is centred on its step, so uneven steps (a short last window) stay true.
    mesh = ax.pcolormesh(np.asarray(steps), experts, loads.T, shading="nearest", cmap="viridis", vmin=0.0)
    fig.colorbar(mesh, ax=ax, label=f"load fraction (uniform = 1/{loads.shape[1]})")
    note = "" if dead is None else f"; dead experts in the last window: {dead}"
    ax.set(title=f"{label}: expert load, {layer}{note}", xlabel="step", ylabel="expert")
    if loads.shape[1] <= 32:
        ax.set_yticks(experts)
    return None


def _say(fig, text: str, ax=None) -> str:
    """The no-data figure: ``text`` centred on an empty axis. Returns ``text`` as the note."""
    ax = ax if ax is not None else fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_axis_off()
    return text


# -- from records to arrays ------------------------------------------------------------------


def _expert_loads(run: RunMetrics) -> dict[str, tuple[list[int], Any, int | None]]:
    """Layer name -> (steps, ``[steps, experts]`` load fractions, dead experts in the last window).

    Records written before ``dead_experts`` existed count experts at load 0 instead.
    """
    import numpy as np

    per_layer: dict[str, tuple[list[int], list[list[float]], list]] = {}
    for record in run.train:
        for i, layer in enumerate(record.get("moe") or []):
            load = layer.get("load") or []
            if not load:
                continue
            steps, rows, dead = per_layer.setdefault(layer.get("layer", f"layer_{i}"), ([], [], []))
            steps.append(record["step"])
            rows.append(load)
            dead.append(layer.get("dead_experts", sum(1 for x in load if x == 0)))
    result = {}
    for name, (steps, rows, dead) in per_layer.items():
        loads = np.full((len(rows), max(len(r) for r in rows)), np.nan)  # NaN: an expert count that changed
        for j, row in enumerate(rows):
            loads[j, :len(row)] = row
        result[name] = (steps, loads, dead[-1])
    return result


def _points(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if _number(r.get(key))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _safe(name: str) -> str:
    """A layer or run name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def _unique_labels(runs: list[RunMetrics], run_dirs: list) -> None:
    """Two run directories of the same name (``a/run``, ``b/run``) are labelled by their paths."""
    names = [run.label for run in runs]
    for run, given in zip(runs, run_dirs):
        if names.count(run.label) > 1:
            run.label = str(given).rstrip("/")
    paths = [run.path.resolve() for run in runs]
    twice = next((run.path.parent for run, path in zip(runs, paths) if paths.count(path) > 1), None)
    if twice is not None:
        raise PlotError(f"{twice} is given twice; name each run directory once")


def _written_by_us(path: Path) -> bool:
    """A PNG whose ``Software`` text chunk is :data:`SOFTWARE`."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") == SOFTWARE
    except OSError:  # not an image at all (PIL's UnidentifiedImageError is an OSError)
        return False
