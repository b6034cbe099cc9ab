"""Pre-trained snapshot ensembles: named bundles whose every file is pinned by sha256.

A bundle is a folder laid out like a run folder of ``snapens train``, so that
:meth:`snapens.ensemble.SnapshotEnsemble.from_run` and ``snapens evaluate`` read it unchanged:

* ``config.json``: the source run's config.json (its ``data_dir`` removed: the data live elsewhere now);
* ``snapshots/manifest.json`` and ``snapshots/snapshot-KK.safetensors``: the members, stored in float16
  (half the bytes; the ensemble casts them back to float32 when it loads a member);
* ``recommended.json`` (where the run was evaluated): the combination ``snapens evaluate`` chose on the run's
  validation split, which :func:`load` uses by default, as ``from_run`` does for a run;
* ``card.json`` / ``card.md``: the model card, i.e. the command that trained the run, test error and NLL of every
  row of its evaluation, and the sha256 of every other file.

Named bundles live beside this module (``<package>/pretrained/<name>/``) and are listed in ``registry.json``,
which pins the sha256 of each of their files. :func:`load` checks every file against those digests before a
single tensor is read, so a changed or truncated file is refused with its name. A bundle outside the registry
(a folder path) is checked against its own ``card.json`` instead: that catches corruption, not tampering.

Example:
    >>> ens = load("resnet-20-cifar10", device="cuda")   # doctest: +SKIP
    >>> probs = ens.predict_proba(uint8_images)           # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from snapens import runs
from snapens._io import atomic_write_json, atomic_write_text, read_json, read_regular_bytes
from snapens.checkpoint import SnapshotError, SnapshotStore
from snapens.ensemble import SnapshotEnsemble
from snapens.models import build_model

__all__ = ["PretrainedNotAvailableError", "REGISTRY_PATH", "CARD_JSON", "CARD_MD", "registry", "available",
           "bundle_files", "verify", "load", "extract", "export_pretrained", "write_card"]

logger = logging.getLogger(__name__)

#: The registry of named bundles shipped with the package.
REGISTRY_PATH = Path(__file__).with_name("registry.json")
CARD_JSON = "card.json"
CARD_MD = "card.md"
CARD_FORMAT = 1
#: The rows of a run's summary.json recorded in the card (besides one row per member).
_SUMMARY_ROWS = ("single_best", "last_snapshot", "ensemble_equal", "ensemble_weighted", "ensemble_temperature",
                 "ensemble_recommended")


class PretrainedNotAvailableError(SnapshotError):
    """A registered bundle whose files are not shipped (yet) or not found where they should be."""


# ------------------------------------------------------------------------------------------------ the registry


def registry(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """The registered bundles, ``name -> entry`` (``files``: ``{relative path: sha256}`` or ``None``).

    Raises:
        SnapshotError: the registry file is unreadable or breaks its schema.
    """
    path = Path(path) if path is not None else REGISTRY_PATH
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read the pre-trained registry {path}: {exc}") from exc
    bundles = data.get("bundles") if isinstance(data, dict) else None
    if not isinstance(bundles, dict):
        raise SnapshotError(f"{path}: expected {{'bundles': {{name: entry}}}}")
    for name, entry in bundles.items():
        if not isinstance(entry, dict):
            raise SnapshotError(f"{path}: bundle {name!r} must be a JSON object")
        files = entry.get("files")
        if files is not None:
            _check_files_table(files, f"{path}: bundle {name!r}")
    return bundles


def available(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the registered bundles whose files are shipped."""
    return sorted(n for n, e in registry(path).items() if e.get("files"))


def _check_files_table(files: Any, where: str) -> None:
    if not isinstance(files, dict) or not files:
        raise SnapshotError(f"{where}: 'files' must map relative paths to sha256 digests")
    for rel, digest in files.items():
        parts = Path(str(rel)).parts
        if not parts or Path(str(rel)).is_absolute() or ".." in parts:
            raise SnapshotError(f"{where}: file {rel!r} is not a relative path inside the bundle")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise SnapshotError(f"{where}: sha256 of {rel!r} must be 64 lowercase hex digits, got {digest!r}")


