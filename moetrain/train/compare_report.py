"""The report of ``moetrain compare``: one table row per estimator (mean ± std over seeds) and
curves with the seed spread, from each run's ``metrics.jsonl``.

    from moetrain.train.compare_report import write_report
    written = write_report(out_dir, {"switch": [run_dir, ...], "sparsemixer": [...]}, peak_rss)

Files written into the comparison directory (replaced on every call):

* ``report.md``: per estimator, final and best dev loss, final and best task metric, steps to
  reach the baseline's final dev loss and its ratio to the baseline's, tokens/s, peak RSS; then
  the same per run, with its training seconds and the CPU share other processes used meanwhile;
* ``train_loss.png``, ``dev_loss.png``, ``<metric>.png`` (``bleu.png``, ...): two panels each,
  against the optimizer step and against training seconds; one line per estimator = the mean
  over seeds, the band from the lowest to the highest seed;
* ``train_loss.csv``, ``dev_loss.csv``, ``<metric>.csv``: the numbers behind each figure, one row
  per (estimator, step): ``estimator, step, seconds, mean, std, min, max, seeds``.

Definitions (docs/compare.md says the same):

* *dev loss*: the ``loss`` of the eval records; *final* is the last evaluation, *best* the lowest.
* *task metric*: ``bleu`` when the eval records have it, else the first eval key that names an
  accuracy, F1 or correlation (higher is better for all of them); none otherwise ("n/a").
* *steps to baseline loss*: the baseline is the first estimator listed. For seed ``s`` the target
  is the baseline's final dev loss with seed ``s`` (same data order and initialisation: a paired
  comparison); a run reaches it at the first eval step whose loss is at or below the target,
  interpolated linearly between that eval point and the one before it (:func:`steps_to_reach`).
  The ratio is the estimator's mean steps over the baseline's (below 1: faster than the baseline).
* *seconds*: training time, the sum of the train records' ``seconds`` (each logging window,
  evaluation and checkpoint writes excluded), so the axis compares compute, not eval cost.
* *tokens/s*: the mean of the run's train records' ``tokens_per_second``.
* *CPU used by others*: the train records' ``cpu_others`` (single-process runs on Linux), weighted
  by each window's seconds: how much the machine was shared while the run's seconds were measured.
"""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moetrain.train.plots import RunMetrics, read_metrics

__all__ = ["steps_to_reach", "task_metric", "RunSummary", "summarize_run", "write_report", "SOFTWARE"]

#: The ``Software`` text chunk of the report's PNG files.
SOFTWARE = "moetrain compare"

#: Eval keys that name a higher-is-better task metric, after ``bleu`` (first match wins).
_METRIC_HINTS = ("accuracy", "f1", "matthews", "pearson", "spearman")


def steps_to_reach(evals: Sequence[dict[str, Any]], target: float, key: str = "loss") -> float | None:
    """The step at which ``key`` first falls to ``target`` or below, or None if it never does.

    Between the last eval point above the target and the first one at or below it, the step is
    interpolated linearly; when the very first evaluation is already at or below, its step.

    Args:
        evals: eval records (``step`` and ``key``), in step order.
        target: the loss to reach.
    """
    before = None
    for record in evals:
        value = record.get(key)
        if not _number(value):
            continue
        step, value = float(record["step"]), float(value)
        if value <= target:
            if before is None:
                return step
            (s0, v0) = before
            return s0 + (v0 - target) / (v0 - value) * (step - s0)  # v0 > target >= value: no division by 0
        before = (step, value)
    return None


def task_metric(runs: Sequence[RunMetrics]) -> str | None:
    """The eval key reported as the task metric: ``bleu``, else an accuracy/F1/correlation key."""
    keys: list[str] = []
    for run in runs:
        for record in run.eval:
            keys += [k for k, v in record.items() if _number(v) and k not in keys]
    if "bleu" in keys:
        return "bleu"
    for hint in _METRIC_HINTS:
        found = next((k for k in keys if hint in k.lower() and "baseline" not in k.lower()), None)
        if found is not None:
            return found
    return None


