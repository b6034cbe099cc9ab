"""Evaluate a run folder: every snapshot, the single best model and the ensembles, on the test split.

Choices (the single best model, the ensemble weights, the temperature) are made on the validation split; the
numbers are measured on the test split. :func:`evaluate` writes ``RUN_DIR/summary.json`` (or a variant's own
file, :func:`snapens.runs.summary_file`), the recommended combination (``recommended.json``,
:func:`snapens.runs.recommended_file`: what ``from_run`` and ``snapens export`` use by default) and, with
``optimize=1``, the fitted weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from snapens import runs
from snapens._io import read_json
from snapens.runs import read_run_info, recommended_file, summary_file, weights_file
from snapens.workflows.common import check_recorded_split, eval_batch_size

__all__ = ["evaluate", "evaluate_run", "load_run_dataset", "load_saved_weights", "make_loader", "recommended_choice"]

logger = logging.getLogger(__name__)


def load_saved_weights(run_dir: Path, member_names: list[str], *, flag: str = "--optimize 0",
                       last: int | None = None, include_best: bool = False) -> torch.Tensor:
    """The weights saved by ``evaluate --optimize 1`` with the same ``last`` / ``include_best``
    (:func:`weights_file`), checked against the members they will be applied to."""
    path = Path(run_dir) / weights_file(last, include_best)
    if not path.exists():
        same = "".join(f" {f}" for f in ([f"--last {last}"] if last is not None else [])
                       + (["--include-best"] if include_best else []))
        raise FileNotFoundError(f"{flag} needs saved ensemble weights, but {path} does not exist; "
                       f"run `snapens evaluate --optimize 1{same}` first")
    try:
        saved = read_json(path)
        weights = [float(w) for w in saved["weights"]]
        names = list(saved["members"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read ensemble weights from {path}: {exc}") from exc
    if names != member_names:
        raise ValueError(f"the weights in {path} were fitted for members {names}, not for {member_names}; "
                       "refit them with --optimize 1 (and the same --last / --include-best)")
    return torch.tensor(weights, dtype=torch.float64)


def recommended_choice(val_member_probs: torch.Tensor | None, val_labels: torch.Tensor | None,
                       names: list[str]) -> tuple[dict[str, Any], Any]:
    """``(choice, recommendation)``: the combination of the members ``names`` to use, as stored in
    recommended.json, and the :class:`snapens.guidance.Recommendation` it comes from (``None`` without one).

    The choice is :func:`snapens.guidance.recommend`'s on the validation probabilities ``[M, N, C]``; with one
    member or no validation split there is nothing to choose on, and it is every member with equal weights.
    """
    from snapens.guidance import recommend

    n = len(names)
    # what the choice was really made on: nothing, when there is no validation split or one member
    fitted_on = ("validation" if val_member_probs is not None and n > 1
                 else "none: one member" if n == 1 else "none: no validation split, equal weights")
    base = {"format_version": 1, "fitted_on": fitted_on, "members": list(names)}
    if val_member_probs is not None and n > 1:
        rec = recommend(val_member_probs, val_labels)
        return {**base, "weights": list(rec.weights), "temperature": rec.temperature,
                "temperature_fitted": rec.temperature_fitted, "use": rec.use, "last_m": rec.last_m,
                "forward_passes": rec.forward_passes, "reason": rec.reason, "criterion": rec.criterion}, rec
    reason = ("one member: nothing to combine" if n == 1
              else "no validation split: nothing to choose on, so the paper's equal weights")
    return {**base, "weights": [1.0 / n] * n, "temperature": 1.0, "temperature_fitted": False, "use": "equal",
            "last_m": None, "forward_passes": n, "reason": reason, "criterion": None}, None


@contextlib.contextmanager
def _temperature_warned_once() -> Iterator[None]:
    """Silence the "Temperature not fitted" warning: the summary's temperature row has logged it already, and the
    recommendation records its own reason (``temperature_reason``)."""
    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Temperature not fitted")

    log = logging.getLogger("snapens.weighting")
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _short(names: list[Any]) -> str:
    shown = ", ".join(str(n) for n in names[:5])
    return f"[{shown}{', ...' if len(names) > 5 else ''}] ({len(names)} classes)"


def load_run_dataset(info: dict[str, Any], *, data_dir: str | os.PathLike[str] | None = None) -> Any:
    """The run's dataset, split exactly as in training (same dataset, val_size, seed and limits), checked against it.

    Args:
        info: the run's config.json (:func:`read_run_info`).
        data_dir: where the dataset lives now, overriding the ``data_dir`` stored in config.json (for a run
            moved to another machine). A relative folder is relative to the current directory.

    Raises:
        ValueError: the dataset found has other split sizes or classes than the one the run was trained on
            (config.json's ``dataset`` entry): another dataset, or the same one changed; or, for runs that recorded
            it, another split (``dataset.split_sha256``, :func:`snapens.data.split_fingerprint`): config.json's
            seed, val_size or limits edited since training; or images of another shape than config.json's
            ``dataset.image_shape`` (edited by hand).
        FileNotFoundError: the dataset's files are missing.
    """
    from snapens.data import load_dataset

    cfg = info["config"]
    root = data_dir if data_dir is not None else cfg.get("data_dir")
    where = f"at {root}" if root is not None else "(default location)"
    hint = "pass --data-dir with the folder the run was trained on"
    try:
        # Older config.json files have no limits: every image.
        data = load_dataset(cfg["dataset"], data_dir=root, download=bool(cfg.get("download", False)),
                            val_size=cfg["val_size"], seed=int(cfg["seed"]), limit_train=cfg.get("limit_train"),
                            limit_test=cfg.get("limit_test"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (the run's dataset {cfg['dataset']!r} {where}; {hint})") from exc
    trained = info["dataset"]
    for split in ("train", "val", "test"):
        now, then = len(getattr(data, split)), trained[f"num_{split}"]
        if now != then:
            raise ValueError(f"the {cfg['dataset']} dataset {where} now has {now} {split} images, but the run was "
                             f"trained with {then}; {hint}")
    if list(data.classes) != list(trained["classes"]):
        raise ValueError(f"the {cfg['dataset']} dataset {where} now has classes {_short(list(data.classes))}, but "
                         f"the run was trained with {_short(list(trained['classes']))}; {hint}")
    check_recorded_split(data, info)
    return data


def make_loader(split: Any, info: dict[str, Any], device: str | torch.device) -> Any:
    """Evaluation batches of ``split``: in order, no augmentation, normalised with the run's mean and std."""
    from snapens.data import BatchLoader

    ds = info["dataset"]
    return BatchLoader(split, batch_size=eval_batch_size(info["config"]["batch_size"]), shuffle=False,
                       augment=None, mean=tuple(ds["mean"]), std=tuple(ds["std"]), device=device)


def _with_progress(loader: Any, desc: str, progress: bool, total: int | None = None) -> Any:
    if not progress:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, file=sys.stderr, total=total)


