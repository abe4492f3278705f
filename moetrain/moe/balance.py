"""Load balancing beyond the per-micro-batch Switch loss: global-batch fractions and the
auxiliary-loss-free expert bias.

Both need expert loads counted over the *global batch* (every rank's tokens of one optimizer
step), so both live here, next to each other; the MoE layer owns one of each and the trainer
tells the layers where optimizer steps begin (:func:`moetrain.moe.layer.set_routing_step`) and
when one has ended (:func:`update_selection_bias`). Formulas and scaling: docs/training.md,
"Load balancing".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .router import balance_loss

__all__ = ["GlobalBalance", "update_selection_bias"]


def _all_reduce(t: Tensor) -> int:
    """Sum ``t`` over the default process group in place; returns the world size (1 alone)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        return torch.distributed.get_world_size()
    return 1


class GlobalBalance:
    """The token fractions ``f_i`` of the global batch, for ``moe.balance_scope: global``.

    "Global batch" as in Qiu et al. 2025 ("Demons in the Detail", arXiv 2501.11873): every rank's
    tokens of the current optimizer step. Each micro-batch all-reduces its per-expert counts
    (one ``[E + 1]`` float64 all-reduce per layer over the default process group, i.e. the data-
    x expert-parallel ranks) and adds them to a running sum that :meth:`start` clears at each
    optimizer step. A micro-batch's backward runs before the next one is seen, so micro-batch k
    uses the counts of micro-batches 1..k (the last one: the whole step), as Megatron's global
    loss does.

    ``P_i`` stays local and differentiable. DeepSpeed averages gradients over the ranks, so each
    rank's loss is scaled by ``world / global tokens of this micro-batch``: the ranks' mean is
    then exactly ``N * sum_i f_i * P_i`` with ``P_i`` over the global micro-batch, whatever the
    ranks' token counts (Megatron's first global loss missed this factor: a gradient 1/dp too
    small).
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.window: int | None = None
        self.counts: Tensor | None = None

    def start(self, window: int | None) -> None:
        """Enter optimizer step ``window``; a new id clears the running counts. ``None`` = no
        accumulation (each micro-batch is its own global batch)."""
        if window is None or window != self.window:
            self.counts = None
        self.window = window

    def loss(self, probs: Tensor, balance_ids: Tensor) -> Tensor:
        counts = torch.bincount(balance_ids, minlength=self.num_experts).to(torch.float64)
        stats = torch.cat([counts, counts.new_tensor([probs.shape[0]])])
        world = _all_reduce(stats)
        counts, tokens = stats[:-1], stats[-1]
        if self.window is not None:
            self.counts = counts if self.counts is None else self.counts + counts
            counts = self.counts
        if tokens == 0:
            return probs.sum() * 0.0
        fraction = counts / counts.sum().clamp(min=1)
        return balance_loss(probs, balance_ids, self.num_experts, fraction, world / tokens.to(probs.dtype))


def update_selection_bias(model: nn.Module) -> None:
    """After an optimizer step: move each aux-free layer's selection bias towards balance.

    DeepSeek-V3's rule (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"):
    ``b_i += rate * sign(mean load - load_i)``, the loads being every route the layer chose (all
    k per token, before capacity) in this optimizer step on every rank. One all-reduce of all
    layers' counts together; every rank then applies the same float32 update to the same bias,
    so the biases stay identical across ranks without being broadcast.
    """
    # By attribute, not by class: this module sits below moetrain.moe.layer, which imports it.
    layers = [m for m in model.modules() if getattr(m, "selection_bias", None) is not None]
    if not layers:
        return
    counts = torch.stack([m.selection_counts for m in layers]).to(torch.float64)
    _all_reduce(counts)
    with torch.no_grad():
        for layer, load in zip(layers, counts):
            step = torch.sign(load.mean() - load).to(layer.selection_bias.dtype)
            layer.selection_bias.add_(layer.bias_update_rate * step)
            layer.selection_counts.zero_()
