"""One set of input checks for probabilities, labels and weights, shared by metrics, weighting, report and ensemble.

A private leaf module: it imports nothing else from :mod:`snapens`, so every layer may use it. The checks are
vectorised and cheap next to the work they guard: two passes over a probability tensor (``aminmax`` and the row
sums), no copies and no dtype conversions of float32/float64 input; the exact diagnosis (how many values are not
finite) is computed only on the way to an error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["EPS", "as_tensor", "check_labels", "check_probs", "check_weights"]

#: Probabilities are clipped to at least ``EPS`` before taking logs: one confidently wrong sample costs at most
#: ``-log(EPS) ~ 27.6`` nats instead of infinity (a float32 softmax can underflow to 0).
EPS = 1e-12


def as_tensor(x: Any, name: str, ndim: int | None = None) -> Tensor:
    """``x`` as a tensor without a copy where possible (detached; numpy arrays shared); checks ``ndim`` if given.

    Raises:
        ValueError: ``x`` is not array-like, or has another number of dimensions than ``ndim``.
    """
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"Expected {name} to be a tensor or array, but got {type(x).__name__}") from exc
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"Expected {name} with {ndim} dimensions, but got shape {tuple(t.shape)}")
    return t


def check_probs(probs: Any, name: str, ndim: int) -> Tensor:
    """Check probabilities with ``ndim`` dims (``[N, C]`` or ``[M, N, C]``) whose rows (last dim) sum to 1.

    Returns the tensor itself for float32/float64 input and a float32 copy for half precision.

    Raises:
        ValueError: wrong shape or dtype, empty, fewer than 2 classes, non-finite, negative (logits?), or a row
            whose sum is off 1 by more than ``max(1e-3, 4 * eps(dtype))`` (float32 softmax rounding is ~1e-7 * C).
    """
    p = as_tensor(probs, name)
    what = "[M, N, C]" if ndim == 3 else "[N, C]"
    if p.ndim != ndim:
        raise ValueError(f"Expected {name} of shape {what}, but got shape {tuple(p.shape)}")
    if not p.is_floating_point():
        raise ValueError(f"Expected floating-point {name} (probabilities), but got dtype {p.dtype}")
    if p.numel() == 0 or p.shape[-2] == 0:
        raise ValueError(f"Expected non-empty {name}, but got shape {tuple(p.shape)}")
    if p.shape[-1] < 2:
        raise ValueError(f"Expected at least 2 classes in {name}, but got shape {tuple(p.shape)}")
    sum_tol = max(1e-3, 4 * torch.finfo(p.dtype).eps)
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    lo, hi = (float(v) for v in torch.aminmax(p))  # NaN and +-inf propagate into the extremes
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"Expected finite {name}, but found {int((~torch.isfinite(p)).sum())} non-finite values")
    if lo < 0:
        raise ValueError(f"Expected {name} >= 0 (probabilities, not logits), but got a minimum of {lo!r}")
    err = float((p.sum(dim=-1) - 1.0).abs().max())
    if err > sum_tol:
        raise ValueError(f"Expected each row of {name} to sum to 1, but a row is off by {err:.3g}")
    return p


def check_labels(labels: Any, n: int, n_classes: int, name: str = "labels") -> Tensor:
    """Check ``[n]`` integer labels in ``[0, n_classes)``; returns them as int64 (no copy if they are already).

    Raises:
        ValueError: wrong shape, not integers, or a label out of range.
    """
    y = as_tensor(labels, name)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"Expected {name} of shape [{n}] (one per sample), but got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"Expected integer {name}, but got dtype {y.dtype}")
    y = y.long()
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"Expected {name} in [0, {n_classes - 1}] (C={n_classes} classes), but got {bad}")
    return y


def check_weights(weights: Any, n_members: int, *, sum_to_one: bool = True) -> Tensor:
    """Check ``M`` member weights and return them as a float64 CPU tensor ``[M]``.

    Args:
        weights: ``M`` weights (sequence, array or tensor).
        n_members: ``M``, the number of members they weigh.
        sum_to_one: require a sum of 1 within ``1e-6`` (ensemble weights); ``False`` asks only for a positive
            sum (weights renormalised by the caller).

    Raises:
        ValueError: not numbers, wrong length, non-finite, negative, or a wrong sum.
    """
    try:
        w = as_tensor(weights, "weights").to("cpu", torch.float64)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"Expected weights as numbers, but got {weights!r}") from exc
    if w.ndim != 1 or w.shape[0] != n_members:
        raise ValueError(f"Expected {n_members} weights (one per member: length M={n_members}), but got shape "
                         f"{tuple(w.shape)}: {w.tolist()}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"Expected finite weights, but got {w.tolist()}")
    if bool((w < 0).any()):
        raise ValueError(f"Expected weights >= 0, but got {w.tolist()}")
    total = float(w.sum())
    if sum_to_one and abs(total - 1.0) > 1e-6:
        raise ValueError(f"Expected weights that sum to 1 (within 1e-6), but they sum to {total!r}: {w.tolist()}")
    if not sum_to_one and total <= 0:
        raise ValueError(f"Expected weights with a positive sum, but got {w.tolist()}")
    return w
