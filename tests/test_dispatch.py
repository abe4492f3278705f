"""Index dispatch: capacity, priority, padding, combine (moetrain/moe/dispatch.py)."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe.dispatch import LocalDispatcher, expert_capacity


@pytest.mark.parametrize(
    "tokens,experts,cf,floor,want",
    [
        (10, 4, 1.0, 0, 3),  # ceil(2.5)
        (10, 4, 1.25, 0, 4),  # ceil(3.125)
        (8, 4, 1.0, 0, 2),  # exact
        (8, 4, 1.0, 4, 4),  # floor wins
        (0, 4, 1.0, 0, 0),
        (7, 2, 2.0, 0, 7),
        (100, 8, None, 4, None),  # dropless: no floor either
        (10, 11, 1.1, 0, 1),  # 10 * 1.1 / 11 is exactly 1 in decimal (1.0000000000000002 in float)
        (3, 10, 0.1, 0, 1),  # 0.03 -> 1
    ],
)
def test_expert_capacity(tokens, experts, cf, floor, want):
    assert expert_capacity(tokens, experts, cf, floor) == want


@pytest.mark.parametrize("tokens,experts,cf,k,want", [(8, 4, 1.0, 2, 4), (10, 4, 1.25, 2, 7), (6, 8, 1.0, 4, 3)])
def test_expert_capacity_scales_with_top_k(tokens, experts, cf, k, want):
    """GShard/DeepSpeed: k routes per token, so ceil(k * T / E * cf)."""
    assert expert_capacity(tokens, experts, cf, 0, top_k=k) == want


def ids(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_hand_worked_capacity_top1():
    """Tokens 0..5 want experts [0, 1, 0, 0, 1, 0]; capacity 2: expert 0 keeps tokens 0, 2 (drops
    3, 5), expert 1 keeps 1, 4."""
    plan = LocalDispatcher(2).plan(ids([[0], [1], [0], [0], [1], [0]]), capacity=2)
    assert plan.token_index.tolist() == [0, 2, 1, 4]  # expert-major, earlier tokens first
    assert plan.counts.tolist() == [2, 2]
    assert plan.counts_before_drop.tolist() == [4, 2]
    assert plan.num_routes == 6 and plan.num_tokens == 6


def test_slot_major_priority_top2():
    """All first choices are served before any second choice, then earlier tokens win.

    T=4, routes (slot 0 / slot 1): t0 (0, 1), t1 (1, 0), t2 (0, 2), t3 (0, 1); capacity 2.
    Expert 0 candidates in priority order: t0/s0, t2/s0, t3/s0, t1/s1 -> keeps t0, t2.
    Expert 1: t1/s0, t0/s1, t3/s1 -> keeps t1, t0. Expert 2: t2/s1 -> keeps t2.
    """
    plan = LocalDispatcher(3).plan(ids([[0, 1], [1, 0], [0, 2], [0, 1]]), capacity=2)
    T = 4
    kept = [(int(r) // T, int(r) % T) for r in plan.route_index]  # (slot, token)
    assert kept == [(0, 0), (0, 2), (0, 1), (1, 0), (1, 2)]
    assert plan.counts.tolist() == [2, 2, 1]
    assert plan.counts_before_drop.tolist() == [4, 3, 1]


def test_dropless_keeps_everything():
    gen = torch.Generator().manual_seed(0)
    e = torch.randint(0, 4, (50, 2), generator=gen)
    plan = LocalDispatcher(4).plan(e, capacity=None)
    assert plan.route_index.numel() == 100
    assert torch.equal(plan.counts, plan.counts_before_drop)
    assert torch.equal(plan.counts, torch.bincount(e.flatten(), minlength=4))
    assert sorted(plan.route_index.tolist()) == list(range(100))


def test_padding_is_never_routed():
    e = ids([[1], [0], [1], [1]])
    valid = torch.tensor([True, False, True, True])
    plan = LocalDispatcher(2).plan(e, capacity=1, valid=valid)
    assert plan.num_routes == 3
    assert plan.counts_before_drop.tolist() == [0, 3]
    assert plan.token_index.tolist() == [0]  # token 1 (padding) takes no capacity slot
    plan = LocalDispatcher(2).plan(ids([[0, 1], [1, 0]]), capacity=None, valid=torch.tensor([False, True]))
    assert sorted(plan.token_index.tolist()) == [1, 1]


def test_plan_with_zero_tokens():
    plan = LocalDispatcher(3).plan(torch.zeros(0, 1, dtype=torch.long), capacity=4)
    assert plan.num_routes == 0 and plan.counts.tolist() == [0, 0, 0] and plan.route_index.numel() == 0
    d = LocalDispatcher(3)
    rows, counts = d.dispatch(torch.zeros(0, 5), plan)
    assert rows.shape == (0, 5) and counts == [0, 0, 0]
    out = d.combine(rows, torch.zeros(0, 1), plan)
    assert out.shape == (0, 5)


def test_dispatch_and_combine_round_trip():
    """Experts = per-expert linear maps; combine(expert(rows)) = sum over kept routes of w * f_e(x),
    dropped routes add exactly 0."""
    gen = torch.Generator().manual_seed(1)
    T, E, K, D = 23, 4, 2, 3
    x = torch.randn(T, D, dtype=torch.float64, generator=gen)
    e = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, dtype=torch.float64, generator=gen)
    mats = torch.randn(E, D, D, dtype=torch.float64, generator=gen)
    d = LocalDispatcher(E)
    for cap in (None, 3, 7):
        plan = d.plan(e, cap)
        rows, counts = d.dispatch(x, plan)
        assert sum(counts) == rows.shape[0] == plan.route_index.numel()
        out_rows = torch.cat([chunk @ mats[j] for j, chunk in enumerate(rows.split(counts))])
        out = d.combine(d.undispatch(out_rows, plan), w, plan)
        kept = torch.zeros(K * T, dtype=torch.bool)
        kept[plan.route_index] = True
        kept = kept.reshape(K, T).t()
        expected = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for k in range(K):
                if kept[t, k]:
                    expected[t] += w[t, k] * (x[t] @ mats[e[t, k]])
        assert torch.allclose(out, expected, atol=1e-13, rtol=0)
        if cap is not None:
            assert (plan.counts <= cap).all()
            # Kept per expert = the earliest `cap` routes in slot-major order.
            for j in range(E):
                order = [k * T + t for k in range(K) for t in range(T) if e[t, k] == j]
                kept_j = sorted(int(r) for r in plan.route_index if e[int(r) % T, int(r) // T] == j)
                assert kept_j == order[:cap]


def test_combine_gradients():
    gen = torch.Generator().manual_seed(2)
    T, E, D = 9, 3, 4
    e = torch.randint(0, E, (T, 1), generator=gen)
    plan = LocalDispatcher(E).plan(e, capacity=2)
    y = torch.randn(plan.route_index.numel(), D, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(T, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda y, w: LocalDispatcher(E).combine(y, w, plan), (y, w))
    out = LocalDispatcher(E).combine(y, w, plan)
    (gw,) = torch.autograd.grad(out.sum(), w)
    dropped = torch.ones(T, dtype=torch.bool)
    dropped[plan.token_index] = False
    assert dropped.any() and (gw[dropped] == 0).all()
