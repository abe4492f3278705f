"""``moetrain compare CONFIG --estimators switch,sparsemixer [--seeds N] [--set ...] [--out DIR]``:
the same recipe once per (estimator, seed), then a report (issue 15, the estimator research harness).

    moetrain compare configs/tiny.yaml --estimators switch,sparsemixer --seeds 3
    # -> runs/compare-tiny/{switch,sparsemixer}-seed{1,2,3}/ (each a normal run directory),
    #    runs/compare-tiny/report.md, *.png, *.csv

Each run is ``moetrain train CONFIG --output-dir DIR/<estimator>-seed<N> --set <the --set list>
moe.estimator=<estimator> train.seed=<N> [moe.top_k=K] train.resume=latest``. The seeds are the
recipe's ``train.seed`` (after ``--set``) and the next ``--seeds - 1`` integers. An estimator
defined for another ``moe.top_k`` (``sparsemixer_v2``: 2, ``topk``: at least 2, the top-1
estimators: 1) gets it, with a printed note. ``--print-commands`` prints these lines (for a cluster
scheduler) and runs nothing; rerunning ``compare`` afterwards finds the runs finished and writes
the report.

Runs go one after another, each in a child process (``python -m moetrain.cli train``), not through
:func:`moetrain.train.trainer.train` in this process, because:

* the trainer initialises ``torch.distributed`` (environment variables, a store on a port) and a
  DeepSpeed engine, and keeps SIGTERM handling, RNG state and CUDA memory for the whole process;
  a fresh process per run starts each one clean, so run 2 cannot inherit anything from run 1;
* ``os.wait4`` gives each child's own peak RSS (``getrusage(RUSAGE_CHILDREN)`` would give the
  largest over all children so far), which the report shows;
* a run is then exactly the launch line ``--print-commands`` prints, with ``train``'s checks, run
  lock and ``config.yaml``.

The child gets the environment without the launcher variables (``RANK``, ``MASTER_PORT``, ...).
SIGTERM to ``compare`` is passed to the running child, which saves a checkpoint and exits 143;
``compare`` then starts nothing more and exits 143 too.

**Resuming.** Rerunning the same command skips finished runs and continues the others (every run
has ``train.resume=latest``, so a run with a checkpoint resumes and one without starts afresh). A
run is finished when its ``config.yaml`` is this run's config (``train.resume`` aside) and either
its latest checkpoint reached ``train.max_steps`` (or spent ``train.max_minutes``), or compare
recorded that the child exited 0 (``compare_status.json``, which also covers a run whose data ran
out). Raising ``train.max_steps`` or ``train.max_minutes`` continues finished runs; any other
change to an existing run's config is refused before anything runs (use another ``--out``).

**What the runs of one seed share** (checked by tests/test_compare.py): the dense initialisation
(every parameter besides the estimator's own, e.g. SparseMixer's ``omega``, which starts at 1, is
identical: the trainer seeds the global RNG with ``train.seed`` before building the model and the
experts draw from generators keyed by (seed, layer, expert)), the data order (the batcher is seeded
by ``train.seed``), and the keys of the routing noise (``(seed, micro-batch, layer, token)``). What
cannot be shared: how an estimator *uses* its noise (jitter, Gumbel, sampling), so the routing
differs from the first step on; a different ``moe.top_k`` (``sparsemixer_v2``, ``topk``) changes
the compute per token; and dropout masks, drawn from the global RNG that starts identically but
drifts once estimators consume different random numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moetrain.config import _BUILTIN_ESTIMATORS, ConfigError, RunConfig, config_to_yaml, known_estimators, load_config
from moetrain.utils.argtypes import at_least
from moetrain.utils.atomic import write_text_synced
from moetrain.utils.errors import UserError
from moetrain.utils.net import child_env

__all__ = ["add_compare_arguments", "main_compare", "plan_runs", "PlannedRun", "run_finished", "STATUS"]

#: Written into a run directory by compare after each attempt (exit code, step, peak RSS).
STATUS = "compare_status.json"
#: Config keys a rerun may change on runs that exist: they extend or re-schedule a run, not redo it.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_minutes", "train.resume", "train.save_every", "train.keep_last",
                     "train.plot", "train.eval_every", "train.log_every", "export.after_train", "export.out_dir")
#: Environment variables of a launcher; a child that inherited them would join the parent's group.
EXIT_STOPPED = 143


class CompareError(UserError, ValueError):
    """A bad ``compare`` request, or a run that failed (finished runs are kept)."""


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG --estimators A,B [--seeds N] [--set ...] [--out DIR] [--print-commands]``."""
    parser.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("--estimators", metavar="A,B,...", required=True,
                        help="comma-separated moe.estimator names; the first is the baseline of the report")
    parser.add_argument("--seeds", metavar="N", type=at_least(1), default=1,
                        help="runs per estimator, with train.seed = the recipe's seed, +1, ... (default 1)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
        help="override config values of every run, e.g. --set train.max_steps=2000 (not moe.estimator)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="comparison directory (default: runs/compare-<config stem>); one run directory "
                             "per (estimator, seed) in it, plus report.md, PNG figures and CSVs")
    parser.add_argument("--print-commands", action="store_true",
                        help="print one `moetrain train` line per run (for a scheduler) and run nothing")


