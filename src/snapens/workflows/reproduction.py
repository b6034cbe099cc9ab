"""The paper's Table 1 comparison and the cheap ensembles at one budget of your choice: :func:`reproduce`.

One run per method (``single``, ``snapshot``, ``fge``, ``swa``, ``single-cycle``) with the same budget and seed,
each method's final model, ensembles, weight average and optional distilled student, with their price; the rows
and files are described once, in ``snapens reproduce --help`` (:mod:`snapens.cli.reproduce`).
"""


from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from snapens.workflows.common import check_model_name

__all__ = ["METHODS", "PAPER_SOURCE", "PAPER_TABLE1", "paper_errors", "parse_methods", "price_points", "reproduce"]

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

#: ``--methods`` names and the schedule that trains each.
METHODS = {"single": "step", "snapshot": "cosine-cycles", "fge": "fge", "swa": "swa", "single-cycle": "single-cycle"}
_METHOD_LABELS = {"single": "single model (step)", "snapshot": "snapshot ensemble", "fge": "FGE", "swa": "SWA",
                  "single-cycle": "single-cycle"}
#: The rows of every method: (suffix, label, where the number comes from: a summary entry, "average" or "distill").
_PARTS = (("last", "final model", "last_snapshot"), ("equal", "ensemble (equal)", "ensemble_equal"),
          ("fitted", "ensemble (fitted on val)", "ensemble_weighted"),
          ("recommended", "ensemble (recommended)", "ensemble_recommended"), ("average", "weight average", "average"),
          ("distill", "distilled student", "distill"))
#: The row keys of the paper's Table 1 columns (and of earlier reproduce.json files).
_LEGACY_KEYS = {("single", "last"): "single", ("single", "equal"): "nocycle", ("snapshot", "equal"): "se_equal",
                ("snapshot", "fitted"): "se_fitted", ("single-cycle", "equal"): "single_cycle"}
_LEGACY_LABELS = {"single": "single model (step schedule, final)", "nocycle": "NoCycle snapshot ensemble (equal)",
                  "se_equal": "snapshot ensemble (equal weights)", "se_fitted": "snapshot ensemble (fitted on val)",
                  "single_cycle": "single-cycle ensemble (equal)"}
_VALUE_KEYS = ("error", "nll", "ece", "forward_passes", "images_per_second")


def _row_key(method: str, part: str) -> str:
    return _LEGACY_KEYS.get((method, part), f"{method.replace('-', '_')}_{part}")


def _row_label(method: str, part: str, label: str) -> str:
    key = _row_key(method, part)
    if method == "single" and part == "fitted":  # the step run's snapshots are the NoCycle ensemble
        return "NoCycle snapshot ensemble (fitted on val)"
    return _LEGACY_LABELS.get(key, f"{_METHOD_LABELS[method]}: {label}")


def parse_methods(text: str) -> list[str]:
    """``"single,snapshot,fge"`` -> the method names, in the order given, each once; unknown names are refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def paper_errors(model: str, dataset: str, lr: float) -> dict[str, float | None]:
    """The paper's Table 1 test errors (%) for our row keys, ``None`` where the paper has no number.

    The snapshot-ensemble number is the paper's column for the same restart rate ``lr0`` (0.1 or 0.2).
    """
    row = PAPER_TABLE1.get((model, _DATASET_ALIASES.get(dataset, dataset)))
    out: dict[str, float | None] = {key: None for key in _LEGACY_LABELS}
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


def _trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that finished training."""
    from snapens import runs

    path = run_dir / runs.STATE_FILE
    return path.is_file() and bool(runs.load_training_state(path).get("finished"))


def _student(run_dir: Path, distill_model: str, epochs: int, resume: bool, progress: bool) -> dict[str, Any]:
    """The distilled student's distill.json: read back when a resumed reproduction already has it."""
    from snapens._io import read_json
    from snapens._lock import run_lock
    from snapens.config import DistillConfig
    from snapens.workflows.distillation import DISTILL_JSON, distill_run

    out = run_dir / f"distill-{distill_model}"
    if resume and (out / DISTILL_JSON).is_file():
        return read_json(out / DISTILL_JSON)
    with run_lock(out, create=True):
        return distill_run(run_dir, out, DistillConfig(model=distill_model, epochs=epochs),
                           resume=resume and (out / "config.json").is_file(), progress=progress)


