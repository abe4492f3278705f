"""Index-based token dispatch: group routes by expert, apply capacity, exchange, combine.

No one-hot ``[tokens x experts x capacity]`` tensor is ever built: routes are
sorted by expert id (a stable sort, so earlier routes win capacity), rows are
gathered into one contiguous ``[R, D]`` buffer whose slices belong to one expert
each, and results are scattered back with ``index_add``.

``LocalDispatcher`` serves one process holding every expert. ``AllToAllDispatcher``
extends it with expert parallelism: the sorted buffer is exchanged with an
autograd all-to-all with uneven splits over the expert-parallel group, regrouped
expert-major for the local experts, and sent back the same way.

Shapes: T tokens, K routes per token, R kept routes, E experts, e local experts,
D channels. Route r of slot k for token t has flat index ``k * T + t`` (slot-major),
so under capacity all first choices are served before any second choice.
"""

from __future__ import annotations

import math
from fractions import Fraction

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DispatchPlan:
    """Bookkeeping from :meth:`LocalDispatcher.dispatch`, needed by ``combine``.

    Attributes:
        route_index: ``[R]`` flat route index (``k * T + t``) of each kept row, expert-major.
        token_index: ``[R]`` token of each kept row.
        counts: ``[E]`` kept rows per expert (after capacity), int64.
        counts_before_drop: ``[E]`` routes per expert before capacity, int64.
        num_tokens: T.
        num_routes: valid (non-padding) routes offered, before capacity.
    """

    route_index: Tensor
    token_index: Tensor
    counts: Tensor
    counts_before_drop: Tensor
    num_tokens: int
    num_routes: int


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float | None, min_capacity: int = 0,
                    top_k: int = 1) -> int | None:
    """Capacity ``ceil(k * T / E * cf)`` per expert, with a floor; ``None`` = dropless.

    The ``k`` factor is GShard's and DeepSpeed's: top-k routing offers ``k * T`` routes, so
    without it a perfectly balanced top-2 batch would lose half of them at ``cf = 1``.
    ``cf`` is taken as the decimal the user wrote (``1.1`` is 11/10, not the binary float
    just above it), so ``T = 10, E = 11, cf = 1.1`` gives exactly 1, not 2.
    """
    if capacity_factor is None:
        return None
    routes = Fraction(num_tokens * top_k) * Fraction(repr(float(capacity_factor)))
    return max(math.ceil(routes / num_experts), min_capacity)


