"""Classification metrics for probabilities, ensemble-size curves and member diversity.

Shapes: probabilities ``probs`` ``[N, C]``, member probabilities ``member_probs`` ``[M, N, C]``, labels ``[N]``
(integers in ``[0, C)``). Torch tensors and numpy arrays are accepted; scalar metrics return Python floats,
matrices are float64 CPU tensors. Predictions are ``argmax`` over classes; ties go to the lowest class index
(``torch.argmax``), and :func:`top_k_accuracy` breaks ties the same way so that ``k = 1`` equals
:func:`accuracy`. This module imports nothing else from :mod:`snapens` but its private input checks
(:mod:`snapens._checks`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from snapens._checks import EPS, check_labels, check_weights
from snapens._checks import check_probs as _check_probs

__all__ = [
    "EPS",
    "accuracy",
    "brier",
    "ece",
    "ensemble_size_curve",
    "error_rate",
    "evaluate_probs",
    "nll",
    "pairwise_correlation",
    "pairwise_disagreement",
    "top_k_accuracy",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- validation
def _check_labels(labels: Any, n: int, n_classes: int, device: torch.device) -> Tensor:
    return check_labels(labels, n, n_classes).to(device)


def _probs_and_labels(probs: Any, labels: Any) -> tuple[Tensor, Tensor]:
    p = _check_probs(probs, "probs", 2)
    return p, _check_labels(labels, p.shape[0], p.shape[1], p.device)


# --------------------------------------------------------------------------------------------- scalar metrics
def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of samples whose ``argmax_c p_{n,c}`` equals the label, in ``[0, 1]``."""
    p, y = _probs_and_labels(probs, labels)
    return float((p.argmax(dim=1) == y).double().mean())


def error_rate(probs: Any, labels: Any) -> float:
    """Top-1 error in percent: ``100 * (1 - accuracy)``."""
    return 100.0 * (1.0 - accuracy(probs, labels))


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood ``-(1/N) sum_n log(max(p_{n, y_n}, EPS))`` in nats."""
    p, y = _probs_and_labels(probs, labels)
    p_true = p.gather(1, y.view(-1, 1)).squeeze(1).double()
    return float(-p_true.clamp_min(EPS).log().mean())


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score ``(1/N) sum_n sum_c (p_{n,c} - [c = y_n])^2``, in ``[0, 2]`` (summed over classes)."""
    p, y = _probs_and_labels(probs, labels)
    sq = p.double().square().sum(dim=1)
    p_true = p.gather(1, y.view(-1, 1)).squeeze(1).double()
    # sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_y + 1, without materialising the one-hot matrix.
    return float((sq - 2.0 * p_true + 1.0).mean())


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (Guo et al. 2017).

    ``conf_n = max_c p_{n,c}``; bin ``b`` (0-based) holds the samples with ``b/B < conf_n <= (b+1)/B``, and the
    first bin also holds ``conf_n = 0``, so a confidence exactly on an inner edge goes to the lower bin. Then
    ``ECE = sum_b (|bin_b| / N) * |acc(bin_b) - mean conf(bin_b)|`` (empty bins contribute 0).

    Raises:
        ValueError: ``n_bins`` not a positive integer, or bad probabilities / labels.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"Expected a positive integer n_bins, but got {n_bins!r}")
    p, y = _probs_and_labels(probs, labels)
    conf, pred = p.double().max(dim=1)
    correct = (pred == y).double()
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64, device=p.device) / n_bins
    # right=False: index i such that edges[i-1] < conf <= edges[i], i.e. bins closed on the right.
    bins = torch.bucketize(conf, inner_edges, right=False)
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, bins, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, bins, conf)
    sum_correct = torch.zeros_like(count).index_add_(0, bins, correct)
    # |count * acc - count * conf| / N = |sum_correct - sum_conf| / N, so empty bins add exactly 0.
    return float((sum_correct - sum_conf).abs().sum() / conf.shape[0])