@dataclass
class RunSummary:
    """The figures of one run that the report's tables aggregate."""

    estimator: str
    seed: int
    run_dir: Path
    metrics: RunMetrics
    final_loss: float | None = None
    best_loss: float | None = None
    final_metric: float | None = None
    best_metric: float | None = None
    steps_to_baseline: float | None = None
    tokens_per_second: float | None = None
    peak_rss_mib: float | None = None
    train_seconds: float | None = None
    cpu_others: float | None = None
    last_step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def summarize_run(estimator: str, seed: int, run_dir: Path, metric: str | None,
                  peak_rss_mib: float | None = None) -> RunSummary:
    """Read one run's metrics.jsonl and compute its row (not yet ``steps_to_baseline``)."""
    m = read_metrics(run_dir)
    losses = [float(r["loss"]) for r in m.eval if _number(r.get("loss"))]
    scores = [float(r[metric]) for r in m.eval if metric and _number(r.get(metric))]
    tps = [float(r["tokens_per_second"]) for r in m.train if _number(r.get("tokens_per_second"))]
    windows = [float(r["seconds"]) for r in m.train if _number(r.get("seconds"))]
    steps = [r["step"] for r in m.train + m.eval]
    return RunSummary(estimator, seed, Path(run_dir), m,
                      final_loss=losses[-1] if losses else None, best_loss=min(losses) if losses else None,
                      final_metric=scores[-1] if scores else None, best_metric=max(scores) if scores else None,
                      tokens_per_second=statistics.fmean(tps) if tps else None, peak_rss_mib=peak_rss_mib,
                      train_seconds=sum(windows) if windows else None,
                      cpu_others=_cpu_others(m.train),
                      last_step=max(steps) if steps else 0)


def _cpu_others(train: list[dict[str, Any]]) -> float | None:
    """Other processes' CPU share over the run, each logging window weighted by its seconds;
    None for runs logged before ``cpu_others`` existed (or multi-rank runs, which do not log it)."""
    shared = [(float(r["seconds"]), float(r["cpu_others"])) for r in train
              if _number(r.get("seconds")) and _number(r.get("cpu_others"))]
    total = sum(seconds for seconds, _ in shared)
    return sum(seconds * share for seconds, share in shared) / total if total > 0 else None


