"""Weight averaging of snapshots (Izmailov et al. 2018, SWA): one model, one forward pass per image.

For snapshots with weights :math:`w_1, \\dots, w_n` of one architecture:

.. math::

    w_{avg} = \\frac{1}{n} \\sum_{i=1}^{n} w_i

(the running form :math:`w \\leftarrow (w \\cdot k + w_{k+1}) / (k + 1)` of the SWA paper gives the same mean).
Floating-point tensors are averaged in float64 and cast back to their dtype, so the mean of identical snapshots
is that snapshot, bit for bit. Integer buffers cannot be averaged: they must agree across the snapshots, except
BatchNorm's ``num_batches_tracked`` counters, which are reset by the recompute below (the largest is kept).

Averaged BatchNorm running statistics are not the statistics of the averaged network's activations, so they
are recomputed on given training batches with :func:`torch.optim.swa_utils.update_bn` (train mode, momentum
``None``: the running mean and variance become the plain average of the per-batch statistics); a model without
BatchNorm needs none. Averaging works when the snapshots sit in one basin (SWA, FGE); snapshots taken after
high-rate restarts usually average into a much worse model: compare with the members on validation.

Nothing here builds a model or reads a dataset: the caller passes a model factory and the batches.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from snapens.checkpoint import SnapshotError, verify_state_dict

__all__ = ["average_state_dicts", "has_batchnorm", "recompute_batchnorm", "average_model"]

logger = logging.getLogger(__name__)

_COUNTER_SUFFIX = "num_batches_tracked"


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]], names: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """The element-wise mean of ``n >= 1`` state dicts of one architecture (see the module docstring).

    Args:
        state_dicts: the snapshots' tensors, all with the same keys, shapes and dtypes.
        names: what to call each state dict in error messages (default ``#1``, ``#2``, ...).

    Raises:
        SnapshotError: no state dicts, different keys, shapes or dtypes (different architectures), or an integer
            buffer other than ``num_batches_tracked`` that differs between snapshots.
    """
    if not state_dicts:
        raise SnapshotError("no snapshots to average")
    names = list(names) if names is not None else [f"#{i + 1}" for i in range(len(state_dicts))]
    if len(names) != len(state_dicts):
        raise ValueError(f"got {len(names)} names for {len(state_dicts)} state dicts")
    first, first_name = state_dicts[0], names[0]
    for sd, name in zip(state_dicts[1:], names[1:]):
        missing, extra = sorted(set(first) - set(sd)), sorted(set(sd) - set(first))
        if missing or extra:
            raise SnapshotError(f"{name} and {first_name} hold different architectures: keys only in "
                                f"{first_name}: {missing[:5]}, only in {name}: {extra[:5]}")
        for key, ref in first.items():
            if sd[key].shape != ref.shape or sd[key].dtype != ref.dtype:
                raise SnapshotError(f"{name} and {first_name} hold different architectures: {key} is "
                                    f"{tuple(sd[key].shape)} {sd[key].dtype} vs {tuple(ref.shape)} {ref.dtype}")
    out: dict[str, Tensor] = {}
    for key, ref in first.items():
        tensors = [sd[key] for sd in state_dicts]
        if ref.is_floating_point() or ref.is_complex():
            wide = torch.complex128 if ref.is_complex() else torch.float64
            out[key] = torch.stack([t.to(wide) for t in tensors]).mean(dim=0).to(ref.dtype)
        elif all(torch.equal(t, ref) for t in tensors[1:]):
            out[key] = ref.clone()
        elif key.endswith(_COUNTER_SUFFIX):
            out[key] = torch.stack(tensors).max(dim=0).values
        else:
            raise SnapshotError(f"the integer tensor {key} differs between the snapshots ({first_name} and "
                                "others): it cannot be averaged")
    return out


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def recompute_batchnorm(
    model: nn.Module, batches: Iterable[Any], *, n_batches: int, device: str | torch.device | None = None
) -> int:
    """Reset ``model``'s BatchNorm statistics and recompute them on the first ``n_batches`` of ``batches``.

    Uses :func:`torch.optim.swa_utils.update_bn`: each BatchNorm layer's running mean and variance become the
    average over the batches of the batch mean and (unbiased) batch variance. Batches are ``x`` or
    ``(x, y, ...)``; pass them without augmentation. The model's train/eval mode is restored.

    Returns:
        The number of batches used (fewer than ``n_batches`` if ``batches`` ran out).

    Raises:
        ValueError: ``n_batches < 1``, or ``batches`` yielded nothing.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    taken = list(itertools.islice(iter(batches), n_batches))
    if not taken:
        raise ValueError("no batches to recompute the BatchNorm statistics on")
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(taken, model, device=device)
    return len(taken)


def average_model(
    model_factory: Callable[[], nn.Module],
    state_dicts: Sequence[Mapping[str, Tensor]],
    *,
    bn_batches: Iterable[Any] | None = None,
    n_bn_batches: int = 50,
    device: str | torch.device = "cpu",
    names: Sequence[str] | None = None,
) -> tuple[nn.Module, int]:
    """A model holding the mean of ``state_dicts`` (:func:`average_state_dicts`), its BatchNorm recomputed.

    Args:
        model_factory: builds the (untrained) architecture of the snapshots.
        state_dicts: the snapshots to average.
        bn_batches: un-augmented training batches for :func:`recompute_batchnorm`; required when the model has
            BatchNorm, unused (and no pass is made) when it has none.
        n_bn_batches: how many of ``bn_batches`` to use.
        device: where the model is put and the statistics computed.
        names: the snapshots' names for error messages.

    Returns:
        ``(model, batches)``: the averaged model in eval mode on ``device``, and the number of batches its
        BatchNorm statistics were recomputed on (0 without BatchNorm).

    Raises:
        SnapshotError: the snapshots do not share the factory's architecture.
        ValueError: a model with BatchNorm and no ``bn_batches``.
    """
    averaged = average_state_dicts(state_dicts, names)
    model = model_factory()
    verify_state_dict(model, averaged, source="the averaged snapshots")
    model.load_state_dict(averaged, strict=True)
    model.to(device)
    used = 0
    if has_batchnorm(model):
        if bn_batches is None:
            raise ValueError("the model has BatchNorm layers: pass training batches to recompute their statistics "
                             "for the averaged weights")
        used = recompute_batchnorm(model, bn_batches, n_batches=n_bn_batches, device=device)
        logger.info("recomputed BatchNorm statistics on %d batches", used)
    else:
        logger.info("no BatchNorm layers: no statistics to recompute")
    return model.eval(), used