@dataclass
class PlannedRun:
    """One (estimator, seed) run: where it goes and the overrides that make it."""

    estimator: str
    seed: int
    run_dir: Path
    overrides: list[str]
    cfg: RunConfig
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.name

    def argv(self, config: str) -> list[str]:
        """``train`` arguments of this run (after the program name)."""
        return ["train", config, "--output-dir", str(self.run_dir), "--set", *self.overrides]


def main_compare(args: argparse.Namespace) -> int:
    """Plan and check every run, then run them one by one, then write the report."""
    out = Path(args.out) if args.out else Path("runs") / f"compare-{Path(args.config).stem}"
    runs = plan_runs(args.config, args.estimators, args.seeds, args.overrides, out)
    for note in dict.fromkeys(n for run in runs for n in run.notes):  # stderr: stdout may feed a scheduler
        print(f"moetrain compare: note: {note}", file=sys.stderr, flush=True)
    if args.print_commands:
        for run in runs:
            print(shlex.join(["moetrain", *run.argv(args.config)]))
        return 0
    states = {run.name: run_finished(run.run_dir, run.cfg) for run in runs}  # refuses a changed config first
    out.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs, 1):
        label = f"moetrain compare: [{i}/{len(runs)}] {run.name}"
        if states[run.name]:
            print(f"{label}: skip, finished ({states[run.name]})", flush=True)
            continue
        resuming = (run.run_dir / "checkpoints" / "latest").exists()
        print(f"{label}: {'resume from its latest checkpoint' if resuming else 'train'}", flush=True)
        code = _run_child(run, args.config)
        if code == EXIT_STOPPED:
            print(f"moetrain compare: stopped by SIGTERM during {run.name} (checkpoint saved); rerun the same "
                  f"command to continue", flush=True)
            return EXIT_STOPPED
        if code != 0:
            raise CompareError(f"run {run.run_dir} exited with code {code} (its output is above); the finished runs "
                               f"are kept, and rerunning the same command continues from there")
    return _report(out, runs, args)


def plan_runs(config: str, estimators: str, seeds: int, overrides: list[str], out: Path) -> list[PlannedRun]:
    """Every run's directory and overrides, each config loaded and validated (nothing is created).

    Raises:
        CompareError: no or unknown or repeated estimators, ``--seeds`` below 1, ``moe.estimator``
            in ``--set``, ``--out`` a file.
        ConfigError: the recipe or an override is invalid for some run.
    """
    names = [n.strip() for n in estimators.split(",") if n.strip()]
    if not names:
        raise CompareError("--estimators: give at least one estimator, e.g. --estimators switch,sparsemixer")
    # Built-in names need no registry import (torch and DeepSpeed, whose import prints a line on
    # stdout, which --print-commands keeps for the launch lines).
    if any(n not in _BUILTIN_ESTIMATORS for n in names):
        known = known_estimators()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CompareError(f"--estimators: unknown estimator '{unknown[0]}'; known: {', '.join(known)}")
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise CompareError(f"--estimators: '{twice}' is listed twice")
    if seeds < 1:
        raise CompareError(f"--seeds: must be at least 1, got {seeds}")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in ("moe.estimator", "train.resume"):
            raise CompareError(f"--set {text}: compare sets {key} for every run itself "
                               + ("(list the estimators in --estimators)" if key == "moe.estimator" else
                                  "(train.resume=latest: reruns continue interrupted runs)"))
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: is a file, not a directory")
    base = _base_config(config, overrides, names)
    plan = []
    for name in names:
        extra, notes = _top_k_for(name, base.moe.top_k)
        for seed in range(base.train.seed, base.train.seed + seeds):
            run_overrides = [*overrides, f"moe.estimator={name}", f"train.seed={seed}", *extra, "train.resume=latest"]
            try:
                cfg = load_config(config, run_overrides)
            except ConfigError as err:
                raise ConfigError(f"estimator {name}, seed {seed}: {err}") from None
            plan.append(PlannedRun(name, seed, out / f"{name}-seed{seed}", run_overrides, cfg, notes))
    _preflight(config, plan)
    return plan


def _base_config(config: str, overrides: list[str], names: list[str]) -> RunConfig:
    """The recipe with ``--set`` applied: its seed and ``moe.top_k``. A ``--set moe.top_k=2`` that
    the recipe's own estimator rejects is fine when a compared estimator takes it."""
    try:
        return load_config(config, overrides)
    except ConfigError as first:
        for name in names:
            with contextlib.suppress(ConfigError):
                return load_config(config, [*overrides, f"moe.estimator={name}"])
        raise first from None


