"""``train.grad_quality_every``: the gradient-quality table of one MoE layer, logged during training.

Every N optimizer steps, rank 0 captures the first MoE layer's input and dL/dy on its first
micro-batch of the step (the real forward and backward of training; nothing is recomputed), and
after the step compares every top-1 estimator's router gradient with the exact one
(:mod:`moetrain.moe.grad_quality`). The table goes to metrics.jsonl as::

    {"type": "grad_quality", "step": 10, "layer": "encoder.layers.1.ffn", "draws": 4,
     "estimators": {"switch": {"cosine": ..., "rel_error": ..., "cosine_of_mean": ..., ...}, ...}}

It is rank 0's local batch only (no collectives). Under expert parallelism no rank holds every
expert, so the probe is skipped with a warning. When off (0) the loop only calls two no-op methods.
"""

from __future__ import annotations

import contextlib

from moetrain.moe import moe_layers
from moetrain.moe.grad_quality import (DEFAULT_ESTIMATORS, LayerCapture, build_top1_estimators, compare_estimators,
                                       estimator_settings)

__all__ = ["GradQualityProbe"]

#: Noise draws per estimator in a logged table (the bench has ``--draws``).
DRAWS = 4


class GradQualityProbe:
    """Captures on due steps (:meth:`watch`) and logs the table after the step (:meth:`log`)."""

    def __init__(self, cfg, model, is_main: bool, logger):
        self.every, self.logger, self.capture = cfg.train.grad_quality_every, logger, None
        self.active = bool(self.every) and is_main
        if self.every and cfg.parallel.ep_size > 1:
            logger.message("moetrain: train.grad_quality_every is skipped: it needs every expert on one rank "
                           f"(parallel.ep_size={cfg.parallel.ep_size})")
            self.active = False
        layers = set(moe_layers(model))
        found = [(name, m) for name, m in model.named_modules() if m in layers]
        if self.active and not found:
            logger.message("moetrain: train.grad_quality_every is skipped: the model has no MoE layer")
            self.active = False
        if self.active:
            self.name, self.layer = found[0]
            self.estimators = build_top1_estimators(DEFAULT_ESTIMATORS, self.layer.num_experts, self.layer.d_model,
                                                    **estimator_settings(cfg.moe))

    def watch(self, step: int, weight: int):
        """Context for one micro-batch's forward and backward of optimizer step ``step`` (1-based):
        captures it when the step is due and nothing was captured for it yet."""
        if not self.active or not weight or step % self.every or self.capture is not None:
            return contextlib.nullcontext()
        self.capture = LayerCapture(self.layer)
        return self.capture

    def log(self, step: int) -> None:
        """After optimizer step ``step``: compute and write the table of its capture, if any."""
        capture, self.capture = self.capture, None
        if capture is None or not capture.captures or capture.captures[-1].grad is None:
            return
        table = compare_estimators(self.layer, capture.captures[-1], self.estimators, DRAWS, step=step)
        self.logger.log_record({"type": "grad_quality", "step": step, "layer": self.name, "draws": DRAWS,
                                "estimators": table})
