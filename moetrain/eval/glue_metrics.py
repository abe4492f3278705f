"""GLUE metrics (Wang et al. 2018, https://arxiv.org/abs/1804.07461), without scikit-learn.

    glue_metrics("mrpc", preds, labels)   # {"f1": ..., "accuracy": ..., "f1_acc_mean": ...}
    MAIN_METRIC["cola"]                   # "mcc"
    summarize([{"accuracy": 0.61}, {"accuracy": 0.64}])   # mean / std / min / max per key

The official metrics: accuracy for most tasks, F1 of the positive class plus accuracy for
MRPC and QQP, Matthews correlation for CoLA. Scores are fractions in [0, 1] (GLUE tables
print them x100).
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["MAIN_METRIC", "accuracy", "f1_binary", "matthews_corrcoef", "glue_metrics", "summarize"]

#: The number GLUE reports first for each task.
MAIN_METRIC = {"rte": "accuracy", "mrpc": "f1", "sst2": "accuracy", "cola": "mcc", "qnli": "accuracy", "qqp": "f1",
               "mnli": "accuracy", "wnli": "accuracy"}


def _check(preds: Sequence[int], labels: Sequence[int]) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Share of exact matches."""
    _check(preds, labels)
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class: ``2 tp / (2 tp + fp + fn)`` (0 when there is no positive at all)."""
    _check(preds, labels)
    tp = sum(int(p) == positive and int(y) == positive for p, y in zip(preds, labels))
    fp = sum(int(p) == positive and int(y) != positive for p, y in zip(preds, labels))
    fn = sum(int(p) != positive and int(y) == positive for p, y in zip(preds, labels))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when either side is constant.

    ``(c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2))`` with ``c`` correct
    predictions, ``s`` samples, ``p_k``/``t_k`` predicted/true counts of class k. For two
    classes it is ``(tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))``.
    """
    _check(preds, labels)
    classes = sorted({int(x) for x in preds} | {int(x) for x in labels})
    s = len(labels)
    c = sum(int(p) == int(y) for p, y in zip(preds, labels))
    p_k = [sum(int(p) == k for p in preds) for k in classes]
    t_k = [sum(int(y) == k for y in labels) for k in classes]
    num = c * s - sum(p * t for p, t in zip(p_k, t_k))
    den = math.sqrt((s * s - sum(p * p for p in p_k)) * (s * s - sum(t * t for t in t_k)))
    return num / den if den else 0.0


def glue_metrics(task: str, preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """The task's official metrics (always including ``accuracy``)."""
    if task not in MAIN_METRIC:
        raise ValueError(f"unknown GLUE task '{task}'; expected one of {', '.join(MAIN_METRIC)}")
    out = {"accuracy": accuracy(preds, labels)}
    if task in ("mrpc", "qqp"):
        out["f1"] = f1_binary(preds, labels)
        out["f1_acc_mean"] = (out["f1"] + out["accuracy"]) / 2  # GLUE's single number for the task
    if task == "cola":
        out["mcc"] = matthews_corrcoef(preds, labels)
    return out


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over runs (seeds): mean, sample standard deviation, min, max and n."""
    if not runs:
        return {}
    out = {}
    for key in runs[0]:
        values = [float(r[key]) for r in runs if key in r]
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}
    return out