def _resolve(name_or_dir: str | os.PathLike[str], root: str | os.PathLike[str] | None,
             registry_path: str | os.PathLike[str] | None) -> tuple[Path, dict[str, str], str]:
    """(bundle folder, the digests its files must have, where those digests come from)."""
    known = registry(registry_path)
    if isinstance(name_or_dir, str) and name_or_dir in known:
        entry = known[name_or_dir]
        folder = Path(root if root is not None else REGISTRY_PATH.parent) / name_or_dir
        if not entry.get("files"):
            how = entry.get("how", "")
            raise PretrainedNotAvailableError(
                f"the pre-trained ensemble {name_or_dir!r} is registered but its weights are not shipped yet"
                + (f": {how}" if how else ""))
        return folder, dict(entry["files"]), f"the registry entry {name_or_dir!r}"
    folder = Path(name_or_dir)
    if folder.is_dir() and (folder / CARD_JSON).exists():
        return folder, _card_files(folder), str(folder / CARD_JSON)
    listed = ", ".join(f"{n}{'' if e.get('files') else ' (not shipped yet)'}" for n, e in sorted(known.items()))
    raise ValueError(f"unknown pre-trained ensemble {os.fspath(name_or_dir)!r}: known names are {listed or 'none'}; "
                     f"or pass a bundle folder (one holding {CARD_JSON})")


def _card_files(folder: Path) -> dict[str, str]:
    try:
        card = read_json(folder / CARD_JSON)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read {folder / CARD_JSON}: {exc}") from exc
    files = card.get("files") if isinstance(card, dict) else None
    _check_files_table(files, str(folder / CARD_JSON))
    return dict(files)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(read_regular_bytes(path)).hexdigest()
    except FileNotFoundError as exc:
        raise PretrainedNotAvailableError(f"{path} is missing from the pre-trained bundle") from exc
    except OSError as exc:  # NotARegularFileError and the rest, named
        raise SnapshotError(f"cannot read {path}: {exc}") from exc


def bundle_files(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of a bundle folder (sorted; what a registry entry pins)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def verify(name_or_dir: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
           registry_path: str | os.PathLike[str] | None = None) -> Path:
    """Check every file of a bundle against its pinned sha256 and return the bundle's folder.

    Args:
        name_or_dir: A registered name (checked against ``registry.json``) or a bundle folder (checked against
            its own ``card.json``: detects corruption, not a deliberate change of card and files together).
        root: Where named bundles live (default: beside this module).
        registry_path: Another registry file (default :data:`REGISTRY_PATH`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        PretrainedNotAvailableError: registered but not shipped, or a pinned file missing.
        SnapshotError: a file whose sha256 differs (named), or a snapshot file no digest pins.
    """
    return _verify(name_or_dir, root, registry_path)[0]


def _verify(name_or_dir: str | os.PathLike[str], root: str | os.PathLike[str] | None,
            registry_path: str | os.PathLike[str] | None) -> tuple[Path, dict[str, str]]:
    folder, pinned, source = _resolve(name_or_dir, root, registry_path)
    for rel, digest in pinned.items():
        actual = _sha256(folder / rel)
        if actual != digest:
            raise SnapshotError(f"{folder / rel} does not match {source}: sha256 {actual}, expected {digest}; "
                                "the file was changed or damaged, refusing to load the bundle")
    # The manifest is pinned and lists the members, but a stray member file would still be refused later by
    # SnapshotStore; refuse it here, naming the file.
    for path in sorted((folder / runs.SNAPSHOT_DIR).glob("*.safetensors")):
        if path.relative_to(folder).as_posix() not in pinned:
            raise SnapshotError(f"{path} is not pinned by {source}: a stray file in the bundle")
    logger.debug("verified %d files of %s against %s", len(pinned), folder, source)
    return folder, pinned


def load(name_or_dir: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
         registry_path: str | os.PathLike[str] | None = None, last: int | None = None,
         weights: Sequence[float] | str | None = "recommended", temperature: bool = True,
         device: str | torch.device = "cpu", member_device: str | torch.device | None = "cpu",
         precision: str = "auto", channels_last: bool | None = None) -> SnapshotEnsemble:
    """A pre-trained snapshot ensemble, every file sha256-verified before any tensor is read.

    It takes images as :meth:`SnapshotEnsemble.from_run` does (uint8 0..255 or float in [0, 1], normalised
    with the training set's mean/std); the members (float16 on disk) compute in ``precision``.

    Args:
        name_or_dir: A registered name (see :func:`available`) or a bundle folder.
        root, registry_path: see :func:`verify`.
        weights: ``"recommended"`` (default): the combination the source run's ``snapens evaluate`` chose on
            validation, carried (pinned) as the bundle's recommended.json, as ``from_run`` uses a run's; a bundle
            without one (exported from a run never evaluated, or with ``last``) gets equal weights, with a logged
            note. ``"equal"`` or ``None``: every member, equal weights. Or one weight per member.
        last, temperature, device, member_device, precision, channels_last: as for ``from_run``.

    Raises:
        ValueError, PretrainedNotAvailableError, SnapshotError: see :func:`verify`.
    """
    folder, pinned = _verify(name_or_dir, root, registry_path)
    if isinstance(weights, str) and weights == "recommended" and runs.recommended_file(last) not in pinned:
        # an unpinned recommended.json (a copy evaluated in place, say) is not read: nothing unverified is
        logger.info("%s carries no recommended combination (%s pinned by its digests): equal weights", folder,
                    runs.recommended_file(last))
        weights = "equal"
    return SnapshotEnsemble.from_run(folder, build_model, last=last, weights=weights, temperature=temperature,
                                     device=device, member_device=member_device, precision=precision,
                                     channels_last=channels_last)


def extract(name_or_dir: str | os.PathLike[str], dest: str | os.PathLike[str], *,
            root: str | os.PathLike[str] | None = None,
            registry_path: str | os.PathLike[str] | None = None) -> Path:
    """Verify a bundle and copy it to ``dest`` (new or empty), a run folder ``snapens evaluate`` can write into.

    The copies are checked again after copying, so ``dest`` holds exactly the pinned bytes.

    Raises:
        ValueError: ``dest`` exists and is not an empty folder; and as :func:`verify`.
    """
    folder, pinned = _verify(name_or_dir, root, registry_path)
    # the card travels along (a folder bundle's card is not among its own pinned files)
    pinned.update({card: _sha256(folder / card) for card in (CARD_JSON, CARD_MD)
                   if card not in pinned and (folder / card).is_file()})
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty folder: choose a new folder for the bundle's copy")
    for rel, digest in pinned.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, target)
        if _sha256(target) != digest:
            raise SnapshotError(f"{folder / rel} changed while it was copied to {target}")
    return dest


