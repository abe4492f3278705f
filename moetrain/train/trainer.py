"""The training loop: DeepSpeed engine, gradient accumulation, logging, evaluation, checkpoints.

    from moetrain.train.trainer import train
    state = train(cfg, out_dir)          # cfg: RunConfig; any launcher, or one plain process

Setup (:func:`setup`) runs in this order, because expert placement depends on the rank:
process group -> task -> model (``task.build_model(ep_size)``) -> engine -> resume.
The loop (:func:`train`) then repeats ``grad_accum_steps`` micro-batches per optimizer step.

Two rules keep multi-rank runs from hanging or drifting:

* every rank runs the same number of MoE forwards: a rank whose batches ran out replays its
  last batch with loss weight 0 until every rank is out (the all-to-all needs all ranks);
* routing noise is keyed by the micro-batch counter (``set_routing_step``), never by RNG
  state, so a resumed run and a run at another EP size route exactly alike.

SIGTERM (SLURM preemption or time limit, ``kill``) on any rank ends the run after the current
step with a checkpoint: the request travels to every rank in the all-reduce each micro-batch
already makes, so all ranks stop at the same step. The returned state's ``stopped_by`` is then
``"SIGTERM"`` and ``moetrain train`` exits with 143, so a scheduler can tell it from a finished run.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from moetrain.config import RunConfig
from moetrain.models.compile import compile_blocks
from moetrain.moe import moe_layers, set_routing_step, update_selection_bias
from moetrain.tasks import Task, build_task
from moetrain.utils import cpu_share

from moetrain.checkpoint_format import TrainerState, resolve_resume

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, build_engine, init_distributed
from .grad_quality import GradQualityProbe
from .metrics import MetricsLogger, WindowStats, flops_per_token, peak_flops
from .optim import clip_stage0_gradients
from .plots import plot_after_training

__all__ = ["train", "setup", "Run"]


@dataclass
class Run:
    """Everything :func:`setup` builds for the loop."""

    cfg: RunConfig
    out_dir: Path
    info: DistInfo
    task: Task
    engine: Any  # deepspeed.DeepSpeedEngine
    state: TrainerState
    logger: MetricsLogger

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints"


def train(cfg: RunConfig, out_dir: str | Path, task: Task | None = None, *, save: bool = True) -> TrainerState:
    """Train until ``train.max_steps`` (or until every rank's data runs out).

    Args:
        cfg: the run config (``train`` and ``parallel`` drive the engine).
        out_dir: run directory: metrics.jsonl, tensorboard/, checkpoints/.
        task: a task object; default ``build_task(cfg, out_dir)``.
        save: write checkpoints and (``train.plot``) plots; False for benchmarks.

    Returns:
        The final :class:`TrainerState` (step, data position, best metric).
    """
    run = setup(cfg, Path(out_dir), task)
    t, engine, state = cfg.train, run.engine, run.state
    clock = TrainingClock(state.train_seconds, t.max_minutes)
    if clock.budget is not None and state.train_seconds >= clock.budget:
        # Resumed after the budget ran out (a rerun of a finished recipe): training one more step
        # would write a checkpoint past the promise "the model t.max_minutes buy". Same on every
        # rank: the spent seconds come from the checkpoint, not from this process's clock.
        run.logger.message(f"moetrain: time budget train.max_minutes={t.max_minutes:g} was already spent at "
                           f"step {state.step} ({state.train_seconds / 60:.1f} min); nothing trained, "
                           f"nothing written. Raise train.max_minutes to train on.")
        run.logger.close()
        return state
    batches = MicroBatches(run.task, run.info, state.data_position, engine.device, clock)
    window, flops = WindowStats(), flops_per_token(engine.module)
    saved, own = None, set()  # own: checkpoints this run wrote (pruning leaves newer ones of earlier runs alone)
    lr, grad_norm = engine.get_lr()[0], None
    probe = GradQualityProbe(cfg, engine.module, run.info.is_main, run.logger)  # train.grad_quality_every
    engine.train()
    with _stop_on_sigterm(batches):
        while state.step < t.max_steps and not (batches.exhausted or batches.stopping or batches.out_of_time):
            logging = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
            for _ in range(t.grad_accum_steps):
                batch, weight = batches.next()
                if batch is None:
                    break  # no rank has data left
                set_routing_step(engine.module, state.data_position, optimizer_step=state.step, count_loads=bool(weight))
                with probe.watch(state.step + 1, weight):
                    out = run.task.loss(engine, batch)
                    engine.backward(out.loss if weight else out.loss * 0.0)
                lr = engine.get_lr()[0]
                if not engine.zero_optimization() and engine.is_gradient_accumulation_boundary() \
                        and (logging or t.grad_clip > 0):
                    grad_norm = clip_stage0_gradients(engine.module, t.grad_clip)  # DeepSpeed's is wrong under EP
                engine.step()
                state.data_position += 1
                if weight:
                    window.add(out, out.num_samples)
            else:
                update_selection_bias(engine.module)  # the optimizer stepped: aux-free balancing (no-op without)
                state.step += 1
                run.logger.advance(state.step)
                probe.log(state.step)
            state.train_seconds = clock.seconds()
            last = state.step >= t.max_steps or batches.exhausted or batches.stopping or batches.out_of_time
            if logging or last:
                _log(run, window, lr, grad_norm, flops)
            paused = time.perf_counter()
            is_best = _maybe_evaluate(run, last and not batches.stopping)  # a stop skips the final eval
            if save and ((t.save_every and state.step % t.save_every == 0) or last):
                saved = save_checkpoint(engine, run.checkpoints, state, cfg, run.info, keep_last=t.keep_last,
                                is_best=is_best, tokenizer_dir=run.task.tokenizer_dir, own=own)
            window.start += time.perf_counter() - paused  # throughput excludes eval and saves
            if logging:
                grad_norm = None
    if batches.out_of_time and not batches.stopping:
        run.logger.message(f"moetrain: time budget train.max_minutes={t.max_minutes:g} spent after step "
                           f"{state.step} ({state.train_seconds / 60:.1f} min; final evaluation and checkpoint done)")
    best = (f"; best {state.metric} {state.best_metric:.4g} at step {state.best_step}"
            if state.best_metric is not None else "")
    if batches.stopping:
        state.stopped_by = "SIGTERM"  # `moetrain train` exits with 143 (128 + SIGTERM), not 0
        headline = (f"moetrain: stopped at step {state.step} of {t.max_steps} by SIGTERM"
                    + (" (checkpoint saved; continue with --set train.resume=latest)" if saved is not None else ""))
    else:
        headline = f"moetrain: finished at step {state.step}{best}"
    run.logger.message(f"{headline}\n"
                       f"  metrics      {run.out_dir / 'metrics.jsonl'}\n"
                       f"  tensorboard  tensorboard --logdir {run.out_dir / 'tensorboard'}"
                       + (f"\n  checkpoint   {saved}" if saved is not None else ""))
    run.logger.close()
    if t.plot and save and run.info.is_main and not batches.stopping:  # a stopped run exits promptly
        plot_after_training(run.out_dir)  # never raises: a figure is not worth a failed run
    return state


def setup(cfg: RunConfig, out_dir: Path, task: Task | None = None) -> Run:
    """Process group, task, model, engine, resume; prints where the outputs go."""
    info = init_distributed(cfg.parallel.backend)
    if info.world_size % cfg.parallel.ep_size:
        raise ValueError(f"parallel.ep_size={cfg.parallel.ep_size} must divide the number of ranks ({info.world_size})")
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed(cfg.train.seed)  # same on every rank: identical dense initialisation
    task = task if task is not None else build_task(cfg, out_dir)
    model = task.build_model(ep_size=cfg.parallel.ep_size)
    if cfg.train.compile:
        compile_blocks(model)
    engine = build_engine(model, cfg.train, cfg.parallel, info)
    state = TrainerState(metric=task.best_metric, higher_is_better=task.higher_is_better)
    ckpt, exact = resolve_resume(cfg.train.resume, out_dir / "checkpoints"), False
    if ckpt is not None:
        state, exact = load_checkpoint(engine, ckpt, cfg, info)  # exact: each rank's RNG restored
    if not exact:
        _seed(cfg.train.seed * 1_000_003 + 7919 * info.rank + state.step)  # dropout differs per rank
    layers = set(moe_layers(model))
    names = [name for name, m in model.named_modules() if m in layers]
    budget = None if cfg.train.max_minutes is None else cfg.train.max_minutes * 60 - state.train_seconds
    logger = MetricsLogger(out_dir, info.is_main, cfg.train.max_steps, state.step, names, budget,
                           resumed=ckpt is not None)
    logger.message(f"moetrain: {info.world_size} rank(s), ep_size={cfg.parallel.ep_size}, "
                   f"ZeRO-{cfg.parallel.zero_stage}, {cfg.train.precision}, device {info.device}"
                   + (f"; resumed at step {state.step} from {ckpt}" if ckpt else ""))
    logger.message(f"moetrain: metrics {out_dir / 'metrics.jsonl'}; tensorboard --logdir "
                   f"{out_dir / 'tensorboard'}; checkpoints {out_dir / 'checkpoints'}")
    return Run(cfg, out_dir, info, task, engine, state, logger)


class TrainingClock:
    """Training time summed over resumed runs, against ``train.max_minutes``."""

    def __init__(self, seconds_before: float, max_minutes: float | None):
        self.start = time.monotonic() - seconds_before
        self.budget = None if max_minutes is None else max_minutes * 60.0

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def spent(self) -> bool:
        return self.budget is not None and self.seconds() >= self.budget


class MicroBatches:
    """This rank's micro-batches, kept in step with the other ranks.

    ``next()`` returns ``(batch, 1)`` normally and ``(None, 0)`` once every rank is out of data.
    A rank that is out of data, or whose task yields an empty filler batch, gets ``(last real
    batch, 0)``: replayed with loss weight 0, so its MoE collectives stay paired with the other
    ranks and every parameter still receives a (zero) gradient, which ZeRO's bucketed reduction
    needs on every rank (an empty batch can leave parameters such as position biases without one).
    One tiny all-reduce per micro-batch decides which; it also carries ``stop_requested`` (set by
    a signal on any rank) into ``stopping`` on every rank, and a spent time budget on any rank's
    clock into ``out_of_time`` on every rank (the step in progress still completes).
    """

    def __init__(self, task: Task, info: DistInfo, start: int, device: torch.device,
                 clock: TrainingClock | None = None):
        self.iterator: Iterator = iter(task.train_batches(info.rank, info.world_size, start))
        self.info, self.device = info, device
        self.last = None
        self.exhausted = False
        self.stop_requested = False  # this rank got SIGTERM
        self.stopping = False  # some rank got SIGTERM: finish the step, save, return
        self.clock = clock
        self.out_of_time = False  # some rank's clock passed train.max_minutes: finish, evaluate, save

    def next(self) -> tuple[dict | None, int]:
        batch = next(self.iterator, None)
        late = self.clock is not None and self.clock.spent()
        flags = torch.tensor([batch is not None, self.stop_requested, late], dtype=torch.long, device=self.device)
        if self.info.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        have_batch, stop, late = flags.tolist()
        self.stopping = self.stopping or bool(stop)
        self.out_of_time = self.out_of_time or bool(late)
        if not have_batch:
            self.exhausted = True
            return None, 0
        if batch is not None and (self.last is None or not _is_empty(batch)):
            self.last = _to_device(batch, self.device)
            return self.last, 1
        if self.last is None:
            raise RuntimeError(f"rank {self.info.rank} got no training batch while other ranks did; "
                               "task.train_batches must yield at least one batch on every rank")
        return self.last, 0


@contextlib.contextmanager
def _stop_on_sigterm(batches: MicroBatches):
    """While training, SIGTERM asks for a clean stop instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum, frame):
        batches.stop_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log(run: Run, window: WindowStats, lr: float, grad_norm: float | None, flops: float) -> None:
    """Reduce the window over ranks (collective) and write one train record on rank 0."""
    engine, info = run.engine, run.info
    seconds = max(time.perf_counter() - window.start, 1e-9)
    cpu_others = cpu_share.others_share(window.cpu, cpu_share.sample()) if info.world_size == 1 else None
    if grad_norm is None:
        norm = engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    merged = window.reduce(info.rank, info.world_size)
    window.reset()
    if merged is None:
        return
    tps = merged["tokens"] / seconds
    peak = peak_flops(info.device, run.cfg.train.precision)
    run.logger.log_train(run.state.step, {
        **merged["means"], "lr": lr, "tokens_per_second": tps, "samples_per_second": merged["samples"] / seconds,
        "grad_norm": grad_norm, "mfu": flops * tps / (peak * info.world_size) if peak else None,
        "tokens": merged["tokens"], "seconds": seconds, "data_position": run.state.data_position,
        **({} if cpu_others is None else {"cpu_others": cpu_others}), "moe": merged["moe"]})


def _maybe_evaluate(run: Run, last: bool) -> bool:
    """Evaluate when due; True when this step set a new best (its checkpoint becomes ``best``)."""
    every, state = run.cfg.train.eval_every, run.state
    if not (last or (every and state.step % every == 0)):
        return False
    run.engine.eval()
    with torch.no_grad():
        metrics = run.task.evaluate(run.engine.module, run.info.rank, run.info.world_size)
    run.engine.train()
    run.logger.log_eval(state.step, metrics)
    value = metrics.get(state.metric)
    if value is None or not math.isfinite(float(value)) or not state.improves(float(value)):
        return False
    state.best_metric, state.best_step = float(value), state.step
    return True


def _seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _is_empty(batch: Any) -> bool:
    """A filler batch: it holds tensors, and every one with a batch dimension has 0 rows."""
    rows = [v.shape[0] for v in (batch.values() if isinstance(batch, dict) else [])
            if torch.is_tensor(v) and v.ndim]
    return bool(rows) and not any(rows)
