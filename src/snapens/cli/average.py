"""``snapens average RUN_DIR``: one model whose weights are the mean of the run's snapshots (SWA-style).

The chosen snapshots (all, ``--last m`` or ``--members i j ...``) are averaged weight by weight; BatchNorm
statistics are recomputed on ``--bn-batches`` training batches (no augmentation, a fixed order from the run's
seed); a model without BatchNorm skips that. Writes ``RUN_DIR/average.safetensors`` (the snapshot format:
safetensors plus JSON metadata) and ``RUN_DIR/average.json`` (its numbers), then prints the averaged model's
error and NLL on the test split, evaluated like any member, and compares it with the best chosen member on the
VALIDATION split. Averaging pays off when the snapshots sit in one basin (swa, fge); snapshots taken after
high-rate restarts (cosine-cycles) usually average into a worse model: the output says when that happens.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from snapens import runs
from snapens.cli import CLIError
from snapens.runs import AVERAGE_FILE, AVERAGE_JSON

__all__ = ["AVERAGE_FILE", "average_run", "register", "run"]

logger = logging.getLogger(__name__)



def _choose(infos: list[Any], last: int | None, members: list[int] | None) -> list[Any]:
    indices = [i.index for i in infos]
    if last is not None:
        if not 1 <= last <= len(infos):
            raise CLIError(f"--last must be in [1, {len(infos)}] (snapshots in the run), got {last}")
        return infos[-last:]
    if members is not None:
        unknown = [m for m in members if m not in indices]
        if unknown:
            raise CLIError(f"--members {' '.join(map(str, unknown))}: the run has snapshots {indices}")
        if len(set(members)) != len(members):
            raise CLIError(f"--members lists a snapshot twice: {members}")
        return [i for i in infos if i.index in set(members)]
    return infos


def average_run(
    run_dir: Path,
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
        CLIError / ValueError: a bad option, a folder that is not a run, missing or corrupt snapshots,
            snapshots of different architectures, or a dataset that is not the run's. Nothing is written then.
    """
    from snapens import metrics
    from snapens.averaging import average_model
    from snapens.checkpoint import SnapshotStore, atomic_write_json, json_safe, save_weights
    from snapens.cli.evaluate import load_run_dataset, make_loader, read_run_info
    from snapens.data import BatchLoader
    from snapens.distributed import resolve_device
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 1:
        raise CLIError(f"--bn-batches must be a positive integer, got {bn_batches!r}")
    if last is not None and members is not None:
        raise CLIError("give --last or --members, not both")
    run_dir = Path(run_dir)
    device = resolve_device(device)
    info = read_run_info(run_dir)
    store = SnapshotStore(run_dir / runs.SNAPSHOT_DIR)
    if not store.manifest_path.is_file():
        raise CLIError(f"{run_dir} holds no snapshots ({store.manifest_path} is missing)")
    chosen = _choose(store.list(), last, members)
    if not chosen:
        raise CLIError(f"{store.manifest_path} lists no snapshots")
    arch = (info["model"]["name"], dict(info["model"]["kwargs"]))
    for snap in chosen:
        if (snap.model_name, snap.model_kwargs) != arch:
            raise CLIError(f"{snap.path} holds model {snap.model_name} {snap.model_kwargs}, but the run's config.json "
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


def format_result(result: dict[str, Any], run_dir: Path) -> str:
    """The lines ``snapens average`` prints."""
    t = result["test"]
    bn = (f"BatchNorm recomputed on {result['bn_batches']} training batches" if result["bn_batches"]
          else "no BatchNorm to recompute")
    lines = [f"averaged {len(result['members'])} snapshots ({', '.join(result['members'])}); {bn}",
             f"average on test: error {t['error']:.2f} %, NLL {t['nll']:.4f}, ECE {t['ece']:.4f}"]
    best = result["best_member"]
    if best is None:
        lines.append("no validation split: the average is not compared with the members")
    else:
        v, bv = result["val"], best["val"]
        lines.append(f"on validation: average error {v['error']:.2f} %, NLL {v['nll']:.4f}; best member "
                     f"{best['name']} error {bv['error']:.2f} %, NLL {bv['nll']:.4f} (its test error "
                     f"{best['test']['error']:.2f} %)")
        if result["worse_than_best_member_on_val"]:
            lines.append(f"note: the averaged model is WORSE on validation than the best member {best['name']}; "
                         "averaging weights helps only when the snapshots sit in one basin: compare the ensemble of "
                         "their predictions (snapens evaluate)")
    lines.append(f"wrote {run_dir / AVERAGE_FILE}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add the ``average`` subcommand."""
    p = subparsers.add_parser("average", help="average a run's snapshot weights into one model (SWA)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by `snapens train`")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, default=None, metavar="M", help="average only the last M snapshots")
    which.add_argument("--members", type=int, nargs="+", default=None, metavar="K",
                       help="average these snapshots (1-based indices, as in snapshot-KK.safetensors)")
    p.add_argument("--bn-batches", type=int, default=50, metavar="N",
                   help="training batches to recompute BatchNorm statistics on (default: 50)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the dataset is now, instead of the data_dir stored in config.json")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="no notes on stderr (results are still printed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens average``; returns 0."""
    from snapens.checkpoint import to_json
    from snapens.cli._common import configure_logging

    configure_logging(args.quiet)
    result = average_run(args.run_dir, last=args.last, members=args.members, bn_batches=args.bn_batches,
                         device=args.device, data_dir=args.data_dir)
    print(to_json(result) if args.json else format_result(result, args.run_dir))
    return 0
