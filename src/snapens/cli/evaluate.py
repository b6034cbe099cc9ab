"""``snapens evaluate RUN_DIR``: every snapshot, the single best model and the ensembles, on the test split.

Choices (the single best model, the ensemble weights, the temperature) are made on the validation split; the
numbers are measured on the test split. Writes ``RUN_DIR/summary.json``, ``RUN_DIR/recommended.json`` (and
``RUN_DIR/ensemble_weights.json`` with ``--optimize 1``) and prints a table (or the JSON with ``--json``).

The "ensemble, recommended" row is what you get by default from ``SnapshotEnsemble.from_run`` and ``snapens
export``: the combination validation supports at the fewest forward passes (it may be the last snapshot alone,
the last m snapshots, fitted weights or the paper's equal weights), with a temperature where validation identifies
one; the line "You get: ..." under the table names it and says why. recommended.json stores it, so every later
command uses the same choice; the other rows stay for comparison.
A run folder on read-only media is evaluated all the same: the results are printed, not saved (a warning
says so).

summary.json is the whole run's (what ``snapens plot`` draws): an evaluation of a variant, ``--last M`` and/or
``--include-best``, writes its own files instead, e.g. ``summary-last3.json``, ``summary-best.json``,
``summary-last3-best.json`` (and ``recommended-last3.json``, ``ensemble_weights-last3.json``, which ``--optimize 0``,
``from_run`` and ``snapens export`` with the same flags read).
"""


from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from snapens.cli._common import CLIError, configure_logging, progress_enabled
from snapens.config import PRECISIONS

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "evaluate", help="evaluate a run's snapshot ensemble on the test split",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?", default=None,
                   help="a folder written by `snapens train`; with --pretrained, the new folder the bundle is "
                        "copied to and evaluated in (default: runs/pretrained-NAME-TIME)")
    p.add_argument("--pretrained", default=None, metavar="NAME",
                   help="evaluate a pre-trained bundle (a registered name or a bundle folder; every file's "
                        "sha256 is checked first) instead of a run folder")
    p.add_argument("--dataset", default=None,
                   help="with --pretrained: the dataset you expect it to be evaluated on (refused if the "
                        "bundle was trained on another)")
    p.add_argument("--last", type=int, default=None, metavar="M",
                   help="ensemble only the last M snapshots (written to summary-lastM.json: summary.json stays "
                        "the whole run's)")
    p.add_argument("--include-best", action="store_true",
                   help="add best.safetensors as an ensemble member (written to summary-best.json)")
    p.add_argument("--optimize", type=int, choices=(-1, 0, 1), default=1,
                   help="-1: equal weights only; 1: fit weights on validation (NLL) and save them to "
                        "ensemble_weights.json (ensemble_weights-lastM.json, ... with --last / --include-best); "
                        "0: use the saved weights (default: 1)")
    p.add_argument("--num_tests", "--num-tests", type=int, default=None, metavar="N",
                   help="accepted for compatibility with the old predict script and ignored: the NLL fit is "
                        "convex, one exact solve replaces the random restarts")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="inference precision: auto = bf16 where the hardware runs it natively (numbers then differ "
                        "from fp32 in the last digits), else fp32; fp32 gives the exact fp32 numbers; fp16 needs "
                        "CUDA (default: auto)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the dataset is now, instead of the data_dir stored in config.json (for a run "
                        "moved to another machine)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="accept a run that has not finished training (killed or still running): use the "
                        "snapshots it has")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes (results are still printed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens evaluate``: evaluate, write the summary file, print the table (or the JSON); returns 0."""
    from snapens.report import format_summary, to_json
    from snapens.workflows.evaluation import evaluate

    configure_logging(args.quiet)
    if args.num_tests is not None:
        logger.info("note: --num_tests %d is ignored: the NLL weight fit is convex, one exact solve replaces the "
                    "random restarts", args.num_tests)
    options = dict(last=args.last, include_best=args.include_best, optimize=args.optimize, device=args.device,
                   data_dir=args.data_dir, progress=progress_enabled(args.quiet), precision=args.precision,
                   allow_unfinished=args.allow_unfinished)
    if args.pretrained is not None:
        from snapens.workflows.evaluation import evaluate_pretrained

        folder, summary = evaluate_pretrained(args.pretrained, args.run_dir, dataset=args.dataset, **options)
        logger.info("pre-trained %s evaluated in %s", args.pretrained, folder)
    elif args.run_dir is None or args.dataset is not None:
        raise CLIError("evaluate needs RUN_DIR (or --pretrained NAME); --dataset goes with --pretrained only")
    else:
        summary = evaluate(args.run_dir, **options)
    print(to_json(summary) if args.json else format_summary(summary))
    return 0
