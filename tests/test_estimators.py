"""Every router estimator against its closed form (docs/estimators.md, spec sections 2 and 4).

All checks run in float64 with injected draws (``FixedNoise``), so forward values and gradients
(router logits, expert outputs, SparseMixer's omega) must agree with the formulas to 1e-12.
Reference implementations are called as oracles: the PyPI ``reinmax`` package (T1) and
``transformers``' PhiMoE ``sparsemixer`` (T5). T3/T4 statistics use the counter noise.

Harness: logits theta [T, E], per-token expert outputs H [T, E, d] (H[t, i] = h_i(x_t)); the
estimator's routing gives ``y_t = sum_k w_tk * H[t, id_tk]`` (times omega for SparseMixer) and a
loss L(y) that is linear (<y, G>) or nonlinear; G = dL/dy at the forward point enters the forms.
"""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.moe.estimators import (
    ESTIMATORS,
    ReinMaxEstimator,
    StraightThroughEstimator,
    build_estimator,
    reinmax,
    sparsemixer_mask,
)
from moetrain.moe.noise import (
    STREAM_COIN,
    STREAM_COIN_2,
    STREAM_JITTER,
    STREAM_SAMPLE,
    STREAM_SAMPLE_2,
    FixedNoise,
    RoutingNoise,
)


F64 = torch.float64
TOL = 1e-12


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


