"""Router gradient estimators: how a token's expert choice is made and differentiated.

An estimator turns fp32 router logits ``[T, E]`` into a :class:`Routing`: which
experts each token goes to, the combine weights (whose *autograd graph* is the
estimator's gradient), and the probabilities the balance loss uses.

Sparse estimators (switch, topk, sparsemixer, sparsemixer_v2) send each token to
K experts. Dense estimators (st, stgs, reinmax) need every expert's output for
their router gradient: in training they return K = E routes whose forward weights
are one-hot, so the layer, dispatcher and experts never special-case them (the
cost is E times the expert compute, by design). At evaluation every estimator
routes by argmax.

The math, with references, is in ``docs/estimators.md`` (mirrors the project's
shared spec). Shapes: T tokens, E experts, K routes per token, D channels.

Add your own estimator::

    @register_estimator("my_router")
    class MyRouter(Estimator):
        def forward(self, logits, noise, training): ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .noise import STREAM_COIN, STREAM_COIN_2, STREAM_JITTER, STREAM_SAMPLE, STREAM_SAMPLE_2, RoutingNoise


@dataclass
class Routing:
    """What an estimator decided for one batch of tokens.

    Attributes:
        expert_ids: ``[T, K]`` int64 expert of each route (slot 0 = first choice).
        weights: ``[T, K]`` combine weight of each route; its graph carries the
            estimator's router gradient.
        probs: ``[T, E]`` the distribution whose mean enters the Switch balance
            loss (masked softmax for SparseMixer, jittered softmax for Switch).
        balance_ids: ``[T]`` the expert counted in the balance loss's fraction
            term (the first choice, before capacity).
        channel_scale: optional ``[D]`` per-channel output scale (SparseMixer's omega).
    """

    expert_ids: Tensor
    weights: Tensor
    probs: Tensor
    balance_ids: Tensor
    channel_scale: Tensor | None = None


class Estimator(nn.Module):
    """Base class. Subclasses set ``dense`` and implement ``forward``.

    ``input_jitter_eps`` > 0 asks the router to multiply its *input* by
    U(1 - eps, 1 + eps) in training (Switch paper / HF / DeepSpeed jitter).
    """

    dense: ClassVar[bool] = False
    #: Accepts ``selection_bias`` (aux-loss-free balancing): a per-expert bias added to the
    #: probabilities for choosing experts only; the combine weights stay unbiased.
    supports_selection_bias: ClassVar[bool] = False
    input_jitter_eps: float = 0.0

    def __init__(self, num_experts: int, top_k: int = 1, **unused):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, logits: Tensor, noise: RoutingNoise, training: bool) -> Routing:  # pragma: no cover
        raise NotImplementedError

    def routes_per_token(self, training: bool) -> int:
        return self.num_experts if (self.dense and training) else self.top_k


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator adding an estimator to :data:`ESTIMATORS` under ``name``."""

    def add(cls: type[Estimator]) -> type[Estimator]:
        if name in ESTIMATORS and ESTIMATORS[name] is not cls:
            raise ValueError(f"estimator {name!r} is already registered ({ESTIMATORS[name].__name__})")
        ESTIMATORS[name] = cls
        cls.registry_name = name
        return cls

    return add


def build_estimator(name: str, num_experts: int, top_k: int = 1, **kwargs) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; registered: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](num_experts=num_experts, top_k=top_k, **kwargs)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def sparsemixer_mask(logits: Tensor, eps: float) -> Tensor:
    """Experts that could never win under jitter ``eps``: True = masked out.

    The official SparseMixer rule: drop i when ``(m - l_i) / max(|l_i|, m) > 2 eps``
    with m the row max. The argmax is always kept; 0/0 (all zero) gives NaN,
    compares False, and keeps the expert. Never mutates ``logits``.
    """
    with torch.no_grad():
        top = logits.max(dim=-1, keepdim=True).values
        factor = logits.abs().clamp(min=top)
        return ((top - logits) / factor) > (2 * eps)


