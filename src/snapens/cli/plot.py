"""``snapens plot RUN_DIR``: PNG figures of a run into ``RUN_DIR/plots/``.

- ``lr_schedule.png``: the learning rate at every optimizer step (recomputed from config.json), snapshots marked;
- ``training_curves.png``: train / validation loss and accuracy per epoch (from metrics.csv), the snapshots
  (the cycle ends) marked;
- ``ensemble_size.png``: test error of the ensemble of the last m snapshots, m = 1..M (from summary.json; the
  run is evaluated first when it has none);
- ``snapshot_correlation.png``: 1 - correlation of the ensemble members' test predictions, labelled by member
  name (from summary.json): snapshots of one run are often more than 99% correlated, and 1 - correlation
  shows how much they differ;
- ``price.png``: test error against the measured inference cost (milliseconds per test image on the device
  that evaluated it, log scale), one numbered point per method, a legend naming each number's method and its
  forward passes per image, errors far above the rest marked on the top edge with their value (from
  summary.json; summaries written before the price columns have no such plot).
"""


from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from snapens.cli._common import CLIError, configure_logging, progress_enabled

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``plot`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("plot", help="plot a run's schedule, curves, ensemble size and diversity",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by `snapens train`")
    p.add_argument("--device", default="auto", help="device for evaluating a run without summary.json")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the dataset is now, for evaluating a run without summary.json (see evaluate)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens plot``: write the PNGs (evaluating the run first if needed) and print their paths."""
    from snapens.workflows.plotting import plot

    configure_logging(args.quiet)
    announce = None if args.quiet else (lambda note: print(note, file=sys.stderr))
    try:
        paths = plot(args.run_dir, device=args.device, data_dir=args.data_dir, progress=progress_enabled(args.quiet),
                     announce=announce)
    except ImportError as exc:  # no matplotlib: a user error like any other
        raise CLIError(str(exc)) from exc
    if not args.quiet:
        for path in paths:
            print(path)
    return 0
