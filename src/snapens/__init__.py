"""Snapshot Ensembles (Huang et al., ICLR 2017) for PyTorch: train one network, get M models for free.

The pieces a training loop needs::

    sched = SnapshotLR(optimizer, total_steps=T, n_cycles=M)   # set the lr before every optimizer step
    store = SnapshotStore("run/snapshots")                       # safetensors + manifest, written atomically
    ...
    optimizer.step()
    if sched.is_cycle_end():
        store.save(model, index=sched.cycle + 1, step=sched.steps_done, epoch=sched.steps_done / len(loader),
                   lr=lr, model_name="resnet-20", model_kwargs={"num_classes": 10})
    sched.step()
    ...
    ensemble = SnapshotEnsemble.from_run("run", build_model)     # mean of the members' softmax probabilities

Whole runs (:mod:`snapens.workflows`)::

    run = snapens.train(TrainConfig(epochs=2, snapshots=2), "runs/py")   # snapens train, as a function
    summary = snapens.evaluate(run)                                        # snapens evaluate
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from snapens.checkpoint import SnapshotError, SnapshotStore
from snapens.ensemble import SnapshotEnsemble
from snapens.schedule import (
    SnapshotLR,
    StepDecayLR,
    cosine_snapshot_lr,
    cosine_snapshot_steps,
    keras_epoch_lr,
)
from snapens.weighting import fit_ensemble_weights, fit_temperature

__all__ = [
    "__version__",
    "cosine_snapshot_lr",
    "cosine_snapshot_steps",
    "keras_epoch_lr",
    "SnapshotLR",
    "StepDecayLR",
    "SnapshotStore",
    "SnapshotError",
    "SnapshotEnsemble",
    "fit_ensemble_weights",
    "fit_temperature",
]

#: The documented submodules, reachable as ``snapens.<name>`` after ``import snapens``. Imported on first
#: attribute access (PEP 562): ``models`` / ``data`` / ``engine`` pull in more than a loop that only needs the
#: names above should pay for, and ``integrations`` must stay lazy (its extras are optional).
_SUBMODULES = frozenset({
    "averaging", "checkpoint", "cli", "config", "cost", "data", "distill", "distributed", "engine", "ensemble",
    "guidance", "integrations", "metrics", "models", "pretrained", "report", "runs", "schedule", "weighting",
    "workflows",
})
#: Entry points imported on first use like the submodules (they pull in models and data): name -> (module,
#: attribute). ``snapens.train(config, run_dir)``, ``snapens.evaluate(run_dir)`` (:mod:`snapens.workflows`) and
#: ``snapens.from_pretrained(name)`` (:func:`snapens.pretrained.load`).
_ENTRY_POINTS = {"train": ("workflows", "train"), "evaluate": ("workflows", "evaluate"),
                 "from_pretrained": ("pretrained", "load")}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"snapens.{name}")  # the import also binds it as an attribute here
    if name in _ENTRY_POINTS:
        module, attribute = _ENTRY_POINTS[name]
        value = getattr(importlib.import_module(f"snapens.{module}"), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'snapens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_ENTRY_POINTS))
