"""The run folder: what each file is called, and the resume state written into it.

One place for the layout that training writes and evaluation, plotting, averaging and export read::

    RUN_DIR/
      config.json                  the resolved config, model, dataset and environment (snapens train)
      state.pt                     the resume state (:func:`save_training_state`; engine.fit, every epoch end)
      metrics.csv                  one row per epoch (:data:`METRICS_FIELDS`)
      best.safetensors             the best single model by validation accuracy
      snapshots/                   a :class:`~snapens.checkpoint.SnapshotStore` (manifest.json + snapshot-KK)
      summary*.json                snapens evaluate (:func:`summary_file`)
      ensemble_weights*.json       snapens evaluate --optimize 1 (:func:`weights_file`)
      recommended*.json            snapens evaluate: the combination validation supports (:func:`recommended_file`)
      average.safetensors/.json    snapens average
      plots/                       snapens plot

The resume state is a dict of tensors, numbers, strings, lists and dicts (``torch.load(weights_only=True)``
reads it back), tagged ``format`` :data:`STATE_FORMAT` and ``format_version`` :data:`STATE_VERSION`; it holds
the global RNG states captured by :func:`capture_rng_state`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from snapens._io import NotARegularFileError, atomic_open, atomic_write_text, read_json, require_regular_file
from snapens.checkpoint import SnapshotError

__all__ = [
    "AVERAGE_FILE",
    "AVERAGE_JSON",
    "BEST_FILE",
    "CONFIG_FILE",
    "METRICS_FIELDS",
    "METRICS_FILE",
    "PLOTS_DIR",
    "RECOMMENDED_FILE",
    "REQUIRED_KEYS",
    "RUN_FILES",
    "RUN_FOLDERS",
    "SNAPSHOT_DIR",
    "STATE_FILE",
    "STATE_FORMAT",
    "STATE_VERSION",
    "SUMMARY_FILE",
    "WEIGHTS_FILE",
    "capture_rng_state",
    "load_training_state",
    "read_recommended",
    "read_resume_state",
    "read_run_info",
    "remove_stale_temp_files",
    "require_finished",
    "restore_rng_state",
    "recommended_file",
    "run_exists",
    "save_training_state",
    "summary_file",
    "weights_file",
    "write_metrics",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"
BEST_FILE = "best.safetensors"
SNAPSHOT_DIR = "snapshots"
PLOTS_DIR = "plots"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "ensemble_weights.json"
RECOMMENDED_FILE = "recommended.json"
AVERAGE_FILE = "average.safetensors"
AVERAGE_JSON = "average.json"
#: What a run folder holds of its own (patterns of top-level names; hidden files are temporary files and locks).
RUN_FILES = (CONFIG_FILE, STATE_FILE, METRICS_FILE, BEST_FILE, "summary*.json", "ensemble_weights*.json",
             "recommended*.json", ".*")
RUN_FOLDERS = (SNAPSHOT_DIR, PLOTS_DIR)

STATE_FORMAT = "snapens-train-state"
STATE_VERSION = 1
METRICS_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


def _variant(last: int | None, include_best: bool) -> str:
    return (f"-last{last}" if last is not None else "") + ("-best" if include_best else "")


def summary_file(last: int | None = None, include_best: bool = False) -> str:
    """The summary's file name: ``summary.json`` for the whole run, else e.g. ``summary-last3-best.json``.

    Variants get their own file so that evaluating one never replaces the run's summary (which plot draws).
    """
    return f"summary{_variant(last, include_best)}.json"


def weights_file(last: int | None = None, include_best: bool = False) -> str:
    """The fitted weights' file name: ``ensemble_weights.json`` for the whole run, else e.g.
    ``ensemble_weights-last3.json`` (see :func:`summary_file`)."""
    return f"ensemble_weights{_variant(last, include_best)}.json"


def recommended_file(last: int | None = None, include_best: bool = False) -> str:
    """The stored recommendation's file name: ``recommended.json`` for the whole run, else e.g.
    ``recommended-last3.json`` (see :func:`summary_file`)."""
    return f"recommended{_variant(last, include_best)}.json"


def read_recommended(run_dir: str | os.PathLike[str], last: int | None = None,
                     include_best: bool = False) -> dict[str, Any] | None:
    """The recommendation ``snapens evaluate`` stored for this member set (:func:`recommended_file`), checked:
    ``members`` (file stems), ``weights`` (one per member, >= 0, summing to 1) and ``temperature`` (> 0);
    ``None`` when there is none.

    Raises:
        ValueError: the file exists but is not a valid recommendation (the message names it).
    """
    path = Path(run_dir) / recommended_file(last, include_best)
    if not path.exists():
        return None
    try:
        rec = read_json(path)
        members = [str(n) for n in rec["members"]]
        weights = [float(w) for w in rec["weights"]]
        temperature = float(rec["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the recommendation in {path}: {exc}") from exc
    if (len(weights) != len(members) or not members or any(not math.isfinite(w) or w < 0 for w in weights)
            or abs(sum(weights) - 1.0) > 1e-6 or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"{path} is not a valid recommendation: it needs one weight >= 0 per member, summing to 1, "
                         f"and a temperature > 0; run `snapens evaluate` again to rewrite it")
    return {**rec, "members": members, "weights": weights, "temperature": temperature}


# ---------------------------------------------------------------------------------------------- config.json


#: Entries of config.json that evaluate, plot and export read: ``section -> keys``.
REQUIRED_KEYS = {
    "config": ("dataset", "seed", "val_size", "batch_size", "epochs", "snapshots", "lr", "schedule"),
    "model": ("name", "kwargs"),
    "dataset": ("classes", "num_train", "num_val", "num_test", "mean", "std"),
}


def _check_run_info(info: Any, path: Path) -> None:
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a snapens run config: expected a JSON object")
    for section, keys in REQUIRED_KEYS.items():
        block = info.get(section)
        if not isinstance(block, dict):
            raise ValueError(f"{path} is not a complete snapens run config: the {section!r} entry is missing")
        for key in keys:
            if key not in block:
                raise ValueError(f"{path} is not a complete snapens run config: {section}.{key} is missing")
    ds = info["dataset"]
    for key in ("mean", "std"):
        value = ds[key]
        if not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{path}: dataset.{key} must be a list of numbers, got {value!r}")
    for key in ("num_train", "num_val", "num_test"):
        if isinstance(ds[key], bool) or not isinstance(ds[key], int) or ds[key] < 0:
            raise ValueError(f"{path}: dataset.{key} must be a non-negative integer, got {ds[key]!r}")
    if not isinstance(ds["classes"], list):
        raise ValueError(f"{path}: dataset.classes must be a list, got {ds['classes']!r}")
    if not isinstance(info["model"]["kwargs"], dict):
        raise ValueError(f"{path}: model.kwargs must be an object, got {info['model']['kwargs']!r}")


def read_run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``run_dir/config.json`` (the entries in :data:`REQUIRED_KEYS`).

    Raises:
        ValueError: the folder does not exist, is not a snapens run, config.json cannot be read, or it lacks an
            entry or holds one of the wrong type (the message names the file and the entry).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"{run_dir} is not a snapens run folder: {path.name} is missing")
    try:
        info = read_json(path)  # refuses a FIFO rather than blocking on it
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    _check_run_info(info, path)
    return info


# ------------------------------------------------------------------------------------ training files


def run_exists(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` already holds (part of) a training run."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in (STATE_FILE, METRICS_FILE, BEST_FILE, SNAPSHOT_DIR))


def read_resume_state(run_dir: str | os.PathLike[str], expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load ``run_dir/state.pt`` and check that it can be resumed (without changing anything on disk).

    ``expect``: entries the state must hold (e.g. ``total_steps``, ``world_size``) for the call resuming it.

    Raises:
        ValueError: the folder is not a snapens run, its state is unreadable, the run already finished, or an
            entry differs from ``expect``.
    """
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not run_dir.is_dir():
        raise ValueError(f"cannot resume: {run_dir} is not a directory")
    if not path.is_file():
        raise ValueError(f"cannot resume: {run_dir} is not a snapens run folder ({STATE_FILE} is missing)")
    state = load_training_state(path)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"cannot resume: {path} is not a snapens training state")
    if state.get("format_version") != STATE_VERSION:
        raise ValueError(f"cannot resume: {path} has unsupported format_version {state.get('format_version')!r}")
    if state.get("finished"):
        raise ValueError(
            f"cannot resume: the run in {run_dir} already finished ({state['epoch']} epochs, "
            f"{state['n_cycles']} snapshots); start a new run in another folder"
        )
    for key, now in (expect or {}).items():
        was = state.get(key, 1) if key == "world_size" else state.get(key)  # older states: 1 process
        if was != now:
            raise ValueError(f"cannot resume {run_dir}: its {key} is {was!r} but this call has {now!r}")
    return state


