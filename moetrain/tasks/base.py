"""The contract between the trainer and a task (translation, ELECTRA, GLUE).

The trainer knows nothing about text: a task builds its model, yields batches
for this data-parallel rank, computes the loss (task loss plus the weighted MoE
losses, in one visible line) and evaluates. Batches are plain dicts of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from torch import Tensor, nn


@dataclass
class LossOutput:
    """One micro-batch's loss and what to log about it.

    Attributes:
        loss: scalar to back-propagate (already normalised per token/sample).
        num_tokens: tokens (or samples) that contributed, for throughput.
        logs: floats to log (task loss, balance, z, accuracy, ...).
        moe_stats: per-layer ``MoEStats`` for router-health metrics.
    """

    loss: Tensor
    num_tokens: int
    logs: dict[str, float] = field(default_factory=dict)
    moe_stats: list = field(default_factory=list)


class Task(Protocol):
    name: str

    def build_model(self, ep_size: int = 1) -> nn.Module:
        """The model, single-device; experts sharded when ``ep_size > 1``."""

    def train_batches(self, dp_rank: int, dp_world: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Endless micro-batches for this rank, resumable from ``start_step`` micro-batches in.

        Deterministic given the config seed; every rank yields the same number of batches.
        """

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        """Forward one micro-batch."""

    def evaluate(self, model: nn.Module, dp_rank: int = 0, dp_world: int = 1) -> dict[str, float]:
        """Validation metrics (every rank calls it; collectives stay paired)."""
