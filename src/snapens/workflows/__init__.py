"""Whole runs, as library functions: what the ``snapens`` subcommands do, without argument parsing or printing.

Each function works on a run folder (:mod:`snapens.runs`), raises ``ValueError`` / ``FileNotFoundError`` /
:class:`snapens.checkpoint.SnapshotError` on bad input and logs through :mod:`logging` (logger ``snapens``)::

    import snapens
    from snapens.config import TrainConfig

    run = snapens.train(TrainConfig(epochs=2, snapshots=2), "runs/py")   # snapens train --run-dir runs/py
    summary = snapens.evaluate(run)                                        # snapens evaluate runs/py

- ``training``: :func:`train`, :func:`train_run` (``snapens train``);
- ``evaluation``: :func:`evaluate`, :func:`evaluate_run`, the run's dataset and loaders (``snapens evaluate``);
- ``weight_average``: :func:`average_run` (``snapens average``);
- ``distillation``: :func:`distill`, :func:`distill_run` (``snapens distill``);
- ``exporting``: :func:`export`, :func:`export_run`, :func:`load_exported` (``snapens export``);
- ``plotting``: :func:`plot`, :func:`plot_run`, :func:`plot_price` (``snapens plot``);
- ``reproduction``: :func:`reproduce` (``snapens reproduce``);
- ``common``: threads, loaders, the environment record, the default run folder.
"""

from __future__ import annotations

from snapens.workflows.distillation import distill, distill_run
from snapens.workflows.evaluation import evaluate, evaluate_run, load_run_dataset, make_loader
from snapens.workflows.exporting import export, export_run, load_exported
from snapens.workflows.plotting import plot, plot_run
from snapens.workflows.reproduction import reproduce
from snapens.workflows.training import train, train_run
from snapens.workflows.weight_average import average_run

__all__ = [
    "average_run",
    "distill",
    "distill_run",
    "evaluate",
    "evaluate_run",
    "export",
    "export_run",
    "load_exported",
    "load_run_dataset",
    "make_loader",
    "plot",
    "plot_run",
    "reproduce",
    "train",
    "train_run",
]
