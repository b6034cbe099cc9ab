"""``snapens evaluate RUN_DIR``: every snapshot, the single best model and the ensembles, on the test split.

Choices (the single best model, the ensemble weights, the temperature) are made on the validation split; the
numbers are measured on the test split. Writes ``RUN_DIR/summary.json`` (and ``RUN_DIR/ensemble_weights.json``
with ``--optimize 1``) and prints a table (or the JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from snapens.cli import CLIError

__all__ = [
    "evaluate_run", "read_run_info", "load_run_dataset", "load_saved_weights", "make_loader", "register", "run",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "ensemble_weights.json"
SUMMARY_FILE = "summary.json"


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/config.json``; a clear ``CLIError`` when the folder is not a snapens run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CLIError(f"{run_dir} is not a directory")
    path = run_dir / "config.json"
    if not path.is_file():
        raise CLIError(f"{run_dir} is not a snapens run folder: {path.name} is missing")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from exc
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict) or not isinstance(
            info.get("model"), dict):
        raise CLIError(f"{path} is not a snapens run config (expected 'config' and 'model' entries)")
    return info


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when available, else ``"cpu"``; anything else is passed through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_saved_weights(run_dir: Path, member_names: list[str], *, flag: str = "--optimize 0") -> torch.Tensor:
    """The weights saved by ``evaluate --optimize 1``, checked against the members they will be applied to."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CLIError(f"{flag} needs saved ensemble weights, but {path} does not exist; "
                       "run `snapens evaluate --optimize 1` first")
    try:
        saved = json.loads(path.read_text())
        weights = [float(w) for w in saved["weights"]]
        names = list(saved["members"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"cannot read ensemble weights from {path}: {exc}") from exc
    if names != member_names:
        raise CLIError(f"the weights in {path} were fitted for members {names}, not for {member_names}; "
                       "refit them with --optimize 1 (and the same --last / --include-best)")
    return torch.tensor(weights, dtype=torch.float64)


def load_run_dataset(info: dict[str, Any]) -> Any:
    """The run's dataset, split exactly as in training (same dataset, data_dir, val_size and seed)."""
    from snapens.data import load_dataset

    cfg = info["config"]
    return load_dataset(cfg["dataset"], data_dir=cfg.get("data_dir"), download=bool(cfg.get("download", False)),
                        val_size=cfg.get("val_size"), seed=int(cfg.get("seed", 0)))


def make_loader(split: Any, info: dict[str, Any], device: str) -> Any:
    """Evaluation batches of ``split``: in order, no augmentation, normalised with the run's mean and std."""
    from snapens.data import BatchLoader

    ds = info.get("dataset", {})
    return BatchLoader(split, batch_size=max(256, int(info["config"].get("batch_size", 64))), shuffle=False,
                       augment=None, mean=tuple(ds["mean"]), std=tuple(ds["std"]), device=device)


def _with_progress(loader: Any, desc: str, progress: bool) -> Any:
    if not progress:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, file=sys.stderr)


