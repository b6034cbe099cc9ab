"""Distil a run's calibrated snapshot ensemble into one student network: :func:`distill`, ``snapens distill``.

The teacher is the run's ensemble with its member weights and temperature fitted on the VALIDATION split (as
:func:`~snapens.workflows.evaluation.evaluate_run` fits them); it runs online on every (augmented) training
batch (:mod:`snapens.distill`). The student trains one cosine cycle with the run's data, splits, seed and
optimizer settings into its own run folder, then is evaluated; ``distill.json`` holds both sides' numbers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from snapens import runs
from snapens.distributed import resolve_device
from snapens.runs import read_run_info
from snapens.workflows.common import check_model_name, set_threads
from snapens.workflows.evaluation import evaluate_run, load_run_dataset, make_loader
from snapens.workflows.training import train_run

__all__ = ["DISTILL_JSON", "distill", "distill_run", "student_config"]

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


def _fit_teacher(ensemble: Any, data: Any, info: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Member weights (NLL on validation) and temperature of the teacher, as ``snapens evaluate`` fits them."""
    from snapens import weighting

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
        raise FileNotFoundError(f"--resume: {out_dir} holds no distillation to continue ({path.name} is missing)")
    try:
        saved = read_json(path)
        recorded, entry = dict(saved["config"]), dict(saved["distill"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--resume: {path} is not a snapens distill run: {exc}") from exc
    was = {**{k: entry[k] for k in ("temperature", "alpha")}, "model": recorded["model"],
           "epochs": recorded["epochs"], "lr": recorded["lr"], "precision": recorded["precision"]}
    changed = sorted(k for k, v in given.items() if v is not None and k in was and was[k] != v)
    if changed:
        raise ValueError(f"--resume continues the distillation as recorded in {path}; do not change "
                       + ", ".join("--" + k for k in changed))
    recorded.update({k: given[k] for k in _RESUME_FREE if given.get(k) is not None})
    return TrainConfig(**recorded), entry


def _teacher_members(run_dir: Path) -> tuple[list[str], list[str]]:
    """The teacher's members as its manifest lists them: names (``snapshot-01``, ...) and sha256s."""
    from snapens.checkpoint import SnapshotStore

    infos = SnapshotStore(run_dir / runs.SNAPSHOT_DIR).list()
    return [i.path.stem for i in infos], [i.sha256 for i in infos]


def _check_same_teacher(run_dir: Path, entry: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume a student whose teacher's snapshots changed since it started (e.g. the teacher run was
    unfinished then and has finished since): its recorded weights and soft targets belong to the old members."""
    names, hashes = _teacher_members(run_dir)
    was_names, was_hashes = entry.get("teacher_members"), entry.get("teacher_sha256")
    if names != was_names or (was_hashes is not None and hashes != was_hashes):
        what = ("its members are now " + ", ".join(names) + " but were " + ", ".join(map(str, was_names or []))
                if names != was_names else "its snapshot files changed (sha256)")
        raise ValueError(f"--resume: the teacher {run_dir} changed since the student in {out_dir} started: {what}; "
                         "start a new distillation in another --run-dir")


def _student_trained(out_dir: Path) -> bool:
    """Whether the student in ``out_dir`` finished training (killed afterwards, before ``distill.json``)."""
    path = out_dir / runs.STATE_FILE
    return path.is_file() and bool(runs.load_training_state(path).get("finished"))


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
        announce: receives the run header (see :func:`snapens.workflows.training.train_run`).

    Returns:
        The content of ``out_dir/distill.json``: ``teacher`` and ``student`` (``test`` metrics, errors in %,
        and the price), ``agreement`` (% of test images with the same top-1 class), T, alpha, epochs.

    Raises:
        ValueError / FileNotFoundError: a missing or incomplete teacher run, an unknown model, a bad setting; raised before
            the student's folder is written.
    """
    from snapens import metrics, weighting
    from snapens._io import atomic_write_json
    from snapens._precision import resolve_precision
    from snapens.distill import EnsembleTeacher, make_loss_fn, top1_agreement
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = read_run_info(run_dir)
    if resume:
        cfg, entry = _resume_settings(out_dir, {**(given or {}), "device": device, "threads": threads})
        if (out_dir / DISTILL_JSON).exists():
            raise ValueError(f"cannot resume: the distillation in {out_dir} already finished (its results are in "
                             f"{DISTILL_JSON}); choose another --run-dir for a new one")
    else:
        cfg = student_config(info, dcfg, device=device, precision=precision, threads=threads)
        entry = None
    check_model_name(cfg.model)
    set_threads(cfg.threads)  # before the teacher's fit too: its weights are recorded, and threads change sums
    dev = resolve_device(cfg.device)  # resolved once: the teacher, the student's training and its evaluation
    used_precision = resolve_precision(cfg.precision, dev)
    if entry is not None:
        _check_same_teacher(run_dir, entry, out_dir)
    data = load_run_dataset(info, data_dir=cfg.data_dir)
    ensemble = _teacher_ensemble(run_dir, dev, used_precision, None)
    if entry is None:
        fitted = _fit_teacher(ensemble, data, info, dev)
        entry = {"teacher_run": str(run_dir.resolve()),
                 "teacher_members": [Path(n).stem for n in ensemble.member_names],
                 "teacher_sha256": _teacher_members(run_dir)[1],
                 "teacher_weights": fitted["weights"], "teacher_temperature": fitted["temperature"],
                 "fitted_on": fitted["fitted_on"], "temperature": dcfg.temperature, "alpha": dcfg.alpha}
    ensemble.set_weights(entry["teacher_weights"])
    teacher = EnsembleTeacher(ensemble, calibration_temperature=entry["teacher_temperature"])
    loss_fn = make_loss_fn(teacher, temperature=entry["temperature"], alpha=entry["alpha"])
    if resume and _student_trained(out_dir):
        # killed after the student's last epoch and before distill.json: what is left is the evaluation
        logger.info("the student in %s finished training: evaluating it", out_dir)
    else:
        train_run(cfg, out_dir, resume=resume, progress=progress, announce=announce, loss_fn=loss_fn,
                  extra_info={"distill": entry}, device=dev)

    summary = evaluate_run(out_dir, device=dev, progress=progress, precision=cfg.precision, optimize=-1)
    test_loader = make_loader(data.test, info, dev)
    teacher_probs, teacher_price = _probs_and_price(ensemble, test_loader)
    teacher_probs = weighting.apply_temperature(teacher_probs, entry["teacher_temperature"])
    student = SnapshotEnsemble.from_run(out_dir, build_model, weights="equal", device=dev, inputs="normalized",
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


def distill(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    dcfg: Any = None,
    *,
    resume: bool = False,
    allow_unfinished: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """:func:`distill_run` into ``out_dir`` (default ``run_dir/distill-<model>``), holding its lock; a folder
    that already holds a distillation is refused unless ``resume`` (and a finished one always). ``dcfg``: a
    :class:`~snapens.config.DistillConfig` (its defaults when None). A teacher run that has not finished
    training is refused unless ``allow_unfinished`` (:func:`snapens.runs.require_finished`). ``options``:
    :func:`distill_run`'s other keyword arguments (``device``, ``precision``, ``threads``, ``given``, ``progress``,
    ``announce``).

    Raises:
        ValueError / FileNotFoundError: see :func:`distill_run`; an unfinished teacher; nothing is written then.
        snapens._lock.RunFolderBusy: another process holds ``out_dir``.
        snapens.engine.TrainingInterrupted: SIGINT/SIGTERM (the student's state was saved).
    """
    from snapens._lock import run_lock
    from snapens.config import DistillConfig

    dcfg = dcfg if dcfg is not None else DistillConfig()
    info = read_run_info(run_dir)  # a missing teacher fails before any folder is made
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"distill-{dcfg.model or info['model']['name']}"
    runs.require_finished(run_dir, allow_unfinished=allow_unfinished)
    with run_lock(out, create=not resume):  # checked while owning the folder: no other process is writing it
        if not resume and (out / "config.json").exists():
            raise ValueError(f"{out} already holds a distillation; pass --resume to continue it or choose another "
                             "--run-dir")
        return distill_run(Path(run_dir), out, dcfg, resume=resume, **options)
