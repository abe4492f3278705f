"""Gradient quality: how close each estimator's router gradient is to the exact one, on live inputs.

For one top-1 MoE layer and one batch we capture the layer input ``x`` (non-padding tokens) and
``g = dL/dy``, the gradient of the real training loss with respect to the layer output, from the
real backward pass. The downstream loss is linearised at the layer output (``g`` held fixed), so
every quantity below depends on the expert outputs only through the scores

    a[t, i] = <g_t, f_i(x_t)>          (all E experts evaluated on every token)

**Target.** The expected-output objective of the sampled top-1 layer (docs/estimators.md,
"Gradient quality"): with ``pi_t = softmax(theta_t)`` and the expert sampled as ``D ~ pi_t``,
``J(theta) = sum_t E_D[<g_t, pi_tD f_D(x_t)>] = sum_t sum_i pi_ti^2 a_ti``; its gradient with
respect to the logits is exact and closed form, ``2 (diag(pi) - pi pi^T) (pi * a)`` per token.

**Estimators.** Each is built fresh (``build_estimator``, the layer's jitter and temperature
settings; SparseMixer's omega = 1), fed the layer's own logits ``theta = W x`` as a leaf, and its
gradient is autograd of ``sum_t sum_k w_tk a[t, id_tk]`` through ``Routing.weights``: exactly the
router-logit gradient that the estimator would send back on this batch if ``L`` were linear in
``y``. Sampling estimators draw ``draws`` independent noise draws (distinct routing steps).

Report per estimator: ``cosine`` and ``rel_error = |g_hat - g*| / |g*|`` (flattened over tokens
and experts), averaged over the draws (what one training step sees), and ``cosine_of_mean`` /
``rel_error_of_mean`` of the draws' mean gradient (towards the estimator's bias as draws grow).

Shapes: T tokens, E experts, D channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .estimators import build_estimator
from .noise import RoutingNoise

__all__ = ["DEFAULT_ESTIMATORS", "Capture", "LayerCapture", "expert_scores", "exact_gradient",
           "estimator_gradient", "compare_estimators", "build_top1_estimators", "estimator_settings"]

#: The top-1 estimators compared by default (sparsemixer_v2 and topk route two experts).
DEFAULT_ESTIMATORS = ("switch", "sparsemixer", "st", "stgs", "reinmax")
#: A separate noise seed offset, so the diagnostic never replays the training forward's draws.
_NOISE_SEED_OFFSET = 0x6A0D


@dataclass
class Capture:
    """One forward + backward of one MoE layer: non-padding tokens only.

    Attributes:
        x: ``[T, D]`` layer input (detached).
        token_ids: ``[T]`` global token ids (key the routing noise).
        grad: ``[T, D]`` dL/dy from the real backward pass; None until backward ran.
    """

    x: Tensor
    token_ids: Tensor
    grad: Tensor | None = None


class LayerCapture:
    """Context manager: records every forward of ``layer`` (input and, after backward, dL/dy).

        with LayerCapture(layer) as cap:
            loss = task.loss(model, batch).loss
            loss.backward()
        capture = cap.captures[-1]
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.captures: list[Capture] = []
        self._handle = None

    def __enter__(self) -> "LayerCapture":
        self._handle = self.layer.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        names = ("x", "padding_mask", "token_ids")
        given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        x = given["x"]
        x_flat = x.detach().reshape(-1, x.shape[-1])
        token_ids = given.get("token_ids")
        token_ids = torch.arange(x_flat.shape[0], device=x.device) if token_ids is None else token_ids.reshape(-1)
        pad = given.get("padding_mask")
        valid = None if pad is None else ~pad.reshape(-1).to(torch.bool)
        keep = (lambda t: t) if valid is None else (lambda t: t[valid])
        capture = Capture(keep(x_flat), keep(token_ids))
        self.captures.append(capture)
        y = output[0]
        if y.requires_grad:
            def store(grad: Tensor) -> None:
                capture.grad = keep(grad.detach().reshape(-1, grad.shape[-1]))

            y.register_hook(store)


@torch.no_grad()
def expert_scores(layer: nn.Module, x: Tensor, grad: Tensor) -> Tensor:
    """``a [T, E]`` (float64): ``a[t, i] = <grad_t, f_i(x_t)>`` for every expert of ``layer``.

    Experts run without dropout (their modules are put in eval mode and restored), one at a time,
    so memory stays ``[T, D]`` per expert.
    """
    experts = layer.experts.deepspeed_experts
    if len(experts) != layer.num_experts:
        raise ValueError(f"gradient quality needs every expert on this rank; the layer holds "
                         f"{len(experts)} of {layer.num_experts} (expert parallelism)")
    was_training = [e.training for e in experts]
    dtype = experts[0].wi.weight.dtype
    try:
        for e in experts:
            e.eval()
        cols = [(e(x.to(dtype)).double() * grad.double()).sum(-1) for e in experts]
    finally:
        for e, mode in zip(experts, was_training):
            e.train(mode)
    return torch.stack(cols, dim=-1)


