"""``snapens train``: train one network with M learning-rate cycles and keep a snapshot at the end of each.

With no arguments it trains the embedded default (scikit-learn's 8x8 digits, ``cnn-small``), then evaluates
the snapshot ensemble on the test split and writes its plots: about 10 s on 2 shared cores with the default
``--threads 1`` (the README has the measurements). ``--limit-train N --limit-test N`` try a big
dataset on a stratified subset in minutes. Every default comes from
:class:`snapens.config.TrainConfig`; ``--preset`` overlays a named setting (``--list-presets``), explicit flags
override both.

The Keras implementation's flags still work: ``--M 5 --nb_epoch 200 --alpha_zero 0.1 --model wrn --wrn_N 2
--wrn_k 4`` is ``--snapshots 5 --epochs 200 --lr 0.1 --model wrn-16-4``.

Exit codes: 0 done, 2 bad input, 130 SIGINT, 143 SIGTERM (both save a resumable state first; continue with
``snapens train --resume --run-dir RUN_DIR``).

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N -m snapens train --run-dir RUN_DIR ...``
(or ``python -m torch.distributed.run --nproc_per_node=N -m snapens train ...``) trains data-parallel, one
process per GPU (NCCL, device ``cuda:LOCAL_RANK``) or, on CPUs, per process (gloo). ``--batch-size`` is per
process: the global batch is batch_size x N, and the learning rate is not rescaled (pass --lr for that).
Every process takes the same steps, so the schedule and the snapshots fall where they would in one process
with the global batch. Rank 0 alone prints, validates (on the whole validation split) and writes the run
folder; resuming reads its state.pt on every process, so RUN_DIR must be on a filesystem they share, and the
run must be resumed with the same N. SIGINT/SIGTERM reach all processes (torchrun forwards them); they stop
together within 10 steps and rank 0 saves the state. ``--sync-bn`` computes BatchNorm statistics over the
global batch (CUDA only). The test evaluation at the end runs on rank 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from snapens import engine
from snapens.cli._common import (
    CLIError,
    configure_logging,
    cycle_multiplier,
    finite_float,
    format_table,
    learning_rate,
    progress_enabled,
    thread_count,
)
from snapens.config import (
    AUTO_MAX_SNAPSHOTS,
    M_SCHEDULES,
    MAX_CYCLE_MULT,
    PRECISIONS,
    PRESETS,
    SCHEDULES,
    TrainConfig,
    resolve_config,
)
from snapens.distributed import launch_context
from snapens.report import format_summary
from snapens.runs import CONFIG_FILE
from snapens.workflows.training import RESUME_FREE, resume_info, train

__all__ = ["register", "run", "config_from_args", "explicit_overrides", "legacy_model_name"]

logger = logging.getLogger(__name__)

#: Flags that may change when a run is resumed: where and how fast it runs, not what it computes.
RESUME_OVERRIDABLE = RESUME_FREE
_LEGACY_SIZES = ("wrn_N", "wrn_k", "dn_depth", "dn_growth_rate")


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", help="train a snapshot ensemble", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"digits, cifar10, cifar100, svhn, cifar10-jpeg or folder:PATH "
                                     f"(default: {d.dataset})")
    g.add_argument("--data-dir", help="folder holding the dataset files (default: ./data)")
    g.add_argument("--download", action="store_true", default=None, help="download CIFAR archives if missing")
    g.add_argument("--val-size", type=_val_size, metavar="N|F",
                   help="training images held out for validation: a count, a fraction, or 0 (default: the "
                        "dataset's)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="turn off the dataset's default augmentation")
    g.add_argument("--limit-train", type=int, metavar="N",
                   help="train on a stratified subset of N training images, seeded by --seed (validation shrinks "
                        "in proportion; default: all)")
    g.add_argument("--limit-test", type=int, metavar="N",
                   help="evaluate on a stratified subset of N test images, the same for every seed (default: all)")
    g = p.add_argument_group("model and schedule")
    g.add_argument("--model", help=f"wrn-D-K, densenet-D-K, densenet-bc-D-K, resnet-D, cnn-small (default: "
                                   f"{d.model}); legacy: wrn, dn")
    g.add_argument("--epochs", type=int, help=f"training budget in epochs (default: {d.epochs})")
    g.add_argument("--snapshots", type=_snapshots, metavar="M",
                   help=f"cycles = snapshots, or auto: epochs // the dataset's shortest useful cycle, 1 to "
                        f"{AUTO_MAX_SNAPSHOTS} (README, Training runs; default: {d.snapshots})")
    g.add_argument("--schedule", choices=SCHEDULES, help=f"(default: {d.schedule})")
    g.add_argument("--lr", type=learning_rate, help=f"restart learning rate lr0 (default: {d.lr})")
    g.add_argument("--lr-min", type=finite_float, help=f"learning rate at the end of each cycle (default: {d.lr_min})")
    g.add_argument("--cycle-decay", type=finite_float,
                   help=f"cosine schedules: each restart's peak is the previous one's times this (default: "
                        f"{d.cycle_decay})")
    g.add_argument("--cycle-mult", type=cycle_multiplier,
                   help=f"cosine schedules: each cycle this many times longer than the last, lengths summing to "
                        f"the budget, 1 to {MAX_CYCLE_MULT:g} (default: {d.cycle_mult})")
    g.add_argument("--fge-start", type=finite_float, metavar="F",
                   help=f"fge: fraction of the budget trained before the first cycle (default: {d.fge_start})")
    g.add_argument("--cycle-epochs", type=int,
                   help=f"fge: epochs per triangular cycle, a snapshot at its middle (default: {d.cycle_epochs})")
    g.add_argument("--swa-start", type=finite_float, metavar="F",
                   help=f"swa: fraction of the budget before the constant SWA rate (default: {d.swa_start})")
    g.add_argument("--swa-lr", type=learning_rate,
                   help="swa: the constant SWA learning rate, a snapshot at each epoch end (default: lr / 2)")
    g.add_argument("--batch-size", type=int,
                   help=f"per process under torchrun: the global batch is this times the process count, the "
                        f"LR is not rescaled (default: {d.batch_size})")
    g.add_argument("--momentum", type=finite_float, help=f"(default: {d.momentum})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Nesterov momentum (default: {d.nesterov})")
    g.add_argument("--weight-decay", type=finite_float, help=f"(default: {d.weight_decay})")
    g.add_argument("--seed", type=int, help=f"(default: {d.seed})")
    g.add_argument("--preset", help="a named setting, e.g. paper-wrn-32-4-cifar100 (see --list-presets)")
    g.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    g.add_argument("--list-models", action="store_true", help="print the model name forms and examples and exit")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help=f"auto, cpu, cuda, cuda:N (default: {d.device})")
    g.add_argument("--precision", choices=PRECISIONS,
                   help=f"auto = bf16 where the hardware runs it natively, else fp32 (default: {d.precision})")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False, default=None,
                   help="keep the NCHW memory format")
    g.add_argument("--threads", type=thread_count,
                   help=f"CPU threads for torch (default: {d.threads}). More threads pay off only for big models "
                        "on cores nobody else uses; on a shared or busy machine keep 1 (extra threads spin "
                        "and can make a run 10x slower). Kept by --resume: another count changes the bits")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    g = p.add_argument_group("run folder")
    g.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/<dataset>-<model>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --run-dir")
    g.add_argument("--no-eval", dest="evaluate", action="store_const", const=False, default=None,
                   help="skip the test-set evaluation at the end (kept by --resume)")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")
    g = p.add_argument_group("legacy flags (the Keras implementation)")
    g.add_argument("--M", dest="legacy_M", type=int, metavar="M", help="= --snapshots")
    g.add_argument("--nb_epoch", dest="legacy_nb_epoch", type=int, metavar="N", help="= --epochs")
    g.add_argument("--alpha_zero", dest="legacy_alpha_zero", type=learning_rate, metavar="LR", help="= --lr")
    g.add_argument("--wrn_N", type=int, metavar="N", help="with --model wrn: depth 6N+4 (default 2)")
    g.add_argument("--wrn_k", type=int, metavar="K", help="with --model wrn: widen factor (default 4)")
    g.add_argument("--dn_depth", type=int, metavar="D", help="with --model dn: depth (default 40)")
    g.add_argument("--dn_growth_rate", type=int, metavar="K", help="with --model dn: growth rate (default 12)")
    p.set_defaults(func=run)


def _snapshots(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer M or auto, got {text!r}") from None


def _val_size(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None


def legacy_model_name(model: str, args: argparse.Namespace) -> str:
    """Map the Keras script's ``--model wrn|dn`` and its size flags to a model name (``wrn-16-4``, ...)."""
    from snapens.models import densenet_name_from_legacy, wrn_name_from_legacy

    if model == "wrn":
        if args.dn_depth is not None or args.dn_growth_rate is not None:
            raise CLIError("--dn_depth/--dn_growth_rate go with --model dn, not --model wrn")
        return wrn_name_from_legacy(2 if args.wrn_N is None else args.wrn_N, 4 if args.wrn_k is None else args.wrn_k)
    if args.wrn_N is not None or args.wrn_k is not None:
        raise CLIError("--wrn_N/--wrn_k go with --model wrn, not --model dn")
    return densenet_name_from_legacy(40 if args.dn_depth is None else args.dn_depth,
                                     12 if args.dn_growth_rate is None else args.dn_growth_rate)


