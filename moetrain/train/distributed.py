"""Process groups, the generated DeepSpeed configuration and the engine.

Everything DeepSpeed-specific that the training loop needs, in the order it runs::

    init_distributed(backend)                 one process or a launcher; gloo on CPU, nccl on CUDA
    model = task.build_model(ep_size)         AFTER init: experts are placed by rank
    engine = build_engine(model, cfg.train, cfg.parallel)
                                              AdamW/Adafactor over MoE-aware groups + LambdaLR + ZeRO 0/1/2

The DeepSpeed JSON is generated from the ``train`` and ``parallel`` sections; a
user file (``parallel.deepspeed_config``) may override any key except those the
training loop owns (batch sizes, accumulation, optimizer, scheduler).

Measured with DeepSpeed 0.19.8 (docs/deepspeed-ep.md): ZeRO-1/2 need an optimizer
group marked ``moe: True`` for the expert parameters, and DeepSpeed's stage-0 gradient norm
is wrong under expert parallelism, so at ZeRO-0 the trainer clips itself (train/optim.py) and
DeepSpeed's ``gradient_clipping`` is set to 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import ParallelConfig, TrainConfig
from moetrain.utils.net import free_port

from .optim import build_optimizer
from .schedule import build_scheduler

__all__ = ["DistInfo", "init_distributed", "deepspeed_config", "build_engine", "barrier",
           "OWNED_KEYS"]

#: DeepSpeed keys the training loop sets itself; a user JSON may not override them.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "optimizer", "scheduler")
#: DeepSpeed settings mirrored from the moetrain config: a user JSON may repeat them, not change them
#: (validation, checkpoints and logs read the moetrain config).
MIRRORED = {("zero_optimization", "stage"): "parallel.zero_stage", ("bf16", "enabled"): "train.precision",
            ("fp16", "enabled"): "train.precision", ("gradient_clipping",): "train.grad_clip"}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. Data parallelism spans every rank (EP only shards experts)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent).

    Works under any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` (deepspeed,
    torchrun, accelerate) and as a plain single process, for which the variables are
    filled in here (DeepSpeed would otherwise look for MPI).

    Args:
        backend: ``nccl``/``gloo``; None lets DeepSpeed pick (nccl on CUDA, gloo on CPU).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        # Before any collective: NCCL binds the communicator to the current device.
        accelerator.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accelerator.device_name())
        share_cpu_threads()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def share_cpu_threads(env=os.environ) -> int:
    """Give each CPU rank on this machine its share of the cores; returns the threads set.

    torch defaults every process to all cores, so N ranks on one machine run N x cores threads,
    and each op's threads wait for one another to be scheduled (``deepspeed --num_gpus 2`` on a
    2-core machine: 4 threads). torchrun sets ``OMP_NUM_THREADS=1`` for several ranks; a user's or
    launcher's ``OMP_NUM_THREADS`` is kept as it is.
    """
    if env.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    ranks_here = max(1, int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1))  # torchrun / deepspeed
    threads = max(1, len(os.sched_getaffinity(0)) // ranks_here)
    if ranks_here > 1:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def deepspeed_config(train: TrainConfig, parallel: ParallelConfig, *, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, with ``parallel.deepspeed_config`` merged on top.

    Raises:
        ValueError: fp16 without a GPU or without ZeRO, or a user file that sets a key
            the loop owns (:data:`OWNED_KEYS`).
    """
    if train.precision == "fp16" and not on_gpu:
        raise ValueError("train.precision=fp16 needs a GPU (loss scaling); use bf16 or fp32 on CPU")
    if train.precision == "fp16" and parallel.zero_stage == 0:
        raise ValueError("train.precision=fp16 needs parallel.zero_stage 1 or 2 (the portable checkpoint "
                         "reads fp32 master weights from the ZeRO optimizer)")
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage == 2:
        # DeepSpeed asserts both for MoE under ZeRO-2 (stage_1_and_2._configure_moe_settings).
        zero.update(contiguous_gradients=True, reduce_scatter=True)
    config: dict[str, Any] = {
        # Batches are token-budget dicts that DeepSpeed never sees; 1 is a placeholder that
        # only feeds DeepSpeed's own samples/s timer (disabled below).
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW as a client optimizer
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,  # our own metrics report progress
        "wall_clock_breakdown": False,
    }
    _check_accelerate_env(train, parallel)
    user_file = parallel.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if user_file:
        user = json.loads(Path(user_file).read_text())
        clash = sorted(set(user) & set(OWNED_KEYS))
        if clash:
            raise ValueError(f"{user_file}: keys {clash} are set by moetrain "
                             "(use train.grad_accum_steps, train.lr, train.schedule instead)")
        for path, key in MIRRORED.items():
            if _lookup(user, path) not in (None, _lookup(config, path)):
                raise ValueError(f"{user_file}: {'.'.join(path)}={_lookup(user, path)!r} disagrees with the "
                                 f"moetrain config ({'.'.join(path)}={_lookup(config, path)!r}); set {key} instead")
        _merge(config, user)
    if parallel.zero_stage == 0:
        config["gradient_clipping"] = 0.0  # the trainer clips with the right norm (optim.clip_stage0_gradients)
        if train.precision == "bf16":
            # DeepSpeed's stage-0 bf16 optimizer leaves expert gradients out of the clipping norm and
            # drifts (docs/deepspeed-ep.md, Q5). torch.autocast instead: fp32 weights, gradients and
            # optimizer (Adafactor sees whole fp32 weights), bf16 matmuls in the forward and backward.
            config["bf16"] = {"enabled": False}
            config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def _lookup(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _check_accelerate_env(train: TrainConfig, parallel: ParallelConfig) -> None:
    """Under ``accelerate launch``, its DeepSpeed plugin settings must agree with the config.

    accelerate only starts the processes here; the moetrain config drives the engine. A
    plugin value that says otherwise is an error rather than silently ignored.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    checks = [("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(parallel.zero_stage), "parallel.zero_stage"),
              ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(train.grad_accum_steps), "train.grad_accum_steps")]
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[train.precision]
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        checks.append(("ACCELERATE_MIXED_PRECISION", mixed, "train.precision"))
    for var, want, key in checks:
        have = os.environ.get(var)
        if have not in (None, "", want):
            raise ValueError(f"accelerate config sets {var}={have} but the moetrain config has {key} "
                             f"(= {want}); make them agree (moetrain's config drives DeepSpeed)")


def _merge(base: dict, extra: dict) -> None:
    """Recursive dict update: nested sections merge, everything else replaces."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_engine(model: nn.Module, train: TrainConfig, parallel: ParallelConfig, info: DistInfo):
    """``deepspeed.initialize`` with the optimizer (train/optim.py), the LR schedule and the config.

    Returns:
        The DeepSpeed engine (``engine.module`` is ``model``; ``engine.optimizer`` wraps the
        torch optimizer).
    """
    import deepspeed

    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train.schedule, train.warmup_steps, train.max_steps)
    config = deepspeed_config(train, parallel, on_gpu=info.device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    return engine