def require_finished(run_dir: str | os.PathLike[str], *, allow_unfinished: bool = False) -> None:
    """Refuse a run that is still training or stopped before its end (killed, interrupted, diverged).

    A run is finished when its ``state.pt`` says so (:func:`snapens.engine.fit` sets ``finished`` after the last
    epoch, once the last snapshot is on disk) and its manifest lists every snapshot the state promises
    (``n_cycles``). A folder without ``state.pt`` (built by hand, or copied without it) holds what its manifest
    lists and is accepted. ``allow_unfinished``: accept the snapshots there are, with a warning.

    Raises:
        ValueError: the run is unfinished (one line, naming what it has and how to finish it), or its state is
            unreadable.
    """
    from snapens.checkpoint import SnapshotStore

    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not path.exists():
        return
    try:
        state = load_training_state(path)
        store = SnapshotStore(run_dir / SNAPSHOT_DIR)
        listed = store.manifest_path.exists()
        have = len(store.list()) if listed else 0
    except (SnapshotError, OSError, ValueError) as exc:
        raise ValueError(f"cannot tell whether {run_dir} finished training: {exc}") from exc
    want, epoch, epochs = state.get("n_cycles"), state.get("epoch"), state.get("epochs")
    if state.get("finished"):
        if not listed or not isinstance(want, int) or have >= want:
            return  # finished; missing or damaged snapshot files are named by the loaders, file by file
        what = (f"{run_dir} is incomplete: it finished training with {want} snapshots, but {store.manifest_path} "
                f"lists {have}")
    else:
        what = (f"{run_dir} has not finished training (epoch {epoch} of {epochs}, {have} of {want} snapshots): "
                "it is still training or was stopped")
    if allow_unfinished:
        logger.warning("warning: %s; using its %d snapshots as asked (--allow-unfinished)", what, have)
        return
    fix = "" if state.get("finished") else f"finish it with `snapens train --resume --run-dir {run_dir}`, or "
    raise ValueError(f"{what}; {fix}pass --allow-unfinished to use the snapshots it has")


