"""Snapshots on disk: atomic writes, safetensors weights and a JSON manifest.

A snapshot is the full ``state_dict`` (parameters and BatchNorm buffers) of the *unwrapped* model (no ``module.``
from DDP, no ``_orig_mod.`` from ``torch.compile``) in ``snapshot-KK.safetensors``, plus an entry in
``manifest.json`` that describes it (step, epoch, learning rate, metrics, model name and constructor arguments,
sha256 of the file). Loading a snapshot reads only safetensors and JSON, so it can never execute code.

Every file is written atomically (:mod:`snapens._io`): a temporary file in the same folder, flushed and fsync'ed,
moved over the target with :func:`os.replace`, then the folder is fsync'ed. A crash leaves the old file or the new
one, never half of one. Reading refuses what does not fit: a manifest that breaks its schema (indices 1..M,
unique, file names that match them), a file whose own metadata disagrees with its manifest entry, non-finite
weights, tensors of another dtype kind than the model's, and anything that is not a regular file (a FIFO would
block the reader forever).

Example:
    >>> store = SnapshotStore(run_dir / "snapshots")            # doctest: +SKIP
    >>> store.save(model, index=1, step=390, epoch=10, lr=0.0,  # doctest: +SKIP
    ...            model_name="resnet-20", model_kwargs={"num_classes": 10})
    >>> store.load_into(model, 1)                               # doctest: +SKIP

Layout: :mod:`~snapens.checkpoint.weights` (state dicts, safetensors files, :class:`SnapshotError`) and
:mod:`~snapens.checkpoint.store` (:class:`SnapshotStore`); every public name is importable from here. The resume
state (``state.pt``) belongs to the run folder: :mod:`snapens.runs`.
"""

from __future__ import annotations

from snapens.checkpoint.store import FORMAT_VERSION, MANIFEST_NAME, SnapshotInfo, SnapshotStore, snapshot_filename
from snapens.checkpoint.weights import (
    METADATA_KEY,
    SnapshotError,
    load_weights,
    save_weights,
    state_dict_mismatch,
    strip_wrapper_prefixes,
    unwrap_model,
    unwrap_state_dict,
    verify_state_dict,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "METADATA_KEY",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotStore",
    "load_weights",
    "save_weights",
    "snapshot_filename",
    "state_dict_mismatch",
    "strip_wrapper_prefixes",
    "unwrap_model",
    "unwrap_state_dict",
    "verify_state_dict",
]