def _merge(new: Any, old: Any, new_flag: str, old_flag: str) -> Any:
    if old is None:
        return new
    if new is not None and new != old:
        raise CLIError(f"{new_flag} {new} and {old_flag} {old} disagree; give one of them")
    return old


def explicit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (None where not given), legacy flags mapped."""
    model = args.model
    if model in ("wrn", "dn"):
        model = legacy_model_name(model, args)
    elif any(getattr(args, k) is not None for k in _LEGACY_SIZES):
        raise CLIError("--wrn_N, --wrn_k, --dn_depth and --dn_growth_rate need --model wrn or --model dn")
    return {
        "dataset": args.dataset, "data_dir": args.data_dir, "download": args.download, "model": model,
        "epochs": _merge(args.epochs, args.legacy_nb_epoch, "--epochs", "--nb_epoch"),
        "snapshots": _merge(args.snapshots, args.legacy_M, "--snapshots", "--M"),
        "schedule": args.schedule, "lr": _merge(args.lr, args.legacy_alpha_zero, "--lr", "--alpha_zero"),
        "lr_min": args.lr_min, "cycle_decay": args.cycle_decay, "cycle_mult": args.cycle_mult,
        "fge_start": args.fge_start, "cycle_epochs": args.cycle_epochs, "swa_start": args.swa_start,
        "swa_lr": args.swa_lr, "batch_size": args.batch_size, "momentum": args.momentum,
        "nesterov": args.nesterov, "weight_decay": args.weight_decay, "val_size": args.val_size,
        "augment": args.augment, "limit_train": args.limit_train, "limit_test": args.limit_test,
        "seed": args.seed, "device": args.device, "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile, "threads": args.threads,
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``--preset``, then explicit flags: the resolved :class:`TrainConfig`."""
    overrides = explicit_overrides(args)
    if overrides["snapshots"] is not None and overrides["schedule"] not in (None, *M_SCHEDULES):
        raise CLIError(f"--snapshots {overrides['snapshots']} applies to {', '.join(M_SCHEDULES)}; the {overrides['schedule']} schedule "
                       "takes as many snapshots as its budget holds (see --cycle-epochs, --swa-start)")
    return resolve_config(args.preset, **overrides)


