"""The contract between the trainer and a task (translation, ELECTRA, GLUE).

The trainer knows nothing about text: a task builds its model, yields batches
for this data-parallel rank, computes the loss (task loss plus the weighted MoE
losses, in one visible line) and evaluates. Batches are plain dicts of tensors.

Everything the trainer and the commands read from a task is declared on :class:`Task`
with its default, so a reader finds it here instead of in ``getattr`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from torch import Tensor, nn

from moetrain.models.export_layout import ExportLayout

__all__ = ["LossOutput", "ExportCheck", "Task"]


@dataclass
class LossOutput:
    """One micro-batch's loss and what to log about it.

    Attributes:
        loss: scalar to back-propagate (already normalised per token/sample).
        num_tokens: tokens (or samples) that contributed, for throughput.
        num_samples: sequences in the micro-batch (samples per second); the task knows what a
            sample is, the trainer does not look inside batches.
        logs: floats to log (task loss, balance, z, accuracy, ...).
        moe_stats: per-layer ``MoEStats`` for router-health metrics.
    """

    loss: Tensor
    num_tokens: int
    num_samples: int
    logs: dict[str, float] = field(default_factory=dict)
    moe_stats: list = field(default_factory=list)


@dataclass
class ExportCheck:
    """A task's own check of an HF export, added to the generic one after ``export.after_train``.

    Attributes:
        figures: written to ``<hf dir>/moetrain_export_check.json`` after the generic figures.
        summary: appended to the printed ``HF export ...`` line.
        usage: printed last: how to use the export.
    """

    figures: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    usage: str = ""


class Task:
    """What the trainer trains. A task is constructed as ``Class(cfg: RunConfig, out_dir: Path)``.

    Attributes:
        name: the task's ``cfg.task`` value.
        best_metric: the :meth:`evaluate` key that picks the ``best`` checkpoint.
        higher_is_better: whether a larger ``best_metric`` is better (True for BLEU).
        tokenizer_dir: copied into each checkpoint's ``portable/tokenizer`` (None: no tokenizer).
        export_layout: which weights of the task's model HF export writes (the model's own).
    """

    name: ClassVar[str] = ""
    best_metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    export_layout: ClassVar[ExportLayout] = ExportLayout()
    tokenizer_dir: str | Path | None = None

    def build_model(self, ep_size: int = 1) -> nn.Module:
        """The model, single-device; experts sharded when ``ep_size > 1``."""
        raise NotImplementedError

    def train_batches(self, dp_rank: int, dp_world: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Endless micro-batches for this rank, resumable from ``start_step`` micro-batches in.

        Deterministic given the config seed; every rank yields the same number of batches.
        """
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        """Forward one micro-batch."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, dp_rank: int = 0, dp_world: int = 1) -> dict[str, float]:
        """Validation metrics (every rank calls it; collectives stay paired)."""
        raise NotImplementedError

    @classmethod
    def check_export(cls, ckpt, hf_dir: Path) -> ExportCheck:
        """Task-specific figures about the HF export of ``ckpt`` (a ``PortableCheckpoint``)
        in ``hf_dir``, beyond the logit gap every export gets. None by default."""
        return ExportCheck()
