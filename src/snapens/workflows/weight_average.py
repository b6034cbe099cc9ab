"""Average a run's snapshot weights into one model (SWA-style): :func:`average_run`, ``snapens average``.

The chosen snapshots are averaged weight by weight; BatchNorm statistics are recomputed on training batches
(no augmentation, a fixed order from the run's seed). Writes ``RUN_DIR/average.safetensors`` (the snapshot
format) and ``RUN_DIR/average.json`` (its numbers, and how it compares with the best chosen member on the
validation split).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from snapens import runs
from snapens.runs import AVERAGE_FILE, AVERAGE_JSON
from snapens.workflows.evaluation import load_run_dataset, make_loader

__all__ = ["average", "average_run"]

logger = logging.getLogger(__name__)


def _choose(infos: list[Any], last: int | None, members: list[int] | None) -> list[Any]:
    indices = [i.index for i in infos]
    if last is not None:
        if not 1 <= last <= len(infos):
            raise ValueError(f"--last must be in [1, {len(infos)}] (snapshots in the run), got {last}")
        return infos[-last:]
    if members is not None:
        unknown = [m for m in members if m not in indices]
        if unknown:
            raise ValueError(f"--members {' '.join(map(str, unknown))}: the run has snapshots {indices}")
        if len(set(members)) != len(members):
            raise ValueError(f"--members lists a snapshot twice: {members}")
        return [i for i in infos if i.index in set(members)]
    return infos


def average_run(
    run_dir: str | os.PathLike[str],
    *,
    last: int | None = None,
    members: list[int] | None = None,
    bn_batches: int = 50,
    device: str | torch.device = "cpu",
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Average a run's snapshots, write ``average.safetensors`` and ``average.json``, and return the numbers.

    Returns:
        ``{"members", "bn_batches", "test": {error, nll, ece, ...}, "val": ... or None, "best_member":
        {"name", "val", "test"} or None, "worse_than_best_member_on_val": bool or None}``; errors in percent.
        The best member has the lowest validation error (then NLL); the average is worse than it when its
        validation error is higher, or equal with a higher NLL.

    Raises:
        ValueError: a bad option, a folder that is not a run, missing or corrupt snapshots,
            snapshots of different architectures, or a dataset that is not the run's. Nothing is written then.
    """
    from snapens import metrics
    from snapens.averaging import average_model
    from snapens._io import atomic_write_json, json_safe
    from snapens.checkpoint import SnapshotStore, save_weights
    from snapens.data import BatchLoader
    from snapens.distributed import resolve_device
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 1:
        raise ValueError(f"--bn-batches must be a positive integer, got {bn_batches!r}")
    if last is not None and members is not None:
        raise ValueError("give --last or --members, not both")
    run_dir = Path(run_dir)
    device = resolve_device(device)
    info = runs.read_run_info(run_dir)
    store = SnapshotStore(run_dir / runs.SNAPSHOT_DIR)
    if not store.manifest_path.is_file():
        raise ValueError(f"{run_dir} holds no snapshots ({store.manifest_path} is missing)")
    chosen = _choose(store.list(), last, members)
    if not chosen:
        raise ValueError(f"{store.manifest_path} lists no snapshots")
    arch = (info["model"]["name"], dict(info["model"]["kwargs"]))
    for snap in chosen:
        if (snap.model_name, snap.model_kwargs) != arch:
            raise ValueError(f"{snap.path} holds model {snap.model_name} {snap.model_kwargs}, but the run's config.json "
                           f"says {arch[0]} {arch[1]}: snapshots of different architectures cannot be averaged")
    names = [snap.path.stem for snap in chosen]
    states = [store.load_state_dict(snap.index) for snap in chosen]
    data = load_run_dataset(info, data_dir=data_dir)
    cfg, ds = info["config"], info["dataset"]
    # BatchNorm statistics: un-augmented training images in a fixed, seeded order (not sorted by class).
    bn_loader = BatchLoader(data.train, int(cfg["batch_size"]), shuffle=True, seed=int(cfg["seed"]), augment=None,
                            mean=tuple(ds["mean"]), std=tuple(ds["std"]), device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(cfg["seed"]))  # dropout is active during the recompute (train mode)
        model, used = average_model(lambda: build_model(arch[0], **arch[1]), states, bn_batches=bn_loader,
                                    n_bn_batches=bn_batches, device=device, names=names)

    def probs_of(ensemble_or_model: Any, split: Any) -> torch.Tensor:
        loader = make_loader(split, info, device)
        if isinstance(ensemble_or_model, SnapshotEnsemble):
            return ensemble_or_model.member_probs(loader)
        with torch.no_grad():
            return torch.cat([torch.softmax(ensemble_or_model(x).float(), dim=1) for x, *_ in loader]).cpu()

    test = metrics.evaluate_probs(probs_of(model, data.test), data.test.labels)
    result: dict[str, Any] = {"members": names, "bn_batches": used, "test": test, "val": None,
                              "best_member": None, "worse_than_best_member_on_val": None}
    if len(data.val) > 0:
        result["val"] = metrics.evaluate_probs(probs_of(model, data.val), data.val.labels)
        ensemble = SnapshotEnsemble(lambda: build_model(arch[0], **arch[1]), states, names=names).to(device)
        val_mp = probs_of(ensemble, data.val)
        val_rows = [metrics.evaluate_probs(p, data.val.labels) for p in val_mp]
        best = min(range(len(names)), key=lambda m: (val_rows[m]["error"], val_rows[m]["nll"]))
        test_best = metrics.evaluate_probs(probs_of(ensemble, data.test)[best], data.test.labels)
        result["best_member"] = {"name": names[best], "val": val_rows[best], "test": test_best}
        # Worse: a higher error, or the same error and a higher NLL (the order the best member is chosen by).
        avg_key = (result["val"]["error"], result["val"]["nll"])
        result["worse_than_best_member_on_val"] = bool(avg_key > (val_rows[best]["error"], val_rows[best]["nll"]))
    meta = {"format_version": 1, "kind": "average", "members": names, "bn_batches": used,
            "model": {"name": arch[0], "kwargs": arch[1]}, "test": test, "val": result["val"]}
    save_weights(run_dir / AVERAGE_FILE, model, json_safe(meta))
    atomic_write_json(run_dir / AVERAGE_JSON, result)
    return json_safe(result)


def average(run_dir: str | os.PathLike[str], *, allow_unfinished: bool = False, **options: Any) -> dict[str, Any]:
    """:func:`average_run` (``options`` are its keyword arguments) holding the run folder's lock, on a finished
    run only unless ``allow_unfinished`` (:func:`snapens.runs.require_finished`): ``snapens average`` as a
    function.

    Raises:
        ValueError: see :func:`average_run`; an unfinished run.
        snapens._lock.RunFolderBusy: another process holds the run folder (e.g. it is still training).
    """
    from snapens._lock import run_lock

    with run_lock(run_dir):  # it writes average.safetensors and average.json into the folder
        runs.require_finished(run_dir, allow_unfinished=allow_unfinished)
        return average_run(run_dir, **options)