def _price(ensemble: Any, images: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Forward passes per image and measured images/s of ``ensemble.predict_proba`` over ``images``."""
    from snapens.cost import measure_inference

    return measure_inference(lambda x: ensemble.predict_proba(x, batch_size=batch_size), images,
                             network=ensemble.model, device=ensemble.device, warmup_images=batch_size).to_dict()


def _recommended_price(loaded: Any, first: int, choice: dict[str, Any], single: dict[str, float],
                       ensemble: dict[str, float], images: torch.Tensor, batch_size: int) -> dict[str, float]:
    """The recommended combination's price: only its members run (one member costs what one network costs, all
    of them what the ensemble costs; anything between is measured)."""
    kept = [m for m, w in enumerate(choice["weights"]) if w > 0]
    if len(kept) == 1:
        return dict(single)
    if len(kept) == len(choice["weights"]):
        return dict(ensemble)
    subset = loaded.subset([first + m for m in kept], [choice["weights"][m] for m in kept])
    if choice["temperature_fitted"]:
        subset.set_temperature(choice["temperature"])
    return _price(subset, images, batch_size)


def evaluate_run(
    run_dir: Path,
    *,
    last: int | None = None,
    include_best: bool = False,
    optimize: int = 1,
    device: str | torch.device = "cpu",
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    precision: str = "auto",
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate a run folder's snapshot ensemble and write its summary (see :func:`snapens.report.summarize`).

    The whole run's summary goes to ``summary.json``; with ``last`` or ``include_best`` it goes to its own file
    (:func:`summary_file`, e.g. ``summary-last3.json``), and so do fitted weights (:func:`weights_file`), so
    that the run's own results are never replaced by a variant's.

    Args:
        run_dir: a folder written by ``snapens train`` (``config.json``, ``snapshots/``, maybe ``best.safetensors``).
        last: use only the last ``m`` snapshots (default: all).
        include_best: add ``best.safetensors`` to the ensemble as a member.
        optimize: ``-1`` equal weights only, ``1`` fit weights on validation and save them to
            ``ensemble_weights.json`` (:func:`weights_file`), ``0`` use the saved weights.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``... (checked by :func:`snapens.distributed.resolve_device`).
        data_dir: where the dataset lives now, instead of the ``data_dir`` stored in config.json.
        progress: show progress bars on stderr.
        precision: the members' inference precision, ``auto`` (bf16 where the hardware runs it natively, else
            fp32), ``fp32``, ``bf16`` or ``fp16`` (CUDA); the one used is recorded as ``run.precision``.
        write: False for a folder that cannot be written (read-only media): the summary is returned only.

    Returns:
        The summary as written (non-finite numbers as ``None``), with a ``"run"`` entry naming the run folder and
        the evaluation options, and the price columns (:func:`snapens.report.add_prices`): each row's forward
        passes per test image and test images/s, measured on ``device`` by timing the last snapshot alone and
        the evaluated ensemble (:func:`snapens.cost.measure_inference`). Its ``ensemble_recommended`` row
        (:func:`snapens.report.add_recommended`) is the combination chosen on validation
        (:func:`recommended_choice`), priced with only its own members; that choice is also written to
        ``recommended.json`` (:func:`snapens.runs.recommended_file`), which ``from_run`` and ``export`` read.

    Raises:
        ValueError: a bad option or device, an incomplete config.json, missing or corrupt snapshots
            (:class:`snapens.checkpoint.SnapshotError`, naming the file), or a dataset that is not the one
            the run was trained on.
    """
    from snapens import metrics, report
    from snapens._io import atomic_write_json, atomic_write_text
    from snapens.distributed import resolve_device
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    run_dir = Path(run_dir)
    if optimize not in report.OPTIMIZE_MODES:
        raise ValueError(f"--optimize must be one of -1, 0, 1, got {optimize!r}")
    device = resolve_device(device)
    info = read_run_info(run_dir)
    cfg = info["config"]

    # best.safetensors, when there is one, is loaded once as member 0: it gives the "single best" row and,
    # with include_best, is also an ensemble member. from_run checks --last and the files.
    # exists(), not is_file(): a FIFO or folder in its place is refused by the loader, not silently skipped
    has_best = include_best or (run_dir / runs.BEST_FILE).exists()
    loaded = SnapshotEnsemble.from_run(run_dir, build_model, last=last, include_best=has_best, weights="equal",
                                       device=device, precision=precision)
    used_precision = loaded.precision  # resolves auto, and refuses fp16 off CUDA, before any work
    all_names = [Path(n).stem for n in loaded.member_names]
    first = 1 if has_best and not include_best else 0  # members of the evaluated ensemble: loaded[first:]
    names = all_names[first:]
    weights = load_saved_weights(run_dir, names, last=last, include_best=include_best) if optimize == 0 else None
    data = load_run_dataset(info, data_dir=data_dir)

    # Member-major over whole splits of raw uint8 images: each member is loaded once per split, and the ensemble
    # normalises with the run's mean/std exactly as make_loader does.
    batch_size = eval_batch_size(cfg["batch_size"])

    def member_probs(split: Any, desc: str) -> torch.Tensor:
        bar = _with_progress(None, desc, progress, total=len(loaded) * len(split))
        try:
            return loaded.member_probs(split.images, batch_size=batch_size, progress=bar)
        finally:
            if bar is not None:
                bar.close()

    has_val = len(data.val) > 0
    val_mp = member_probs(data.val, "validation") if has_val else None
    test_mp = member_probs(data.test, "test")
    best_test = test_mp[0] if has_best else None
    best_val_acc = float(metrics.accuracy(val_mp[0], data.val.labels)) if has_best and val_mp is not None else None

    summary = report.summarize(val_mp[first:] if val_mp is not None else None, data.val.labels if has_val else None,
                               test_mp[first:], data.test.labels, member_names=names, best_test_probs=best_test,
                               best_val_acc=best_val_acc, weights=weights, optimize=optimize,
                               is_snapshot=[not (include_best and m == 0) for m in range(len(names))])
    # validation only: the guidance must never see test data
    with _temperature_warned_once():
        choice, rec = recommended_choice(val_mp[first:] if val_mp is not None else None,
                                         data.val.labels if has_val else None, names)
    summary["recommendation"] = rec.to_dict() if rec is not None else None
    report.add_recommended(summary, choice, test_mp[first:], data.test.labels)
    snap_members = [first + m for m in range(len(names)) if not (include_best and m == 0)]
    single = _price(loaded.subset([snap_members[-1]]), data.test.images, batch_size)
    ensemble = _price(loaded.subset(range(first, len(loaded))), data.test.images, batch_size)
    report.add_prices(summary, single=single, ensemble=ensemble, device=str(device),
                      recommended=_recommended_price(loaded, first, choice, single, ensemble, data.test.images,
                                                     batch_size))
    summary["run"] = {"run_dir": str(run_dir), "last": last, "include_best": include_best,
                      "dataset": cfg["dataset"], "model": info["model"]["name"],
                      "schedule": cfg["schedule"], "epochs": cfg["epochs"], "lr": cfg["lr"],
                      "precision": used_precision}
    summary_path = run_dir / summary_file(last, include_best)
    if not write:
        logger.warning("warning: %s is read-only: the summary is not saved to %s", run_dir, summary_path.name)
        return report.json_safe(summary)
    atomic_write_text(summary_path, report.to_json(summary) + "\n")
    atomic_write_json(run_dir / recommended_file(last, include_best), choice)
    if optimize == 1 and summary["ensemble_weighted"] is not None:
        atomic_write_json(run_dir / weights_file(last, include_best), {
            "format_version": 1, "method": "nll", "fitted_on": "validation", "members": names,
            "weights": summary["ensemble_weighted"]["weights"]})
    logger.info("wrote %s", summary_path)
    return report.json_safe(summary)


