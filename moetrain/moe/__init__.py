"""Sparse Mixture-of-Experts layer with pluggable router gradient estimators.

    from moetrain.moe import MoELayer
    moe = MoELayer(d_model=512, d_ff=2048, num_experts=8, estimator="sparsemixer")
    y, stats = moe(x)                      # x: [batch, seq, 512]
    loss = task_loss + 0.01 * stats.balance_loss + 0.001 * stats.z_loss
"""

from .balance import GlobalBalance, update_selection_bias
from .dispatch import AllToAllDispatcher, DispatchPlan, LocalDispatcher, expert_capacity
from .estimators import ESTIMATORS, Estimator, Routing, build_estimator, register_estimator, reinmax, sparsemixer_mask
from .layer import MoELayer, MoEStats, moe_layers, set_routing_step
from .noise import FixedNoise, RoutingNoise, counter_uniform
from .router import Router, balance_loss, router_entropy, z_loss

__all__ = [
    "AllToAllDispatcher", "DispatchPlan", "ESTIMATORS", "Estimator", "FixedNoise", "GlobalBalance", "LocalDispatcher", "MoELayer",
    "MoEStats", "Router", "Routing", "RoutingNoise", "balance_loss", "build_estimator", "counter_uniform",
    "expert_capacity", "moe_layers", "register_estimator", "reinmax", "router_entropy", "set_routing_step",
    "sparsemixer_mask", "update_selection_bias", "z_loss",
]
