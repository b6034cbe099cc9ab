"""Honest guidance from VALIDATION data: is the equal-weight snapshot ensemble worth it, and what to use instead.

At short budgets the snapshots are still improving cycle to cycle; the early ones are weak, and averaging them
in with equal weights can make the ensemble worse than its best member. :func:`recommend` says so, picks the
better of three ways to combine the members and writes a short hint. It receives only validation
probabilities and labels: no test data can enter it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from snapens import metrics
from snapens._checks import check_probs
from snapens.weighting import fit_ensemble_weights, weighted_average

__all__ = ["CV_FOLDS", "MIN_GAIN_NLL", "Recommendation", "recommend"]

#: Validation NLL (nats) by which last-m or fitted weights must beat the earlier choices to be recommended.
MIN_GAIN_NLL = 1e-4

#: Folds of the cross-validation that scores fitted weights on images their fit did not see.
CV_FOLDS = 5


@dataclass(frozen=True)
class Recommendation:
    """What validation says about combining ``n_members`` snapshots (all NLLs in nats, errors in %).

    ``use`` is ``"equal"``, ``"last-m"`` or ``"fitted"`` (see :func:`recommend`).
    """

    n_members: int
    equal_val_error: float
    equal_val_nll: float
    best_member: int  # 0-based index of the member with the lowest validation NLL
    best_member_val_error: float
    best_member_val_nll: float
    equal_worse_than_best: bool
    last_m: int
    last_m_val_nll: float
    fitted_cv_val_nll: float | None  # None where validation is too small to cross-validate
    use: str
    hint: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _cross_validated_fit_nll(member_probs: torch.Tensor, labels: torch.Tensor, folds: int) -> float | None:
    """Mean NLL of NLL-fitted weights, each fold scored with weights fitted on the other folds.

    Weights fitted and scored on the same images never lose to equal weights (equal weights are one of the
    points the fit searches), so the comparison must use held-out images. Folds are ``n mod folds``.
    """
    n = member_probs.shape[1]
    if n < 2 * folds:
        return None
    fold_of = torch.arange(n) % folds
    total = 0.0
    for k in range(folds):
        held, rest = fold_of == k, fold_of != k
        w = fit_ensemble_weights(member_probs[:, rest], labels[rest])
        total += metrics.nll(weighted_average(member_probs[:, held], w), labels[held]) * int(held.sum())
    return total / n


def _hint(rec_use: str, worse: bool, last_m: int, n_members: int) -> str:
    if not worse and rec_use == "equal":
        return f"the equal-weight ensemble of all {n_members} snapshots is the best choice on validation"
    last = "only the last snapshot" if last_m == 1 else f"the last m={last_m} snapshots"
    advice = {"last-m": f"use {last} (`snapens evaluate --last {last_m}`)",
              "fitted": "use the weights fitted on validation (the 'weights fitted on validation' row; "
                        "`snapens export --weights fitted`)",
              "equal": "the equal weights are still the best of the three combinations"}[rec_use]
    if worse:
        return (f"the equal-weight ensemble is worse than its best member on validation: {advice}; the early "
                "snapshots are still weak, so a longer budget or fewer cycles would likely help")
    return f"{advice}: it beats the equal-weight ensemble on validation"


def recommend(val_member_probs: Any, val_labels: Any, *, folds: int = CV_FOLDS) -> Recommendation:
    """Compare, on validation only, the equal-weight ensemble with its best member, the last m and fitted weights.

    With member probabilities ``p_m`` (``m = 1..M``, in snapshot order):

    * equal: ``(1/M) sum_m p_m``; it is *worse than its best member* when its NLL is above the lowest member
      NLL or its error above the lowest member error;
    * last m: ``(1/m) sum_{j > M-m} p_j`` with ``m`` minimising validation NLL (ties go to the larger m);
    * fitted: simplex weights minimising NLL, scored by ``folds``-fold cross-validation.

    ``use`` is equal, unless last-m (then fitted) lowers the validation NLL by more than :data:`MIN_GAIN_NLL`.

    Args:
        val_member_probs: ``[M, N, C]`` validation probabilities of the members.
        val_labels: ``[N]`` validation labels.
        folds: cross-validation folds for the fitted weights.
    """
    p = check_probs(val_member_probs, "val_member_probs", 3).double()
    y = torch.as_tensor(val_labels).long()
    if y.shape != (p.shape[1],):
        raise ValueError(f"val_labels must have shape [{p.shape[1]}], got {tuple(y.shape)}")
    m_total = p.shape[0]
    member_nll = [metrics.nll(p[i], y) for i in range(m_total)]
    member_err = [metrics.error_rate(p[i], y) for i in range(m_total)]
    best = min(range(m_total), key=lambda i: member_nll[i])
    equal_nll, equal_err = metrics.nll(p.mean(0), y), metrics.error_rate(p.mean(0), y)
    worse = equal_nll > min(member_nll) or equal_err > min(member_err)
    last_nll = [metrics.nll(p[-m:].mean(0), y) for m in range(1, m_total + 1)]
    last_m = max(range(1, m_total + 1), key=lambda m: (-last_nll[m - 1], m))
    fitted = _cross_validated_fit_nll(p, y, folds) if m_total > 1 else None
    candidates = [("equal", equal_nll), ("last-m", last_nll[last_m - 1])]
    if fitted is not None:
        candidates.append(("fitted", fitted))
    use, use_nll = candidates[0]
    for name, value in candidates[1:]:  # another choice only for a real gain, not for solver noise
        if value < use_nll - MIN_GAIN_NLL:
            use, use_nll = name, value
    return Recommendation(
        n_members=m_total, equal_val_error=equal_err, equal_val_nll=equal_nll, best_member=best,
        best_member_val_error=member_err[best], best_member_val_nll=member_nll[best],
        equal_worse_than_best=worse, last_m=last_m, last_m_val_nll=last_nll[last_m - 1],
        fitted_cv_val_nll=fitted, use=use, hint=_hint(use, worse, last_m, m_total))
