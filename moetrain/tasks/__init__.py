"""Tasks: what is trained (translation, ELECTRA pretraining). The trainer knows only :class:`Task`.

A task is a subclass of :class:`moetrain.tasks.base.Task`, constructed as
``Class(cfg: RunConfig, out_dir: Path)``::

    build_model(ep_size) -> nn.Module            the model; experts sharded when ep_size > 1
    train_batches(dp_rank, dp_world, start_step) endless micro-batches (dicts of tensors) for a rank
    loss(model, batch) -> LossOutput             task loss + coef * sum(MoE losses), in one line
    evaluate(model, dp_rank, dp_world) -> dict   validation metrics (collective on every rank)

Attributes the trainer and the commands read, with their defaults on the base class:

    best_metric: str = "loss"                    the evaluate() key that picks the ``best`` checkpoint
    higher_is_better: bool = False               e.g. True for "bleu"
    tokenizer_dir: str | Path | None = None      copied into each checkpoint's portable/tokenizer
    export_layout: ExportLayout                  which weights HF export writes (the model's own)

Adding a task: write the class and add one line to :data:`TASKS` and one to
``moetrain.config.TASKS`` (with ``"train"``: the trainer runs it). Classes are imported only when used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from moetrain.config import TASKS as CONFIG_TASKS

from .base import ExportCheck, LossOutput, Task

__all__ = ["TASKS", "task_class", "build_task", "ExportCheck", "LossOutput", "Task"]

#: task name (``cfg.task``) -> ``"module:Class"``.
TASKS: dict[str, str] = {
    "translation": "moetrain.tasks.translation:TranslationTask",
    "electra": "moetrain.tasks.electra:ElectraTask",
}


def task_class(name: str) -> type[Task]:
    """The class registered as ``name`` (its module is imported now).

    Raises:
        ValueError: the name is not in :data:`TASKS`.
        ImportError: the task's module cannot be imported.
    """
    if name not in TASKS and CONFIG_TASKS.get(name, "train") != "train":
        raise ValueError(f"task '{name}' is run by `moetrain {CONFIG_TASKS[name]}`, not by the trainer")
    try:
        target = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_task(cfg, out_dir: str | Path) -> Task:
    """Instantiate the task named by ``cfg.task`` as ``Class(cfg, Path(out_dir))``."""
    return task_class(cfg.task)(cfg, Path(out_dir))