def remove_stale_temp_files(run_dir: Path) -> None:
    """Remove the temporary files of atomic writes (``.NAME.HEX.tmp[SUFFIX]``) in the run folder, ``snapshots/``
    and ``plots/``: call it only while holding the folder's lock."""
    # Left behind by a process killed between writing a temp file and renaming it (snapens._io.atomic_open);
    # atomic_path keeps the target's suffix after ".tmp" (".lr.png.1a2b3c4d.tmp.png"), hence ".tmp*".
    for folder in (run_dir, run_dir / SNAPSHOT_DIR, run_dir / PLOTS_DIR):
        for tmp in folder.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                logger.debug("removed stale temporary file %s", tmp)


def write_metrics(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``metrics.csv`` atomically: the header :data:`METRICS_FIELDS`, one row per epoch, NaN as empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in METRICS_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _fmt(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


# --------------------------------------------------------------------------------------------- resume state


def save_training_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """``torch.save`` the resume state (model/optimizer/scheduler state dicts, step, RNG...) atomically.

    Keep to types that ``torch.load(weights_only=True)`` accepts: tensors, dicts, lists, tuples, numbers,
    strings, None (see :func:`capture_rng_state`).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"training state must be a dict, got {type(state).__name__}")
    with atomic_open(path) as f:
        sink = _WriteErrors(f)
        try:
            torch.save(dict(state), sink)
        except RuntimeError:
            # torch.save reports a failed write (disk full) as "unexpected pos ..."; the OSError behind it
            # (errno, message) is what a user can act on.
            if sink.error is not None:
                raise sink.error from None
            raise
    logger.debug("wrote training state %s", path)


class _WriteErrors:
    """A binary file that remembers the OSError its last failed ``write`` raised."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def load_training_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`save_training_state` with ``torch.load(weights_only=True)``.

    Raises:
        SnapshotError: the file is missing, corrupt, or holds objects that weights-only loading refuses.
    """
    path = Path(path)
    try:
        require_regular_file(path)
    except FileNotFoundError as e:
        raise SnapshotError(f"training state {path} is missing") from e
    except NotARegularFileError as e:
        raise SnapshotError(f"training state {e}") from e
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors come in many types
        raise SnapshotError(f"training state {path} is corrupt or unsafe to load: {e}") from e
    if not isinstance(state, dict):
        raise SnapshotError(f"training state {path} holds a {type(state).__name__}, not a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The global random states of Python, NumPy, torch CPU and (if available) CUDA, weights_only-safe.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor, ...] | None}`` holding
        only tensors, lists, ints, floats, strings and None.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`capture_rng_state` (CUDA only where available and captured).

    Raises:
        ValueError: a part is missing.
    """
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise ValueError(f"RNG state lacks {key!r}; has {sorted(state)}")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = np.asarray(torch.as_tensor(npst["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npst["name"], keys, int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            logger.warning("RNG state has %d CUDA generators, this machine %d: restoring the common ones", len(cuda), n)
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(torch.as_tensor(s).cpu().to(torch.uint8), device=i)
    elif cuda is not None:
        logger.warning("RNG state has CUDA generators but CUDA is not available: not restored")
