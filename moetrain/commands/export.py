"""``moetrain export CHECKPOINT --out HF_DIR [--max-shard-size SIZE] [--verify] [--overwrite]``.

``HF_DIR`` must be missing or empty, or an earlier moetrain export (replaced only with
``--overwrite``); anything else, and any directory inside a checkpoint or run, is refused with one
line and exit code 2 (:func:`moetrain.export.check_export_target`).

The checkpoint is read once; which of its weights are exported is its model's business (the
task's ``export_layout``: an ELECTRA run exports the discriminator, never the generator).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moetrain.utils.argtypes import size_text

__all__ = ["add_export_arguments", "main_export", "export_and_report"]


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """``CHECKPOINT --out HF_DIR [--max-shard-size SIZE] [--verify]``."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="portable checkpoint, a checkpoint dir holding portable/, or a run dir "
                             "(uses checkpoints/latest)")
    parser.add_argument("--out", metavar="HF_DIR", default=None,
                        help="output directory (default: export.out_dir of the checkpoint's config)")
    parser.add_argument("--max-shard-size", dest="max_shard_size", type=size_text, default=None, metavar="SIZE",
                        help="largest weight file, e.g. 500MB (default: export.max_shard_size)")
    parser.add_argument("--verify", action="store_true",
                        help="load the export with transformers and compare logits with moetrain's")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace HF_DIR when it holds an earlier moetrain export (never anything else)")


def main_export(args: argparse.Namespace) -> int:
    """``moetrain export``: portable checkpoint -> HF directory. Returns the exit code.

    Export takes a checkpoint, not a recipe: the run's config travels inside it.
    """
    from moetrain.checkpoint_format import CheckpointNotFound, read_portable
    from moetrain.config import ConfigError
    from moetrain.export import ExportError
    from moetrain.hf_convert import ConversionError

    try:
        ckpt = read_portable(args.checkpoint)
        out = getattr(args, "out", None) or ckpt.cfg.export.out_dir
        if out is None:
            raise ExportError("no output directory: pass --out HF_DIR (or set export.out_dir)")
        gap = export_and_report(ckpt, out, max_shard_size=getattr(args, "max_shard_size", None),
                                verify=getattr(args, "verify", False), overwrite=getattr(args, "overwrite", False))
    except (ExportError, ConversionError, ConfigError, CheckpointNotFound) as err:
        print(f"moetrain export: {err}", file=sys.stderr)
        return 2
    if gap is not None:
        print(f"max |moetrain - HF| = {gap:.3g}")
    return 0


def export_and_report(ckpt, out: str | os.PathLike, *, max_shard_size: str | None = None,
                      verify: bool = False, overwrite: bool = False) -> float | None:
    """Export ``ckpt`` (a ``PortableCheckpoint``) as its task's model lays it out, print what was
    written, and with ``verify`` return the largest |moetrain - HF| output gap (else None)."""
    from moetrain.export import export_checkpoint, verify_export
    from moetrain.hf_convert import name_map
    from moetrain.tasks import task_class

    cfg = ckpt.cfg
    layout = task_class(cfg.task).export_layout
    export_checkpoint(ckpt, out, layout, max_shard_size=max_shard_size, overwrite=overwrite)
    what = f"{layout.label} of {ckpt.path}" if layout.label else str(ckpt.path)
    detail = layout.summary or f"{len(name_map(cfg.model, cfg.moe))} tensors, estimator {cfg.moe.estimator}"
    print(f"exported {what} -> {out} ({detail})")
    if not verify:
        return None
    return verify_export(Path(out), layout.select(ckpt.weights), cfg.model, cfg.moe)
