"""``snapens reproduce``: the paper's Table 1 comparison at a budget of your choice, on one model and dataset.

Trains, with the same budget (epochs, M, lr0) and seed:

- ``step``: the single-model baseline (lr0, x0.1 at 50 % and 75 % of the budget). Its final model is the
  "single model" row; its snapshots, taken where the cyclic run takes them, give the "NoCycle" ensemble;
- ``cosine-cycles``: the snapshot ensemble (equal weights, the paper; and weights fitted on validation);
- with ``--with-single-cycle``: M independently initialised models trained one cycle each.

Each run is evaluated like ``snapens evaluate`` and the test errors are printed next to the paper's Table 1
numbers when the paper reports that model and dataset. With ``--seeds N`` the numbers are mean +- std over N
seeds. Writes OUT/reproduce.json; the runs are kept under OUT/<schedule>-seed<k>/.

The default (no arguments) is cnn-small on the bundled 8x8 digits at the TrainConfig defaults: minutes on a
laptop CPU. A paper setting is e.g. ``--preset paper-wrn-32-4-cifar10`` (days on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

from snapens.cli import CLIError

__all__ = ["PAPER_SOURCE", "PAPER_TABLE1", "paper_errors", "reproduce", "format_reproduce", "register", "run"]

PAPER_SOURCE = ("Huang et al., Snapshot Ensembles: Train 1, Get M for Free, ICLR 2017 (arXiv 1704.00109), "
                "Table 1: test error (%)")

# Table 1 of the paper, quoted (not re-measured): (single model, NoCycle SE, SE lr0=0.1, SE lr0=0.2) per
# model and dataset, keyed by our model and dataset names. The paper's Wide-ResNet-32 is our wrn-32-4, its
# DenseNet-40 and DenseNet-100 are densenet-40-12 and densenet-100-24 (growth rates 12 and 24).
_COLUMNS = ("single", "nocycle", "se_lr0.1", "se_lr0.2")
_ROWS = {
    "resnet-110": {"cifar10": (5.52, 5.49, 5.73, 5.32), "cifar100": (28.02, 26.97, 25.55, 24.19),
                   "svhn": (1.96, 1.78, 1.63, 1.66), "tiny-imagenet": (46.50, 43.69, 40.54, 39.40)},
    "wrn-32-4": {"cifar10": (5.43, 5.18, 4.41, 4.73), "cifar100": (23.55, 22.81, 21.26, 21.56),
                 "svhn": (1.90, 1.81, 1.64, 1.51), "tiny-imagenet": (39.63, 38.64, 35.45, 32.90)},
    "densenet-40-12": {"cifar10": (5.24, 5.20, 4.99, 4.84), "cifar100": (24.42, 24.63, 23.34, 21.93),
                       "svhn": (1.77, 1.80, 1.64, 1.73), "tiny-imagenet": (39.09, 38.51, 37.25, 36.61)},
    "densenet-100-24": {"cifar10": (3.74, 3.80, 3.57, 3.44), "cifar100": (19.25, 19.30, 18.12, 17.41)},
}
PAPER_TABLE1: dict[tuple[str, str], dict[str, float]] = {
    (model, dataset): dict(zip(_COLUMNS, values)) for model, by_data in _ROWS.items()
    for dataset, values in by_data.items()
}
# Our CIFAR-10 as JPEGs is the same images (re-encoded): the paper's CIFAR-10 numbers are the reference.
_DATASET_ALIASES = {"cifar10-jpeg": "cifar10"}

#: Table rows: (key, label, schedule whose run gives it, summary entry).
_TABLE = (
    ("single", "single model (step schedule, final)", "step", "last_snapshot"),
    ("nocycle", "NoCycle snapshot ensemble (equal)", "step", "ensemble_equal"),
    ("se_equal", "snapshot ensemble (equal weights)", "cosine-cycles", "ensemble_equal"),
    ("se_fitted", "snapshot ensemble (fitted on val)", "cosine-cycles", "ensemble_weighted"),
    ("single_cycle", "single-cycle ensemble (equal)", "single-cycle", "ensemble_equal"),
)


def paper_errors(model: str, dataset: str, lr: float) -> dict[str, float | None]:
    """The paper's Table 1 test errors (%) for our row keys, ``None`` where the paper has no number.

    The snapshot-ensemble number is the paper's column for the same restart rate ``lr0`` (0.1 or 0.2).
    """
    row = PAPER_TABLE1.get((model, _DATASET_ALIASES.get(dataset, dataset)))
    out: dict[str, float | None] = {key: None for key, *_ in _TABLE}
    if row is None:
        return out
    out["single"], out["nocycle"] = row["single"], row["nocycle"]
    for lr0 in (0.1, 0.2):
        if abs(lr - lr0) < 1e-12:
            out["se_equal"] = row[f"se_lr0.{int(lr0 * 10)}"]
    return out


def _float(value: float | None) -> float:
    # summaries store a non-finite number (a diverged run) as None; it stays NaN through mean and std
    return float("nan") if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    # Sample standard deviation over seeds (0 for a single seed).
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def reproduce(
    config: Any,
    out_dir: Path,
    *,
    seeds: int = 1,
    with_single_cycle: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train and evaluate the Table 1 runs for ``config`` (a :class:`snapens.config.TrainConfig`).

    Args:
        config: the budget, model and dataset; its ``schedule`` is replaced run by run, its ``seed`` is the
            first seed (seeds ``seed, seed + 1, ...``).
        out_dir: runs go to ``out_dir/<schedule>-seed<k>``; ``out_dir/reproduce.json`` is written last.
        seeds: number of seeds.
        with_single_cycle: also train the single-cycle baseline.
        progress: progress bars.

    Returns:
        The content of ``reproduce.json``: per row the test errors (%) per seed, mean, std and the paper's number
        (non-finite numbers, from a diverged run, as ``None``).
    """
    from snapens._io import atomic_write_text
    from snapens.cli.evaluate import evaluate_run
    from snapens.cli.train import train_run
    from snapens.report import json_safe, to_json

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CLIError(f"--seeds must be a positive integer, got {seeds!r}")
    out_dir = Path(out_dir)
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first
    out_dir.mkdir(parents=True, exist_ok=True)
    schedules = ["step", "cosine-cycles"] + (["single-cycle"] if with_single_cycle else [])
    seed_list = [config.seed + k for k in range(seeds)]
    runs = []
    try:
        for seed in seed_list:
            for schedule in schedules:
                cfg = dataclasses.replace(config, schedule=schedule, seed=seed)
                run_dir = out_dir / f"{schedule}-seed{seed}"
                train_run(cfg, run_dir, resume=False, progress=progress)
                summary = evaluate_run(run_dir, optimize=1, device=cfg.device, progress=progress,
                                       precision=cfg.precision)
                runs.append({"schedule": schedule, "seed": seed, "run_dir": str(run_dir), "summary": summary})
    except BaseException:
        # A failure before anything was trained (missing data, a bad model) leaves no empty folder behind;
        # finished or interrupted runs stay where they are.
        for folder in created:
            try:
                folder.rmdir()  # only succeeds on an empty folder
            except OSError:
                break
        raise

    paper = paper_errors(config.model, config.dataset, config.lr)
    rows = []
    for key, label, schedule, entry in _TABLE:
        if schedule not in schedules:
            continue
        picked = [r["summary"][entry] for r in runs if r["schedule"] == schedule]
        if any(p is None for p in picked):  # e.g. no validation split: no fitted weights
            continue
        errors = [_float(p["error"]) for p in picked]
        nlls = [_float(p["nll"]) for p in picked]
        mean, std = _mean_std(errors)
        rows.append({"key": key, "name": label, "schedule": schedule, "errors": errors, "nlls": nlls,
                     "mean": mean, "std": std, "nll_mean": statistics.fmean(nlls), "paper": paper[key]})
    result = {
        "format_version": 1,
        "config": config.to_dict(),
        "seeds": seed_list,
        "runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs],
        "rows": rows,
        "paper_source": PAPER_SOURCE,
        "paper_has_setting": any(v is not None for v in paper.values()),
    }
    atomic_write_text(out_dir / "reproduce.json", to_json(result) + "\n")
    return json_safe(result)


