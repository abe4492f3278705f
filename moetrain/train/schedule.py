"""Learning-rate schedules: linear warmup, then inverse square root, linear decay or constant.

The schedule is a multiplier of ``train.lr`` applied by a torch ``LambdaLR``, which
DeepSpeed steps once per optimizer step (after gradient accumulation). Step ``s``
(0-based) trains with ``lr * factor(s)``; warmup reaches the peak at the end of step
``warmup_steps - 1``, so the very first step already has a non-zero rate::

    warmup        factor = (s + 1) / warmup_steps                 for s + 1 <= warmup_steps
    inverse_sqrt  factor = sqrt(warmup_steps / (s + 1))           (Vaswani et al. 2017; fairseq)
    linear        factor = (max_steps - s) / (max_steps - warmup) reaching 0 after the last step
    constant      factor = 1
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LRSchedule", "build_scheduler"]


class LRSchedule:
    """The multiplier of the peak learning rate at optimizer step ``s`` (0-based).

    A class rather than a closure: ``LambdaLR.state_dict`` stores the ``__dict__`` of
    callable objects, so a checkpoint records which schedule produced its rates.
    """

    def __init__(self, kind: str, warmup_steps: int, max_steps: int):
        if kind not in ("inverse_sqrt", "linear", "constant"):
            raise ValueError(f"unknown schedule '{kind}' (inverse_sqrt, linear, constant)")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps

    def __call__(self, step: int) -> float:
        done = step + 1  # optimizer steps taken once this one is applied
        if done <= self.warmup_steps:
            return done / self.warmup_steps
        if self.kind == "inverse_sqrt":
            # Without warmup, decay from the first step as lr / sqrt(step).
            return math.sqrt(max(self.warmup_steps, 1) / done)
        if self.kind == "linear":
            return max(0.0, (self.max_steps - step) / max(self.max_steps - self.warmup_steps, 1))
        return 1.0


def build_scheduler(optimizer: Optimizer, schedule: str, warmup_steps: int, max_steps: int) -> LambdaLR:
    """A ``LambdaLR`` over every parameter group of ``optimizer`` (dense and expert alike)."""
    return LambdaLR(optimizer, LRSchedule(schedule, warmup_steps, max_steps))
