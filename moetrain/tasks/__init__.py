"""Tasks: what is trained (translation, ELECTRA pretraining). The trainer knows only :class:`Task`.

A task is a class constructed as ``Class(cfg: RunConfig, out_dir: Path)`` that implements the
protocol in :mod:`moetrain.tasks.base`::

    build_model(ep_size) -> nn.Module            the model; experts sharded when ep_size > 1
    train_batches(dp_rank, dp_world, start_step) endless micro-batches (dicts of tensors) for a rank
    loss(model, batch) -> LossOutput             task loss + coef * sum(MoE losses), in one line
    evaluate(model, dp_rank, dp_world) -> dict   validation metrics (collective on every rank)

Optional attributes the trainer reads when present:

    best_metric: str = "loss"                    the evaluate() key that picks the ``best`` checkpoint
    higher_is_better: bool = False               e.g. True for "bleu"
    tokenizer_dir: str | Path                    copied into each checkpoint's portable/tokenizer

Adding a task: write the class and add one line to :data:`TASKS` (and its name to
``moetrain.config.TASKS``). Classes are imported only when used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import LossOutput, Task

__all__ = ["TASKS", "build_task", "LossOutput", "Task"]

#: task name (``cfg.task``) -> ``"module:Class"``.
TASKS: dict[str, str] = {
    "translation": "moetrain.tasks.translation:TranslationTask",
    "electra": "moetrain.tasks.electra:ElectraTask",
}


def build_task(cfg, out_dir: str | Path) -> Task:
    """Instantiate the task named by ``cfg.task`` as ``Class(cfg, Path(out_dir))``.

    Raises:
        ValueError: the name is not in :data:`TASKS`.
        ImportError: the task's module cannot be imported.
    """
    try:
        target = TASKS[cfg.task]
    except KeyError:
        raise ValueError(f"unknown task '{cfg.task}'; known tasks: {', '.join(TASKS)}") from None
    module_name, _, class_name = target.partition(":")
    task_class = getattr(importlib.import_module(module_name), class_name)
    return task_class(cfg, Path(out_dir))
