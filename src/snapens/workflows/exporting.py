"""Export a run's snapshot ensemble as ONE self-contained module file: :func:`export_run`, ``snapens export``.

The exported module takes the run's images ``[N, C, H, W]`` (its channels and image size) as float in [0, 1]
(uint8 pixels / 255), normalises them with the training set's mean and std, runs the members at the precision
chosen at export and returns the ensemble's probabilities. By default the members and weights are the recommended
ones (chosen on validation by ``snapens evaluate``, stored in recommended.json), with their temperature; members
of weight 0 are left out; so are, with fitted weights (``--weights fitted``), the members weighted below
:data:`snapens.weighting.DROP_BELOW` (the rest renormalised): the module runs only the members that count. Two formats: ``torch.export`` (``.pt2``) and TorchScript
(``.pt``, deprecated by PyTorch). Both carry a JSON description as the extra file :data:`EXTRA_FILE`;
:func:`load_exported` reads either back.

Input checks inside the file (the ensemble's contract, :meth:`snapens.ensemble.SnapshotEnsemble.predict_proba`):
the ``.pt`` module also takes uint8 images and refuses other dtypes, other shapes and floats outside [0, 1] with
a ``snapens:`` message. The ``.pt2`` program refuses values outside [0, 1] (so 0..255 input, uint8 included) and
other channel counts or image sizes, but cannot check the dtype: give it float32, ``x.float() / 255`` for uint8
pixels. The description's ``input_checks`` says which format checks what.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from snapens import runs
from snapens.runs import read_run_info
from snapens.workflows.evaluation import load_run_dataset, load_saved_weights, recommended_choice

__all__ = ["EXTRA_FILE", "FORMATS", "WEIGHT_CHOICES", "default_format", "export", "export_run", "load_exported"]

FORMATS = {"torchscript": ".pt", "export": ".pt2"}
#: ``--weights``: the combination validation supports (default), equal weights (the paper), or the fitted ones.
WEIGHT_CHOICES = ("recommended", "equal", "fitted")
EXTRA_FILE = "snapens.json"
_EXAMPLE_BATCH = 8
#: What the exported module checks of its input itself, and what it leaves to the caller (description field).
_INPUT_CHECKS = {
    "torchscript": "refuses (torch.jit.Error, a ValueError inside) other dtypes than uint8/floating, other shapes than input_shape, and float "
                   "values outside [0, 1]",
    "export": "refuses (RuntimeError) values outside [0, 1], and other channels or image sizes than input_shape; "
              "does NOT check the dtype: pass float32 (uint8 images: x.float() / 255)",
}
#: What a run folder holds of its own (patterns of top-level names; hidden files are temporary files and locks):
#: an export may sit beside them, never in their place.
_RUN_FILES = runs.RUN_FILES
_RUN_FOLDERS = runs.RUN_FOLDERS


def _refuse_run_file(run_dir: Path, out: Path) -> None:
    """Raise ValueError if ``out`` is (or, through symlinks, resolves to) one of ``run_dir``'s own files."""
    import fnmatch

    run, target = os.path.realpath(run_dir), os.path.realpath(out)
    owned = os.path.dirname(target) == run and any(fnmatch.fnmatch(os.path.basename(target), p) for p in _RUN_FILES)
    owned = owned or any(os.path.commonpath([target, os.path.join(run, d)]) == os.path.join(run, d)
                         for d in _RUN_FOLDERS)
    if owned:
        raise ValueError(f"refusing to write the export over {out}: it belongs to the run {run_dir}; choose another "
                       f"file name, e.g. {Path(run_dir) / 'ensemble.pt2'}")


def _serialize(module: Any, example: Tensor, fmt: str, extra: str) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        # torch.export.save says so for channels-last weights on the CPU, where it does not matter
        warnings.filterwarnings("ignore", message=r"No complete tensor found in the group")
        # The input checks travel inside the file: see MaterializedEnsemble.scripted_images / range_checked.
        if fmt == "torchscript":
            torch.jit.save(module.scripted_images(example), buf, _extra_files={EXTRA_FILE: extra})
        else:
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(module.range_checked(), (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, buf, extra_files={EXTRA_FILE: extra})
    return buf.getvalue()


def load_exported(path: Path) -> tuple[Any, dict[str, Any]]:
    """Load a file written by :func:`export_run`: ``(callable module, its snapens.json description)``."""
    path = Path(path)
    extra = {EXTRA_FILE: ""}
    if path.suffix == ".pt2":
        module = torch.export.load(str(path), extra_files=extra).module()
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXTRA_FILE] or "{}")