def evaluate(
    run_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    allow_unfinished: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a finished run folder and write its summary, holding the folder's lock meanwhile
    (an unfinished run is refused unless ``allow_unfinished``: :func:`snapens.runs.require_finished`).

    The same as :func:`evaluate_run` (``options`` are its keyword arguments: ``last``, ``include_best``,
    ``optimize``, ``data_dir``, ``progress``, ``precision``; see there for the summary), on ``device`` ``"auto"``
    (CUDA when available) by default, as ``snapens evaluate RUN_DIR`` does.

    Example:
        >>> summary = snapens.evaluate("runs/py")                    # doctest: +SKIP
        >>> summary["ensemble_equal"]["error"], summary["single_best"]["error"]   # doctest: +SKIP

    Raises:
        ValueError: see :func:`evaluate_run`.
        FileNotFoundError: the dataset or (``optimize=0``) the saved weights are missing.
        snapens._lock.RunFolderBusy: another process holds the run folder.
    """
    from snapens._lock import run_lock

    # it writes summary.json (and weights) into the folder: one owner at a time; a read-only folder is only read
    with run_lock(run_dir, read_only=True) as lock:
        runs.require_finished(run_dir, allow_unfinished=allow_unfinished)
        return evaluate_run(Path(run_dir), device=device, write=lock is not None or not Path(run_dir).is_dir(),
                            **options)


def evaluate_pretrained(
    name: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    dataset: str | None = None,
    **options: Any,
) -> tuple[Path, dict[str, Any]]:
    """Evaluate a pre-trained bundle (:mod:`snapens.pretrained`) like a run folder: ``snapens evaluate
    --pretrained NAME``.

    The bundle is verified (every file's sha256) and copied into ``dest`` (a new or empty folder; a fresh folder
    under ``runs/`` when None), which then holds the bundle and the evaluation's files; the package's own copy is
    never written to. When the evaluation fails (bad options, missing data), the copy is removed again, so that
    a rerun with the same ``dest`` works.

    Args:
        name: a registered bundle name or a bundle folder.
        dest: where the copy and the summary go.
        dataset: the dataset the user expects (e.g. ``cifar10-jpeg``); refused when the bundle was trained on
            another one. None: the bundle's own.
        options: :func:`evaluate`'s keyword arguments (``data_dir``, ``device``, ``precision``, ...).

    Returns:
        ``(dest, summary)``.

    Raises:
        ValueError: an unknown name, a dataset other than the bundle's, ``dest`` not empty.
        snapens.checkpoint.SnapshotError: a file that does not match its sha256, or weights not shipped yet.
    """
    import time

    from snapens import pretrained

    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(dest) if dest is not None else Path("runs") / f"pretrained-{Path(name).name}-{stamp}"
    # verified before anything is written: an unknown, unshipped or changed bundle leaves nothing behind
    trained_on = read_run_info(pretrained.verify(name))["config"]["dataset"]
    if dataset is not None and dataset != trained_on:
        raise ValueError(f"the pre-trained bundle {name} was trained on {trained_on}, not {dataset}")
    # the copy is this call's to undo when it fails (e.g. --precision fp16 on a CPU): a rerun into the same DEST
    # is refused while the folder is not empty; a folder that held anything before is never touched
    fresh = not folder.exists()
    was_empty = folder.is_dir() and not any(folder.iterdir())
    try:
        pretrained.extract(name, folder)
        return folder, evaluate(folder, **options)
    except BaseException:
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        elif was_empty:
            for child in list(folder.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
