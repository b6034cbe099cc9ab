"""``snapens distill RUN_DIR --model NAME``: one student network trained on the run's snapshot ensemble.

The teacher is the run's ensemble with its member weights and temperature fitted on the VALIDATION split (as
``snapens evaluate`` fits them); it runs online on every (augmented) training batch, in eval mode, without
gradients. The student minimises ``(1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) ||
softmax(student / T))`` (Hinton et al. 2015, see snapens.distill) for ``--epochs`` epochs of one cosine cycle,
with the run's dataset, splits, seed, batch size and optimizer settings, into its own run folder (default
``RUN_DIR/distill-<model>``): config.json, metrics.csv, state.pt, snapshots/ (the final student), summary.json
(``snapens evaluate`` of the student) and distill.json. ``--resume`` continues an interrupted student
bit-exactly. Prints the student's and the teacher's test error, NLL, ECE and price (forward passes per image,
measured images/s), and how often the student's top-1 class is the teacher's on the test split.
"""


from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from snapens.cli._common import (
    CLIError,
    configure_logging,
    finite_float,
    learning_rate,
    method_table,
    progress_enabled,
    thread_count,
)

__all__ = ["format_distill", "register", "run"]


def format_distill(result: dict[str, Any]) -> str:
    """The lines ``snapens distill`` prints: the teacher's and the student's test rows, and their agreement."""
    t, s = result["teacher"], result["student"]
    rows = [{"name": f"teacher: ensemble of {len(t['members'])} (fitted weights, T={t['calibration_temperature']:.3g})",
             **t["test"], **{k: t[k] for k in ("forward_passes", "images_per_second")}},
            {"name": f"student: {s['model']} (distilled, T={result['temperature']:g}, alpha={result['alpha']:g})",
             **s["test"], **{k: s[k] for k in ("forward_passes", "images_per_second")}}]
    agree = result["agreement"]
    same = round(agree * result["num_test"] / 100)
    return "\n".join([f"Test split: {result['num_test']} images; img/s measured on {result['device']}",
                      method_table(rows),
                      f"top-1 agreement with the teacher on test: {agree:.2f} % ({same} of {result['num_test']})",
                      f"student run: {result['student_run']}"])


def register(subparsers: Any) -> None:
    """Add the ``distill`` subcommand."""
    from snapens.config import PRECISIONS, DistillConfig

    d = DistillConfig()
    p = subparsers.add_parser("distill", help="train one student network on a run's snapshot ensemble",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the teacher: a folder written by `snapens train`")
    p.add_argument("--model", default=None, help="the student's architecture (default: the teacher's)")
    p.add_argument("--epochs", type=int, default=None, help=f"the student's epochs (default: {d.epochs})")
    p.add_argument("--temperature", type=finite_float, default=None, metavar="T",
                   help=f"softmax temperature of the soft targets, > 0 (default: {d.temperature:g})")
    p.add_argument("--alpha", type=finite_float, default=None,
                   help=f"weight of the teacher's soft targets in [0, 1] (default: {d.alpha:g})")
    p.add_argument("--lr", type=learning_rate, default=None, help=f"the student's peak learning rate (default: {d.lr:g})")
    p.add_argument("--run-dir", dest="out", type=Path, default=None, metavar="OUT",
                   help="the student's run folder (default: RUN_DIR/distill-<model>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted distillation in OUT")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the teacher run's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the teacher run's")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads for torch (default: the teacher run's)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="accept a teacher run that has not finished training (killed or still running): use the "
                        "snapshots it has")
    p.add_argument("--json", action="store_true", help="print distill.json instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens distill``; returns 0 (or 128 + the signal number when interrupted)."""
    from snapens import engine
    from snapens.config import DistillConfig
    from snapens.report import to_json
    from snapens.workflows.distillation import distill

    configure_logging(args.quiet)
    given = {"model": args.model, "epochs": args.epochs, "temperature": args.temperature, "alpha": args.alpha,
             "lr": args.lr, "precision": args.precision}
    dcfg = DistillConfig(**{k: v for k, v in given.items() if v is not None and k != "precision"})
    try:
        result = distill(args.run_dir, args.out, dcfg, resume=args.resume, device=args.device,
                         precision=args.precision, threads=args.threads, given=given,
                         allow_unfinished=args.allow_unfinished,
                         progress=progress_enabled(args.quiet),
                         announce=lambda s: print(s, flush=True, file=sys.stderr if args.json else sys.stdout))
    except engine.TrainingInterrupted as exc:
        print(f"snapens: {signal.Signals(exc.signum).name}: training state saved to {exc.state_path}; continue "
              f"with: snapens distill {args.run_dir} --resume --run-dir {exc.state_path.parent}", file=sys.stderr)
        return 128 + exc.signum
    except engine.NonFiniteLossError as exc:
        raise CLIError(str(exc)) from exc
    print(to_json(result) if args.json else format_distill(result))
    return 0
