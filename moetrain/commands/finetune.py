"""``moetrain finetune CONFIG``: fine-tune a pretrained encoder on a GLUE task
(:mod:`moetrain.tasks.glue`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["main_finetune"]


def main_finetune(cfg, out_dir: Path, args: argparse.Namespace | None = None) -> int:
    """Refuse several processes (GLUE sets are small), then fine-tune every seed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from moetrain.utils.errors import UserError

        raise UserError("moetrain finetune runs in one process (GLUE sets are small); launch it without "
                           "deepspeed/torchrun")
    from moetrain.tasks.glue import finetune

    finetune(cfg, out_dir)
    return 0