def default_format(out: Path) -> str:
    """The format an output file's suffix asks for: ``"torchscript"`` for ``.pt``, else ``"export"``."""
    return "torchscript" if Path(out).suffix == FORMATS["torchscript"] else "export"


def export_run(
    run_dir: Path,
    out: Path,
    *,
    fmt: str | None = None,
    weights: str = "recommended",
    temperature: bool = True,
    last: int | None = None,
    include_best: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Export a run's snapshot ensemble (on CPU, at ``precision``) to ``out`` and check the file against it.

    Args:
        run_dir: a folder written by ``snapens train``.
        out: the file to write (atomically).
        fmt: ``"export"`` (``torch.export``) or ``"torchscript"`` (``torch.jit.trace``, deprecated by
            PyTorch); ``None`` = :func:`default_format` of ``out``.
        weights: ``"recommended"`` (default): the members, weights and temperature ``snapens evaluate`` chose
            on validation (``run_dir/recommended.json``, :func:`snapens.runs.recommended_file`); for a run never
            evaluated, chosen now on the validation split the same way (:func:`recommended_choice`, at
            ``precision`` on the CPU). Members of weight 0 are left out of the module. ``"equal"``: every member,
            equal weights (the paper); ``"fitted"``: the weights in ``run_dir/ensemble_weights.json``.
        temperature: apply the recommended temperature where validation identified one; ``False``: ``T = 1``.
        last: only the last ``m`` snapshots.
        include_best: add ``best.safetensors`` as a member.
        data_dir: where the dataset is now, instead of the ``data_dir`` stored in config.json.
        precision: the members' precision, applied by the exported module: ``auto`` (bf16 where this CPU runs it
            natively, else fp32), ``fp32`` or ``bf16``.

    Returns:
        The description stored in the file, plus ``"max_abs_diff"``: the largest difference between the reloaded
        file's probabilities and the ensemble's on a batch of test images.

    Raises:
        ValueError: a bad format, weights or precision, ``out`` one of the run's own files, a run that is not
            complete, or a file that disagrees with the ensemble (it is written, then refused); a file whose module
            refuses the run's own test images is removed.
        FileNotFoundError: ``out``'s folder, the dataset or (``weights="fitted"``) the saved weights are missing.
    """
    from snapens._io import atomic_write_bytes
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    if fmt is None:
        fmt = default_format(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    run_dir, out = Path(run_dir), Path(out)
    _refuse_run_file(run_dir, out)
    if out.suffix not in FORMATS.values():
        raise ValueError(f"cannot export to {out}: the file must end in .pt2 (torch.export) or .pt (TorchScript)")
    if out.suffix != FORMATS[fmt]:
        raise ValueError(f"--format {fmt} writes a {FORMATS[fmt]} file, got {out}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: the folder {out.parent} does not exist")
    info = read_run_info(run_dir)
    # from_run's ensemble normalises [0, 1] images with the run's mean/std itself, and so does its materialized
    # form that is exported.
    ensemble = SnapshotEnsemble.from_run(run_dir, build_model, last=last, include_best=include_best,
                                         weights="equal", precision=precision)
    names = [Path(n).stem for n in ensemble.member_names]
    data = load_run_dataset(info, data_dir=data_dir)
    chosen: dict[str, Any] = {}
    if weights == "fitted":
        ensemble, chosen = _fitted(ensemble, run_dir, names, last, include_best)
    if weights == "recommended":
        ensemble, chosen = _recommended(ensemble, run_dir, names, data, last, include_best, temperature)
    batch = data.test.subset(torch.arange(min(_EXAMPLE_BATCH, len(data.test))))
    example = batch.images.float() / 255.0
    mean, std = tuple(info["dataset"]["mean"]), tuple(info["dataset"]["std"])
    module = ensemble.materialize().eval()
    description = {
        "format_version": 1, "format": fmt, "run_dir": str(run_dir),
        "members": [Path(n).stem for n in ensemble.member_names],
        "weights": ensemble.weights_.tolist(), "weights_source": weights, "temperature": ensemble.temperature,
        "members_of_run": names, **chosen, "classes": list(data.classes),
        "mean": list(mean), "std": list(std), "input_shape": ["N", *example.shape[1:]],
        "input": ("uint8 images (0..255) or float32 images in [0, 1] (uint8 / 255)" if fmt == "torchscript" else
                  "float32 images in [0, 1] (uint8 / 255)") + ", NCHW; output: ensemble probabilities",
        "input_dtypes": ["uint8", "float32"] if fmt == "torchscript" else ["float32"],
        "input_checks": _INPUT_CHECKS[fmt],
        "model": info["model"], "precision": ensemble.precision,
    }
    atomic_write_bytes(out, _serialize(module, example, fmt, json.dumps(description)))

    # The file must reproduce the ensemble's (so evaluate's) numbers at the same precision.
    inputs = [example, batch.images] if fmt == "torchscript" else [example]  # .pt also takes uint8
    try:
        reloaded, _ = load_exported(out)
        with torch.no_grad():
            diff = max(float((reloaded(x) - ensemble.predict_proba(x)).abs().max()) for x in inputs)
    except torch.jit.Error as exc:  # the module's own input checks refuse the run's images: no usable file
        out.unlink(missing_ok=True)
        raise ValueError(f"the exported module refuses the run's test images, so {out} was removed (is "
                         f"config.json's dataset.image_shape the run's?): {str(exc).strip().splitlines()[-1]}"
                         ) from exc
    if diff > 1e-4:
        raise ValueError(f"the exported file {out} disagrees with the ensemble by {diff:.2e} on test images")
    return {**description, "max_abs_diff": diff}


def _fitted(ensemble: Any, run_dir: Path, names: list[str], last: int | None,
            include_best: bool) -> tuple[Any, dict[str, Any]]:
    """The members of ``ensemble`` that count under the saved fitted weights (those below
    :data:`snapens.weighting.DROP_BELOW` dropped, :func:`~snapens.weighting.prune_weights`) and what the
    description records of it."""
    from snapens.weighting import DROP_BELOW, prune_weights

    saved = load_saved_weights(run_dir, names, flag="--weights fitted", last=last, include_best=include_best)
    pruned = prune_weights(saved).tolist()
    kept = [m for m, w in enumerate(pruned) if w > 0]
    return ensemble.subset(kept, [pruned[m] for m in kept]), {"fitted": {
        "source": str(run_dir / runs.weights_file(last, include_best)), "drop_below": DROP_BELOW,
        "dropped": [names[m] for m, w in enumerate(pruned) if w <= 0]}}


def _recommended(ensemble: Any, run_dir: Path, names: list[str], data: Any, last: int | None, include_best: bool,
                 temperature: bool) -> tuple[Any, dict[str, Any]]:
    """The recommended members of ``ensemble`` (all of the run's, equal weights) with their weights and
    temperature, and what the description records of the choice."""
    stored = runs.read_recommended(run_dir, last, include_best)
    if stored is None:  # never evaluated: choose now, on validation, the way evaluate does
        val = ensemble.member_probs(data.val.images) if len(data.val) else None
        stored, _ = recommended_choice(val, data.val.labels if val is not None else None, names)
        source = "chosen on validation at export (run `snapens evaluate` to store it)"
    else:
        source = str(run_dir / runs.recommended_file(last, include_best))
        if stored["members"] != names:
            raise ValueError(f"{source} was chosen for the members {stored['members']}, not for {names}; run "
                             "`snapens evaluate` again (with the same --last / --include-best)")
    kept = [m for m, w in enumerate(stored["weights"]) if w > 0]
    chosen = ensemble.subset(kept, [stored["weights"][m] for m in kept])
    use_t = temperature and bool(stored.get("temperature_fitted"))
    chosen.set_temperature(stored["temperature"] if use_t else 1.0)
    return chosen, {"recommendation": {"use": stored["use"], "reason": stored["reason"], "source": source,
                                       "temperature_fitted": bool(stored.get("temperature_fitted")),
                                       "temperature_applied": use_t}}


def export(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """:func:`export_run` (``options`` are its keyword arguments), holding the run folder's lock when ``out`` lies
    inside it: ``snapens export RUN_DIR OUT`` as a function.

    Raises:
        ValueError / FileNotFoundError: see :func:`export_run`.
        snapens._lock.RunFolderBusy: ``out`` lies in the run folder and another process holds it.
    """
    import contextlib

    from snapens._lock import run_lock

    into_run = Path(run_dir).resolve() in Path(out).resolve().parents
    with run_lock(run_dir) if into_run else contextlib.nullcontext():  # writing into a run: own it
        runs.require_finished(run_dir, allow_unfinished=bool(options.pop("allow_unfinished", False)))
        return export_run(Path(run_dir), Path(out), **options)
