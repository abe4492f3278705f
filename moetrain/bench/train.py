"""``moetrain bench train``: training throughput on one rank and with expert parallelism on two.

    moetrain bench train --config configs/tiny.yaml [--set key=value ...] [--steps 20] [--warmup 5]
    python -m moetrain.bench.train --config configs/tiny.yaml          # the same

Both runs use the recipe's model and per-rank batch (``data.max_tokens``): one process with
``ep_size=1``, then two processes (torchrun) with ``ep_size=2``, each through the real trainer
(``moetrain.train.trainer.train``; no evaluation, no checkpoints). Throughput is measured over
the steps after the warm-up and printed side by side with the scaling ratio
``tokens/s (EP=2, 2 ranks) / tokens/s (1 rank)``.

On a CPU the two runs share the machine's cores by default (the single rank gets them all, each
of the two ranks half), so the ratio measures the parallel overhead at equal hardware: 1.0 is the
ideal. With ``--threads-per-rank 1`` (or on GPUs, one device per rank) the EP run has twice the
hardware and the ideal is 2.0. Two ranks need two GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from moetrain.bench.train_options import add_arguments  # for ``python -m moetrain.bench.train``
from moetrain.utils.net import child_env, free_port

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    import torch

    from moetrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # fail fast on a bad recipe
    zero = max(cfg.parallel.zero_stage, 1)  # EP needs ZeRO 1/2; the single rank uses the same stage
    gpus = torch.cuda.device_count()
    cores = os.cpu_count() or 2
    settings = [("single rank", 1, 1), ("expert parallel", 2, 2)]
    scratch = None if args.keep else tempfile.TemporaryDirectory(prefix="moetrain-bench-")
    root = Path(args.keep) if args.keep else Path(scratch.name)
    rows = []
    for label, ranks, ep in settings:
        if gpus and gpus < ranks:
            print(f"moetrain bench train: {label} needs {ranks} GPUs, {gpus} visible; skipped", file=sys.stderr)
            continue
        overrides = [*args.overrides, f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}",
                     f"train.max_steps={args.warmup + args.steps}", "train.log_every=1", "train.eval_every=0"]
        threads = 0 if gpus else (args.threads_per_rank or max(cores // ranks, 1))
        result = _run(args.config, overrides, root / f"{label.replace(' ', '_')}", ranks, threads, args.task)
        rows.append({"setting": label, "ranks": ranks, "ep_size": ep, "threads_per_rank": threads or None,
                     **_throughput(result, args.warmup)})
    if scratch is not None:
        scratch.cleanup()
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"cpu ({cores} cores)"
    _print(rows, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "device": device, "runs": rows}, indent=1))
    return 0


def _run(config: str, overrides: list[str], out_dir: Path, ranks: int, threads: int, task: str | None) -> Path:
    """One training run in fresh processes; returns its metrics.jsonl."""
    spec = out_dir.with_suffix(".json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps({"config": config, "overrides": overrides, "out_dir": str(out_dir), "task": task}))
    worker = ["-m", "moetrain.bench.train", "--worker", str(spec)]
    if ranks == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), *worker]
    env = child_env()  # a bench started under a launcher must not leak its rendezvous
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, env=env, check=True)
    return out_dir / "metrics.jsonl"


def _throughput(metrics: Path, warmup: int) -> dict[str, float]:
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    timed = [r for r in records if r["type"] == "train" and r["step"] > warmup]
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    return {"tokens_per_second": tokens / seconds, "steps": len(timed), "final_loss": timed[-1]["loss"]}


def _print(rows: list[dict], args: argparse.Namespace, device: str) -> None:
    print(f"moetrain bench train: {args.config}, {args.steps} timed steps after {args.warmup} warm-up, {device}")
    print(f"{'setting':<16} {'ranks':>5} {'ep':>3} {'threads':>7} {'tokens/s':>10} {'tokens/s/rank':>14}")
    for r in rows:
        print(f"{r['setting']:<16} {r['ranks']:>5} {r['ep_size']:>3} {r['threads_per_rank'] or '-':>7} "
              f"{r['tokens_per_second']:>10.1f} {r['tokens_per_second'] / r['ranks']:>14.1f}")
    if len(rows) == 2:
        ratio = rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]
        same_cores = "cpu" in device and rows[0]["threads_per_rank"] == 2 * rows[1]["threads_per_rank"]
        ideal = "1.0: both runs use the same cores" if same_cores else "2.0: twice the devices"
        print(f"scaling ratio (EP=2 on 2 ranks / 1 rank): {ratio:.2f}x (ideal {ideal})")


class _NoEval:
    """The task, minus evaluation (a benchmark measures training only)."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        return getattr(self._task, name)

    def evaluate(self, model, dp_rank: int = 0, dp_world: int = 1) -> dict[str, float]:
        return {}


def _worker(spec_file: str) -> None:
    import importlib

    from moetrain.config import load_config
    from moetrain.tasks import build_task
    from moetrain.train.trainer import train

    spec = json.loads(Path(spec_file).read_text())
    cfg = load_config(spec["config"], spec["overrides"])
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec["task"]:
        module, _, name = spec["task"].partition(":")
        task = getattr(importlib.import_module(module), name)(cfg, out_dir)
    else:
        task = build_task(cfg, out_dir)
    train(cfg, out_dir, task=_NoEval(task), save=False)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m moetrain.bench.train", description=__doc__.split("\n\n")[0])
    cli.add_argument("--worker", help=argparse.SUPPRESS)
    if "--worker" in sys.argv:
        _worker(cli.parse_known_args()[0].worker)
    else:
        add_arguments(cli)
        sys.exit(main(cli.parse_args()))
