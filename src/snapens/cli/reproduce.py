"""``snapens reproduce``: the paper's Table 1 comparison, and the cheap ensembles, at one budget of your choice.

Trains, with the same budget (epochs, M, lr0) and seed, one run per method of ``--methods`` (default
``single,snapshot``):

- ``single`` (schedule ``step``): the single-model baseline (lr0, x0.1 at 50 % and 75 % of the budget). Its final
  model is the "single model" row; its snapshots, taken where the cyclic run takes them, give the "NoCycle"
  ensemble;
- ``snapshot`` (``cosine-cycles``): the snapshot ensemble (equal weights, the paper; and weights fitted on
  validation);
- ``fge`` and ``swa``: Fast Geometric Ensembling (Garipov et al. 2018) and the SWA recipe (Izmailov et al. 2018);
- ``single-cycle``: M independently initialised models trained one cycle each (also ``--with-single-cycle``).

For every method: its final model, its ensemble (equal and fitted weights), the weight average of its snapshots
(``snapens average``, BatchNorm recomputed) and, with ``--distill MODEL``, a MODEL student distilled from its
calibrated ensemble for the same number of epochs (``snapens distill``). Each row gives the test error, NLL, ECE
and its price: forward passes per image and images/s measured on this device (a weight average costs what a
single model of its architecture costs). Test errors stand next to the paper's Table 1 numbers when the paper
reports that model and dataset. With ``--seeds N`` the numbers are mean +- std over N seeds (the other columns
means). Writes OUT/reproduce.json and OUT/price.png; the runs are kept under OUT/<schedule>-seed<k>/. Every
method's settings are checked before the first run trains; an interrupted reproduction continues with the same
flags and ``--resume`` (finished runs are not trained again).

The default (no arguments) is cnn-small on the bundled 8x8 digits at the TrainConfig defaults: minutes on a
laptop CPU. A paper setting is e.g. ``--preset paper-wrn-32-4-cifar10`` (days on a CPU).
"""


from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from snapens.cli._common import (
    METHOD_COLUMNS,
    configure_logging,
    learning_rate,
    method_table,
    progress_enabled,
    thread_count,
)
from snapens.workflows.common import plural
from snapens.workflows.reproduction import METHODS

__all__ = ["format_reproduce", "register", "run"]


def format_reproduce(result: dict[str, Any]) -> str:
    """The reproduce table: our test error (mean +- std over seeds), NLL, ECE and price next to the paper's
    error (``nan`` for a number that is not finite, ``None`` in the JSON; ``-`` for a missing one)."""
    cfg = result["config"]
    n = len(result["seeds"])
    lines = [f"Table 1 comparison: {cfg['model']} on {cfg['dataset']}, {plural(cfg['epochs'], 'epoch')}, "
             f"M={cfg['snapshots']}, lr0={cfg['lr']:g}, {n} seed{'s' if n > 1 else ''}"]
    rows = []
    for r in result["rows"]:
        mean, std = (float("nan") if r[k] is None else float(r[k]) for k in ("mean", "std"))
        row = {"name": r["name"], "error": f"{mean:.2f} +- {std:.2f}" if n > 1 else mean, "nll": r["nll_mean"],
               "paper": "-" if r["paper"] is None else f"{r['paper']:.2f}"}
        row.update({k: r[f"{k}_mean"] for k in ("ece", "forward_passes", "images_per_second") if f"{k}_mean" in r})
        rows.append(row)
    error_title = "test error %" + (" (mean +- std)" if n > 1 else "")
    columns = ((("error", error_title, ".2f"),) + METHOD_COLUMNS[1:] + (("paper", "paper", "s"),))
    lines.append(method_table(rows, columns))
    if result["paper_has_setting"]:
        lines.append(f"paper: {result['paper_source']} (at the paper's full budget; '-' where it reports none)")
    else:
        lines.append("paper: no Table 1 numbers for this model and dataset")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add the ``reproduce`` subcommand to ``subparsers``."""
    from snapens.config import PRECISIONS, PRESETS, TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("reproduce", help="train step / cyclic runs and compare with the paper's Table 1",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a paper setting (see snapens train)")
    p.add_argument("--model", default=None, help=f"architecture (default: {d.model})")
    p.add_argument("--dataset", default=None, help=f"dataset (default: {d.dataset})")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    p.add_argument("--download", action="store_true", default=None, help="download CIFAR archives if missing")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="stratified subset of N training images (see snapens train; default: all)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="stratified subset of N test images (default: all)")
    p.add_argument("--epochs", type=int, default=None, help=f"budget in epochs (default: {d.epochs})")
    p.add_argument("--snapshots", "--M", type=int, default=None,
                   help=f"M, cycles and snapshots (default: {d.snapshots})")
    p.add_argument("--lr", type=learning_rate, default=None, help=f"restart learning rate lr0 (default: {d.lr})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {d.batch_size})")
    p.add_argument("--seed", type=int, default=None, help=f"first seed (default: {d.seed})")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="number of seeds, reported as mean +- std")
    p.add_argument("--device", default=None, help=f"cpu, cuda, ... (default: {d.device})")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads for torch (default: one per core)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"training and evaluation precision: auto = bf16 where the hardware runs it natively, else "
                        f"fp32 (default: {d.precision})")
    p.add_argument("--methods", default="single,snapshot", metavar="LIST",
                   help=f"comma-separated methods, each trained at the same budget: {', '.join(METHODS)} "
                        "(default: single,snapshot)")
    p.add_argument("--with-single-cycle", action="store_true",
                   help="also train M independent models for one cycle each (= adding single-cycle to --methods)")
    p.add_argument("--distill", default=None, metavar="MODEL",
                   help="also distil each method's ensemble into a MODEL student (same epochs; see snapens distill)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: runs/reproduce-<model>-<dataset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted reproduction in --out with the same flags: finished runs are "
                        "not trained again, an interrupted one continues from its state")
    p.add_argument("--json", action="store_true", help="print reproduce.json instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    p.set_defaults(func=run)


def _plot_price(result: dict[str, Any], out: Path) -> None:
    from snapens.workflows.plotting import plot_price
    from snapens.workflows.reproduction import price_points

    try:
        plot_price(price_points(result), out / "price.png", title="error vs inference cost, one point per method")
    except ImportError as exc:  # no matplotlib: the table and reproduce.json are the results
        print(f"warning: {exc}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens reproduce``: train and evaluate the runs, print the table (or the JSON); returns 0."""
    from snapens.config import resolve_config
    from snapens.report import to_json
    from snapens.workflows.reproduction import parse_methods, reproduce

    configure_logging(args.quiet)
    config = resolve_config(args.preset, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                            download=args.download, limit_train=args.limit_train, limit_test=args.limit_test,
                            epochs=args.epochs, snapshots=args.snapshots, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, device=args.device, threads=args.threads, precision=args.precision)
    safe_dataset = config.dataset.replace(":", "-").replace("/", "-")
    out = args.out or Path("runs") / f"reproduce-{config.model}-{safe_dataset}"
    methods = parse_methods(args.methods)
    result = reproduce(config, out, seeds=args.seeds, methods=methods, with_single_cycle=args.with_single_cycle,
                       distill=args.distill, progress=progress_enabled(args.quiet), resume=args.resume)
    _plot_price(result, out)
    if args.json:
        print(to_json(result))
    else:
        print(format_reproduce(result))
        if not args.quiet:
            print(f"\nwrote {out / 'reproduce.json'}", file=sys.stderr)
    return 0