def _method_run(cfg: Any, run_dir: Path, method: str, distill_model: str | None, progress: bool,
                resume: bool = False) -> dict[str, Any]:
    """Train, evaluate, average (and distil) one method's run, holding its folder's lock; returns its rows'
    numbers by part. ``resume``: a run that finished training is not trained again, an interrupted one continues
    (its evaluation and average are repeated: seconds, and the same numbers)."""
    from snapens import runs
    from snapens._lock import run_lock
    from snapens.workflows.evaluation import evaluate_run
    from snapens.workflows.training import train_run
    from snapens.workflows.weight_average import average_run

    with run_lock(run_dir, create=True):
        started = runs.run_exists(run_dir) or (run_dir / runs.CONFIG_FILE).exists()
        if not (resume and _trained(run_dir)):
            train_run(cfg, run_dir, resume=resume and started, progress=progress)
        summary = evaluate_run(run_dir, optimize=1, device=cfg.device, progress=progress, precision=cfg.precision)
        parts: dict[str, dict[str, Any] | None] = {}
        for part, _, entry in _PARTS:
            if entry in summary:
                parts[part] = summary[entry]
        average = average_run(run_dir, device=cfg.device)
    # The same architecture as a single snapshot: the same forward pass, so the same measured price.
    parts["average"] = {**average["test"], **summary["price"]["single"]}
    if distill_model is not None:
        student = _student(run_dir, distill_model, cfg.epochs, resume, progress)
        parts["distill"] = {**student["student"]["test"],
                            **{k: student["student"][k] for k in ("forward_passes", "images_per_second")}}
    return {"method": method, "schedule": cfg.schedule, "seed": cfg.seed, "run_dir": str(run_dir), "parts": parts}


def _check_out(out_dir: Path, plan: list[tuple[str, Any]], resume: bool) -> None:
    """Refuse a finished reproduction, runs left by an interrupted one (without ``resume``), and (with it) runs
    whose recorded settings differ from this call's. Call it holding ``out_dir``'s lock."""
    from snapens import runs
    from snapens.workflows.training import changed_settings

    if (out_dir / "reproduce.json").exists():
        raise ValueError(f"{out_dir} already holds a reproduction (reproduce.json); choose another --out")
    started = [(out_dir / f"{cfg.schedule}-seed{cfg.seed}", cfg) for _, cfg in plan]
    started = [(d, cfg) for d, cfg in started if runs.run_exists(d) or (d / runs.CONFIG_FILE).exists()]
    if started and not resume:
        raise ValueError(f"{out_dir} holds the runs of an unfinished reproduction ({', '.join(d.name for d, _ in started)}"
                         "); pass --resume to continue it or choose another --out")
    for run_dir, cfg in started:
        changed = changed_settings(cfg, run_dir)
        if changed:
            raise ValueError(f"--resume continues the reproduction as recorded in {run_dir / runs.CONFIG_FILE}; do not "
                             "change " + ", ".join("--" + k.replace("_", "-") for k in changed))