def _sync_bn(args: argparse.Namespace) -> bool:
    """``--sync-bn``; on resume the run's own setting (changing it would change what the run computes)."""
    if not args.resume:
        return bool(args.sync_bn)
    saved = bool((resume_info(args.run_dir).get("distributed") or {}).get("sync_bn", False))
    if args.sync_bn and not saved:
        raise CLIError(f"--resume continues the run as configured in {args.run_dir / CONFIG_FILE}; "
                       "do not change --sync-bn")
    return saved


def _resume_config(args: argparse.Namespace) -> TrainConfig:
    if args.run_dir is None:
        raise CLIError("--resume needs --run-dir RUN_DIR (the folder of the interrupted run)")
    if args.preset is not None:
        raise CLIError(f"--resume continues the run as configured in {args.run_dir / CONFIG_FILE}; "
                       "do not pass --preset")
    overrides = explicit_overrides(args)
    info = resume_info(args.run_dir)
    saved = dict(info["config"])
    if overrides["snapshots"] == "auto" and saved.get("snapshots_auto"):
        overrides["snapshots"] = None  # the original command repeated: keep the M it picked, even if the table changed
    # Repeating the original command with --resume is fine; changing what the run computes is not.
    changed = sorted(k for k, v in overrides.items()
                     if v is not None and k not in RESUME_OVERRIDABLE and saved.get(k) != v)
    if changed:
        names = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise CLIError(f"--resume continues the run as configured in {args.run_dir / CONFIG_FILE}; "
                       f"do not change {names}")
    if saved.get("threads") is None:  # written before the count was recorded: the one the run used
        saved["threads"] = (info.get("environment") or {}).get("threads")
    if overrides["threads"] is not None and saved["threads"] is not None and overrides["threads"] != saved["threads"]:
        logger.warning("warning: --threads %d, but the run started with %d threads: the resumed run's results "
                       "will differ (slightly) from an uninterrupted run's; resume without --threads to keep them "
                       "bit-identical", overrides["threads"], saved["threads"])
    saved.update({k: overrides[k] for k in RESUME_OVERRIDABLE if overrides[k] is not None})
    try:
        return TrainConfig(**saved)
    except TypeError as exc:
        raise CLIError(f"cannot resume: {args.run_dir / CONFIG_FILE} does not match this snapens: {exc}") from exc


