"""Weights on disk: state dicts keyed as the unwrapped model has them, and safetensors files with JSON metadata.

The state-dict half of :mod:`snapens.checkpoint`; :class:`~snapens.checkpoint.SnapshotStore` builds on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
import torch
from torch import nn

from snapens._io import NotARegularFileError, atomic_write_bytes, read_regular_bytes

__all__ = [
    "METADATA_KEY",
    "SnapshotError",
    "load_weights",
    "save_weights",
    "state_dict_mismatch",
    "strip_wrapper_prefixes",
    "unwrap_model",
    "unwrap_state_dict",
    "verify_state_dict",
]

logger = logging.getLogger("snapens.checkpoint")

#: The one safetensors metadata key under which :func:`save_weights` stores its JSON-encoded metadata.
METADATA_KEY = "snapens"
_WRAPPER_PREFIX = "module."  # DistributedDataParallel / DataParallel
_COMPILED_PART = "_orig_mod"  # torch.compile's OptimizedModule


class SnapshotError(ValueError):
    """A snapshot, manifest or state file is missing, corrupt, or does not fit the model. Names the file."""


# ----------------------------------------------------------------------------------------------- state dicts


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, _COMPILED_PART, None), nn.Module):
            model = getattr(model, _COMPILED_PART)
        else:
            return model


def _strip_key(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIX):
        key = key[len(_WRAPPER_PREFIX) :]
    # torch.compile may wrap any submodule, so its component can sit anywhere in the key.
    return ".".join(part for part in key.split(".") if part != _COMPILED_PART)


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename keys as the unwrapped model has them: drop leading ``module.`` and every ``_orig_mod`` component.

    Values are kept as they are (no copy).

    Raises:
        ValueError: two keys collapse onto the same name.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = _strip_key(key)
        if new in out:
            raise ValueError(f"state dict keys collide after removing wrapper prefixes: {key!r} -> {new!r}")
        out[new] = value
    return out


def unwrap_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A snapshot of a model's weights and buffers, keyed as in the unwrapped model.

    Strips ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes. Every tensor is detached, copied to
    CPU and made contiguous, so the result no longer changes with the model and shares no storage
    (safetensors refuses aliased tensors, e.g. tied weights).

    Raises:
        ValueError: a value is not a tensor (e.g. a module's ``extra_state``) or keys collide.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = unwrap_model(model_or_state_dict).state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise ValueError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_wrapper_prefixes(state).items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating point"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Describe why ``state_dict`` does not fit ``model`` (missing/unexpected keys, shape mismatches, a tensor
    of another dtype kind than the model's: integer or bool where the model has floating point, or the reverse).

    Returns:
        Human-readable problems, empty if the state dict fits. At most ``limit`` keys are named per kind.
    """
    expected = unwrap_model(model).state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    # A float model loading int or bool weights (or the reverse) would be cast silently into nonsense; float16
    # vs float32 is only a precision choice and is cast as usual.
    dtypes = [
        f"{k}: file {state_dict[k].dtype} vs model {expected[k].dtype}"
        for k in expected
        if k in state_dict and isinstance(state_dict[k], torch.Tensor)
        and _dtype_kind(state_dict[k].dtype) != _dtype_kind(expected[k].dtype)
    ]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes),
                         ("dtype mismatch", dtypes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{label} {', '.join(items[:limit])}{more}")
    return problems


def verify_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise :class:`SnapshotError` naming ``source`` if ``state_dict`` does not fit ``model``'s architecture."""
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise SnapshotError(f"{source} does not fit {type(unwrap_model(model)).__name__}: {'; '.join(problems)}")


def _load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    verify_state_dict(model, state_dict, source=source)
    unwrap_model(model).load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------------------------------------- safetensors files


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return read_regular_bytes(path)
    except FileNotFoundError as e:
        raise SnapshotError(f"{what} {path} is missing") from e
    except NotARegularFileError as e:
        raise SnapshotError(f"{what} {e}") from e


def _decode_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_safetensors_bytes(data)  # parses tensors only: never runs code
    except Exception as e:  # safetensors raises its own SafetensorError (a plain Exception), truncation included
        raise SnapshotError(f"{path} is truncated or not a safetensors file: {e}") from e
    # safetensors has no public call for the metadata of bytes in memory; load() has just validated the
    # header (8-byte little-endian length, then JSON), so reading it back cannot go wrong.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    raw = header.get("__metadata__") or {}
    if METADATA_KEY not in raw:
        return tensors, {}
    try:
        metadata = json.loads(raw[METADATA_KEY])
    except ValueError as e:
        raise SnapshotError(f"{path} has corrupt {METADATA_KEY!r} metadata: {e}") from e
    if not isinstance(metadata, dict):
        raise SnapshotError(f"{path} has corrupt {METADATA_KEY!r} metadata: not a JSON object")
    return tensors, metadata


def _refuse_non_finite_weights(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    # NaN/inf weights would only surface later as NaN probabilities, far from the file that holds them.
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise SnapshotError(f"{path} holds non-finite values (NaN/inf) in tensor {key!r} "
                                f"({n_bad} of {tensor.numel()}): refusing to load it")


def _encode_safetensors(state_dict: Mapping[str, torch.Tensor] | nn.Module, metadata: Mapping[str, Any]) -> bytes:
    tensors = unwrap_state_dict(state_dict)
    try:
        meta = json.dumps(dict(metadata))
    except TypeError as e:
        raise ValueError(f"snapshot metadata is not JSON-serialisable: {e}") from e
    return save_safetensors_bytes(tensors, metadata={METADATA_KEY: meta})


def save_weights(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor] | nn.Module,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write one safetensors file atomically; ``metadata`` is JSON-encoded under the key :data:`METADATA_KEY`.

    Args:
        path: Target file (e.g. ``run_dir/best.safetensors``).
        state_dict: A state dict or a model (unwrapped and copied, see :func:`unwrap_state_dict`).
        metadata: JSON-serialisable description (model name and kwargs, epoch, val_acc, ...).
    """
    atomic_write_bytes(path, _encode_safetensors(state_dict, metadata or {}))
    logger.debug("wrote weights %s", path)


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_weights` (or any safetensors file; then the metadata is ``{}``).

    Returns:
        ``(state_dict, metadata)``, tensors on CPU.

    Raises:
        SnapshotError: the file is missing, not a regular file, truncated or corrupt, or holds NaN/inf values.
    """
    path = Path(path)
    tensors, metadata = _decode_safetensors(_read_bytes(path, "weights file"), path)
    _refuse_non_finite_weights(tensors, path)
    return tensors, metadata
