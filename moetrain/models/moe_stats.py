"""Router losses and statistics summed / flattened over a model's MoE layers.

The task adds the auxiliary losses in one visible line (design.md, decision 9)::

    out = model(...)
    aux, aux_logs = moe_aux_loss(out.moe_stats, cfg.moe.balance_coef, cfg.moe.z_coef)
    loss = ce + aux
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moetrain.moe import MoEStats

__all__ = ["moe_aux_loss", "router_stats"]


def moe_aux_loss(moe_stats: Sequence[MoEStats], balance_coef: float, z_coef: float) -> tuple[Tensor, dict[str, float]]:
    """``balance_coef * sum(balance) + z_coef * sum(z)`` over the MoE layers.

    Args:
        moe_stats: one entry per MoE layer (``SwitchOutput.moe_stats``).
        balance_coef: weight of the Switch load-balancing loss (``moe.balance_coef``).
        z_coef: weight of the router z-loss (``moe.z_coef``).

    Returns:
        ``(aux_loss, logs)``: a differentiable scalar (0 with no MoE layer) and the unweighted
        sums ``{"balance_loss": ..., "z_loss": ..., "aux_loss": ...}`` as floats.
    """
    if not moe_stats:
        zero = torch.zeros(())
        return zero, {"balance_loss": 0.0, "z_loss": 0.0, "aux_loss": 0.0}
    balance = torch.stack([s.balance_loss for s in moe_stats]).sum()
    z = torch.stack([s.z_loss for s in moe_stats]).sum()
    aux = balance_coef * balance + z_coef * z
    logs = {"balance_loss": float(balance.detach()), "z_loss": float(z.detach()), "aux_loss": float(aux.detach())}
    return aux, logs


def router_stats(moe_stats: Sequence[MoEStats], names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-layer router statistics for logging, as flat ``{"moe/<layer>/<stat>": value}``.

    For each layer: ``load_<j>`` (fraction of processed routes that expert j took), ``dropped``
    (fraction of routes dropped by capacity), ``entropy`` (mean router entropy, nats),
    ``balance`` and ``z`` (the unweighted losses), ``max_load`` (largest load fraction:
    1/E is perfect balance) and ``tokens``.

    Args:
        moe_stats: one entry per MoE layer.
        names: layer names (``model.moe_layer_names``, e.g. ``encoder.1``); default ``0, 1, ...``.

    NOTE: the numbers are this rank's (expert loads are not all-reduced here).
    """
    if names is None:
        names = [str(i) for i in range(len(moe_stats))]
    if len(names) != len(moe_stats):
        raise ValueError(f"{len(names)} layer names for {len(moe_stats)} MoE layers")
    logs: dict[str, float] = {}
    for name, stats in zip(names, moe_stats):
        prefix = f"moe/{name}/"
        load = stats.expert_load().tolist()
        for j, fraction in enumerate(load):
            logs[f"{prefix}load_{j}"] = fraction
        logs[prefix + "max_load"] = max(load) if load else 0.0
        logs[prefix + "dropped"] = float(stats.dropped_fraction)
        logs[prefix + "entropy"] = float(stats.router_entropy)
        logs[prefix + "balance"] = float(stats.balance_loss.detach())
        logs[prefix + "z"] = float(stats.z_loss.detach())
        logs[prefix + "tokens"] = float(stats.num_tokens)
    return logs
