"""``moetrain plot RUN_DIR [RUN_DIR ...] [--out DIR]``: PNG figures of runs' ``metrics.jsonl``.

What is drawn, and how several runs share a figure: :mod:`moetrain.train.plots`. One run writes
into ``RUN_DIR/plots/`` (where training itself leaves them with ``train.plot``); several runs need
``--out``, because no one run directory is the obvious home of a comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_plot_arguments", "main_plot"]


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """``RUN_DIR [RUN_DIR ...] [--out DIR]``."""
    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                        help="run directory holding metrics.jsonl; several overlay their curves")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="directory for the PNG files (default: RUN_DIR/plots for one run; required for "
                             "several). Only moetrain's own PNGs there are replaced.")


def main_plot(args: argparse.Namespace) -> int:
    """Draw the figures and list the files written (with the reason of any figure without data)."""
    from moetrain.train.plots import PlotError, plot_runs

    if args.out is None and len(args.run_dirs) > 1:
        raise PlotError(f"--out DIR is required with {len(args.run_dirs)} run directories "
                        "(the default, RUN_DIR/plots, is for one run)")
    out = Path(args.out) if args.out is not None else Path(args.run_dirs[0]) / "plots"
    written = plot_runs(args.run_dirs, out)
    print(f"moetrain plot: {len(written)} PNG figures in {out}")
    for path, note in written:
        print(f"  {path}" + (f"  (no data: {note})" if note else ""))
    return 0