def top_k_accuracy(probs: Any, labels: Any, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` most probable classes.

    Ties are broken towards the lower class index (as ``argmax``): the label's rank is
    ``#{c : p_c > p_y} + #{c < y : p_c = p_y}``, and the sample counts if that rank is ``< k``.

    Raises:
        ValueError: ``k`` not in ``[1, C]``, or bad probabilities / labels.
    """
    p, y = _probs_and_labels(probs, labels)
    n_classes = p.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_classes:
        raise ValueError(f"Expected an integer k in [1, {n_classes}], but got {k!r}")
    p_true = p.gather(1, y.view(-1, 1))
    classes = torch.arange(n_classes, device=p.device).view(1, -1)
    rank = (p > p_true).sum(dim=1) + ((p == p_true) & (classes < y.view(-1, 1))).sum(dim=1)
    return float((rank < k).double().mean())


def evaluate_probs(probs: Any, labels: Any) -> dict[str, float]:
    """All scalar metrics of ``[N, C]`` probabilities.

    Returns:
        ``{"error": % top-1 error, "nll": nats, "brier": ..., "ece": 15-bin ECE}`` plus
        ``"top5_error"`` (%) when ``C >= 5``.
    """
    p, y = _probs_and_labels(probs, labels)
    out = {"error": error_rate(p, y), "nll": nll(p, y), "brier": brier(p, y), "ece": ece(p, y)}
    if p.shape[1] >= 5:
        out["top5_error"] = 100.0 * (1.0 - top_k_accuracy(p, y, 5))
    return out


# --------------------------------------------------------------------------------------------- ensembles
def ensemble_size_curve(member_probs: Any, labels: Any, weights: Any = None) -> list[float]:
    """Top-1 error (%) of the ensemble of the LAST ``m`` members, for ``m = 1 .. M``.

    Members are in snapshot order, so entry ``m - 1`` is the ensemble of snapshots ``M - m + 1 .. M`` (the paper's
    Figure 3). With ``weights=None`` the ``m`` members are averaged equally; otherwise their given weights are
    renormalised over them, ``w_j / sum_{i >= M-m} w_i``. Where those weights are all 0 the ensemble is undefined
    and the entry is ``nan``.

    Args:
        member_probs: ``[M, N, C]`` member probabilities.
        labels: ``[N]`` labels.
        weights: optional ``M`` weights, finite and ``>= 0`` with a positive sum (need not sum to 1).

    Returns:
        ``M`` error rates in percent.

    Raises:
        ValueError: bad shapes, probabilities, labels or weights.
    """
    mp = _check_probs(member_probs, "member_probs", 3)
    n_members = mp.shape[0]
    y = _check_labels(labels, mp.shape[1], mp.shape[2], mp.device)
    if weights is None:
        w = torch.ones(n_members, dtype=torch.float64)
    else:
        w = check_weights(weights, n_members, sum_to_one=False)
    errors: list[float] = []
    running = torch.zeros(mp.shape[1:], dtype=torch.float64, device=mp.device)
    total = 0.0
    for j in range(n_members - 1, -1, -1):
        running += float(w[j]) * mp[j].double()
        total += float(w[j])
        if total == 0.0:
            errors.append(math.nan)
            continue
        pred = (running / total).argmax(dim=1)
        errors.append(100.0 * float((pred != y).double().mean()))
    return errors


def pairwise_disagreement(member_probs: Any) -> Tensor:
    """``D[i, j]`` = fraction of samples on which members ``i`` and ``j`` predict different classes (argmax).

    Returns:
        float64 CPU tensor ``[M, M]``, symmetric, zero diagonal.
    """
    mp = _check_probs(member_probs, "member_probs", 3)
    pred = mp.argmax(dim=2)  # [M, N]
    diff = (pred[:, None, :] != pred[None, :, :]).double().mean(dim=2)
    return diff.cpu()


def pairwise_correlation(member_probs: Any) -> Tensor:
    """Pearson correlation between the members' softmax outputs (the paper's diversity measure).

    Each member ``m`` contributes one vector ``x_m`` of length ``N * C``: its probability matrix ``[N, C]``
    flattened, i.e. every (sample, class) probability. ``R[i, j] = cov(x_i, x_j) / (std(x_i) std(x_j))``.
    A member with constant outputs (e.g. uniform everywhere) has zero variance: its row and column are ``nan``.

    Returns:
        float64 CPU tensor ``[M, M]``, symmetric, ones on the diagonal.
    """
    mp = _check_probs(member_probs, "member_probs", 3)
    x = mp.reshape(mp.shape[0], -1).double()
    x = x - x.mean(dim=1, keepdim=True)
    cov = x @ x.T
    std = cov.diagonal().sqrt()
    corr = cov / (std[:, None] * std[None, :])
    return corr.clamp(-1.0, 1.0).cpu()
