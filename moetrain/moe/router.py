"""The router: a bias-free linear producing logits in at least float32, and the routing losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .noise import STREAM_JITTER, RoutingNoise


class Router(nn.Module):
    """``logits = W x`` computed in float32, or float64 for a float64 model.

    Softmax over experts is sensitive to rounding (bf16 logits flip argmaxes), so
    half-precision inputs and weights are upcast; float64 is kept (the closed-form tests
    run in it). ``classifier`` matches HF's parameter name.
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.classifier = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: Tensor, noise: RoutingNoise | None = None, input_jitter_eps: float = 0.0) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(dtype)
        if noise is not None and input_jitter_eps > 0:
            # Multiplicative jitter on the router's copy of the input only (the
            # experts see the clean x; HF once leaked jitter into the experts).
            u = noise.uniform(STREAM_JITTER, x32.shape[-1])
            x32 = x32 * (1.0 - input_jitter_eps + 2.0 * input_jitter_eps * u)
        return F.linear(x32, self.classifier.weight.to(dtype))


def balance_loss(probs: Tensor, balance_ids: Tensor, num_experts: int, fraction: Tensor | None = None,
                 prob_scale: float | Tensor | None = None) -> Tensor:
    """Switch load balancing ``N * sum_i f_i * P_i`` over the given (non-padding) tokens.

    ``f_i``: fraction of tokens whose first choice (before capacity) is i, no
    gradient; ``P_i``: mean router probability of i. Equals 1 at perfect balance.

    The global-batch form (:class:`GlobalBalance`) passes ``fraction`` counted over every rank
    and micro-batch, and ``prob_scale`` = world size / global token count in place of
    1 / local token count, so that the ranks' mean of this loss is the global-batch loss.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    if fraction is None:
        fraction = torch.bincount(balance_ids, minlength=num_experts).to(probs.dtype) / probs.shape[0]
    # The default keeps the original expression, so micro_batch results stay bit-identical.
    mean_probs = probs.mean(dim=0) if prob_scale is None else probs.sum(dim=0) * prob_scale
    return num_experts * torch.sum(fraction.to(probs.dtype) * mean_probs)


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_i logits_ti)^2`` (keeps logits small)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(logits: Tensor) -> Tensor:
    """Mean entropy of the router softmax, in nats; log(E) is uniform.

    Computed from the logits the estimator saw: in training with input jitter
    (``switch``'s default) these include the jitter, at evaluation they are clean.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    logp = torch.log_softmax(logits.detach(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
