"""Run several trainer scenarios in one process group (launched by tests/test_distributed.py).

    python -m deepspeed.launcher.runner --num_gpus 2 tests/dist_scripts/run_scenarios.py SPEC.json
    python tests/dist_scripts/run_scenarios.py SPEC.json                 # a single rank

SPEC.json is a list of scenarios, run in order (one launch pays the start-up cost once)::

    {"name": ..., "out_dir": ..., "set": {"train.max_steps": 4, ...},   # on top of BASE below
     "task": "seq2seq",                       # Seq2SeqToyTask (the real Switch model); default ToyTask
     "toy": {"uneven": true, ...},            # task options
     "validate": true,                        # false: skip config validation (negative control)
     "kill_in_save_at": 8}                    # rank 0 SIGKILLs itself inside the save of step 8

Each scenario trains with ``moetrain.train.trainer.train`` on the toy task; rank 0 writes
``<out_dir>/result.json`` = {"ok", "error", "seconds"}. A failing scenario does not stop the
next one unless the failure broke the process group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_task import Seq2SeqToyTask, ToyTask  # noqa: E402

import moetrain.train.checkpoint as checkpoint  # noqa: E402
from moetrain.config import RunConfig, validate  # noqa: E402
from moetrain.train.trainer import train  # noqa: E402

BASE = {
    "model.vocab_size": 64, "model.d_model": 16, "model.d_ff": 32, "model.dropout_rate": 0.0,
    "moe.num_experts": 4, "moe.estimator": "switch", "moe.capacity_factor": None,
    # The balance loss uses per-rank statistics (f_i * P_i is not linear), so it is not
    # the same at another data-parallel size; parity runs leave it out. z-loss is a mean.
    "moe.balance_coef": 0.0, "moe.z_coef": 1e-3,
    "data.vocab_size": 64, "model.d_kv": 8, "model.num_heads": 2, "model.num_layers": 2,
    "model.num_decoder_layers": 2, "moe.sparse_step": 2,
    "train.max_steps": 4, "train.lr": 1e-2, "train.warmup_steps": 2, "train.log_every": 1,
    "train.eval_every": 0, "train.save_every": 0, "train.keep_last": 0, "train.grad_accum_steps": 2,
    "parallel.ep_size": 2, "parallel.zero_stage": 1,
}


def make_config(overrides: dict, check: bool) -> RunConfig:
    cfg = RunConfig(name="toy")
    for dotted, value in {**BASE, **overrides}.items():
        section, key = dotted.split(".")
        if isinstance(getattr(getattr(cfg, section), key), tuple):
            value = tuple(value)
        setattr(getattr(cfg, section), key, value)
    if check:
        validate(cfg)
    return cfg


def kill_inside_save(step: int) -> None:
    """Make rank 0 die by SIGKILL after writing step ``step``'s files, before publishing them."""
    original = checkpoint._write_portable

    def write_then_die(path, weights, moments, engine, state, *args, **kwargs):
        original(path, weights, moments, engine, state, *args, **kwargs)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._write_portable = write_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank
    rank = int(os.environ.get("RANK", "0"))
    for scenario in json.loads(Path(args.spec).read_text()):
        out_dir = Path(scenario["out_dir"])
        t0, error = time.perf_counter(), None
        try:
            cfg = make_config(scenario.get("set", {}), scenario.get("validate", True))
            if scenario.get("kill_in_save_at"):
                kill_inside_save(scenario["kill_in_save_at"])
            task_class = Seq2SeqToyTask if scenario.get("task") == "seq2seq" else ToyTask
            train(cfg, out_dir, task=task_class(cfg, out_dir, **scenario.get("toy", {})))
        except Exception as err:  # recorded for the test to assert on
            error = f"{type(err).__name__}: {err}"
            if not scenario.get("expect_error"):
                traceback.print_exc()
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            result = {"ok": error is None, "error": error, "seconds": time.perf_counter() - t0}
            (out_dir / "result.json").write_text(json.dumps(result))
            print(f"[scenario] {scenario['name']}: {'ok' if error is None else error} "
                  f"({result['seconds']:.1f}s)", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # gloo may abort at exit otherwise (deepspeed-ep.md, P7)


if __name__ == "__main__":
    main()
