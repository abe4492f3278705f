"""``moetrain train CONFIG``: train, then (``export.after_train``) export the last checkpoint.

Exit codes: 0 finished, 2 a user error (one line on stderr), 143 stopped by SIGTERM (checkpoint
saved, not exported; ``--set train.resume=latest`` continues).

The export after training is the same as ``moetrain export RUN --verify`` plus the task's own
check of the result (:meth:`moetrain.tasks.base.Task.check_export`), written to
``<hf dir>/moetrain_export_check.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["main_train", "export_after_training", "EXIT_STOPPED"]

#: Exit code of a run stopped by SIGTERM before ``train.max_steps`` (128 + 15, what a shell reports
#: for a process killed by SIGTERM): a checkpoint was saved and ``train.resume=latest`` continues it,
#: but the run is not finished and nothing was exported.
EXIT_STOPPED = 143


def main_train(cfg, out_dir: Path, args: argparse.Namespace | None = None) -> int:
    """Train; on rank 0, export the result when ``export.after_train`` is set.

    Returns 0 for a finished run, :data:`EXIT_STOPPED` (143) for one stopped by SIGTERM.
    """
    import torch.distributed as dist

    from moetrain.train.trainer import train

    state = train(cfg, out_dir)
    if state.stopped_by is not None:
        return EXIT_STOPPED
    if cfg.export.after_train and (not dist.is_initialized() or dist.get_rank() == 0):
        from moetrain.config import ConfigError
        from moetrain.export import ExportError
        from moetrain.hf_convert import ConversionError

        try:
            export_after_training(cfg, out_dir)
        except (ExportError, ConversionError) as err:  # the run is complete; say so in the one line
            raise ConfigError(f"training finished (checkpoints in {out_dir / 'checkpoints'}), but the export after "
                              f"training failed: {err}") from None
    return 0


def export_after_training(cfg, run_dir: Path) -> dict[str, Any]:
    """Export the run's last checkpoint (read once) and check it against stock transformers.

    Writes ``export.out_dir`` (default ``<run dir>/hf``) and returns the figures it prints: the
    largest logit gap on a random batch, then whatever the task checks.
    """
    from moetrain.checkpoint_format import read_portable
    from moetrain.export import record_export_file
    from moetrain.tasks import task_class

    from .export import export_and_report

    ckpt = read_portable(run_dir)
    out = Path(cfg.export.out_dir) if cfg.export.out_dir else run_dir / "hf"
    gap = export_and_report(ckpt, out, verify=True, overwrite=True)  # the run's own export destination
    report: dict[str, Any] = {"hf_dir": str(out), "estimator": ckpt.cfg.moe.estimator, "max_logit_gap": gap}
    check = task_class(ckpt.cfg.task).check_export(ckpt, out)
    report.update(check.figures)
    (out / "moetrain_export_check.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    record_export_file(out, "moetrain_export_check.json")
    print(f"moetrain: HF export {out}: max |logit gap| {gap:.2g}{check.summary}")
    if check.usage:
        print(check.usage)
    return report