# ------------------------------------------------------------------------------------------------ making one


def _half(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Floating tensors to float16 (integer buffers such as BatchNorm's step count unchanged)."""
    out = {}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            half = tensor.to(torch.float16)
            if not bool(torch.isfinite(half).all()):
                raise ValueError(f"{source}: tensor {key} overflows float16 (|x| > 65504); it cannot be shipped "
                                 "in half precision")
            tensor = half
        out[key] = tensor.contiguous()
    return out


def _rows(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Test error % and NLL of each row of a summary.json (members, then the combinations)."""
    rows = {}
    for snap in summary.get("snapshots", []):
        rows[str(snap["name"])] = {"error": float(snap["error"]), "nll": float(snap["nll"])}
    for key in _SUMMARY_ROWS:
        row = summary.get(key)
        if isinstance(row, Mapping) and "error" in row:
            rows[key] = {"error": float(row["error"]), "nll": float(row["nll"])}
    return rows


def export_pretrained(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, name: str,
                      command: str, last: int | None = None, max_bytes: int | None = None) -> dict[str, Any]:
    """Turn a finished run folder into a bundle: float16 members, config.json, card; returns the registry entry.

    The card's metrics are the run's own summary.json (fp32 members); call :func:`write_card` with the summary
    of ``snapens evaluate`` on the bundle to record the numbers of the float16 members instead.

    Args:
        run_dir: A run folder of ``snapens train`` (config.json, snapshots/, summary.json).
        out_dir: The bundle's folder: new or empty.
        name: The bundle's name (``resnet-20-cifar10``).
        command: The command that trained the run, for the card.
        last: Keep only the last ``last`` snapshots (default all).
        max_bytes: Refuse a bundle whose snapshot files together exceed this size.

    Raises:
        ValueError: ``out_dir`` not new or empty, ``last`` out of range, a weight overflowing float16, or the size
            limit exceeded. SnapshotError: the run's snapshots are missing or corrupt.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty folder")
    info = runs.read_run_info(run_dir)
    source = SnapshotStore(run_dir / runs.SNAPSHOT_DIR)
    infos = source.list()
    if not infos:
        raise SnapshotError(f"{run_dir} holds no snapshots")
    if last is not None:
        if not 1 <= last <= len(infos):
            raise ValueError(f"last must be in [1, {len(infos)}], got {last}")
        infos = infos[-last:]
    # Built in a sibling folder and renamed into place: a refused or interrupted export leaves nothing behind.
    work = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        entry = _write_bundle(run_dir, work, info, source, infos, name=name, command=command, last=last,
                              max_bytes=max_bytes)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry


def _write_bundle(run_dir: Path, out_dir: Path, info: dict[str, Any], source: SnapshotStore, infos: list[Any], *,
                  name: str, command: str, last: int | None, max_bytes: int | None) -> dict[str, Any]:
    config = json.loads(json.dumps(info))
    config["config"]["data_dir"] = None  # a path on the machine that trained it: meaningless elsewhere
    store = SnapshotStore(out_dir / runs.SNAPSHOT_DIR)
    for new_index, snap in enumerate(infos, start=1):
        state = _half(source.load_state_dict(snap.index), str(snap.path))
        store.save(state, index=new_index, step=snap.step, epoch=snap.epoch, lr=snap.lr, model_name=snap.model_name,
                   model_kwargs=snap.model_kwargs, metrics=snap.metrics)
    atomic_write_json(out_dir / runs.CONFIG_FILE, config)
    _copy_recommendation(run_dir, out_dir, [Path(i.path).stem for i in infos], [i.path.stem for i in store.list()],
                         last)
    size = sum(p.stat().st_size for p in store.folder.glob("*.safetensors"))
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"the bundle's snapshots take {size} bytes, over the limit of {max_bytes}")
    summary_path = run_dir / runs.SUMMARY_FILE
    summary = read_json(summary_path) if summary_path.exists() and last is None else None
    card = {"format_version": CARD_FORMAT, "name": name, "command": command, "source_run": run_dir.name,
            "model": {"name": infos[-1].model_name, "kwargs": infos[-1].model_kwargs},
            "dataset": {k: info["dataset"].get(k) for k in ("name", "classes", "num_train", "num_val", "num_test")},
            "members": len(infos), "stored_dtype": "float16", "snapshot_bytes": size,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return write_card(out_dir, summary, measured_on="the source run (float32 members)", card=card)


def _copy_recommendation(run_dir: Path, out_dir: Path, run_stems: list[str], bundle_stems: list[str],
                         last: int | None) -> None:
    """The run's recommendation for the bundled members (recommended.json, or recommended-lastK.json with
    ``last``) as the bundle's recommended.json, its members renamed to the bundle's snapshot files."""
    rec = runs.read_recommended(run_dir, last)
    if rec is None:
        logger.info("%s holds no %s (never evaluated): the bundle carries no recommended combination and loads "
                    "with equal weights", run_dir, runs.recommended_file(last))
        return
    if rec["members"] != run_stems:
        raise ValueError(f"{run_dir / runs.recommended_file(last)} was chosen for the members {rec['members']}, "
                         f"not for {run_stems}; run `snapens evaluate` on the run again")
    atomic_write_json(out_dir / runs.RECOMMENDED_FILE, {**rec, "members": bundle_stems})


def write_card(bundle_dir: str | os.PathLike[str], summary: Mapping[str, Any] | None, *, measured_on: str,
               card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """(Re)write a bundle's card.json and card.md with the test metrics of ``summary``; returns the registry entry.

    Args:
        bundle_dir: The bundle.
        summary: A summary.json of ``snapens train``/``evaluate`` (``None``: no metrics recorded).
        measured_on: Which members the numbers are of, e.g. ``"this bundle (float16 members)"``.
        card: The card's other fields (default: the bundle's current card.json).
    """
    bundle_dir = Path(bundle_dir)
    card = dict(card) if card is not None else dict(read_json(bundle_dir / CARD_JSON))
    card["metrics"] = None if summary is None else {
        "split": summary.get("split", "test"), "num_test": summary.get("num_test"), "measured_on": measured_on,
        "rows": _rows(summary), "recommendation": (summary.get("recommendation") or {}).get("use")}
    card["files"] = {rel: d for rel, d in bundle_files(bundle_dir).items() if rel not in (CARD_JSON, CARD_MD)}
    atomic_write_json(bundle_dir / CARD_JSON, card)
    atomic_write_text(bundle_dir / CARD_MD, card_markdown(card))
    return {"files": bundle_files(bundle_dir), "description": f"{card['model']['name']} on "
            f"{card['dataset']['name']}, {card['members']} float16 snapshots"}


def card_markdown(card: Mapping[str, Any]) -> str:
    """The model card as Markdown (what card.md holds)."""
    lines = [f"# {card['name']}", "", f"{card['members']} snapshots of `{card['model']['name']}` "
             f"({card['model']['kwargs']}) trained on {card['dataset']['name']} "
             f"({card['dataset']['num_train']} training, {card['dataset']['num_val']} validation, "
             f"{card['dataset']['num_test']} test images), stored as {card['stored_dtype']}.", "",
             "Trained with:", "", "```", str(card["command"]), "```", ""]
    metrics = card.get("metrics")
    if metrics:
        lines += [f"Test metrics ({metrics['num_test']} {metrics['split']} images, measured on "
                  f"{metrics['measured_on']}); recommendation from validation: {metrics['recommendation']}", "",
                  "| row | error % | NLL |", "|---|---|---|"]
        for row, m in metrics["rows"].items():
            nll = m["nll"] if math.isfinite(m["nll"]) else float("nan")
            lines.append(f"| {row} | {m['error']:.2f} | {nll:.4f} |")
        lines.append("")
    lines += ["Files (sha256):", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {rel} | `{digest}` |" for rel, digest in card["files"].items()]
    return "\n".join(lines) + "\n"