def _print_presets() -> None:
    rows = [[name, p["model"], p["dataset"], p["epochs"], p["snapshots"], p["lr"], p["batch_size"]]
            for name, p in PRESETS.items()]
    print(format_table(["preset", "model", "dataset", "epochs", "M", "lr0", "batch"], rows))


def _evaluate_setting(args: argparse.Namespace) -> bool:
    """``--no-eval``; on resume, the run's own setting unless ``--no-eval`` is given now."""
    if args.evaluate is not None:
        return bool(args.evaluate)
    if args.resume and args.run_dir is not None and (args.run_dir / CONFIG_FILE).is_file():
        return bool(resume_info(args.run_dir).get("evaluate", True))
    return True


def run(args: argparse.Namespace) -> int:
    """Entry point of ``snapens train`` (one process, or every process of a torchrun job)."""
    if args.list_presets:
        _print_presets()
        return 0
    if args.list_models:
        from snapens.models import list_models, model_forms

        print("\n".join(model_forms()))
        print("examples: " + ", ".join(list_models()))
        return 0
    ctx = launch_context()
    configure_logging(args.quiet, rank=ctx.rank)
    cfg = _resume_config(args) if args.resume else config_from_args(args)
    evaluate = _evaluate_setting(args)
    try:
        run_dir = train(cfg, args.run_dir, resume=args.resume, evaluate=evaluate,
                        progress=progress_enabled(args.quiet) and ctx.is_main, plot=True,
                        announce=lambda s: print(s, flush=True),
                        on_summary=lambda summary: print(format_summary(summary)), sync_bn=_sync_bn(args),
                        dist_ctx=ctx)
    except engine.TrainingInterrupted as exc:
        if ctx.is_main:
            name = signal.Signals(exc.signum).name
            again = "torchrun --nproc_per_node=N -m " if ctx.enabled else ""
            print(f"snapens: {name}: training state saved to {exc.state_path}; continue with: "
                  f"{again}snapens train --resume --run-dir {exc.state_path.parent}", file=sys.stderr)
        return 128 + exc.signum
    except engine.NonFiniteLossError as exc:
        if not ctx.is_main:
            return 2  # the same error on every rank: rank 0 reports it
        raise CLIError(str(exc)) from exc
    if ctx.is_main and (evaluate or not args.quiet):  # --no-eval --quiet: the header's "run dir:" was the last line
        print(f"run dir: {run_dir}")
    return 0
