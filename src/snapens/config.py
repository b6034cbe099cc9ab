"""Every default of a training run, written once, and the presets that name the paper's settings.

The CLI reads its defaults from :class:`TrainConfig` and overlays a preset (:data:`PRESETS`) and then explicit
flags; library functions take explicit keyword arguments and never read this module's defaults behind the
caller's back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from snapens._precision import PRECISIONS

__all__ = ["TrainConfig", "DistillConfig", "PRESETS", "SCHEDULES", "M_SCHEDULES", "SCHEDULE_OPTIONS", "PRECISIONS",
           "MAX_CYCLE_MULT", "AUTO_MIN_CYCLE_EPOCHS", "AUTO_MAX_SNAPSHOTS", "auto_snapshots", "lr_min_problem",
           "resolve_config"]

#: Schedules the engine knows: the snapshot ensemble, the paper's single-model step baseline (its snapshots at
#: the same steps give the "NoCycle" ensemble), M independently initialised models trained one cycle each, Fast
#: Geometric Ensembling (Garipov et al. 2018) and the SWA recipe (Izmailov et al. 2018). fge and swa take as
#: many snapshots as their budget holds (M does not apply).
SCHEDULES = ("cosine-cycles", "step", "single-cycle", "fge", "swa")
#: The schedules whose number of snapshots is M (``snapshots``).
M_SCHEDULES = ("cosine-cycles", "step", "single-cycle")
#: The TrainConfig fields that only one family of schedules reads: ``schedule -> fields``.
SCHEDULE_OPTIONS = {"cosine-cycles": ("cycle_decay", "cycle_mult"), "single-cycle": ("cycle_decay", "cycle_mult"),
                    "step": (), "fge": ("fge_start", "cycle_epochs", "fge_lr1", "fge_lr2"),
                    "swa": ("swa_start", "swa_lr")}


def lr_min_problem(schedule: str, lr_min: float) -> str | None:
    """Why a non-zero ``lr_min`` does not apply to ``schedule``, or None when it does: only the cosine schedules
    (cosine-cycles, single-cycle) anneal to a floor."""
    if not lr_min or schedule not in ("step", "fge", "swa"):
        return None
    if schedule == "step":
        return (f"lr_min={lr_min} applies to the cosine schedules; the step schedule decays lr0 by 10x at 50% and "
                "again at 75% of the budget")
    return f"lr_min={lr_min} applies to the cosine schedules, not to {schedule}"


#: The largest ``cycle_mult`` accepted: with 100 each cycle is 100 times the last, so beyond it the first cycles
#: get no step on any budget worth running; ``--cycle-mult 1e308`` overflowed while the schedule was computed.
MAX_CYCLE_MULT = 100.0
#: ``--snapshots auto``: the shortest cycle, in epochs, worth a snapshot on each dataset family (``folder:PATH``
#: datasets are "folder"). From the budget study, benchmarks/results/budget_study.md; edit it there and here.
AUTO_MIN_CYCLE_EPOCHS: dict[str, int] = {"cifar10": 16, "cifar100": 16, "cifar10-jpeg": 16, "svhn": 16,
                                         "folder": 16, "digits": 6}
#: ``--snapshots auto`` never picks more snapshots than this, however long the budget.
AUTO_MAX_SNAPSHOTS = 6


def _dataset_family(dataset: str) -> str:
    name = dataset.lower()
    return "folder" if name.startswith("folder:") else name


def auto_min_cycle_epochs(dataset: str) -> int:
    """The shortest cycle ``--snapshots auto`` allows on ``dataset`` (:data:`AUTO_MIN_CYCLE_EPOCHS`)."""
    family = _dataset_family(dataset)
    if family not in AUTO_MIN_CYCLE_EPOCHS:
        raise ValueError(f"--snapshots auto has no rule for dataset {dataset!r} (known: "
                         f"{', '.join(AUTO_MIN_CYCLE_EPOCHS)}); give --snapshots M")
    return AUTO_MIN_CYCLE_EPOCHS[family]


def auto_snapshots(dataset: str, epochs: int) -> int:
    """M for ``--snapshots auto``: ``clamp(epochs // c, 1, AUTO_MAX_SNAPSHOTS)``.

    ``c`` is the dataset family's shortest useful cycle (:data:`AUTO_MIN_CYCLE_EPOCHS`; ``folder:PATH`` is
    "folder"): as many cycles of at least ``c`` epochs as the budget holds, at least one, at most
    :data:`AUTO_MAX_SNAPSHOTS`. The table comes from the budget study, benchmarks/results/budget_study.md.
    """
    return max(1, min(epochs // auto_min_cycle_epochs(dataset), AUTO_MAX_SNAPSHOTS))


@dataclass(frozen=True)
class TrainConfig:
    """One training run, fully resolved. ``None`` means "the dataset's own default" where noted."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str = "cnn-small"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    snapshots: int = 5
    #: ``--snapshots auto``: ``snapshots`` was picked by :func:`auto_snapshots` when the run was configured. The
    #: picked M is what config.json stores and what evaluate and --resume read, even if the table changes later.
    snapshots_auto: bool = False
    schedule: str = "cosine-cycles"
    lr: float = 0.1
    lr_min: float = 0.0
    #: cosine schedules (timm's --lr-cycle-decay / --lr-cycle-mul): each restart's peak times cycle_decay, each
    #: cycle cycle_mult times longer than the last (lengths still sum to the budget). 1.0: the paper's cycles.
    cycle_decay: float = 1.0
    cycle_mult: float = 1.0
    #: fge: the fraction of the budget trained with the step schedule's shape before the first cycle; cycles of
    #: cycle_epochs epochs from fge_lr1 down to fge_lr2 and back (multiples of lr: the paper's 0.05 and 0.0005
    #: for lr 0.1), a snapshot at each cycle's lowest rate.
    fge_start: float = 0.5
    cycle_epochs: int = 2
    fge_lr1: float = 0.5
    fge_lr2: float = 0.005
    #: swa: the fraction of the budget before the constant SWA rate swa_lr (None: lr / 2, the SWA repository's
    #: 0.05 for lr 0.1); a snapshot at each epoch end of the SWA phase.
    swa_start: float = 0.75
    swa_lr: float | None = None
    batch_size: int = 64
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    #: Images held out of the training set for validation: a count, a fraction, or None for the dataset's default.
    val_size: int | float | None = None
    #: None: the dataset's default augmentation; False: none.
    augment: bool | None = None
    #: Train on a stratified subset of this many training images, seeded by ``seed`` (None: all of them). The
    #: validation split is carved from the full training set first and shrinks in proportion.
    limit_train: int | None = None
    #: Evaluate on a stratified subset of this many test images, the same for every seed (None: all of them).
    limit_test: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    #: torch intra-op CPU threads; None keeps torch's default (one per core). 1 by default: the default run
    #: took 11.5-18.5 s with 1 thread and 28-264 s with 2 on a shared 2-core machine (README, "Threads").
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.snapshots < 1:
            raise ValueError(f"snapshots (M) must be >= 1, got {self.snapshots}")
        if self.snapshots > self.epochs and self.schedule in M_SCHEDULES:
            raise ValueError(f"snapshots (M={self.snapshots}) must not exceed epochs ({self.epochs})")
        if self.snapshots_auto and self.schedule not in M_SCHEDULES:
            raise ValueError(f"snapshots auto applies to {', '.join(M_SCHEDULES)}; the {self.schedule} schedule "
                             "takes as many snapshots as its budget holds")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.lr_min < self.lr:
            raise ValueError(f"lr_min must be in [0, lr={self.lr}), got {self.lr_min}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.momentum >= 0 and self.weight_decay >= 0):  # also rejects NaN
            raise ValueError(f"momentum and weight decay must be >= 0, got {self.momentum} and {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        problem = lr_min_problem(self.schedule, self.lr_min)
        if problem is not None:
            raise ValueError(problem)
        self._check_schedule_options()
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.val_size is not None and not self.val_size >= 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive image count, got {value!r}")

    def _check_schedule_options(self) -> None:
        if not 0 < self.cycle_decay <= 1:
            raise ValueError(f"cycle_decay must be in (0, 1], got {self.cycle_decay}")
        if not 1 <= self.cycle_mult <= MAX_CYCLE_MULT:
            raise ValueError(f"cycle_mult must be >= 1 (each cycle at least as long as the last) and at most "
                             f"{MAX_CYCLE_MULT:g}, got {self.cycle_mult}")
        for name in ("fge_start", "swa_start"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be a fraction of the budget in (0, 1), got {getattr(self, name)}")
        if isinstance(self.cycle_epochs, bool) or not isinstance(self.cycle_epochs, int) or self.cycle_epochs < 1:
            raise ValueError(f"cycle_epochs must be a positive integer, got {self.cycle_epochs!r}")
        for name in ("fge_lr1", "fge_lr2"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} (a multiple of lr) must be > 0, got {getattr(self, name)}")
        if self.swa_lr is not None and not 0 < self.swa_lr < float("inf"):
            raise ValueError(f"swa_lr must be > 0 and finite, got {self.swa_lr}")
        # An option of another schedule would be silently ignored: refuse it instead.
        default = {f.name: f.default for f in dataclasses.fields(self)}
        for name in sorted({n for names in SCHEDULE_OPTIONS.values() for n in names}):
            schedules = [k for k, names in SCHEDULE_OPTIONS.items() if name in names]
            if self.schedule not in schedules and getattr(self, name) != default[name]:
                raise ValueError(f"{name}={getattr(self, name)} applies to the {' and '.join(schedules)} "
                                 f"schedule{'s' if len(schedules) > 1 else ''}, not to {self.schedule}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (what ``config.json`` stores)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DistillConfig:
    """``snapens distill``: a student trained on a run's calibrated snapshot ensemble (see :mod:`snapens.distill`).

    The student keeps the teacher run's dataset, splits, seed, batch size and optimizer settings; it trains one
    cosine cycle (the ``cosine-cycles`` schedule with M=1) from ``lr`` down to 0 and keeps its final weights.
    """

    #: the student's architecture; None: the teacher's
    model: str | None = None
    epochs: int = 30
    #: T of the soft targets softmax(z / T); Hinton et al. use 1-20, 4 is a common choice for CIFAR-size nets
    temperature: float = 4.0
    #: weight of the soft (teacher) term; 1 - alpha goes to the cross-entropy with the labels
    alpha: float = 0.9
    lr: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"--temperature must be > 0 and finite, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def _paper(model: str, dataset: str, epochs: int, snapshots: int, **extra: Any) -> dict[str, Any]:
    # Paper section 4.2 and the official code: batch 64, SGD with Nesterov momentum 0.9, weight decay 1e-4;
    # lr0 = 0.2 is the restart rate the paper reports most often as best (Table 1, last column).
    return {"model": model, "dataset": dataset, "epochs": epochs, "snapshots": snapshots, "lr": 0.2,
            "batch_size": 64, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, **extra}


#: Named settings. Each maps TrainConfig fields to values; explicit CLI flags override them.
PRESETS: dict[str, dict[str, Any]] = {}
for _model, _epochs, _m in (("resnet-110", 200, 5), ("wrn-32-4", 200, 5),
                            ("densenet-40-12", 300, 6), ("densenet-100-24", 300, 6)):
    for _dataset in ("cifar10", "cifar100"):
        PRESETS[f"paper-{_model}-{_dataset}"] = _paper(_model, _dataset, _epochs, _m)
    if _model != "densenet-100-24":  # the paper reports no DenseNet-100 on SVHN
        # SVHN: 40 epochs, M=5, no augmentation, 6,000 training images held out (paper section 4.1).
        PRESETS[f"paper-{_model}-svhn"] = _paper(_model, "svhn", 40, 5, val_size=6000, augment=False)
# The Keras implementation this project replaces (WRN-16-4, batch 128, M=5, 200 epochs, lr0=0.1), with the
# paper's optimizer: its users can compare against their old numbers.
PRESETS["keras-wrn-16-4-cifar10"] = _paper("wrn-16-4", "cifar10", 200, 5, lr=0.1, batch_size=128)
PRESETS["keras-wrn-16-4-cifar100"] = _paper("wrn-16-4", "cifar100", 200, 5, lr=0.1, batch_size=128)
del _model, _epochs, _m, _dataset


def resolve_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then explicit overrides (``None`` values are ignored).

    ``snapshots="auto"`` picks M with :func:`auto_snapshots` from the resolved dataset and epochs and sets
    ``snapshots_auto``; an integer M (explicit or the preset's) is kept as given.
    """
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; see `snapens train --list-presets`")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    if values.get("snapshots") == "auto":
        d = TrainConfig()
        schedule = values.get("schedule", d.schedule)
        if schedule not in M_SCHEDULES:  # before auto_snapshots: its table error would hide the real one
            raise ValueError(f"snapshots auto applies to {', '.join(M_SCHEDULES)}; the {schedule} schedule "
                             "takes as many snapshots as its budget holds")
        values["snapshots"] = auto_snapshots(values.get("dataset", d.dataset), values.get("epochs", d.epochs))
        values["snapshots_auto"] = True
    return TrainConfig(**values)
