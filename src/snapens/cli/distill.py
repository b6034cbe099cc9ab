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
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from snapens.cli import CLIError

__all__ = ["DISTILL_JSON", "distill_run", "format_distill", "register", "run", "student_config"]

logger = logging.getLogger(__name__)

DISTILL_JSON = "distill.json"
#: TrainConfig fields the student takes over from the teacher's run: the same data, splits and optimizer.
_INHERITED = ("dataset", "data_dir", "download", "val_size", "augment", "limit_train", "limit_test", "seed",
              "batch_size", "momentum", "nesterov", "weight_decay", "device", "precision", "channels_last",
              "compile", "threads")
#: Flags that may differ on --resume (they change where and how fast, not what is computed).
_RESUME_FREE = ("device", "threads")


def student_config(info: dict[str, Any], dcfg: Any, **overrides: Any) -> Any:
    """The student's :class:`~snapens.config.TrainConfig`: the teacher run's data, seed and optimizer settings
    (``info`` is its config.json), ``dcfg``'s (:class:`~snapens.config.DistillConfig`) model, epochs and lr,
    one cosine cycle (M=1); ``overrides`` (None values ignored) for device, precision, threads."""
    from snapens.config import TrainConfig

    teacher = info["config"]
    model = dcfg.model or info["model"]["name"]
    values = {k: teacher[k] for k in _INHERITED if k in teacher}
    values.update(model=model, epochs=dcfg.epochs, snapshots=1, schedule="cosine-cycles", lr=dcfg.lr,
                  model_kwargs=dict(teacher.get("model_kwargs") or {}) if model == info["model"]["name"] else {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def _check_model(name: str) -> None:
    from snapens.models import build_model

    with torch.random.fork_rng(devices=[]):
        try:
            build_model(name, num_classes=10, in_channels=3)
        except ValueError as exc:
            raise CLIError(f"{exc}; `snapens train --list-models` lists them all") from exc


def _fit_teacher(ensemble: Any, data: Any, info: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Member weights (NLL on validation) and temperature of the teacher, as ``snapens evaluate`` fits them."""
    from snapens import weighting
    from snapens.cli.evaluate import make_loader

    if len(data.val) == 0:
        logger.info("no validation split: the teacher uses equal weights and T_cal = 1")
        return {"weights": [1.0 / len(ensemble)] * len(ensemble), "temperature": 1.0, "fitted_on": None}
    val_mp = ensemble.member_probs(make_loader(data.val, info, device))
    weights = torch.as_tensor(weighting.fit_ensemble_weights(val_mp, data.val.labels, method="nll"),
                              dtype=torch.float64)
    temperature = float(weighting.fit_temperature(weighting.weighted_average(val_mp, weights), data.val.labels))
    return {"weights": weights.tolist(), "temperature": temperature, "fitted_on": "validation"}


def _resume_settings(out_dir: Path, given: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The recorded student config and distill entry of ``out_dir``; refuses flags that change them."""
    from snapens._io import read_json
    from snapens.config import TrainConfig

    path = out_dir / "config.json"
    if not path.is_file():
        raise CLIError(f"--resume: {out_dir} holds no distillation to continue ({path.name} is missing)")
    try:
        saved = read_json(path)
        recorded, entry = dict(saved["config"]), dict(saved["distill"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"--resume: {path} is not a snapens distill run: {exc}") from exc
    was = {**{k: entry[k] for k in ("temperature", "alpha")}, "model": recorded["model"],
           "epochs": recorded["epochs"], "lr": recorded["lr"], "precision": recorded["precision"]}
    changed = sorted(k for k, v in given.items() if v is not None and k in was and was[k] != v)
    if changed:
        raise CLIError(f"--resume continues the distillation as recorded in {path}; do not change "
                       + ", ".join("--" + k for k in changed))
    recorded.update({k: given[k] for k in _RESUME_FREE if given.get(k) is not None})
    return TrainConfig(**recorded), entry


def _teacher_ensemble(run_dir: Path, device: torch.device, precision: str, weights: list[float] | None) -> Any:
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    # Normalised inputs: the teacher sees the training batches exactly as the student does. Members on the
    # device: the teacher runs every member on every training batch.
    return SnapshotEnsemble.from_run(run_dir, build_model, weights=weights, device=device, member_device=device,
                                     inputs="normalized", precision=precision)


def _probs_and_price(ensemble: Any, loader: Any) -> tuple[torch.Tensor, dict[str, float]]:
    from snapens.cost import measure_inference

    x = torch.cat([batch[0] for batch in loader])
    probs = ensemble.predict_proba(x, batch_size=loader.batch_size)
    price = measure_inference(lambda b: ensemble.predict_proba(b, batch_size=loader.batch_size), x,
                              network=ensemble.model, device=ensemble.device, warmup_images=loader.batch_size)
    return probs, price.to_dict()


def distill_run(
    run_dir: Path,
    out_dir: Path,
    dcfg: Any,
    *,
    resume: bool = False,
    device: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    given: dict[str, Any] | None = None,
    progress: bool = False,
    announce: Any = None,
) -> dict[str, Any]:
    """Distil ``run_dir``'s calibrated snapshot ensemble into a ``dcfg.model`` student in ``out_dir``.

    Args:
        run_dir: the teacher's run folder (``snapens train``).
        out_dir: the student's run folder.
        dcfg: a :class:`~snapens.config.DistillConfig`.
        resume: continue the student in ``out_dir`` as recorded there (``given`` must not change it).
        device, precision, threads: override the teacher run's (None: keep them).
        given: the flags given explicitly, checked against the recorded ones on resume.
        progress: progress bars.
        announce: receives the run header (see :func:`snapens.cli.train.train_run`).

    Returns:
        The content of ``out_dir/distill.json``: ``teacher`` and ``student`` (``test`` metrics, errors in %,
        and the price), ``agreement`` (% of test images with the same top-1 class), T, alpha, epochs.

    Raises:
        CLIError / ValueError: a missing or incomplete teacher run, an unknown model, a bad setting; raised before
            the student's folder is written.
    """
    from snapens import engine, metrics, weighting
    from snapens._io import atomic_write_json
    from snapens.cli.evaluate import evaluate_run, load_run_dataset, make_loader, read_run_info
    from snapens.cli.train import train_run
    from snapens.distill import EnsembleTeacher, make_loss_fn, top1_agreement
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = read_run_info(run_dir)
    if resume:
        cfg, entry = _resume_settings(out_dir, {**(given or {}), "device": device, "threads": threads})
    else:
        cfg = student_config(info, dcfg, device=device, precision=precision, threads=threads)
        entry = None
    _check_model(cfg.model)
    from snapens.cli._common import set_threads

    set_threads(cfg.threads)  # before the teacher's fit too: its weights are recorded, and threads change sums
    dev = engine.resolve_device(cfg.device)
    used_precision = engine.resolve_precision(cfg.precision, dev)
    data = load_run_dataset(info, data_dir=cfg.data_dir)
    ensemble = _teacher_ensemble(run_dir, dev, used_precision, None)
    if entry is None:
        fitted = _fit_teacher(ensemble, data, info, dev)
        entry = {"teacher_run": str(run_dir.resolve()),
                 "teacher_members": [Path(n).stem for n in ensemble.member_names],
                 "teacher_weights": fitted["weights"], "teacher_temperature": fitted["temperature"],
                 "fitted_on": fitted["fitted_on"], "temperature": dcfg.temperature, "alpha": dcfg.alpha}
    ensemble.set_weights(entry["teacher_weights"])
    teacher = EnsembleTeacher(ensemble, calibration_temperature=entry["teacher_temperature"])
    loss_fn = make_loss_fn(teacher, temperature=entry["temperature"], alpha=entry["alpha"])
    train_run(cfg, out_dir, resume=resume, progress=progress, announce=announce, loss_fn=loss_fn,
              extra_info={"distill": entry})

    summary = evaluate_run(out_dir, device=dev, progress=progress, precision=cfg.precision, optimize=-1)
    test_loader = make_loader(data.test, info, dev)
    teacher_probs, teacher_price = _probs_and_price(ensemble, test_loader)
    teacher_probs = weighting.apply_temperature(teacher_probs, entry["teacher_temperature"])
    student = SnapshotEnsemble.from_run(out_dir, build_model, device=dev, inputs="normalized",
                                        precision=cfg.precision)
    student_probs = student.predict_proba(torch.cat([b[0] for b in test_loader]))
    row = summary["last_snapshot"]
    result = {
        "format_version": 1, "teacher_run": str(run_dir), "student_run": str(out_dir),
        "temperature": entry["temperature"], "alpha": entry["alpha"], "epochs": cfg.epochs,
        "teacher": {"members": entry["teacher_members"], "weights": entry["teacher_weights"],
                    "calibration_temperature": entry["teacher_temperature"],
                    "test": metrics.evaluate_probs(teacher_probs, data.test.labels), **teacher_price},
        "student": {"model": cfg.model, "test": {k: row[k] for k in ("error", "nll", "ece", "brier")},
                    "forward_passes": row["forward_passes"], "images_per_second": row["images_per_second"]},
        "agreement": top1_agreement(student_probs, teacher_probs),
        "num_test": len(data.test), "device": str(dev), "precision": summary["run"]["precision"],
    }
    atomic_write_json(out_dir / DISTILL_JSON, result)
    return result


def format_distill(result: dict[str, Any]) -> str:
    """The lines ``snapens distill`` prints: the teacher's and the student's test rows, and their agreement."""
    from snapens.cli._common import method_table

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
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"softmax temperature of the soft targets, > 0 (default: {d.temperature:g})")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"weight of the teacher's soft targets in [0, 1] (default: {d.alpha:g})")
    p.add_argument("--lr", type=float, default=None, help=f"the student's peak learning rate (default: {d.lr:g})")
    p.add_argument("--run-dir", dest="out", type=Path, default=None, metavar="OUT",
                   help="the student's run folder (default: RUN_DIR/distill-<model>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted distillation in OUT")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the teacher run's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the teacher run's")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the teacher run's)")
    p.add_argument("--json", action="store_true", help="print distill.json instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens distill``; returns 0 (or 128 + the signal number when interrupted)."""
    import signal
    import sys

    from snapens import engine
    from snapens._lock import run_lock
    from snapens.cli._common import configure_logging, progress_enabled
    from snapens.cli.evaluate import read_run_info
    from snapens.config import DistillConfig
    from snapens.report import to_json

    configure_logging(args.quiet)
    given = {"model": args.model, "epochs": args.epochs, "temperature": args.temperature, "alpha": args.alpha,
             "lr": args.lr, "precision": args.precision}
    dcfg = DistillConfig(**{k: v for k, v in given.items() if v is not None and k != "precision"})
    info = read_run_info(args.run_dir)  # a missing teacher fails before any folder is made
    out = args.out if args.out is not None else args.run_dir / f"distill-{dcfg.model or info['model']['name']}"
    if not args.resume and (out / "config.json").exists():
        raise CLIError(f"{out} already holds a distillation; pass --resume to continue it or choose another --run-dir")
    with run_lock(out, create=not args.resume):
        try:
            result = distill_run(args.run_dir, out, dcfg, resume=args.resume, device=args.device,
                                 precision=args.precision, threads=args.threads, given=given,
                                 progress=progress_enabled(args.quiet),
                                 announce=lambda s: print(s, flush=True, file=sys.stderr if args.json else sys.stdout))
        except engine.TrainingInterrupted as exc:
            print(f"snapens: {signal.Signals(exc.signum).name}: training state saved to {exc.state_path}; continue "
                  f"with: snapens distill {args.run_dir} --resume --run-dir {out}", file=sys.stderr)
            return 128 + exc.signum
        except engine.NonFiniteLossError as exc:
            raise CLIError(str(exc)) from exc
    print(to_json(result) if args.json else format_distill(result))
    return 0
