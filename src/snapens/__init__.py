"""Snapshot Ensembles (Huang et al., ICLR 2017) for PyTorch: train one network, get M models for free."""

from __future__ import annotations

__version__ = "0.1.0"

from snapens.schedule import SnapshotLR, StepDecayLR, cosine_snapshot_lr, cycle_bounds, seed_epoch_lr

__all__ = [
    "__version__",
    "cosine_snapshot_lr",
    "cycle_bounds",
    "seed_epoch_lr",
    "SnapshotLR",
    "StepDecayLR",
]