def evaluate_run(
    run_dir: Path,
    *,
    last: int | None = None,
    include_best: bool = False,
    optimize: int = 1,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a run folder's snapshot ensemble and write ``summary.json`` (see :func:`snapens.report.summarize`).

    Args:
        run_dir: a folder written by ``snapens train`` (``config.json``, ``snapshots/``, maybe ``best.safetensors``).
        last: use only the last ``m`` snapshots (default: all).
        include_best: add ``best.safetensors`` to the ensemble as a member.
        optimize: ``-1`` equal weights only, ``1`` fit weights on validation and save them to
            ``ensemble_weights.json``, ``0`` use the saved weights.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        progress: show progress bars on stderr.

    Returns:
        The summary dict, with a ``"run"`` entry naming the run folder and the evaluation options.
    """
    from snapens import report
    from snapens.checkpoint import SnapshotStore, atomic_write_json, load_weights
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    run_dir = Path(run_dir)
    if optimize not in report.OPTIMIZE_MODES:
        raise CLIError(f"--optimize must be one of -1, 0, 1, got {optimize!r}")
    info = read_run_info(run_dir)
    cfg = info["config"]
    entries = SnapshotStore(run_dir / "snapshots").list() if (run_dir / "snapshots").is_dir() else []
    if not entries:
        raise CLIError(f"{run_dir} has no snapshots (expected {run_dir / 'snapshots' / 'manifest.json'})")
    if last is not None and not 1 <= last <= len(entries):
        raise CLIError(f"--last must be between 1 and the number of snapshots ({len(entries)}), got {last}")
    best_path = run_dir / "best.safetensors"
    if include_best and not best_path.is_file():
        raise CLIError(f"--include-best: {best_path} does not exist")
    device = resolve_device(device)

    ensemble = SnapshotEnsemble.from_run(run_dir, build_model, last=last, include_best=include_best, device=device)
    names = [Path(n).stem for n in ensemble.member_names]
    weights = load_saved_weights(run_dir, names) if optimize == 0 else None
    data = load_run_dataset(info)

    has_val = len(data.val) > 0
    val_mp = ensemble.member_probs(_with_progress(make_loader(data.val, info, device), "validation", progress)) \
        if has_val else None
    test_mp = ensemble.member_probs(_with_progress(make_loader(data.test, info, device), "test", progress))

    best_test = best_val_acc = None
    if best_path.is_file():
        state, meta = load_weights(best_path)
        arch = entries[-1]
        best = SnapshotEnsemble(lambda: build_model(arch.model_name, **arch.model_kwargs), [state],
                                names=[str(best_path)])
        best_test = best.to(device).predict_proba(make_loader(data.test, info, device))
        best_val_acc = meta.get("val_acc") if isinstance(meta, dict) else None

    summary = report.summarize(val_mp, data.val.labels if has_val else None, test_mp, data.test.labels,
                               member_names=names, best_test_probs=best_test,
                               best_val_acc=None if best_val_acc is None else float(best_val_acc),
                               weights=weights, optimize=optimize)
    summary["run"] = {"run_dir": str(run_dir), "last": last, "include_best": include_best,
                      "dataset": cfg["dataset"], "model": info["model"].get("name"),
                      "schedule": cfg.get("schedule"), "epochs": cfg.get("epochs"), "lr": cfg.get("lr")}
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    if optimize == 1 and summary["ensemble_weighted"] is not None:
        atomic_write_json(run_dir / WEIGHTS_FILE, {
            "format_version": 1, "method": "nll", "fitted_on": "validation", "members": names,
            "weights": summary["ensemble_weighted"]["weights"]})
    logger.info("wrote %s", run_dir / SUMMARY_FILE)
    return summary


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate a run's snapshot ensemble on the test split",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by `snapens train`")
    p.add_argument("--last", type=int, default=None, metavar="M", help="ensemble only the last M snapshots")
    p.add_argument("--include-best", action="store_true", help="add best.safetensors as an ensemble member")
    p.add_argument("--optimize", type=int, choices=(-1, 0, 1), default=1,
                   help="-1: equal weights only; 1: fit weights on validation (NLL) and save them to "
                        "ensemble_weights.json; 0: use the saved weights (default: 1)")
    p.add_argument("--num_tests", "--num-tests", type=int, default=None, metavar="N",
                   help="accepted for compatibility with the old predict script and ignored: the NLL fit is "
                        "convex, one exact solve replaces the random restarts")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes (results are still printed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapens.cli._common import configure_logging, progress_enabled

    configure_logging(args.quiet)
    from snapens.report import format_summary

    if args.num_tests is not None:
        logger.info("note: --num_tests %d is ignored: the NLL weight fit is convex, one exact solve replaces the "
                    "random restarts", args.num_tests)
    summary = evaluate_run(args.run_dir, last=args.last, include_best=args.include_best, optimize=args.optimize,
                           device=args.device, progress=progress_enabled(args.quiet))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0