def _top_k_for(estimator: str, top_k: int) -> tuple[list[str], list[str]]:
    """The ``moe.top_k`` override an estimator needs (with its note), or nothing."""
    need = _BUILTIN_ESTIMATORS.get(estimator)
    if estimator == "topk" and top_k < 2:
        need = 2
    if need is None or need == top_k:
        return [], []
    needs = "needs moe.top_k >= 2" if estimator == "topk" else f"is defined for moe.top_k={need}"
    return [f"moe.top_k={need}"], [f"{estimator} {needs}: its runs set moe.top_k={need} (the recipe has {top_k}), "
                                   f"so they compute {need} expert(s) per token"]


def _preflight(config: str, plan: list[PlannedRun]) -> None:
    """``train``'s checks of each run (input files, ranks, precision, a dangling ``latest``)."""
    from moetrain.commands.common import preflight

    for run in plan:
        preflight(run.cfg, argparse.Namespace(config=config, output_dir=str(run.run_dir)), "train")


# -- finished or not ----------------------------------------------------------------------------


def run_finished(run_dir: Path, cfg: RunConfig) -> str | None:
    """Why the run in ``run_dir`` needs no more training, or None (absent, interrupted, extended).

    Raises:
        CompareError: ``run_dir`` holds a run of another config (beyond :data:`RESUMABLE_CHANGES`).
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    want, have = _flat(yaml.safe_load(config_to_yaml(cfg))), _flat(yaml.safe_load(saved.read_text(encoding="utf-8")))
    # A key newer than the saved run is no change when it holds its default: the run was trained
    # with the behaviour the default keeps (e.g. train.compile added after a comparison started).
    defaults = _flat(yaml.safe_load(config_to_yaml(RunConfig())))
    have = {**{k: defaults[k] for k in want.keys() - have.keys() if k in defaults}, **have}
    changed = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    if refused:
        shown = "; ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in refused[:3])
        raise CompareError(f"{run_dir} holds a run of another config ({shown}{'; ...' if len(refused) > 3 else ''});"
                           f" nothing was run: use another --out, or remove that run directory")
    if [k for k in changed if k != "train.resume"]:
        return None  # e.g. more steps: resume
    state = _latest_state(run_dir)
    t = cfg.train
    if state is not None:
        if state.step >= t.max_steps:
            return f"step {state.step} of {t.max_steps}"
        if t.max_minutes is not None and state.train_seconds >= t.max_minutes * 60:
            return f"time budget train.max_minutes={t.max_minutes:g} spent at step {state.step}"
    status = _read_status(run_dir)
    if status.get("exit_code") == 0 and status.get("config") == want:
        return f"exited 0 at step {status.get('step')}"
    return None


def _latest_state(run_dir: Path) -> "TrainerState | None":
    from moetrain.checkpoint_format import TrainerState, resolve_resume

    try:
        ckpt = resolve_resume("latest", run_dir / "checkpoints")
        return None if ckpt is None else TrainerState.from_json(ckpt / "trainer_state.json")
    except (OSError, ValueError, UserError):
        return None


def _read_status(run_dir: Path) -> dict[str, Any]:
    try:
        status = json.loads((run_dir / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# -- one run ------------------------------------------------------------------------------------


def _run_child(run: PlannedRun, config: str) -> int:
    """Train one run in a child process; record its exit code, step and peak RSS; return the code."""
    import subprocess

    env = child_env()
    child = subprocess.Popen([sys.executable, "-m", "moetrain.cli", *run.argv(config)], env=env)
    start = time.monotonic()
    with _forward_sigterm(child):
        while True:
            try:
                _, status, usage = os.wait4(child.pid, 0)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for old kernels
                continue
    child.returncode = code = os.waitstatus_to_exitcode(status)
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention
    previous = _read_status(run.run_dir)
    rss = usage.ru_maxrss / 1024  # KiB on Linux
    state = _latest_state(run.run_dir)
    record = {"exit_code": code, "step": state and state.step, "max_steps": run.cfg.train.max_steps,
              "train_seconds": state and state.train_seconds, "wall_seconds": round(time.monotonic() - start, 1),
              "peak_rss_mib": max(rss, previous.get("peak_rss_mib") or 0.0),
              "attempts": int(previous.get("attempts", 0)) + 1, "command": ["moetrain", *run.argv(config)],
              "config": _flat(yaml.safe_load(config_to_yaml(run.cfg)))}
    if run.run_dir.is_dir():
        write_text_synced(run.run_dir / STATUS, json.dumps(record, indent=1) + "\n")
    return code


@contextlib.contextmanager
def _forward_sigterm(child):
    """SIGTERM to compare goes on to the child (it checkpoints and exits 143)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the report ---------------------------------------------------------------------------------


def _report(out: Path, runs: list[PlannedRun], args: argparse.Namespace) -> int:
    from moetrain.train.compare_report import write_report

    groups: dict[str, list[tuple[int, Path, float | None]]] = {}
    for run in runs:
        rss = _read_status(run.run_dir).get("peak_rss_mib")
        groups.setdefault(run.estimator, []).append((run.seed, run.run_dir, rss))
    title = f"Recipe `{args.config}`" + (f", `--set {' '.join(args.overrides)}`" if args.overrides else "") + "."
    written = write_report(out, groups, title)
    print(f"moetrain compare: report {written[0]}")
    for path in written[1:]:
        print(f"  {path}")
    return 0