class LocalDispatcher:
    """All experts live in this process."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def plan(self, expert_ids: Tensor, capacity: int | None, valid: Tensor | None = None) -> DispatchPlan:
        """Sort routes by expert and keep at most ``capacity`` per expert.

        Args:
            expert_ids: ``[T, K]`` int64.
            capacity: max routes per expert, or None for dropless.
            valid: optional ``[T]`` bool, False for padding tokens (never routed).
        """
        num_tokens, k = expert_ids.shape
        flat = expert_ids.t().reshape(-1)
        if valid is not None:
            # Padding goes to a sentinel bucket E that sorts last and is cut off.
            flat = torch.where(valid.repeat(k), flat, torch.full_like(flat, self.num_experts))
        counts_all = torch.bincount(flat, minlength=self.num_experts + 1)
        counts_before_drop = counts_all[: self.num_experts]
        num_routes = int(counts_before_drop.sum())
        sorted_ids, order = torch.sort(flat, stable=True)
        sorted_ids, order = sorted_ids[:num_routes], order[:num_routes]
        if capacity is not None and num_routes > 0:
            starts = torch.cumsum(counts_before_drop, 0) - counts_before_drop
            position = torch.arange(num_routes, device=flat.device) - starts[sorted_ids]
            keep = position < capacity
            order = order[keep]
            counts = counts_before_drop.clamp(max=capacity)
        else:
            counts = counts_before_drop
        return DispatchPlan(order, order % num_tokens, counts, counts_before_drop, num_tokens, num_routes)

    def dispatch(self, x: Tensor, plan: DispatchPlan) -> tuple[Tensor, list[int]]:
        """Rows for the experts, expert-major, and the row count of each (local) expert."""
        return x.index_select(0, plan.token_index), plan.counts.tolist()

    def undispatch(self, y: Tensor, plan: DispatchPlan) -> Tensor:
        """Inverse of the exchange part of :meth:`dispatch` (identity when local)."""
        return y

    def combine(self, y_sorted: Tensor, weights: Tensor, plan: DispatchPlan, channel_scale: Tensor | None = None) -> Tensor:
        """``out[t] = scale * sum_k weights[t, k] * expert_out[route(t, k)]``; dropped routes add 0.

        Args:
            y_sorted: ``[R, D]`` expert outputs in plan order.
            weights: ``[T, K]`` combine weights (any float dtype; cast to ``y``'s).
            channel_scale: optional ``[D]`` per-channel output scale (SparseMixer's omega),
                applied here rather than by the caller to save a pass and a ``[T, D]``
                temporary in forward and two in backward.
        """
        route_weight = weights.t().reshape(-1).index_select(0, plan.route_index).to(y_sorted.dtype)
        if channel_scale is not None:
            channel_scale = channel_scale.to(y_sorted.dtype)
        return _WeightedScatterAdd.apply(y_sorted, route_weight, channel_scale, plan.token_index, plan.num_tokens)


class _WeightedScatterAdd(torch.autograd.Function):
    """``out = zeros(T, D); out[token_index[r]] += weight[r] * y[r]; out *= scale`` by hand.

    Under autograd, ``zeros.index_add(..., y * w)`` copies the zeros once more
    (out-of-place ``index_add``), and its backward makes three ``[R, D]`` tensors
    (the gathered gradient, ``grad * w`` and ``grad * y``); a separate ``out * scale``
    adds three ``[T, D]`` ones. Here the gradient is gathered once and scaled in
    place. On the 2-core CPU a fresh ``[T, D]`` tensor costs more to page in than
    the arithmetic on it.

    Gradients, with ``G = grad_out[token_index]`` (``[R, D]``) and ``s`` the scale:
    ``d/dy[r] = w[r] * (G[r] * s)``, ``d/dw[r] = <G[r] * s, y[r]>``,
    ``d/ds = sum_r w[r] * G[r] * y[r]``.
    """

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, scale: Tensor | None, token_index: Tensor, num_tokens: int) -> Tensor:
        ctx.save_for_backward(y, weight, scale, token_index)
        out = y.new_zeros(num_tokens, y.shape[-1])
        out.index_add_(0, token_index, y * weight.unsqueeze(-1))
        return out if scale is None else out.mul_(scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        y, weight, scale, token_index = ctx.saved_tensors
        need_y, need_weight, need_scale = ctx.needs_input_grad[:3]
        grad_rows = grad_out.index_select(0, token_index)
        grad_scale = None
        if scale is not None:
            if need_scale:
                grad_scale = torch.einsum("rd,rd,r->d", grad_rows, y, weight)
            grad_rows.mul_(scale)
        # Row-wise dot <grad, y>: einsum runs it as a batched matmul, 2x faster than
        # (grad * y).sum(-1), which makes an [R, D] temporary.
        grad_weight = torch.einsum("rd,rd->r", grad_rows, y) if need_weight else None
        grad_y = grad_rows.mul_(weight.unsqueeze(-1)) if need_y else None
        return grad_y, grad_weight, grad_scale, None, None


class _AllToAll(torch.autograd.Function):
    """Autograd all-to-all with uneven splits; the backward swaps the splits."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits = (in_splits, out_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        in_splits, out_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher(LocalDispatcher):
    """Experts sharded over ``group``: rank r owns experts ``[r * e, (r + 1) * e)``.

    Every rank must call ``dispatch``/``undispatch`` the same number of times
    (the collectives pair up), even with zero tokens.
    """

    def __init__(self, num_experts: int, group):
        super().__init__(num_experts)
        self.group = group
        self.world = dist.get_world_size(group)
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {self.world}")
        self.num_local = num_experts // self.world
        self._state: tuple | None = None

    def dispatch(self, x: Tensor, plan: DispatchPlan) -> tuple[Tensor, list[int]]:
        rows = x.index_select(0, plan.token_index)
        send_counts = plan.counts.reshape(self.world, self.num_local)  # [ranks, e] what we send
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)  # [sources, e]
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        received = all_to_all(rows, out_splits, in_splits, self.group)  # source-major
        # Regroup (source, expert) -> (expert, source) so each local expert's rows are contiguous.
        src_expert = torch.arange(self.world * self.num_local, device=x.device).reshape(self.world, self.num_local)
        block_of_row = torch.repeat_interleave(src_expert.reshape(-1), recv_counts.reshape(-1))
        expert_major = torch.sort(block_of_row % self.num_local * self.world + block_of_row // self.num_local, stable=True).indices
        self._state = (in_splits, out_splits, torch.argsort(expert_major))
        return received.index_select(0, expert_major), recv_counts.sum(0).tolist()

    def undispatch(self, y: Tensor, plan: DispatchPlan) -> Tensor:
        in_splits, out_splits, source_major_order = self._state
        self._state = None
        source_major = y.index_select(0, source_major_order)
        return all_to_all(source_major, in_splits, out_splits, self.group)