def _check_jitter_mode(jitter_mode: str) -> None:
    if jitter_mode not in ("input", "logits", "none"):
        raise ValueError(f"jitter_mode must be 'input', 'logits' or 'none', got {jitter_mode!r}")


def _jitter_logits(logits: Tensor, noise: RoutingNoise, eps: float) -> Tensor:
    """Multiply the logits by U(1 - eps, 1 + eps) (the SparseMixer code's Switch baseline)."""
    u = noise.uniform(STREAM_JITTER, logits.shape[-1]).to(logits.dtype)
    return logits * (1.0 - eps + 2.0 * eps * u)


def _biased(probs: Tensor, selection_bias: Tensor | None) -> Tensor:
    """The scores experts are chosen by: ``p + b`` (no gradient: choice is not differentiated)."""
    if selection_bias is None:
        return probs
    return probs.detach() + selection_bias.to(probs.dtype)


def _first_choice_weight(probs: Tensor, ids: Tensor) -> Tensor:
    return probs.gather(-1, ids)


class _MaskedGateFn(torch.autograd.Function):
    """Forward ``c * p_D``; backward ``scale * grad * p_D * (e_D - p)`` to the logits.

    This is SparseMixer's custom gate: the value is scaled by the order
    coefficient ``c`` (1, 1/2 or 1/3) but the gradient is not; v1 doubles it
    (``scale=2``, estimating both the sampling and the gate-value terms), v2 does
    not (``scale=1``). ``p`` is the masked softmax, so masked experts get exactly
    zero gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, masked_probs: Tensor, ids: Tensor, coef: Tensor, scale: float):
        p_d = masked_probs.gather(-1, ids)
        ctx.save_for_backward(masked_probs, ids, p_d)
        ctx.scale = scale
        return p_d * coef

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        masked_probs, ids, p_d = ctx.saved_tensors
        gamma = grad_out * p_d * ctx.scale
        grad_logits = -masked_probs * gamma
        grad_logits = grad_logits.scatter_add(-1, ids, gamma)
        return grad_logits, None, None, None, None


def masked_gate(logits: Tensor, masked_probs: Tensor, ids: Tensor, coef: Tensor, scale: float) -> Tensor:
    return _MaskedGateFn.apply(logits, masked_probs.detach(), ids, coef, scale)


# ---------------------------------------------------------------------------
# Sparse estimators
# ---------------------------------------------------------------------------


@register_estimator("switch")
class SwitchEstimator(Estimator):
    """Switch Transformer top-1: argmax expert, output ``p_D * f_D(x)``.

    The router gradient flows only through the gate value ``p_D``. Jitter is a
    flag: ``"input"`` multiplies the router input (Switch paper, HF, DeepSpeed),
    ``"logits"`` multiplies the logits (the SparseMixer paper's baseline),
    ``"none"`` turns it off. With a ``selection_bias`` b the expert is ``argmax(p + b)`` and the
    gate stays ``p_D`` (DeepSeek-V3's aux-loss-free balancing on softmax scores).
    """

    supports_selection_bias = True

    def __init__(self, num_experts: int, top_k: int = 1, jitter_eps: float = 0.1, jitter_mode: str = "input", **unused):
        super().__init__(num_experts, top_k)
        if top_k != 1:
            # Silently routing top-1 would leave the layer expecting top_k routes per token.
            raise ValueError("switch is top-1; use topk or sparsemixer_v2 for more experts per token")
        _check_jitter_mode(jitter_mode)
        self.jitter_eps = jitter_eps
        self.jitter_mode = jitter_mode
        self.input_jitter_eps = jitter_eps if jitter_mode == "input" else 0.0

    def forward(self, logits: Tensor, noise: RoutingNoise, training: bool, selection_bias: Tensor | None = None) -> Routing:
        if training and self.jitter_mode == "logits" and self.jitter_eps > 0:
            logits = _jitter_logits(logits, noise, self.jitter_eps)
        probs = logits.softmax(dim=-1)
        ids = _biased(probs, selection_bias).argmax(dim=-1, keepdim=True)
        return Routing(ids, _first_choice_weight(probs, ids), probs, ids[:, 0])


@register_estimator("topk")
class TopKEstimator(Estimator):
    """GShard / Mixtral top-k: the k largest softmax probabilities, renormalised.

    With ``top_k=1`` the renormalised weight is always 1, so the router learns
    only from the balance and z losses; use ``switch`` for top-1. Jitter modes
    and ``selection_bias`` as for ``switch`` (the weights renormalise the unbiased p).
    """

    supports_selection_bias = True

    def __init__(self, num_experts: int, top_k: int = 2, jitter_eps: float = 0.0, jitter_mode: str = "none", **unused):
        super().__init__(num_experts, top_k)
        _check_jitter_mode(jitter_mode)
        self.jitter_eps = jitter_eps
        self.jitter_mode = jitter_mode
        self.input_jitter_eps = jitter_eps if jitter_mode == "input" else 0.0

    def forward(self, logits: Tensor, noise: RoutingNoise, training: bool, selection_bias: Tensor | None = None) -> Routing:
        if training and self.jitter_mode == "logits" and self.jitter_eps > 0:
            logits = _jitter_logits(logits, noise, self.jitter_eps)
        probs = logits.softmax(dim=-1)
        ids = _biased(probs, selection_bias).topk(self.top_k, dim=-1).indices
        top_probs = probs.gather(-1, ids)
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return Routing(ids, weights, probs, ids[:, 0])


@register_estimator("sparsemixer")
class SparseMixerEstimator(Estimator):
    """SparseMixer v1 (Liu et al. 2023), top-1, as the official code behaves.

    Training: mask experts that jitter ``eps`` could never make win, sample
    ``D ~ softmax(masked logits)`` (Gumbel-max), pick the order coefficient
    ``c = 1`` when D is the argmax or a fair coin says so, else ``c = 1/2``
    (mid-point), output ``c * p~_D * (omega ⊙ f_D(x))`` with the router gradient
    ``2 * <G, omega ⊙ f_D> * p~_D (e_D - p~)``. Evaluation: argmax, weight p~_D.
    ``omega`` is a learnable per-channel scale initialised to 1.
    """

    def __init__(self, num_experts: int, top_k: int = 1, jitter_eps: float = 0.1, d_model: int | None = None, **unused):
        super().__init__(num_experts, top_k)
        if top_k != 1:
            raise ValueError("sparsemixer is top-1; use sparsemixer_v2 for top-2")
        if d_model is None:
            raise ValueError("sparsemixer needs d_model for its omega scale")
        self.jitter_eps = jitter_eps
        self.omega = nn.Parameter(torch.ones(d_model))

    def forward(self, logits: Tensor, noise: RoutingNoise, training: bool) -> Routing:
        masked = logits.masked_fill(sparsemixer_mask(logits, self.jitter_eps), float("-inf"))
        probs = masked.softmax(dim=-1)
        argmax_ids = logits.argmax(dim=-1, keepdim=True)
        if not training:
            return Routing(argmax_ids, _first_choice_weight(probs, argmax_ids), probs, argmax_ids[:, 0], self.omega)
        exp_draws = noise.exponential(STREAM_SAMPLE, logits.shape[-1]).to(logits.dtype)
        ids = (masked.detach() - exp_draws.log()).argmax(dim=-1, keepdim=True)
        coin = noise.uniform(STREAM_COIN, 1).to(logits.dtype)
        first_order = (ids == argmax_ids) | (coin > 0.5)
        coef = torch.where(first_order, 1.0, 0.5).to(logits.dtype)
        weights = masked_gate(logits, probs, ids, coef, scale=2.0)
        return Routing(ids, weights, probs, ids[:, 0], self.omega)


@register_estimator("sparsemixer_v2")
class SparseMixerV2Estimator(Estimator):
    """SparseMixer v2 (GRIN / PhiMoE), top-2.

    Each slot masks, samples and picks ``c in {1, 1/3}`` (1 when the sample is
    the slot's argmax or with probability 1/4); the second slot repeats it with
    the first choice removed. Router gradient ``sum_k gamma_k p~_k (e_Dk - p~_k)``
    (no doubling), weights not renormalised. The constants 0.3333/0.6667 follow
    the reference so results match it to the last bit.
    """

    def __init__(self, num_experts: int, top_k: int = 2, jitter_eps: float = 0.01, **unused):
        super().__init__(num_experts, top_k)
        if top_k != 2:
            raise ValueError("sparsemixer_v2 routes each token to exactly 2 experts (top_k=2)")
        if num_experts < 2:
            raise ValueError("sparsemixer_v2 needs at least 2 experts")
        self.jitter_eps = jitter_eps

    def _slot(self, logits, scores, noise, training, sample_stream, coin_stream):
        """One slot: ``scores`` may have earlier choices set to -inf."""
        with torch.no_grad():
            top, top_ids = scores.max(dim=-1, keepdim=True)
            mask = ((top - logits) / logits.abs().clamp(min=top)) > (2 * self.jitter_eps)
        masked = scores.masked_fill(mask, float("-inf"))
        if training:
            exp_draws = noise.exponential(sample_stream, logits.shape[-1]).to(logits.dtype)
            ids = (masked.detach() - exp_draws.log()).argmax(dim=-1, keepdim=True)
        else:
            ids = top_ids
        probs = masked.softmax(dim=-1)
        if not training:
            return ids, probs.gather(-1, ids), probs
        coin = noise.uniform(coin_stream, 1).to(logits.dtype)
        first_order = (ids == probs.argmax(dim=-1, keepdim=True)) | (coin > 0.75)
        # The reference forms the coefficient in float32 and then casts it, so in float64
        # the mid-point value is float32(0.3333) = 0.33329999446868896, not 0.3333.
        coef = torch.where(first_order, 1.0, 0.3333).to(torch.float32).to(logits.dtype)
        return ids, masked_gate(logits, probs, ids, coef, scale=1.0), probs

    def forward(self, logits: Tensor, noise: RoutingNoise, training: bool) -> Routing:
        ids1, w1, probs1 = self._slot(logits, logits, noise, training, STREAM_SAMPLE, STREAM_COIN)
        # Not detached: at evaluation slot 2's weight is a plain softmax value whose gradient
        # reaches the logits (as in the reference); in training masked_gate detaches it anyway.
        scores2 = logits.scatter(-1, ids1, float("-inf"))
        ids2, w2, _ = self._slot(logits, scores2, noise, training, STREAM_SAMPLE_2, STREAM_COIN_2)
        ids = torch.cat([ids1, ids2], dim=-1)
        return Routing(ids, torch.cat([w1, w2], dim=-1), probs1, ids1[:, 0])


# ---------------------------------------------------------------------------
# Dense estimators (research baselines: every expert runs on every token)
# ---------------------------------------------------------------------------


class _DenseEstimator(Estimator):
    """Shared shape of ST / STGS / ReinMax.

    Forward weights are ``D^_i * pi_i`` (``v_i = pi_i h_i`` in the spec): equal to
    Switch's ``pi_D`` on the sampled expert and 0 elsewhere; the surrogate
    ``D^`` carries the estimator's gradient to every expert's output.
    """

    dense = True

    def __init__(self, num_experts: int, top_k: int = 1, temperature: float = 1.0, **unused):
        super().__init__(num_experts, top_k)
        if top_k != 1:
            raise ValueError(f"{type(self).__name__} is a top-1 estimator")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def surrogate(self, logits: Tensor, noise: RoutingNoise) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (sample ids [T, 1], surrogate one-hot D^ [T, E], probs pi [T, E])."""
        raise NotImplementedError

    def forward(self, logits: Tensor, noise: RoutingNoise, training: bool) -> Routing:
        if not training:
            probs = logits.softmax(dim=-1)
            ids = probs.argmax(dim=-1, keepdim=True)
            return Routing(ids, probs.gather(-1, ids), probs, ids[:, 0])
        ids, one_hot, probs = self.surrogate(logits, noise)
        all_ids = torch.arange(self.num_experts, device=logits.device).expand(logits.shape[0], -1)
        return Routing(all_ids, one_hot * probs, probs, ids[:, 0])


def _gumbel_max(logits: Tensor, noise: RoutingNoise) -> tuple[Tensor, Tensor]:
    gumbel = noise.gumbel(STREAM_SAMPLE, logits.shape[-1]).to(logits.dtype)
    perturbed = logits.detach() + gumbel
    return perturbed.argmax(dim=-1, keepdim=True), gumbel


@register_estimator("st")
class StraightThroughEstimator(_DenseEstimator):
    """Straight-Through: D ~ pi, ``D^ = e_D - sg(q) + q`` with ``q = softmax(l / tau)``."""

    def surrogate(self, logits, noise):
        ids, _ = _gumbel_max(logits, noise)
        soft = (logits / self.temperature).softmax(dim=-1)
        hard = torch.zeros_like(soft).scatter(-1, ids, 1.0)
        return ids, hard - soft.detach() + soft, logits.softmax(dim=-1)


@register_estimator("stgs")
class STGumbelSoftmaxEstimator(_DenseEstimator):
    """Straight-Through Gumbel-Softmax: ``D^ = e_D - sg(s) + s``, ``s = softmax((l + G) / tau)``."""

    def surrogate(self, logits, noise):
        ids, gumbel = _gumbel_max(logits, noise)
        soft = ((logits + gumbel) / self.temperature).softmax(dim=-1)
        hard = torch.zeros_like(soft).scatter(-1, ids, 1.0)
        return ids, hard - soft.detach() + soft, logits.softmax(dim=-1)


class _ReinMaxFn(torch.autograd.Function):
    """ReinMax (Liu et al. 2023): second-order (Heun) straight-through.

    Forward returns ``(e_D, pi)``; backward, with ``a = dL/de_D``, ``b = dL/dpi``
    and ``psi = (softmax(l / tau) + e_D) / 2``:
    ``dL/dl = 2 J(psi) a - J(pi) a / 2 + J(pi) b`` where ``J(q) = diag(q) - q q^T``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float):
        probs = logits.softmax(dim=-1)
        one_hot = torch.zeros_like(probs).scatter(-1, ids, 1.0)
        ctx.save_for_backward(logits, one_hot, probs)
        ctx.temperature = temperature
        return one_hot, probs

    @staticmethod
    def backward(ctx, grad_one_hot: Tensor, grad_probs: Tensor):
        logits, one_hot, probs = ctx.saved_tensors

        def jvp(q: Tensor, v: Tensor) -> Tensor:  # J(q) v, row-wise
            qv = q * v
            return qv - q * qv.sum(dim=-1, keepdim=True)

        psi = 0.5 * ((logits / ctx.temperature).softmax(dim=-1) + one_hot)
        grad = 2.0 * jvp(psi, grad_one_hot) + jvp(probs, grad_probs - 0.5 * grad_one_hot)
        return grad, None, None


def reinmax(logits: Tensor, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """ReinMax on a given sample ``ids [T, 1]``: returns ``(one_hot, probs)``."""
    return _ReinMaxFn.apply(logits, ids, temperature)


@register_estimator("reinmax")
class ReinMaxEstimator(_DenseEstimator):
    """ReinMax: D ~ pi (temperature does not change the sample)."""

    def surrogate(self, logits, noise):
        ids, _ = _gumbel_max(logits, noise)
        one_hot, probs = reinmax(logits, ids, self.temperature)
        return ids, one_hot, probs


def uniform_entropy(num_experts: int) -> float:
    """Entropy of the uniform router, the maximum ``router_entropy`` can reach."""
    return math.log(num_experts)
