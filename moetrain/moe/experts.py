"""Expert feed-forward networks, laid out where DeepSpeed's engine looks for them.

DeepSpeed 0.19.8 recognises expert parameters by module path: they must live at
``<moe>.deepspeed_moe.experts.deepspeed_experts.<local_id>.*`` and carry
``allreduce=False`` and ``group_name``. It then reduces their gradients over the
expert-data-parallel group and saves one checkpoint file per *global* expert.
No other parameter may have "expert" in its path (see docs/design.md).

Each expert is initialised from its own generator keyed by (seed, layer, global
expert id), never from the global RNG: a model built with expert parallelism 2
holds exactly the experts that a single process would, and building fewer local
experts does not shift the initialisation of the rest of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .noise import _mix32


class BiasFreeLinear(nn.Module):
    """``y = x W^T`` with an uninitialised weight (the owner initialises it).

    nn.Linear would draw from the global RNG in its constructor.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class FeedForward(nn.Module):
    """T5 / Switch feed-forward ``wo(dropout(relu(wi(x))))``, bias-free (HF ``wi``/``wo`` names).

    The one FFN of moetrain: every expert is one, and so is the dense FFN of a block without
    experts (:mod:`moetrain.models`). Its owner initialises the weights.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.wi = BiasFreeLinear(d_model, d_ff)
        self.wo = BiasFreeLinear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


def expert_generator(seed: int, layer_id: int, global_expert_id: int) -> torch.Generator:
    key = torch.tensor([[seed & 0xFFFFFFFF]], dtype=torch.int64)
    for value in (layer_id, global_expert_id):
        key = _mix32(key ^ _mix32(torch.tensor([[value + 0x85EBCA6B]], dtype=torch.int64)))
    return torch.Generator().manual_seed(int(key))


class LocalExperts(nn.Module):
    """The experts this rank owns, as ``deepspeed_experts.<local_id>``."""

    def __init__(self, d_model: int, d_ff: int, num_local: int, first_global_id: int, dropout: float = 0.0):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(FeedForward(d_model, d_ff, dropout) for _ in range(num_local))
        self.first_global_id = first_global_id

    def reset_parameters(self, seed: int, layer_id: int, init_scale: float = 1.0) -> None:
        """T5 initialisation: ``wi ~ N(0, s^2 / d_model)``, ``wo ~ N(0, s^2 / d_ff)``."""
        for local_id, expert in enumerate(self.deepspeed_experts):
            gen = expert_generator(seed, layer_id, self.first_global_id + local_id)
            d_ff, d_model = expert.wi.weight.shape
            with torch.no_grad():
                wi = torch.randn(expert.wi.weight.shape, generator=gen) * (init_scale * d_model**-0.5)
                wo = torch.randn(expert.wo.weight.shape, generator=gen) * (init_scale * d_ff**-0.5)
                expert.wi.weight.copy_(wi)
                expert.wo.weight.copy_(wo)

    def forward(self, rows: Tensor, counts: list[int]) -> Tensor:
        """Run expert j on the j-th contiguous slice of ``rows`` (``counts[j]`` rows).

        A loop over contiguous slices measured faster on CPU than a padded
        batched matmul, and it never pads (docs/design.md).
        """
        # Empty slices still run: every expert then takes part in the graph and
        # gets a (zero) gradient, so DeepSpeed's reduction hooks fire alike on all ranks.
        outputs = [expert(chunk) for expert, chunk in zip(self.deepspeed_experts, rows.split(counts))]
        return torch.cat(outputs, dim=0)


class ExpertContainer(nn.Module):
    """Holds ``experts`` so the path reads ``deepspeed_moe.experts.deepspeed_experts``."""

    def __init__(self, experts: LocalExperts):
        super().__init__()
        self.experts = experts