def write_report(out_dir: Path, runs: dict[str, list[tuple[int, Path, float | None]]],
                 title: str = "") -> list[Path]:
    """Summarise the runs and write report.md, the CSVs and the PNGs into ``out_dir``.

    Args:
        out_dir: the comparison directory.
        runs: estimator -> ``[(seed, run dir, peak RSS in MiB or None)]``; the first estimator is
            the baseline of "steps to baseline loss".
        title: a line under the report's heading (the recipe and the overrides).

    Returns:
        The files written, report.md first.
    """
    summaries = {est: [summarize_run(est, seed, path, None, rss) for seed, path, rss in items]
                 for est, items in runs.items()}
    metric = task_metric([s.metrics for group in summaries.values() for s in group])
    if metric is not None:
        summaries = {est: [summarize_run(est, seed, path, metric, rss) for seed, path, rss in items]
                     for est, items in runs.items()}
    baseline = next(iter(summaries))
    targets = {s.seed: s.final_loss for s in summaries[baseline]}
    for group in summaries.values():
        for s in group:
            target = targets.get(s.seed)
            s.steps_to_baseline = None if target is None else steps_to_reach(s.metrics.eval, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.md"]
    _write_text(out_dir / "report.md", _markdown(summaries, baseline, metric, title))
    series = [("train_loss", "train", "loss", "train loss"), ("dev_loss", "eval", "loss", "dev loss")]
    if metric is not None:
        series.append((_safe(metric), "eval", metric, f"dev {metric}"))
    curves = {name: {est: _aggregate([(s.metrics, kind, key) for s in group]) for est, group in summaries.items()}
              for name, kind, key, _ in series}
    for name, _, _, _ in series:
        written.append(_write_csv(out_dir / f"{name}.csv", curves[name]))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("moetrain compare: warning: matplotlib is not installed; report.md and the CSVs are written, "
              "no figures (pip install 'matplotlib>=3.7')", flush=True)
        return written
    for name, _, _, label in series:
        written.append(_write_png(Figure, out_dir / f"{name}.png", curves[name], label))
    return written


# -- the tables --------------------------------------------------------------------------------


def _markdown(summaries: dict[str, list[RunSummary]], baseline: str, metric: str | None, title: str) -> str:
    m = metric or "task metric"
    base_steps = _mean([s.steps_to_baseline for s in summaries[baseline]])
    seeds = sorted({s.seed for group in summaries.values() for s in group})
    lines = ["# Estimator comparison", ""]
    if title:
        lines += [title, ""]
    lines += [f"Mean ± std over seeds {', '.join(map(str, seeds))}. Baseline: `{baseline}` (the first estimator); "
              f"*steps to baseline loss*: the step at which a run's dev loss first reaches the baseline's final dev "
              f"loss with the same seed (interpolated between evaluations), and its ratio to the baseline's. "
              f"Tokens/s: mean of the train records. Peak RSS: host memory of the training process "
              f"(`getrusage` of the child; GPU memory is not included), the highest over its attempts.", ""]
    if metric is None:
        lines += ["The eval records hold no task metric besides the loss (no `bleu`, accuracy or F1 key).", ""]
    head = ["estimator", "runs", "final dev loss", "best dev loss", f"final {m}", f"best {m}",
            "steps to baseline loss", "ratio to baseline", "tokens/s", "peak RSS (MiB)"]
    lines += [_row(head)[0], _row(["---"] * len(head))[0]]
    for est, group in summaries.items():
        reached = [s.steps_to_baseline for s in group if s.steps_to_baseline is not None]
        if not reached:
            steps, ratio = "not reached", "n/a"
        else:
            steps = _pm(reached, 1) + ("" if len(reached) == len(group) else f" ({len(reached)} of {len(group)} seeds; "
                                                                               f"not reached by the others)")
            ratio = f"{statistics.fmean(reached) / base_steps:.2f}" if base_steps else "n/a"
        lines += _row([f"`{est}`", str(len(group)), _pm([s.final_loss for s in group]),
                       _pm([s.best_loss for s in group]), _pm([s.final_metric for s in group]),
                       _pm([s.best_metric for s in group]), steps, ratio,
                       _pm([s.tokens_per_second for s in group], 0), _pm([s.peak_rss_mib for s in group], 0)])
    lines += ["", "## Runs", ""]
    head = ["run", "last step", "final dev loss", "best dev loss", f"final {m}", f"best {m}",
            "steps to baseline loss", "tokens/s", "train seconds", "CPU used by others", "peak RSS (MiB)"]
    lines += [_row(head)[0], _row(["---"] * len(head))[0]]
    for group in summaries.values():
        for s in group:
            lines += _row([f"`{s.run_dir.name}`", str(s.last_step), _fmt(s.final_loss), _fmt(s.best_loss),
                           _fmt(s.final_metric), _fmt(s.best_metric),
                           "not reached" if s.steps_to_baseline is None else _fmt(s.steps_to_baseline, 1),
                           _fmt(s.tokens_per_second, 0), _fmt(s.train_seconds, 1),
                           "n/a" if s.cpu_others is None else f"{s.cpu_others:.1%}", _fmt(s.peak_rss_mib, 0)])
    lines += ["", "*Train seconds*: the logging windows' seconds summed (evaluation and checkpoints excluded). "
              "*CPU used by others*: the share of the machine's CPUs that other processes used while the run "
              "trained (train records' `cpu_others`); above a few percent the run's seconds and tokens/s "
              "measure the machine's load as much as the estimator."]
    lines += ["", "Figures (mean over seeds, band = lowest to highest seed; against the step and against training "
              "seconds, evaluation excluded) and the CSV behind each: "
              + ", ".join(f"`{n}.png`" for n in ["train_loss", "dev_loss"] + ([_safe(metric)] if metric else [])), ""]
    return "\n".join(lines)


def _row(cells: list[str]) -> list[str]:
    return ["| " + " | ".join(cells) + " |"]


def _pm(values: list[float | None], digits: int = 4) -> str:
    """``mean ± std`` of the values that exist (std over 2 or more), ``n/a`` without any."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return "n/a"
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(statistics.stdev(xs), min(digits, 2))}"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if digits < 2 else f"{value:.{digits}g}"


def _mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.fmean(xs) if xs else None


# -- the curves ------------------------------------------------------------------------------


@dataclass
class Curve:
    """One estimator's curve: per step, the seconds (mean over seeds) and the values' spread."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


def _aggregate(sources: list[tuple[RunMetrics, str, str]]) -> Curve:
    """Mean, std, min and max over the seeds at every step some seed has a value for."""
    per_step: dict[int, list[tuple[float, float]]] = {}
    for run, kind, key in sources:
        clock = _training_seconds(run)
        for record in getattr(run, kind):
            if _number(record.get(key)):
                per_step.setdefault(record["step"], []).append((float(record[key]), clock(record["step"])))
    curve = Curve()
    for step in sorted(per_step):
        values = [v for v, _ in per_step[step]]
        curve.steps.append(step)
        curve.seconds.append(statistics.fmean(t for _, t in per_step[step]))
        curve.mean.append(statistics.fmean(values))
        curve.std.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        curve.low.append(min(values))
        curve.high.append(max(values))
        curve.seeds.append(len(values))
    return curve


def _training_seconds(run: RunMetrics):
    """step -> training seconds at the end of that step: the running sum of the train records'
    ``seconds``, linear between logged steps (an eval step that was not logged, a resumed run)."""
    points = [(0, 0.0)]
    total = 0.0
    for record in run.train:
        if _number(record.get("seconds")):
            total += float(record["seconds"])
            points.append((record["step"], total))

    def at(step: int) -> float:
        for (s0, t0), (s1, t1) in zip(points, points[1:]):
            if s0 <= step <= s1:
                return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
        return points[-1][1]

    return at


def _write_csv(path: Path, curves: dict[str, Curve]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["estimator", "step", "seconds", "mean", "std", "min", "max", "seeds"])
        for est, c in curves.items():
            for row in zip(c.steps, c.seconds, c.mean, c.std, c.low, c.high, c.seeds):
                writer.writerow([est, row[0], *(f"{x:.6g}" for x in row[1:6]), row[6]])
    os.replace(tmp, path)
    return path


def _write_png(Figure, path: Path, curves: dict[str, Curve], label: str) -> Path:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, xkey, xlabel in ((axes[0], "steps", "step"), (axes[1], "seconds", "training seconds (eval excluded)")):
        for colour, (est, c) in enumerate(curves.items()):
            if not c.steps:
                continue
            x = getattr(c, xkey)
            style = {"marker": "o", "markersize": 3} if len(c.steps) < 30 else {}
            ax.plot(x, c.mean, color=f"C{colour % 10}", label=est, **style)
            ax.fill_between(x, c.low, c.high, color=f"C{colour % 10}", alpha=0.2, linewidth=0)
        ax.set(xlabel=xlabel, title=f"{label} vs {xkey}")
        if xkey == "steps":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if any(c.steps for c in curves.values()):
        axes[0].legend(fontsize="small")
    else:
        axes[0].text(0.5, 0.5, f"no {label} values in the runs' metrics.jsonl", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.suptitle(f"{label}: mean over seeds, band = lowest to highest seed")
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": SOFTWARE})
    os.replace(tmp, path)
    return path


# -- helpers ---------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "metric"