def exact_gradient(logits: Tensor, scores: Tensor) -> Tensor:
    """d/dtheta of ``sum_t sum_i pi_ti^2 a_ti`` (pi = softmax(theta)): ``2 J(pi) (pi * a)`` per row.

    The two halves are the sampling term and the gate-value term of docs/estimators.md; under the
    linearised loss they are equal (the gate-direction derivative does not depend on the scale).
    """
    pi = logits.double().softmax(dim=-1)
    v = pi * scores
    return 2.0 * (pi * v - pi * (pi * v).sum(dim=-1, keepdim=True))


def estimator_gradient(estimator: nn.Module, logits: Tensor, scores: Tensor, noise: RoutingNoise,
                       logit_offset: Tensor | None = None) -> Tensor:
    """The estimator's router-logit gradient ``[T, E]`` of ``sum_t sum_k w_tk a[t, id_tk]``.

    ``logit_offset`` (no gradient) is added to the logits before the estimator sees them: the
    effect of input jitter, which changes the router input rather than the logits.
    """
    theta = logits.detach().double().requires_grad_(True)
    seen = theta if logit_offset is None else theta + logit_offset.double()
    routing = estimator(seen, noise, True)
    objective = (routing.weights.double() * scores.gather(-1, routing.expert_ids)).sum()
    if not objective.requires_grad:  # e.g. every token kept one expert under SparseMixer's mask
        return torch.zeros_like(theta)
    return torch.autograd.grad(objective, theta)[0]


def build_top1_estimators(names: Sequence[str], num_experts: int, d_model: int,
                          **settings: Any) -> dict[str, nn.Module]:
    """Fresh top-1 estimators in float64 (``settings``: jitter_eps, jitter_mode, temperature)."""
    built = {}
    for name in names:
        if name == "topk":
            raise ValueError("estimator 'topk' renormalises over the chosen experts: at top-1 its weight is "
                             "always 1 and it has no router gradient to compare")
        try:
            built[name] = build_estimator(name, num_experts, 1, d_model=d_model, **settings).double()
        except ValueError as err:
            raise ValueError(f"gradient quality compares top-1 estimators; {name!r}: {err}") from None
    return built


def _cosine(est: Tensor, exact: Tensor) -> float:
    """Cosine of an estimate with the exact gradient: NaN when the exact gradient is zero (the batch
    carries no signal to agree with), 0 for a zero estimate of a nonzero gradient (it points nowhere,
    which is as unaligned as an estimate can be without pointing away)."""
    exact_norm, est_norm = exact.norm(), est.norm()
    if not exact_norm > 0:
        return float("nan")
    if not est_norm > 0:
        return 0.0
    return float((est * exact).sum() / (est_norm * exact_norm))


def _rel_error(est: Tensor, exact: Tensor) -> float:
    norm = exact.norm()
    return float((est - exact).norm() / norm) if norm > 0 else float("nan")


def compare_estimators(layer: nn.Module, capture: Capture, estimators: dict[str, nn.Module], draws: int = 4,
                       step: int = 0) -> dict[str, dict[str, float]]:
    """The table for one captured batch: ``{name: {cosine, rel_error, cosine_of_mean, rel_error_of_mean}}``.

    Args:
        layer: the :class:`~moetrain.moe.MoELayer` the capture came from (its router and experts).
        capture: its input, token ids and dL/dy.
        estimators: from :func:`build_top1_estimators`.
        draws: noise draws per estimator (routing steps ``step * draws + k``).
        step: keys the draws (e.g. the batch index or training step).
    """
    if capture.grad is None:
        raise ValueError("the capture has no dL/dy: run backward inside the LayerCapture context")
    x, token_ids = capture.x, capture.token_ids
    with torch.no_grad():
        logits = layer.router(x)
    scores = expert_scores(layer, x, capture.grad)
    exact = exact_gradient(logits, scores)
    table = {}
    for name, est in estimators.items():
        est.to(logits.device)
        grads = []
        for k in range(draws):
            noise = RoutingNoise(layer.noise_seed + _NOISE_SEED_OFFSET, step * draws + k, layer.layer_id, token_ids)
            offset = None
            if est.input_jitter_eps > 0:
                with torch.no_grad():
                    offset = layer.router(x, noise, est.input_jitter_eps) - logits
            grads.append(estimator_gradient(est, logits, scores, noise, offset))
        mean = torch.stack(grads).mean(0)
        table[name] = {
            "cosine": sum(_cosine(g, exact) for g in grads) / draws,
            "rel_error": sum(_rel_error(g, exact) for g in grads) / draws,
            "cosine_of_mean": _cosine(mean, exact),
            "rel_error_of_mean": _rel_error(mean, exact),
        }
    return table


def estimator_settings(moe_cfg) -> dict[str, Any]:
    """The jitter and temperature settings of a run config's ``moe`` section, for
    :func:`build_top1_estimators` (the same values the layer's own estimator was built with)."""
    return {"jitter_eps": moe_cfg.jitter_eps, "jitter_mode": moe_cfg.jitter_mode, "temperature": moe_cfg.temperature}