def format_reproduce(result: dict[str, Any]) -> str:
    """The reproduce table: our test error (mean +- std over seeds) next to the paper's (``nan`` for a
    number that is not finite, ``None`` in the JSON)."""
    from snapens.cli._common import plural

    cfg = result["config"]
    n = len(result["seeds"])
    lines = [f"Table 1 comparison: {cfg['model']} on {cfg['dataset']}, {plural(cfg['epochs'], 'epoch')}, "
             f"M={cfg['snapshots']}, lr0={cfg['lr']:g}, {n} seed{'s' if n > 1 else ''}"]
    width = max(len(r["name"]) for r in result["rows"])
    ours = "test error %" + (" (mean +- std)" if n > 1 else "")
    lines.append(f"{'':<{width}}  {ours:>26}  {'NLL':>7}  {'paper':>6}")
    for r in result["rows"]:
        mean, std, nll = _float(r["mean"]), _float(r["std"]), _float(r["nll_mean"])
        value = f"{mean:.2f} +- {std:.2f}" if n > 1 else f"{mean:.2f}"
        paper = "-" if r["paper"] is None else f"{r['paper']:.2f}"
        lines.append(f"{r['name']:<{width}}  {value:>26}  {nll:7.4f}  {paper:>6}")
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
    p.add_argument("--lr", type=float, default=None, help=f"restart learning rate lr0 (default: {d.lr})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {d.batch_size})")
    p.add_argument("--seed", type=int, default=None, help=f"first seed (default: {d.seed})")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="number of seeds, reported as mean +- std")
    p.add_argument("--device", default=None, help=f"cpu, cuda, ... (default: {d.device})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: one per core)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"training and evaluation precision: auto = bf16 where the hardware runs it natively, else "
                        f"fp32 (default: {d.precision})")
    p.add_argument("--with-single-cycle", action="store_true",
                   help="also train M independent models for one cycle each")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: runs/reproduce-<model>-<dataset>)")
    p.add_argument("--json", action="store_true", help="print reproduce.json instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens reproduce``: train and evaluate the runs, print the table (or the JSON); returns 0."""
    from snapens.cli._common import configure_logging, progress_enabled
    from snapens.config import resolve_config
    from snapens.report import to_json

    configure_logging(args.quiet)
    config = resolve_config(args.preset, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                            download=args.download, limit_train=args.limit_train, limit_test=args.limit_test,
                            epochs=args.epochs, snapshots=args.snapshots, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, device=args.device, threads=args.threads, precision=args.precision)
    safe_dataset = config.dataset.replace(":", "-").replace("/", "-")
    out = args.out or Path("runs") / f"reproduce-{config.model}-{safe_dataset}"
    if (out / "reproduce.json").exists():
        raise CLIError(f"{out} already holds a reproduction (reproduce.json); choose another --out")
    result = reproduce(config, out, seeds=args.seeds, with_single_cycle=args.with_single_cycle,
                       progress=progress_enabled(args.quiet))
    if args.json:
        print(to_json(result))
    else:
        print(format_reproduce(result))
        if not args.quiet:
            print(f"\nwrote {out / 'reproduce.json'}", file=sys.stderr)
    return 0
