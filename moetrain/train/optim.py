"""The optimizer: parameter groups, AdamW or Adafactor, and gradient clipping without ZeRO.

    optimizer = build_optimizer(model, cfg.train)     # before deepspeed.initialize
    norm = clip_stage0_gradients(engine, max_norm)     # ZeRO-0 only, after the boundary backward

**Why Adafactor.** T5 initialises the tied embedding N(0, 1), ~sqrt(d_model) times larger than the
other weights. AdamW moves every weight by about ``lr`` in absolute terms, so relative to its size
the embedding (input *and* output layer) learns ~16x slower and real text sits on the unigram
plateau for thousands of steps. Adafactor's step is ``lr x RMS(weight)`` times a normalised
gradient: relative, the same for every weight. We take ``torch.optim.Adafactor`` (PyTorch core,
T5's rule ``min(lr, 1/sqrt(t)) x max(1e-3, RMS(w))`` with update clipping at RMS 1, and the rate
read from each parameter group, so the LR scheduler and ``lr_scale`` apply) rather than the copy
in ``transformers.optimization``.

**Why not under ZeRO-1/2.** ZeRO-1/2 flatten each parameter group and give the optimizer one 1-D
shard per rank. Adafactor then factors nothing (a 1-D tensor keeps a full second moment) and
scales by the RMS of the shard, a mix of unrelated weights (measured in docs/training.md), so
config validation refuses the pair. At ZeRO-0 the optimizer sees the real parameters, and expert
parallelism works there too once the clipping norm is right, which DeepSpeed's stage-0 path does
not compute under EP (:func:`clip_stage0_gradients` does).

**lr_scale** multiplies the rate of the parameters whose names match a pattern. Each becomes a
parameter group of its own, which ZeRO keeps separate, so it means the same at every stage.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import TrainConfig

__all__ = ["param_groups", "build_optimizer", "stage0_grad_norm", "clip_stage0_gradients"]


def param_groups(model: nn.Module, weight_decay: float, lr: float = 1.0,
                 lr_scale: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: by weight decay and ``lr_scale`` pattern, experts split out (``moe: True``).

    With weight decay, vectors (norm scales, biases) are not decayed. Each input group needs a
    ``name``: ``split_params_into_different_moe_groups_for_optimizer`` keys on it (and copies
    the group's ``lr`` to the expert group it splits off).

    Raises:
        ValueError: an ``lr_scale`` pattern that matches no parameter (names a few real ones).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    lr_scale = lr_scale or {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale_of = {n: next((f for pattern, f in lr_scale.items() if re.search(pattern, n)), 1.0) for n, _ in named}
    for pattern in lr_scale:
        if not any(re.search(pattern, n) for n, _ in named):
            examples = ", ".join(n for n, _ in named[:4])
            raise ValueError(f"train.lr_scale: pattern '{pattern}' matches no parameter name (e.g. {examples})")
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in named:
        decay = weight_decay > 0 and p.ndim >= 2
        key = (decay, scale_of[name])
        if key not in groups:
            label = ("decay" if decay else "no_decay") if weight_decay > 0 else "dense"
            groups[key] = {"name": label if key[1] == 1.0 else f"{label}_x{key[1]:g}", "params": [],
                           "weight_decay": weight_decay if decay else 0.0, "lr": lr * key[1]}
        groups[key]["params"].append(p)
    # Unscaled groups first: the logged lr is the first group's.
    ordered = sorted(groups.values(), key=lambda g: g["lr"] != lr)
    split = split_params_into_different_moe_groups_for_optimizer(ordered)
    return [g for g in split if g["params"]]  # ZeRO cannot flatten an empty group


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` over :func:`param_groups` (the LR scheduler scales each group's ``lr``)."""
    groups = param_groups(model, train.weight_decay, train.lr, train.lr_scale)
    if train.optimizer == "adafactor":
        # Defaults are T5's: beta2 = 1 - t^-0.8, eps2 = 1e-3 floor on RMS(w), update clipped at RMS 1.
        return torch.optim.Adafactor(groups, lr=train.lr)
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.adam_betas), eps=train.adam_eps,
                             fused=_fused_adamw_supported(groups))


def _fused_adamw_supported(groups: list[dict[str, Any]]) -> bool:
    """torch's fused AdamW (one kernel over all tensors, CPU since torch 2.4, CUDA) needs every
    parameter floating point on one of those devices. On a CPU it is several times faster than the
    default one-tensor-at-a-time loop, and it is what HF's Trainer uses by default (torch >= 2.8)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def stage0_grad_norm(model: nn.Module) -> float:
    """The global L2 norm of the gradients after DeepSpeed's stage-0 all-reduce (collective).

    Dense gradients are identical on every rank by then. Expert gradients (``allreduce=False``)
    live on the ranks that hold the expert, replicated over its expert-data-parallel group, so
    their squares are summed over all ranks and divided by that replication. DeepSpeed's own
    stage-0 norm averages the per-rank norms instead, which is wrong once EP > 1
    (docs/deepspeed-ep.md, P2).
    """
    dense, expert, group_name = [], [], None
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "allreduce", True):
            dense.append(p.grad.detach())
        else:
            expert.append(p.grad.detach())
            group_name = p.group_name
    grads = dense + expert
    if not grads:
        return 0.0
    # Squares summed on the gradients' device in float64; one transfer at the end (no per-tensor sync).
    zero = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    dense_sq = sum((g.double().pow(2).sum() for g in dense), zero)
    expert_sq = sum((g.double().pow(2).sum() for g in expert), zero)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(expert_sq)
        expert_sq = expert_sq / _expert_replicas(group_name)
    return float((dense_sq + expert_sq).sqrt())


def _expert_replicas(group_name: str | None) -> int:
    """How many ranks hold a copy of each expert (the expert-data-parallel size of ``group_name``)."""
    if group_name is None:
        return 1
    from deepspeed.utils import groups

    return dist.get_world_size(group=groups._get_expert_data_parallel_group(group_name))


def clip_stage0_gradients(model: nn.Module, max_norm: float) -> float:
    """Scale the gradients so their global norm is at most ``max_norm``; returns the norm before.

    Same rule as ZeRO-1/2 and ``torch.nn.utils.clip_grad_norm_``: ``g * max_norm / (norm + 1e-6)``
    when that factor is below 1. ``max_norm <= 0`` only measures.
    """
    norm = stage0_grad_norm(model)
    if max_norm > 0:
        factor = max_norm / (norm + 1e-6)
        if factor < 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(factor)
    return norm
