"""``snapens average RUN_DIR``: one model whose weights are the mean of the run's snapshots (SWA-style).

The chosen snapshots (all, ``--last m`` or ``--members i j ...``) are averaged weight by weight; BatchNorm
statistics are recomputed on ``--bn-batches`` training batches (no augmentation, a fixed order from the run's
seed); a model without BatchNorm skips that. Writes ``RUN_DIR/average.safetensors`` (the snapshot format:
safetensors plus JSON metadata) and ``RUN_DIR/average.json`` (its numbers), then prints the averaged model's
error and NLL on the test split, evaluated like any member, and compares it with the best chosen member on the
VALIDATION split. Averaging pays off when the snapshots sit in one basin (swa, fge); snapshots taken after
high-rate restarts (cosine-cycles) usually average into a worse model: the output says when that happens.
"""


from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from snapens.cli._common import configure_logging
from snapens.runs import AVERAGE_FILE

__all__ = ["format_result", "register", "run"]


def format_result(result: dict[str, Any], run_dir: Path) -> str:
    """The lines ``snapens average`` prints."""
    t = result["test"]
    bn = (f"BatchNorm recomputed on {result['bn_batches']} training batches" if result["bn_batches"]
          else "no BatchNorm to recompute")
    lines = [f"averaged {len(result['members'])} snapshots ({', '.join(result['members'])}); {bn}",
             f"average on test: error {t['error']:.2f} %, NLL {t['nll']:.4f}, ECE {t['ece']:.4f}"]
    best = result["best_member"]
    if best is None:
        lines.append("no validation split: the average is not compared with the members")
    else:
        v, bv = result["val"], best["val"]
        lines.append(f"on validation: average error {v['error']:.2f} %, NLL {v['nll']:.4f}; best member "
                     f"{best['name']} error {bv['error']:.2f} %, NLL {bv['nll']:.4f} (its test error "
                     f"{best['test']['error']:.2f} %)")
        if result["worse_than_best_member_on_val"]:
            lines.append(f"note: the averaged model is WORSE on validation than the best member {best['name']}; "
                         "averaging weights helps only when the snapshots sit in one basin: compare the ensemble of "
                         "their predictions (snapens evaluate)")
    lines.append(f"wrote {run_dir / AVERAGE_FILE}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add the ``average`` subcommand."""
    p = subparsers.add_parser("average", help="average a run's snapshot weights into one model (SWA)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by `snapens train`")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, default=None, metavar="M", help="average only the last M snapshots")
    which.add_argument("--members", type=int, nargs="+", default=None, metavar="K",
                       help="average these snapshots (1-based indices, as in snapshot-KK.safetensors)")
    p.add_argument("--bn-batches", type=int, default=50, metavar="N",
                   help="training batches to recompute BatchNorm statistics on (default: 50)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the dataset is now, instead of the data_dir stored in config.json")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="accept a run that has not finished training (killed or still running): use the "
                        "snapshots it has")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="no notes on stderr (results are still printed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens average``; returns 0."""
    from snapens._io import to_json
    from snapens.workflows.weight_average import average

    configure_logging(args.quiet)
    result = average(args.run_dir, last=args.last, members=args.members, bn_batches=args.bn_batches,
                     device=args.device, data_dir=args.data_dir, allow_unfinished=args.allow_unfinished)
    print(to_json(result) if args.json else format_result(result, args.run_dir))
    return 0
