"""MoELayer end to end: capacity, statistics, padding, noise keying, DeepSpeed contract, memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.moe import MoELayer, RoutingNoise, counter_uniform, moe_layers, set_routing_step
from moetrain.moe.noise import STREAM_JITTER, STREAM_SAMPLE


def make(**kw) -> MoELayer:
    args = dict(d_model=6, d_ff=8, num_experts=4, estimator="switch", jitter_mode="none", capacity_factor=None,
                min_capacity=0, init_seed=0)
    args.update(kw)
    torch.manual_seed(args.pop("router_seed", 0))  # the router draws from the global RNG
    return MoELayer(**args)


def ffn(layer: MoELayer, j: int, x: torch.Tensor) -> torch.Tensor:
    return layer.experts.deepspeed_experts[j](x)


def num(t: torch.Tensor) -> float:
    return t.detach().item()


def x_of(T, d=6, seed=0, dtype=torch.float32):
    return torch.randn(T, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------


def two_expert_layer(**kw):
    layer = make(d_model=2, num_experts=2, **kw)
    with torch.no_grad():
        layer.router.classifier.weight.copy_(5.0 * torch.eye(2))
    return layer


# Token t prefers expert WANT[t]: x_t = (1 + t/10) e_WANT[t].
WANT = [0, 1, 0, 0, 1, 0]
X_HAND = torch.stack([(1 + t / 10) * torch.eye(2)[w] for t, w in enumerate(WANT)])


@pytest.mark.parametrize("training", [True, False])
def test_capacity_hand_worked(training):
    """Capacity ceil(6 / 2 * 0.5) = 2: expert 0 keeps tokens 0, 2 and drops 3, 5; expert 1 keeps
    1, 4. Dropped tokens output exactly 0; kept ones p_D * FFN_D(x)."""
    layer = two_expert_layer(capacity_factor=0.5, eval_capacity_factor=0.5)
    layer.train(training)
    y, stats = layer(X_HAND)
    p = (X_HAND @ layer.router.classifier.weight.t()).softmax(-1)
    for t, w in enumerate(WANT):
        if t in (3, 5):
            assert (y[t] == 0).all()
        else:
            assert torch.allclose(y[t], p[t, w] * ffn(layer, w, X_HAND[t]), atol=1e-6)
    assert stats.tokens_per_expert.tolist() == [2, 2]
    assert stats.dropped_fraction.item() == pytest.approx(2 / 6)
    assert stats.num_tokens == 6


def test_min_capacity_and_dropless():
    layer = two_expert_layer(capacity_factor=0.5, min_capacity=3)
    y, stats = layer(X_HAND)
    assert stats.tokens_per_expert.tolist() == [3, 2] and (y[5] == 0).all() and (y[3] != 0).any()
    assert stats.dropped_fraction.item() == pytest.approx(1 / 6)
    layer = two_expert_layer(capacity_factor=None)
    y, stats = layer(X_HAND)
    assert stats.tokens_per_expert.tolist() == [4, 2] and stats.dropped_fraction.item() == 0.0
    assert (y.abs().sum(-1) > 0).all()
    # Evaluation is dropless by default.
    layer = two_expert_layer(capacity_factor=0.5).eval()
    assert layer(X_HAND)[1].dropped_fraction.item() == 0.0


def test_top2_capacity_and_stats():
    """v2 routes 2 experts per token; all first choices are served before second choices."""
    layer = make(estimator="sparsemixer_v2", top_k=2, jitter_eps=0.01, capacity_factor=0.5)
    x = x_of(40)
    y, stats = layer(x)
    cap = math.ceil(2 * 40 / 4 * 0.5)  # k * T / E * cf
    assert (stats.tokens_per_expert <= cap).all()
    kept = int(stats.tokens_per_expert.sum())
    assert stats.dropped_fraction.item() == pytest.approx(1 - kept / 80)
    # Independent recomputation of the routing and of what each expert kept.
    noise = RoutingNoise(layer.noise_seed, layer.routing_step, layer.layer_id, torch.arange(40))
    routing = layer.estimator(layer.router(x), noise, True)
    flat = [(k, t) for k in range(2) for t in range(40)]
    seen = {j: 0 for j in range(4)}
    expected = torch.zeros_like(y)
    for k, t in flat:
        j = int(routing.expert_ids[t, k])
        if seen[j] < cap:
            seen[j] += 1
            expected[t] += routing.weights[t, k] * ffn(layer, j, x[t])
    assert [seen[j] for j in range(4)] == stats.tokens_per_expert.tolist()
    assert torch.allclose(y, expected, atol=1e-6)


def test_top2_capacity_scales_with_k():
    """8 tokens, top-2, 4 experts, each expert chosen by exactly 4 routes: with cf = 1 the
    DeepSpeed/GShard capacity ceil(k * T / E * cf) = 4 drops nothing."""
    pairs = [(0, 1), (2, 3), (0, 1), (2, 3), (0, 2), (1, 3), (0, 2), (1, 3)]
    layer = make(d_model=4, estimator="topk", top_k=2, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.classifier.weight.copy_(torch.eye(4))
    x = torch.stack([2.0 * torch.eye(4)[a] + 1.9 * torch.eye(4)[b] for a, b in pairs])
    _, stats = layer(x)
    assert stats.tokens_per_expert.tolist() == [4, 4, 4, 4]
    assert stats.dropped_fraction.item() == 0.0


# ---------------------------------------------------------------------------
# Exact forward values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", ["none", "input"])
def test_single_expert_is_the_dense_ffn(jitter):
    """One expert, switch: p = 1, so y = FFN(x) exactly, also under input jitter (the experts see
    the clean input; only the router's copy is jittered)."""
    layer = make(num_experts=1, jitter_mode=jitter, jitter_eps=0.1)
    x = x_of(10)
    for training in (True, False):
        layer.train(training)
        y, stats = layer(x)
        assert torch.equal(y, ffn(layer, 0, x))
        assert stats.tokens_per_expert.tolist() == [10] and stats.balance_loss.item() == pytest.approx(1.0)


def test_switch_layer_output_and_balance_and_z_loss():
    layer = make()
    x = x_of(32)
    y, stats = layer(x)
    logits = x @ layer.router.classifier.weight.t()
    p = logits.softmax(-1)
    D = p.argmax(-1)
    expected = torch.stack([p[t, D[t]] * ffn(layer, int(D[t]), x[t]) for t in range(32)])
    assert torch.allclose(y, expected, atol=1e-6)
    f = torch.bincount(D, minlength=4).float() / 32
    assert stats.balance_loss.item() == pytest.approx(4 * num((f * p.mean(0)).sum()), rel=1e-6)
    assert stats.z_loss.item() == pytest.approx(num((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-6)
    assert stats.router_entropy.item() == pytest.approx(num(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    assert torch.equal(stats.tokens_per_expert, torch.bincount(D, minlength=4))
    # Balance gradient flows through P only (f is a count).
    (g,) = torch.autograd.grad(stats.balance_loss, layer.router.classifier.weight)
    w = layer.router.classifier.weight.detach().clone().requires_grad_(True)
    ref = 4 * (f * (x @ w.t()).softmax(-1).mean(0)).sum()
    (g_ref,) = torch.autograd.grad(ref, w)
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert stats.expert_load().sum().item() == pytest.approx(1.0)


def test_sparsemixer_layer_output_omega_and_balance():
    layer = make(estimator="sparsemixer", jitter_eps=0.1)
    with torch.no_grad():
        layer.estimator.omega.uniform_(0.5, 1.5)
    x = x_of(48, seed=3)
    ids = torch.arange(100, 148)
    y, stats = layer(x, token_ids=ids)
    noise = RoutingNoise(layer.noise_seed, layer.routing_step, layer.layer_id, ids)
    routing = layer.estimator(layer.router(x), noise, True)
    omega = layer.estimator.omega.detach()
    expected = torch.stack(
        [routing.weights[t, 0] * ffn(layer, int(routing.expert_ids[t, 0]), x[t]) * omega for t in range(48)]
    )
    assert torch.allclose(y, expected, atol=1e-6)
    f = torch.bincount(routing.balance_ids, minlength=4).float() / 48
    assert stats.balance_loss.item() == pytest.approx(4 * num((f * routing.probs.mean(0)).sum()), rel=1e-6)
    # z-loss on the unmasked logits.
    logits = layer.router(x)
    assert stats.z_loss.item() == pytest.approx(num((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-6)
    y.sum().backward()
    assert layer.estimator.omega.grad is not None and layer.estimator.omega.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["st", "stgs", "reinmax"])
def test_dense_estimators_in_the_layer(name):
    """Dense estimators: forward pi_D FFN_D(x) at the sampled D; every expert takes part in the
    graph (their gradient needs all outputs); capacity is ignored."""
    layer = make(estimator=name, capacity_factor=0.1)
    x = x_of(20, seed=4)
    y, stats = layer(x)
    logits = layer.router(x)
    gumbel = RoutingNoise(layer.noise_seed, 0, layer.layer_id, torch.arange(20)).gumbel(STREAM_SAMPLE, 4)
    D = (logits + gumbel).argmax(-1)
    p = logits.softmax(-1)
    expected = torch.stack([p[t, D[t]] * ffn(layer, int(D[t]), x[t]) for t in range(20)])
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.equal(stats.tokens_per_expert, torch.bincount(D, minlength=4))
    assert stats.dropped_fraction.item() == 0.0
    (y * x_of(20, seed=5)).sum().backward()
    grads = [e.wi.weight.grad for e in layer.experts.deepspeed_experts]
    assert all(g is not None for g in grads)
    g_router = layer.router.classifier.weight.grad
    assert g_router is not None and torch.isfinite(g_router).all()
    layer.eval()
    y_eval, _ = layer(x)
    De = logits.argmax(-1)
    assert torch.allclose(y_eval, torch.stack([p[t, De[t]] * ffn(layer, int(De[t]), x[t]) for t in range(20)]), atol=1e-6)


def test_router_input_jitter_analytic():
    """Router: logits = (x * m) W^T with m = 1 - eps + 2 eps u, u keyed by (seed, step, layer,
    STREAM_JITTER, token id, channel); dL/dx = m * (g W) through the router."""
    layer = make(jitter_mode="input", jitter_eps=0.1, noise_seed=7, layer_id=2)
    layer.routing_step = 5
    x = x_of(12, dtype=torch.float32).requires_grad_(True)
    ids = torch.arange(50, 62)
    noise = RoutingNoise(7, 5, 2, ids)
    logits = layer.router(x, noise, 0.1)
    u = counter_uniform(7, 5, 2, STREAM_JITTER, ids, 6)
    m = 1 - 0.1 + 0.2 * u
    W = layer.router.classifier.weight.detach()
    assert torch.allclose(logits, (x.detach() * m) @ W.t(), atol=1e-6)
    g = torch.randn(12, 4)
    (gx,) = torch.autograd.grad((logits * g).sum(), x)
    assert torch.allclose(gx, m * (g @ W), atol=1e-6)
    assert torch.equal(layer.router(x, noise, 0.0), x @ layer.router.classifier.weight.t())
    # In the layer: training z-loss sees the jittered logits, evaluation the clean ones.
    _, stats = layer(x.detach(), token_ids=ids)
    jittered = (x.detach() * m) @ W.t()
    assert stats.z_loss.item() == pytest.approx(num((torch.logsumexp(jittered, -1) ** 2).mean()), rel=1e-6)
    layer.eval()
    _, stats = layer(x.detach(), token_ids=ids)
    clean = x.detach() @ W.t()
    assert stats.z_loss.item() == pytest.approx(num((torch.logsumexp(clean, -1) ** 2).mean()), rel=1e-6)


# ---------------------------------------------------------------------------
# Permutation, padding, noise keying, determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator,top_k,cf", [("sparsemixer", 1, None), ("switch", 1, 8.0), ("sparsemixer_v2", 2, None)])
def test_permutation_equivariance(estimator, top_k, cf):
    layer = make(estimator=estimator, top_k=top_k, jitter_mode="input", jitter_eps=0.1, capacity_factor=cf)
    x = x_of(30, seed=6)
    ids = torch.arange(1000, 1030)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    y, s = layer(x, token_ids=ids)
    yp, sp = layer(x[perm], token_ids=ids[perm])
    assert torch.allclose(yp, y[perm], atol=1e-6)
    assert torch.equal(sp.tokens_per_expert, s.tokens_per_expert)
    assert s.dropped_fraction.item() == sp.dropped_fraction.item() == 0.0
    for name in ("balance_loss", "z_loss", "router_entropy"):
        assert getattr(sp, name).item() == pytest.approx(getattr(s, name).item(), rel=1e-5)


@pytest.mark.parametrize("estimator,top_k", [("switch", 1), ("sparsemixer", 1), ("sparsemixer_v2", 2)])
def test_padding_is_excluded(estimator, top_k):
    """Padding outputs 0 and is left out of capacity, balance, z-loss and entropy: the real tokens
    behave exactly as if the padding were not there."""
    layer = make(estimator=estimator, top_k=top_k, jitter_mode="input", capacity_factor=1.0)
    x = x_of(2 * 7, seed=8).reshape(2, 7, 6)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    pad[1, 3:] = True
    ids = torch.arange(14).reshape(2, 7)
    y, s = layer(x, padding_mask=pad, token_ids=ids)
    assert y.shape == x.shape
    assert (y[pad] == 0).all()
    y_real, s_real = layer(x[~pad], token_ids=ids[~pad])
    assert torch.allclose(y[~pad], y_real, atol=1e-6)
    assert torch.equal(s.tokens_per_expert, s_real.tokens_per_expert)
    assert s.num_tokens == s_real.num_tokens == 8
    for name in ("balance_loss", "z_loss", "router_entropy", "dropped_fraction"):
        assert getattr(s, name).item() == pytest.approx(getattr(s_real, name).item(), rel=1e-6, abs=1e-7)
    # Padding gets no gradient through the layer.
    xg = x.clone().requires_grad_(True)
    y, s = layer(xg, padding_mask=pad, token_ids=ids)
    (y.sum() + s.balance_loss + s.z_loss).backward()
    assert (xg.grad[pad] == 0).all()


def test_all_padding():
    layer = make(estimator="sparsemixer")
    x = x_of(5)
    y, s = layer(x, padding_mask=torch.ones(5, dtype=torch.bool))
    assert (y == 0).all() and s.num_tokens == 0 and s.tokens_per_expert.sum() == 0
    assert s.balance_loss.item() == 0.0 and s.z_loss.item() == 0.0 and s.dropped_fraction.item() == 0.0


@pytest.mark.parametrize("estimator", ["sparsemixer", "switch", "st"])
def test_noise_is_keyed_by_token_id_not_position(estimator):
    """Two 'ranks' holding different subsets of a batch: the same token id gets the same draws."""
    layer = make(estimator=estimator, jitter_mode="input", jitter_eps=0.5)
    x = x_of(12, seed=9)
    ids = torch.arange(200, 212)
    y_full, _ = layer(x, token_ids=ids)
    part = torch.tensor([7, 2, 11, 5])
    y_part, _ = layer(x[part], token_ids=ids[part])
    assert torch.allclose(y_part, y_full[part], atol=1e-6)
    # Default token ids are positions 0..T-1.
    assert torch.allclose(layer(x)[0], layer(x, token_ids=torch.arange(12))[0])


def _sampled(layer, x, ids):
    """The experts chosen in a training forward (recomputed from the layer's own noise key)."""
    noise = RoutingNoise(layer.noise_seed, layer.routing_step, layer.layer_id, ids)
    return layer.estimator(layer.router(x), noise, True).expert_ids


def test_noise_changes_with_step_layer_and_seed_and_eval_is_deterministic():
    x = x_of(64, seed=10)
    ids = torch.arange(64)
    base = make(estimator="sparsemixer", jitter_eps=0.5, noise_seed=1, layer_id=0)
    y0, _ = base(x)
    assert torch.equal(base(x)[0], y0)  # same key -> same draws
    set_routing_step(torch.nn.Sequential(base), 3)
    assert base.routing_step == 3 and moe_layers(torch.nn.Sequential(base)) == [base]
    y_step, _ = base(x)
    assert not torch.allclose(y_step, y0)
    other_seed = make(estimator="sparsemixer", jitter_eps=0.5, noise_seed=2, layer_id=0)
    other_layer = make(estimator="sparsemixer", jitter_eps=0.5, noise_seed=1, layer_id=1)
    for other in (other_seed, other_layer):
        other.load_state_dict(base.state_dict())
        other.routing_step = 3
        assert not torch.equal(_sampled(other, x, ids), _sampled(base, x, ids))
        assert not torch.allclose(other(x)[0], y_step)
    # Evaluation: no noise at all.
    outs = []
    for layer in (base, other_seed, other_layer):
        layer.eval()
        for step in (0, 9):
            layer.routing_step = step
            outs.append(layer(x)[0])
    assert all(torch.equal(o, outs[0]) for o in outs)


# ---------------------------------------------------------------------------
# No [T, E, C] tensor
# ---------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("estimator,top_k", [("sparsemixer", 1), ("sparsemixer_v2", 2)])
def test_no_tokens_by_experts_by_capacity_tensor(estimator, top_k):
    """Every tensor created in forward and backward is O(T * max(E, D, d_ff) * k); a one-hot
    dispatch mask would be T * E * C = 256 * 16 * 20 elements."""
    T, E, D, d_ff = 256, 16, 8, 16
    layer = make(d_model=D, d_ff=d_ff, num_experts=E, estimator=estimator, top_k=top_k, capacity_factor=1.25)
    x = x_of(T, d=D).requires_grad_(True)
    with _LargestTensor() as mode:
        y, s = layer(x)
        (y.square().sum() + s.balance_loss + s.z_loss).backward()
    bound = 2 * top_k * T * max(E, D, d_ff)
    cap = math.ceil(T / E * 1.25)
    assert mode.largest <= bound < T * E * cap, (mode.largest, mode.op)


# ---------------------------------------------------------------------------
# DeepSpeed contract
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["sparsemixer", "switch"])
def test_deepspeed_parameter_contract(estimator):
    import deepspeed
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    layer = make(estimator=estimator)
    assert isinstance(layer, deepspeed.moe.layer.MoE)
    assert layer.num_experts == 4 and layer.ep_size == 1 and layer.num_local_experts == 4
    assert layer.expert_group_name == "ep_size_1"
    expert_names = set()
    for name, p in layer.named_parameters():
        if "expert" in name:
            assert "deepspeed_moe.experts.deepspeed_experts." in name, name
            j = int(name.split("deepspeed_experts.")[1].split(".")[0])
            assert 0 <= j < 4
            assert p.allreduce is False and p.group_name == "ep_size_1" and is_moe_param(p)
            expert_names.add(j)
        else:
            assert not is_moe_param(p), name
            assert "expert" not in name
    assert expert_names == {0, 1, 2, 3}
    for name, _ in layer.named_buffers():
        assert "expert" not in name, name
    for name, _ in layer.named_modules():
        if "expert" in name:
            assert name.startswith("deepspeed_moe"), name
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(layer.parameters()), "name": "all"})
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and moe[0]["name"] == "ep_size_1"
    assert len(moe[0]["params"]) == 8  # wi, wo per expert
    assert len(groups[0]["params"]) == sum(1 for n, _ in layer.named_parameters() if "expert" not in n)


def test_experts_are_initialised_by_global_id():
    full = make(num_experts=4, init_seed=3, layer_id=2)
    half = make(num_experts=4, init_seed=3, layer_id=2, ep_size=2, ep_rank=1)
    assert half.num_local_experts == 2 and half.expert_group_name == "ep_size_2"
    assert len(half.experts.deepspeed_experts) == 2
    for local, global_id in ((0, 2), (1, 3)):
        a, b = half.experts.deepspeed_experts[local], full.experts.deepspeed_experts[global_id]
        assert torch.equal(a.wi.weight, b.wi.weight) and torch.equal(a.wo.weight, b.wo.weight)
    for p in half.experts.parameters():
        assert p.group_name == "ep_size_2" and p.allreduce is False
    # Distinct experts, layers and seeds get distinct weights; building experts does not touch
    # the global RNG.
    w = [e.wi.weight for e in full.experts.deepspeed_experts]
    assert not torch.equal(w[0], w[1])
    assert not torch.equal(make(init_seed=3, layer_id=1).experts.deepspeed_experts[0].wi.weight, w[0])
    assert not torch.equal(make(init_seed=4, layer_id=2).experts.deepspeed_experts[0].wi.weight, w[0])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    from moetrain.moe.experts import LocalExperts

    LocalExperts(6, 8, 4, 0).reset_parameters(0, 0)
    assert torch.equal(torch.get_rng_state(), before)


def test_constructor_validation():
    with pytest.raises(ValueError):
        make(top_k=5)
    with pytest.raises(ValueError):
        make(num_experts=4, ep_size=3, ep_rank=0)
    with pytest.raises(ValueError):
        make(capacity_factor=0.0)
    with pytest.raises(ValueError):
        make(estimator="no_such_estimator")


def test_leading_dims_and_dtypes():
    layer = make(estimator="sparsemixer")
    x = torch.randn(3, 5, 6)
    y, s = layer(x)
    assert y.shape == x.shape and s.num_tokens == 15
    layer64 = make(estimator="sparsemixer").double()
    y64, _ = layer64(x.double())
    assert y64.dtype == torch.float64


def test_router_precision_is_at_least_float32():
    """bf16 inputs are routed in float32; float64 stays float64 (a float32 cast there would
    round the closed-form tests' logits and, near ties, change the argmax)."""
    from moetrain.moe.router import Router

    router = Router(4, 3)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert router.double()(x).dtype == torch.float64
    tie = torch.tensor([[1.0, 1.0 + 1e-12, 0.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        router.classifier.weight.copy_(torch.eye(3, 4, dtype=torch.float64))
    assert int(router(tie).argmax()) == 1  # float32 would tie and pick expert 0
    assert Router(4, 3).bfloat16()(x.bfloat16()).dtype == torch.float32