def _rows(runs: list[dict[str, Any]], methods: list[str], paper: dict[str, float | None]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        for part, label, _ in _PARTS:
            picked = [r["parts"].get(part) for r in runs if r["method"] == method]
            if not picked or any(p is None for p in picked):  # e.g. no validation split: no fitted weights
                continue
            key = _row_key(method, part)
            values = {k: [_float(p.get(k)) for p in picked] for k in _VALUE_KEYS}
            mean, std = _mean_std(values["error"])
            row = {"key": key, "name": _row_label(method, part, label), "method": method,
                   "schedule": METHODS[method], "errors": values["error"], "nlls": values["nll"], "mean": mean,
                   "std": std, "nll_mean": statistics.fmean(values["nll"]), "paper": paper.get(key)}
            row.update({f"{k}_mean": statistics.fmean(values[k]) for k in ("ece", "forward_passes",
                                                                             "images_per_second")})
            rows.append(row)
    return rows


def reproduce(
    config: Any,
    out_dir: Path,
    *,
    seeds: int = 1,
    methods: list[str] | None = None,
    with_single_cycle: bool = False,
    distill: str | None = None,
    progress: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one run per method for ``config`` (a :class:`snapens.config.TrainConfig`).

    Args:
        config: the budget, model and dataset; its ``schedule`` is replaced run by run (:data:`METHODS`), its
            ``seed`` is the first seed (seeds ``seed, seed + 1, ...``).
        out_dir: runs go to ``out_dir/<schedule>-seed<k>``; ``out_dir/reproduce.json`` is written last.
        seeds: number of seeds.
        methods: the methods (default ``["single", "snapshot"]``).
        with_single_cycle: also the ``single-cycle`` method.
        distill: a student architecture: each method's ensemble is also distilled into one (same epochs).
        progress: progress bars.
        resume: continue an interrupted reproduction in ``out_dir``: methods whose run finished training are not
            trained again, an interrupted run continues from its state (the settings must be the recorded ones);
            an ``out_dir`` that does not exist is refused.

    Every method's settings are checked (its model, and its schedule on the dataset) before the first run is
    trained; ``out_dir``'s lock is held throughout, and each run's while it is trained and evaluated.

    Returns:
        The content of ``reproduce.json``: per row the test errors (%) and NLLs per seed, mean, std, the means
        of ECE, forward passes per image and images/s, and the paper's number (non-finite numbers, from a
        diverged run, as ``None``).
    """
    from snapens._io import atomic_write_text
    from snapens._lock import run_lock
    from snapens.report import json_safe, to_json
    from snapens.workflows.training import preflight

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {seeds!r}")
    methods = list(methods or ["single", "snapshot"])
    if with_single_cycle and "single-cycle" not in methods:
        methods.append("single-cycle")
    parse_methods(",".join(methods))
    if distill is not None:
        check_model_name(distill)
    if resume and not Path(out_dir).is_dir():  # as train --resume: nothing to continue is not a fresh start
        raise ValueError(f"cannot resume: {out_dir} is not a directory (no reproduction to continue); leave out "
                         "--resume to start one")
    seed_list = [config.seed + k for k in range(seeds)]
    plan = [(method, dataclasses.replace(config, schedule=METHODS[method], seed=seed))
            for seed in seed_list for method in methods]
    # Every method's settings before the first step: a method that cannot run must not find out after the
    # others spent their budget (and leave a folder the next call refuses).
    preflight([cfg for _, cfg in plan[:len(methods)]])
    out_dir = Path(out_dir)
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first
    runs = []
    try:
        # One owner for the whole reproduction (its own runs are locked one by one as they are trained): two
        # calls with the same --out can no longer mix their settings in one folder.
        with run_lock(out_dir, create=True):
            _check_out(out_dir, plan, resume)
            for method, cfg in plan:
                runs.append(_method_run(cfg, out_dir / f"{cfg.schedule}-seed{cfg.seed}", method, distill, progress,
                                        resume))
            result = _result(config, seed_list, methods, distill, runs)
            atomic_write_text(out_dir / "reproduce.json", to_json(result) + "\n")
    except BaseException:
        # A failure before anything was trained (missing data, a bad model) leaves no empty folder behind;
        # finished or interrupted runs stay where they are.
        for folder in created:
            if folder.exists():
                try:
                    folder.rmdir()  # only succeeds on an empty folder
                except OSError:
                    break
        raise
    return json_safe(result)


def _result(config: Any, seed_list: list[int], methods: list[str], distill: str | None,
            runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of reproduce.json."""
    paper = paper_errors(config.model, config.dataset, config.lr)
    return {
        "format_version": 1,
        "config": config.to_dict(),
        "seeds": seed_list,
        "methods": methods,
        "distill": distill,
        "runs": [{k: v for k, v in r.items() if k != "parts"} for r in runs],
        "rows": _rows(runs, methods, paper),
        "paper_source": PAPER_SOURCE,
        "paper_has_setting": any(v is not None for v in paper.values()),
    }


def price_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per row of a reproduce result for :func:`snapens.workflows.plotting.plot_price` (rows with a price)."""
    return [{"label": r["name"], "error": r["mean"], "forward_passes": r["forward_passes_mean"],
             "images_per_second": r["images_per_second_mean"]}
            for r in result["rows"] if r.get("images_per_second_mean") is not None]