def jac_vec(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise J(q) v with J(q) = diag(q) - q q^T."""
    return q * v - q * (q * v).sum(-1, keepdim=True)


def one_hot(ids: torch.Tensor, num: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], num, dtype=F64).scatter(-1, ids.reshape(-1, 1), 1.0)


class Loss:
    """L(y) and its gradient G(y) in closed form."""

    def __init__(self, kind: str, d: int, gen: torch.Generator):
        self.kind = kind
        self.g = torch.randn(d, dtype=F64, generator=gen)
        self.w = torch.randn(d, dtype=F64, generator=gen)

    def __call__(self, y):
        if self.kind == "linear":
            return (y * self.g).sum()
        z = 3 * y * self.w  # softplus via logaddexp: F.softplus's threshold breaks d/dz = sigmoid(z)
        return torch.logaddexp(torch.zeros_like(z), z).sum() + (y**4).sum()

    def grad(self, y):
        y = y.detach()
        if self.kind == "linear":
            return self.g.expand_as(y)
        return 3 * self.w * torch.sigmoid(3 * y * self.w) + 4 * y**3


def case(T=8, E=6, d=5, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = scale * torch.randn(T, E, dtype=F64, generator=gen)
    H = torch.randn(T, E, d, dtype=F64, generator=gen)
    return theta, H, gen


def uniforms(gen, T, C):
    return torch.rand(T, C, dtype=F64, generator=gen).clamp(1e-300, 1 - 2**-53)


def run(est, theta, H, noise, training, loss):
    """Forward through the harness; returns routing, y and grads (theta, H, omega or None)."""
    theta = theta.clone().requires_grad_(True)
    H = H.clone().requires_grad_(True)
    r = est(theta, noise, training)
    d = H.shape[-1]
    picked = H.gather(1, r.expert_ids.unsqueeze(-1).expand(-1, -1, d))
    y = (r.weights.unsqueeze(-1) * picked).sum(1)
    if r.channel_scale is not None:
        y = y * r.channel_scale
    inputs = [theta, H] + ([r.channel_scale] if r.channel_scale is not None else [])
    grads = torch.autograd.grad(loss(y), inputs)
    return r, y.detach(), grads


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3e} > {tol:.0e}"


def expert_grad(T, E, d, ids, coef_times_g):
    """H-gradient that is ``coef_times_g[t]`` at (t, ids[t]) and 0 elsewhere."""
    out = torch.zeros(T, E, d, dtype=F64)
    out[torch.arange(T), ids] = coef_times_g
    return out


# ---------------------------------------------------------------------------
# Registry / construction
# ---------------------------------------------------------------------------


def test_registry_has_all_estimators():
    assert {"switch", "topk", "sparsemixer", "sparsemixer_v2", "st", "stgs", "reinmax"} <= set(ESTIMATORS)
    with pytest.raises(ValueError, match="unknown estimator"):
        build_estimator("nope", 4)


@pytest.mark.parametrize("name,k", [("switch", 2), ("sparsemixer", 2), ("sparsemixer_v2", 1), ("st", 2), ("reinmax", 2)])
def test_wrong_top_k_is_rejected(name, k):
    with pytest.raises(ValueError):
        build_estimator(name, 4, k, d_model=3)


def test_dense_flags_and_routes_per_token():
    for name in ("st", "stgs", "reinmax"):
        est = build_estimator(name, 5, 1)
        assert est.dense and est.routes_per_token(True) == 5 and est.routes_per_token(False) == 1
    for name, k in (("switch", 1), ("topk", 3), ("sparsemixer_v2", 2)):
        est = build_estimator(name, 5, k, d_model=3)
        assert not est.dense and est.routes_per_token(True) == k


# ---------------------------------------------------------------------------
# Switch (both jitter modes) and top-k
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_kind", ["linear", "nonlinear"])
@pytest.mark.parametrize("mode", ["none", "input"])
def test_switch_closed_form(mode, loss_kind):
    theta, H, gen = case(seed=1)
    T, E, d = H.shape
    est = build_estimator("switch", E, 1, jitter_eps=0.1, jitter_mode=mode)
    assert est.input_jitter_eps == (0.1 if mode == "input" else 0.0)  # the router applies it
    loss = Loss(loss_kind, d, gen)
    for training in (True, False):
        r, y, (g_theta, g_h) = run(est, theta, H, FixedNoise({}), training, loss)
        p = theta.softmax(-1)
        D = p.argmax(-1)
        pD = p.gather(-1, D[:, None])
        assert torch.equal(r.expert_ids[:, 0], D) and torch.equal(r.balance_ids, D)
        close(r.weights, pD)
        close(r.probs, p)
        hD = H[torch.arange(T), D]
        G = loss.grad(y)
        a = (G * hD).sum(-1, keepdim=True)
        close(g_theta, a * pD * (one_hot(D, E) - p))
        close(g_h, expert_grad(T, E, d, D, pD * G))


@pytest.mark.parametrize("loss_kind", ["linear", "nonlinear"])
def test_switch_logits_jitter_closed_form(loss_kind):
    """SparseMixer-paper baseline: theta' = theta * U(1-eps, 1+eps), p = softmax(theta'), D = argmax p."""
    theta, H, gen = case(seed=2)
    T, E, d = H.shape
    eps = 0.1
    u = uniforms(gen, T, E)
    est = build_estimator("switch", E, 1, jitter_eps=eps, jitter_mode="logits")
    assert est.input_jitter_eps == 0.0
    loss = Loss(loss_kind, d, gen)
    r, y, (g_theta, g_h) = run(est, theta, H, FixedNoise({STREAM_JITTER: u}), True, loss)
    m = 1 - eps + 2 * eps * u
    p = (theta * m).softmax(-1)
    D = p.argmax(-1)
    pD = p.gather(-1, D[:, None])
    assert torch.equal(r.expert_ids[:, 0], D)
    close(r.weights, pD)
    close(r.probs, p)
    G = loss.grad(y)
    a = (G * H[torch.arange(T), D]).sum(-1, keepdim=True)
    close(g_theta, m * a * pD * (one_hot(D, E) - p))
    close(g_h, expert_grad(T, E, d, D, pD * G))
    # Evaluation is clean argmax whatever the draws.
    r_eval, _, _ = run(est, theta, H, FixedNoise({STREAM_JITTER: u}), False, loss)
    assert torch.equal(r_eval.expert_ids[:, 0], theta.argmax(-1))
    close(r_eval.weights, theta.softmax(-1).max(-1, keepdim=True).values)
    # The jitter changed at least one decision in this batch (the test exercises it).
    assert not torch.equal(D, theta.argmax(-1)) or not torch.allclose(pD, theta.softmax(-1).max(-1, keepdim=True).values)


@pytest.mark.parametrize("mode", ["none", "logits"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_closed_form(k, mode):
    theta, H, gen = case(seed=3 + k)
    T, E, d = H.shape
    eps = 0.2
    u = uniforms(gen, T, E)
    est = build_estimator("topk", E, k, jitter_eps=eps, jitter_mode=mode)
    loss = Loss("nonlinear", d, gen)
    for training in (True, False):
        r, y, (g_theta, g_h) = run(est, theta, H, FixedNoise({STREAM_JITTER: u}), training, loss)
        m = 1 - eps + 2 * eps * u if (training and mode == "logits") else torch.ones_like(u)
        jittered = theta * m
        ids = jittered.topk(k, -1).indices
        assert torch.equal(r.expert_ids, ids)
        # Renormalised top-k probabilities = softmax over the chosen logits.
        w = jittered.gather(-1, ids).softmax(-1)
        close(r.weights, w)
        close(r.probs, jittered.softmax(-1))
        G = loss.grad(y)
        a = (G.unsqueeze(1) * H.gather(1, ids[..., None].expand(-1, -1, d))).sum(-1)  # [T, k]
        expected = torch.zeros(T, E, dtype=F64).scatter(-1, ids, w * (a - (w * a).sum(-1, keepdim=True)))
        close(g_theta, m * expected)
        exp_h = torch.zeros(T, E, d, dtype=F64)
        for j in range(k):
            exp_h[torch.arange(T), ids[:, j]] += w[:, j : j + 1] * G
        close(g_h, exp_h)
    if mode == "logits" and k > 1:  # the jitter changed some decision or weight here
        assert not torch.equal(run(est, theta, H, FixedNoise({STREAM_JITTER: u}), True, loss)[0].weights,
                               run(est, theta, H, FixedNoise({}), False, loss)[0].weights)


def test_unknown_jitter_mode_is_rejected():
    for name in ("switch", "topk"):
        with pytest.raises(ValueError, match="jitter_mode"):
            build_estimator(name, 4, 1 if name == "switch" else 2, jitter_mode="logit")


# ---------------------------------------------------------------------------
# SparseMixer v1 (T2)
# ---------------------------------------------------------------------------


def keep_set(theta, eps):
    """Kept experts by the official rule in multiplicative form (no division): independent of the code."""
    m = theta.max(-1, keepdim=True).values
    return (m - theta) <= 2 * eps * torch.maximum(theta.abs(), m)


def masked_softmax(theta, keep):
    return theta.masked_fill(~keep, float("-inf")).softmax(-1)


def test_sparsemixer_mask_hand_cases():
    eps = 0.1
    rows = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # 0/0 -> NaN -> kept
            [0.0, -1.0, -0.01],  # m = 0: every negative logit has ratio 1 -> masked
            [-1.0, -1.1, -1.5],  # m < 0: ratio (|l| - |m|) / |l| = 0.09, 0.33
            [10.0, 8.1, 7.9],  # ratio 0.19 kept, 0.21 masked
            [1.0, -1.0, 0.5],
        ],
        dtype=F64,
    )
    expected = torch.tensor(
        [[0, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(sparsemixer_mask(rows, eps), expected)
    # Argmax always kept; masks computed with no graph; no mutation.
    theta = torch.randn(200, 7, dtype=F64, requires_grad=True)
    before = theta.detach().clone()
    mask = sparsemixer_mask(theta, eps)
    assert not mask.requires_grad
    assert not mask.gather(-1, theta.argmax(-1, keepdim=True)).any()
    assert torch.equal(theta.detach(), before)
    assert torch.equal(~mask, keep_set(theta.detach(), eps))


@pytest.mark.parametrize("loss_kind", ["linear", "nonlinear"])
def test_sparsemixer_v1_closed_form(loss_kind):
    """T2: T=64, N=8, d=5, theta ~ N(0, 4), eps=0.1, omega ~ U(0.5, 1.5)."""
    theta, H, gen = case(T=64, E=8, d=5, scale=2.0, seed=7)
    T, E, d = H.shape
    eps = 0.1
    est = build_estimator("sparsemixer", E, 1, jitter_eps=eps, d_model=d).double()
    with torch.no_grad():
        est.omega.copy_(0.5 + torch.rand(d, dtype=F64, generator=gen))
    omega = est.omega.detach().clone()
    U, coin = uniforms(gen, T, E), uniforms(gen, T, 1)
    loss = Loss(loss_kind, d, gen)
    theta_before = theta.clone()
    r, y, (g_theta, g_h, g_omega) = run(est, theta, H, FixedNoise({STREAM_SAMPLE: U, STREAM_COIN: coin}), True, loss)
    assert torch.equal(theta, theta_before)  # the mask never touches the caller's logits

    keep = keep_set(theta, eps)
    pt = masked_softmax(theta, keep)
    # Gumbel-max on the masked logits with Exp = -log U: argmax(theta~ - log E).
    D = (theta.masked_fill(~keep, float("-inf")) - torch.log(-torch.log(U))).argmax(-1)
    assert torch.equal(r.expert_ids[:, 0], D) and torch.equal(r.balance_ids, D)
    assert keep.gather(-1, D[:, None]).all()
    argmax = theta.argmax(-1)
    c = torch.where((D == argmax) | (coin[:, 0] > 0.5), 1.0, 0.5).to(F64)[:, None]
    pD = pt.gather(-1, D[:, None])
    close(r.weights, c * pD)
    close(r.probs, pt)
    assert r.channel_scale is est.omega

    coef = r.weights.detach() / pD
    assert set(coef.flatten().round(decimals=12).tolist()) == {0.5, 1.0}  # both orders exercised
    assert ((coef == 0.5).flatten() <= (D != argmax)).all()  # mid-point only off the argmax
    assert ((D != argmax).sum() > 0) and ((D == argmax).sum() > 0)

    G = loss.grad(y)
    hD = H[torch.arange(T), D]
    a = (G * omega * hD).sum(-1, keepdim=True)
    close(g_theta, 2 * a * pD * (one_hot(D, E) - pt))  # x2, no factor c
    assert (g_theta[~keep] == 0).all()  # masked coordinates: exactly zero
    close(g_h, expert_grad(T, E, d, D, c * pD * omega * G))
    close(g_omega, (c * pD * hD * G).sum(0))

    # Eval: argmax, weight = masked softmax at the argmax (larger than the plain softmax max), times omega.
    r, y, (g_theta, g_h, g_omega) = run(est, theta, H, FixedNoise({}), False, loss)
    assert torch.equal(r.expert_ids[:, 0], argmax)
    close(r.weights, pt.gather(-1, argmax[:, None]))
    assert (r.weights >= theta.softmax(-1).max(-1, keepdim=True).values - 1e-15).all()
    close(y, r.weights.detach() * H[torch.arange(T), argmax] * omega)


def test_sparsemixer_v1_leaf_logits_and_single_candidate():
    """A leaf that requires grad is fine (the official code's in-place fill would raise) and a
    token with one candidate gets weight omega * h_D and zero router gradient."""
    E, d = 4, 3
    est = build_estimator("sparsemixer", E, 1, jitter_eps=0.1, d_model=d).double()
    theta = torch.tensor([[5.0, 1.0, 0.5, -2.0], [1.0, 0.95, 0.9, 0.1]], dtype=F64, requires_grad=True)
    U = torch.full((2, E), 0.5, dtype=F64)
    r = est(theta, FixedNoise({STREAM_SAMPLE: U, STREAM_COIN: torch.full((2, 1), 0.1, dtype=F64)}), True)
    assert r.weights[0, 0].item() == 1.0 and r.expert_ids[0, 0].item() == 0
    (g,) = torch.autograd.grad(r.weights.sum(), theta)
    assert (g[0] == 0).all() and g[1].abs().sum() > 0


# ---------------------------------------------------------------------------
# SparseMixer v2 (T5 closed form; HF parity below)
# ---------------------------------------------------------------------------


def v2_expected(theta, U1, c1, U2, c2, eps):
    """Independent slot-by-slot computation: ids, coefficients, masked probs per slot."""
    keep1 = keep_set(theta, eps)
    p1 = masked_softmax(theta, keep1)
    D1 = (theta.masked_fill(~keep1, float("-inf")) - torch.log(-torch.log(U1))).argmax(-1)
    rest = theta.scatter(-1, D1[:, None], float("-inf"))
    m2 = rest.max(-1, keepdim=True).values
    keep2 = ((m2 - theta) <= 2 * eps * torch.maximum(theta.abs(), m2)) & torch.isfinite(rest)
    p2 = masked_softmax(theta, keep2)
    D2 = (theta.masked_fill(~keep2, float("-inf")) - torch.log(-torch.log(U2))).argmax(-1)
    third = torch.tensor(0.3333, dtype=torch.float32).item()  # the reference's float32 constant
    k1 = torch.where((D1 == p1.argmax(-1)) | (c1[:, 0] > 0.75), 1.0, third).to(F64)
    k2 = torch.where((D2 == p2.argmax(-1)) | (c2[:, 0] > 0.75), 1.0, third).to(F64)
    return (D1, D2), (k1, k2), (p1, p2), (keep1, keep2)


@pytest.mark.parametrize("loss_kind", ["linear", "nonlinear"])
def test_sparsemixer_v2_closed_form(loss_kind):
    theta, H, gen = case(T=128, E=8, d=4, scale=0.3, seed=11)
    T, E, d = H.shape
    eps = 0.1
    est = build_estimator("sparsemixer_v2", E, 2, jitter_eps=eps)
    U1, c1, U2, c2 = uniforms(gen, T, E), uniforms(gen, T, 1), uniforms(gen, T, E), uniforms(gen, T, 1)
    noise = FixedNoise({STREAM_SAMPLE: U1, STREAM_COIN: c1, STREAM_SAMPLE_2: U2, STREAM_COIN_2: c2})
    loss = Loss(loss_kind, d, gen)
    theta_before = theta.clone()
    r, y, (g_theta, g_h) = run(est, theta, H, noise, True, loss)
    assert torch.equal(theta, theta_before)
    (D1, D2), (k1, k2), (p1, p2), (keep1, keep2) = v2_expected(theta, U1, c1, U2, c2, eps)
    assert torch.equal(r.expert_ids, torch.stack([D1, D2], -1))
    assert (D1 != D2).all()
    w1, w2 = p1.gather(-1, D1[:, None])[:, 0], p2.gather(-1, D2[:, None])[:, 0]
    close(r.weights, torch.stack([k1 * w1, k2 * w2], -1))  # not renormalised
    close(r.probs, p1)
    assert torch.equal(r.balance_ids, D1) and r.channel_scale is None
    for k in (k1, k2):  # both coefficients occur in both slots
        assert (k == 1.0).any() and (k < 1.0).any()

    G = loss.grad(y)
    h1, h2 = H[torch.arange(T), D1], H[torch.arange(T), D2]
    g1, g2 = (G * h1).sum(-1, keepdim=True), (G * h2).sum(-1, keepdim=True)
    expected = g1 * w1[:, None] * (one_hot(D1, E) - p1) + g2 * w2[:, None] * (one_hot(D2, E) - p2)
    close(g_theta, expected)  # no x2, no 1/c
    assert (g_theta[~(keep1 | keep2)] == 0).all()
    exp_h = torch.zeros(T, E, d, dtype=F64)
    exp_h[torch.arange(T), D1] += (k1 * w1)[:, None] * G
    exp_h[torch.arange(T), D2] += (k2 * w2)[:, None] * G
    close(g_h, exp_h)

    # Eval: the top-2 logits, each weighted by its slot's masked softmax.
    r, _, _ = run(est, theta, H, FixedNoise({}), False, loss)
    top2 = theta.topk(2, -1).indices
    assert torch.equal(r.expert_ids, top2)
    rest = theta.scatter(-1, top2[:, :1], float("-inf"))
    m2 = rest.max(-1, keepdim=True).values
    keep2 = ((m2 - theta) <= 2 * eps * torch.maximum(theta.abs(), m2)) & torch.isfinite(rest)
    close(r.weights[:, 0], masked_softmax(theta, keep_set(theta, eps)).gather(-1, top2[:, :1])[:, 0])
    close(r.weights[:, 1], masked_softmax(theta, keep2).gather(-1, top2[:, 1:])[:, 0])


# ---------------------------------------------------------------------------
# Dense estimators: ST, STGS, ReinMax (v_i = pi_i h_i)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", ["st", "stgs", "reinmax"])
def test_dense_closed_form(name, tau):
    theta, H, gen = case(T=16, E=5, d=4, seed=13)
    T, E, d = H.shape
    est = build_estimator(name, E, 1, temperature=tau)
    U = uniforms(gen, T, E)
    loss = Loss("nonlinear", d, gen)
    r, y, (g_theta, g_h) = run(est, theta, H, FixedNoise({STREAM_SAMPLE: U}), True, loss)
    gumbel = -torch.log(-torch.log(U))
    D = (theta + gumbel).argmax(-1)
    pi = theta.softmax(-1)
    e_D = one_hot(D, E)
    assert torch.equal(r.expert_ids, torch.arange(E).expand(T, E)) and torch.equal(r.balance_ids, D)
    close(r.weights, e_D * pi)  # forward = Switch's pi_D h_D on the sampled expert
    close(r.probs, pi)
    G = loss.grad(y)
    gh = (G.unsqueeze(1) * H).sum(-1)  # <G, h_i>  [T, E]
    a = pi * gh  # dL/dD^ with v_i = pi_i h_i
    gate = (e_D * gh).sum(-1, keepdim=True) * pi.gather(-1, D[:, None]) * (e_D - pi)  # J(pi) (e_D * gh)
    if name == "st":
        expected = jac_vec((theta / tau).softmax(-1), a) / tau + gate
    elif name == "stgs":
        expected = jac_vec(((theta + gumbel) / tau).softmax(-1), a) / tau + gate
    else:  # ReinMax: 2 J(psi) a - J(pi) a / 2 + J(pi) b, no 1/tau
        psi = 0.5 * ((theta / tau).softmax(-1) + e_D)
        expected = 2 * jac_vec(psi, a) - 0.5 * jac_vec(pi, a) + gate
    close(g_theta, expected)
    close(g_h, expert_grad(T, E, d, D, pi.gather(-1, D[:, None]) * G))  # only the sampled expert
    # Eval: argmax, sparse.
    r, _, _ = run(est, theta, H, FixedNoise({}), False, loss)
    assert torch.equal(r.expert_ids[:, 0], theta.argmax(-1)) and r.expert_ids.shape == (T, 1)
    close(r.weights, pi.max(-1, keepdim=True).values)


def test_reinmax_sample_ignores_temperature():
    theta, _, gen = case(T=32, E=6, seed=17)
    U = uniforms(gen, 32, 6)
    ids = [ReinMaxEstimator(6, 1, temperature=t).surrogate(theta, FixedNoise({STREAM_SAMPLE: U}))[0] for t in (0.3, 1, 5)]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[1], ids[2])
    st_ids = StraightThroughEstimator(6, 1, temperature=3.0).surrogate(theta, FixedNoise({STREAM_SAMPLE: U}))[0]
    assert torch.equal(ids[0], st_ids)


# ---------------------------------------------------------------------------
# T1: ReinMax parity with the PyPI package
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 1.3, 2.0])
def test_reinmax_matches_pypi_package(tau):
    reinmax_pkg = pytest.importorskip("reinmax").reinmax
    gen = torch.Generator().manual_seed(int(tau * 10))
    for rep in range(3):
        logits = torch.randn(5, 6, dtype=F64, generator=gen)
        a, b = torch.randn(5, 6, dtype=F64, generator=gen), torch.randn(5, 6, dtype=F64, generator=gen)
        ref_in = logits.clone().requires_grad_(True)
        torch.manual_seed(1000 + rep)  # the package samples with torch.multinomial
        sample, p = reinmax_pkg(ref_in, tau)
        ((sample * a).sum() + (p * b).sum()).backward()
        ids = sample.argmax(-1, keepdim=True)
        assert torch.equal(sample, one_hot(ids, 6))

        ours_in = logits.clone().requires_grad_(True)
        one, pi = reinmax(ours_in, ids, tau)
        assert torch.equal(one, sample)
        close(pi, p.detach())
        ((one * a).sum() + (pi * b).sum()).backward()
        close(ours_in.grad, ref_in.grad)
        closed = 2 * jac_vec(0.5 * ((logits / tau).softmax(-1) + sample), a) - 0.5 * jac_vec(pi.detach(), a) + jac_vec(pi.detach(), b)
        close(ours_in.grad, closed)
        close(ours_in.grad.sum(-1), torch.zeros(5, dtype=F64))


# ---------------------------------------------------------------------------
# T5: SparseMixer-v2 parity with transformers' PhiMoE sparsemixer
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_sparsemixer():
    mod = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    return mod.sparsemixer


def test_sparsemixer_v2_matches_hf_phimoe(hf_sparsemixer):
    """T=256, N=16, eps=0.01, scores ~ N(0, 9). The reference draws, in order: exponential_ [T, E],
    rand_like [T, 1], exponential_ [T, E], rand_like [T, 1] then uniform_ over it (the second
    uniform draw is the one used). We replay that sequence from the same seed and hand it to our
    estimator as uniforms (U = exp(-Exp)); -log(exp(-x)) is x to a relative ~1e-16 (~1e-11 for
    the smallest draws), which can only matter through the sampled ids, compared exactly."""
    T, E, eps = 256, 16, 0.01
    gen = torch.Generator().manual_seed(5)
    scores = 3.0 * torch.randn(T, E, dtype=F64, generator=gen)
    gamma = torch.randn(T, 2, dtype=F64, generator=gen)
    est = build_estimator("sparsemixer_v2", E, 2, jitter_eps=eps)

    ref_in = scores.clone().requires_grad_(True)
    torch.manual_seed(2024)
    mult, sel = hf_sparsemixer(ref_in, jitter_eps=eps, training=True, top_k=2)
    (mult * gamma).sum().backward()

    torch.manual_seed(2024)
    e1 = torch.empty(T, E, dtype=F64).exponential_()
    u1 = torch.rand(T, 1, dtype=F64)
    e2 = torch.empty(T, E, dtype=F64).exponential_()
    torch.rand(T, 1, dtype=F64)  # overwritten by the reference's uniform_()
    u2 = torch.empty(T, 1, dtype=F64).uniform_()
    noise = FixedNoise({STREAM_SAMPLE: torch.exp(-e1), STREAM_COIN: u1, STREAM_SAMPLE_2: torch.exp(-e2), STREAM_COIN_2: u2})

    ours_in = scores.clone().requires_grad_(True)
    r = est(ours_in, noise, True)
    (r.weights * gamma).sum().backward()
    assert torch.equal(r.expert_ids, sel)
    close(r.weights, mult.detach())
    close(ours_in.grad, ref_in.grad)
    (D1, D2), (k1, k2), (p1, p2), _ = v2_expected(scores, torch.exp(-e1), u1, torch.exp(-e2), u2, eps)
    assert torch.equal(torch.stack([D1, D2], -1), sel)
    close(mult.detach(), torch.stack([k1 * p1.gather(-1, D1[:, None])[:, 0], k2 * p2.gather(-1, D2[:, None])[:, 0]], -1))
    # Scales are in {0.3333, 1}, both occur in both slots (slot 2 has its own coin).
    for k in (k1, k2):
        assert set(k.round(decimals=6).tolist()) == {0.3333, 1.0}
    closed = gamma[:, :1] * p1.gather(-1, D1[:, None]) * (one_hot(D1, E) - p1) + gamma[:, 1:] * p2.gather(
        -1, D2[:, None]
    ) * (one_hot(D2, E) - p2)
    close(ours_in.grad, closed)

    # Evaluation: top-2 logits, masked-softmax weights, same gradients.
    ref_in = scores.clone().requires_grad_(True)
    mult, sel = hf_sparsemixer(ref_in, jitter_eps=eps, training=False, top_k=2)
    (mult * gamma).sum().backward()
    ours_in = scores.clone().requires_grad_(True)
    r = est(ours_in, FixedNoise({}), False)
    (r.weights * gamma).sum().backward()
    assert torch.equal(r.expert_ids, sel) and torch.equal(sel, scores.topk(2, -1).indices)
    close(r.weights, mult.detach())
    close(ours_in.grad, ref_in.grad)


def test_sparsemixer_v2_matches_hf_phimoe_float32(hf_sparsemixer):
    """Same replay in float32, the router dtype in practice. Uniforms are handed over in float64
    (exp of the float32 draws), so -log U rounds back to the reference's float32 exponentials
    exactly and the two implementations agree bit for bit."""
    T, E, eps = 256, 16, 0.01
    gen = torch.Generator().manual_seed(6)
    scores = 3.0 * torch.randn(T, E, generator=gen)
    gamma = torch.randn(T, 2, generator=gen)
    ref_in = scores.clone().requires_grad_(True)
    torch.manual_seed(7)
    mult, sel = hf_sparsemixer(ref_in, jitter_eps=eps, training=True, top_k=2)
    (mult * gamma).sum().backward()
    torch.manual_seed(7)
    e1 = torch.empty(T, E).exponential_()
    u1 = torch.rand(T, 1)
    e2 = torch.empty(T, E).exponential_()
    torch.rand(T, 1)
    u2 = torch.empty(T, 1).uniform_()
    assert torch.equal(-torch.log(torch.exp(-e1.double())).float(), e1)  # the round trip is exact here
    noise = FixedNoise({STREAM_SAMPLE: torch.exp(-e1.double()), STREAM_COIN: u1,
                        STREAM_SAMPLE_2: torch.exp(-e2.double()), STREAM_COIN_2: u2})
    ours_in = scores.clone().requires_grad_(True)
    r = build_estimator("sparsemixer_v2", E, 2, jitter_eps=eps)(ours_in, noise, True)
    (r.weights * gamma).sum().backward()
    assert torch.equal(r.expert_ids, sel)
    assert torch.equal(r.weights, mult)
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# T3 / T4: distributions and mask statistics (counter noise)
# ---------------------------------------------------------------------------

# Upper 0.1% points of chi-square (df -> value).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    keep = probs > 0
    assert (counts[~keep] == 0).all(), "a zero-probability expert was sampled"
    exp = n * probs[keep]
    return float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def counter_noise(n, seed=3):
    return RoutingNoise(seed, 0, 0, torch.arange(n), torch.float32)


ROW = torch.tensor([2.0, 1.9, 1.8, 1.7, 1.5, 1.0, 0.5, 2.05])  # eps=0.1 keeps 5 of 8


def test_sample_frequencies_match_masked_softmax():
    n = 20000
    theta = ROW.expand(n, -1).clone()
    noise = counter_noise(n)
    pt = masked_softmax(ROW[None].double(), keep_set(ROW[None].double(), 0.1))[0]
    assert int((pt > 0).sum()) == 5

    est1 = build_estimator("sparsemixer", 8, 1, jitter_eps=0.1, d_model=2)
    r = est1(theta, noise, True)
    stat, df = chi2(torch.bincount(r.expert_ids[:, 0], minlength=8).double(), pt)
    assert stat < CHI2_999[df], stat

    est2 = build_estimator("sparsemixer_v2", 8, 2, jitter_eps=0.1)
    r2 = est2(theta, noise, True)
    stat, df = chi2(torch.bincount(r2.expert_ids[:, 0], minlength=8).double(), pt)
    assert stat < CHI2_999[df], stat
    # Slot 2 given slot 1 = the argmax (expert 7): masked softmax of the rest.
    sel = r2.expert_ids[:, 0] == 7
    rest = ROW[None].double().scatter(-1, torch.tensor([[7]]), float("-inf"))
    m2 = rest.max()
    keep2 = ((m2 - ROW.double()) <= 0.2 * torch.maximum(ROW.double().abs(), m2)) & torch.isfinite(rest[0])
    p2 = masked_softmax(ROW[None].double(), keep2[None])[0]
    stat, df = chi2(torch.bincount(r2.expert_ids[sel, 1], minlength=8).double(), p2)
    assert stat < CHI2_999[df], stat

    # Dense estimators sample the plain softmax (Gumbel-max).
    theta_d = torch.tensor([0.3, -0.2, 0.0, 0.8, -1.0, 0.1])
    for name in ("st", "reinmax", "stgs"):
        r = build_estimator(name, 6, 1)(theta_d.expand(n, -1).clone(), counter_noise(n, seed=9), True)
        stat, df = chi2(torch.bincount(r.balance_ids, minlength=6).double(), theta_d.double().softmax(-1))
        assert stat < CHI2_999[df], (name, stat)


def test_midpoint_coin_rates():
    n = 20000
    theta = ROW.expand(n, -1).clone()
    noise = counter_noise(n, seed=4)
    r = build_estimator("sparsemixer", 8, 1, jitter_eps=0.1, d_model=2)(theta, noise, True)
    pt = masked_softmax(ROW[None].double(), keep_set(ROW[None].double(), 0.1))[0].float()
    c = r.weights[:, 0] / pt[r.expert_ids[:, 0]]
    off = r.expert_ids[:, 0] != 7
    assert off.sum() > 5000
    assert torch.allclose(c[~off], torch.ones(1))
    rate = (c[off] < 0.75).double().mean().item()
    assert abs(rate - 0.5) < 0.02, rate

    r = build_estimator("sparsemixer_v2", 8, 2, jitter_eps=0.1)(theta, noise, True)
    c = r.weights[:, 0] / pt[r.expert_ids[:, 0]]
    off = r.expert_ids[:, 0] != 7
    assert torch.allclose(c[~off], torch.ones(1))
    rate = (c[off] < 0.5).double().mean().item()
    assert abs(rate - 0.75) < 0.02, rate


@pytest.mark.parametrize(
    "eps,expected", [(0.1, (1.071, 1.151, 1.335, 1.618)), (0.01, (1.007, 1.014, 1.029, 1.049))]
)
def test_mean_kept_experts(eps, expected):
    """T4: mean kept experts for N(0,1) logits over 1e5 tokens; scale invariant; contains the
    logit-jitter reachable set m - l_i <= eps (|m| + |l_i|) (the code's set is a strict superset)."""
    gen = torch.Generator().manual_seed(0)
    tol = 0.01 if eps == 0.1 else 0.004
    for N, want in zip((2, 4, 8, 16), expected):
        theta = torch.randn(100_000, N, generator=gen)
        keep = ~sparsemixer_mask(theta, eps)
        got = keep.sum(-1).double().mean().item()
        assert abs(got - want) < tol, (N, got, want)
        for s in (0.01, 10.0, 0.25, 1024.0):
            assert torch.equal(~sparsemixer_mask(theta * s, eps), keep), s
        m = theta.max(-1, keepdim=True).values
        reachable = (m - theta) <= eps * (m.abs() + theta.abs())
        assert (keep | ~reachable).all()
        if N >= 4:
            assert (keep & ~reachable).any()


def test_estimator_noise_is_per_token():
    """A token's routing depends only on its own logits and draws, not on its batch-mates."""
    n, E = 64, 8
    gen = torch.Generator().manual_seed(1)
    theta = 0.2 * torch.randn(n, E, generator=gen)
    perm = torch.randperm(n, generator=gen)
    for name, k in (("sparsemixer", 1), ("sparsemixer_v2", 2), ("st", 1), ("stgs", 1), ("reinmax", 1)):
        est = build_estimator(name, E, k, jitter_eps=0.1, d_model=3)
        a = est(theta, RoutingNoise(1, 2, 3, torch.arange(n)), True)
        b = est(theta[perm], RoutingNoise(1, 2, 3, perm), True)
        assert torch.equal(a.expert_ids[perm], b.expert_ids), name
        assert torch.equal(a.weights[perm], b.weights), name
    est = build_estimator("switch", E, 1, jitter_eps=0.1, jitter_mode="logits")
    a = est(theta, RoutingNoise(1, 2, 3, torch.arange(n)), True)
    b = est(theta[perm], RoutingNoise(1, 2, 3, perm), True)
    assert torch.equal(a.weights[perm], b.weights)


def test_estimators_handle_zero_tokens():
    for name, k in (("switch", 1), ("topk", 2), ("sparsemixer", 1), ("sparsemixer_v2", 2), ("st", 1), ("stgs", 1), ("reinmax", 1)):
        est = build_estimator(name, 4, k, d_model=3)
        for training in (True, False):
            r = est(torch.zeros(0, 4), RoutingNoise(0, 0, 0, torch.zeros(0, dtype=torch.long)), training)
            assert r.weights.shape[0] == 0 and r.expert_ids.shape[0] == 0 and math.prod(r.probs.shape) == 0


def test_extreme_draws_cannot_select_a_masked_expert():
    """The largest legal float32 draw 1 - 2**-24 (Exp ~ 6e-8, Gumbel ~ +16.6) on a masked or
    very unlikely expert, the smallest 2**-24 elsewhere: the masked expert is never chosen and
    gradients stay finite. (With the old noise a draw could be exactly 1.0: Gumbel +inf.)"""
    top, low = 1 - 2.0**-24, 2.0**-24
    u = torch.full((1, 16), low)
    u[0, 6] = top
    noise = FixedNoise({STREAM_SAMPLE: u, STREAM_COIN: torch.full((1, 1), top), STREAM_SAMPLE_2: u,
                        STREAM_COIN_2: torch.full((1, 1), low)})
    theta = torch.zeros(1, 16)
    theta[0, 0] = 5.0  # every other expert is masked (ratio 1 > 2 eps)
    r = build_estimator("sparsemixer", 16, 1, jitter_eps=0.1, d_model=2)(theta, noise, True)
    assert r.expert_ids.item() == 0 and torch.isfinite(r.weights).all()
    for name in ("stgs", "st", "reinmax"):
        th = torch.zeros(1, 16)
        th[0, 0] = 30.0  # gumbel gap 16.6 + 2.8 < 30
        th.requires_grad_(True)
        r = build_estimator(name, 16, 1)(th, noise, True)
        assert r.balance_ids.item() == 0, name
        (g,) = torch.autograd.grad((r.weights * torch.arange(16.0)).sum(), th)
        assert torch.isfinite(g).all(), name
