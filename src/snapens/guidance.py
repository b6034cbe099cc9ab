"""Honest guidance from VALIDATION data: which combination of the snapshots to use, weighing its price.

At short budgets the snapshots are still improving cycle to cycle; the early ones are weak, and averaging them
in with equal weights can make the ensemble worse than its best member. And every member costs one forward pass
per image at test time. :func:`recommend` scores the ways to combine the members on validation NLL, picks the
cheapest one whose score is within noise of the best, and returns it as a concrete, storable choice (member
weights, temperature, forward passes) with a short hint that names the measure behind it. It receives only
validation probabilities and labels: no test data can enter it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from snapens import metrics, weighting
from snapens._checks import check_probs
from snapens.weighting import fit_ensemble_weights, prune_weights, weighted_average

__all__ = ["CV_FOLDS", "MIN_GAIN_NLL", "NOISE_STANDARD_ERRORS", "Recommendation", "recommend"]

#: Validation NLL (nats) below which two candidates count as tied whatever their standard error (solver noise).
MIN_GAIN_NLL = 1e-4

#: Folds of the cross-validation that scores fitted weights (and checks the temperature) on unseen images.
CV_FOLDS = 5

#: A candidate is "within noise" of the best when its mean validation NLL exceeds the best one's by at most this
#: many standard errors of the paired per-image NLL differences (plus :data:`MIN_GAIN_NLL`): the one-standard-
#: error rule of model selection (Breiman et al. 1984; Hastie et al., ESL 7.10), applied to forward passes.
NOISE_STANDARD_ERRORS = 1.0

_CRITERION = (f"validation NLL ({CV_FOLDS}-fold cross-validated for fitted weights); the fewest forward passes "
              f"within {NOISE_STANDARD_ERRORS:g} standard error of the lowest")


@dataclass(frozen=True)
class Recommendation:
    """What validation says about combining ``n_members`` snapshots (all NLLs in nats, errors in %).

    ``use`` is ``"equal"`` (all members, equal weights: the paper), ``"last-m"`` (equal weights over the last
    ``last_m`` snapshots; ``last_m = 1`` is the last snapshot alone) or ``"fitted"`` (NLL-fitted weights, members
    below :data:`snapens.weighting.DROP_BELOW` dropped). ``weights``, ``temperature`` and ``forward_passes`` are
    the choice itself: apply ``softmax(log(sum_m w_m p_m) / T)``, running only the members with ``w_m > 0``.
    ``candidates`` holds every scored combination (see :func:`recommend`), each a dict with ``use``, ``m`` (the
    number of last snapshots; ``None`` for fitted), ``weights``, ``forward_passes``, ``val_error``, ``val_nll``,
    ``nll_gap`` and ``nll_gap_se`` (mean and standard error of the per-image NLL difference to the candidate
    with the lowest NLL) and ``within_noise``.
    """

    n_members: int
    equal_val_error: float
    equal_val_nll: float
    best_member: int  # 0-based index of the member with the lowest validation NLL
    best_member_val_error: float
    best_member_val_nll: float
    equal_worse_than_best: bool  # by NLL or by error (see equal_worse_by_nll / _by_error)
    last_m: int  # the recommended m among the last-m ensembles (m = 1..M); the chosen one when use == "last-m"
    last_m_val_nll: float
    fitted_cv_val_nll: float | None  # None where validation is too small to cross-validate
    use: str
    hint: str
    equal_worse_by_nll: bool  # equal NLL above the lowest member NLL
    equal_worse_by_error: bool  # equal error above the lowest member error
    best_error_member: int  # 0-based index of the member with the lowest validation error (ties: the later)
    best_error_member_val_error: float
    measures_disagree: bool  # one of NLL and error says worse, the other strictly better (equal vs best member,
    # or the choice vs equal); a tie is no disagreement
    criterion: str  # the measure the choice is made on, in words
    weights: list[float]  # M weights summing to 1: the recommended combination
    temperature: float  # the temperature to apply; 1.0 when not identifiable or not confirmed by CV
    temperature_fitted: bool
    temperature_reason: str | None  # why T = 1 was kept; None when fitted
    forward_passes: int  # members with non-zero weight
    chosen_val_nll: float  # the choice's validation NLL (cross-validated for fitted weights)
    chosen_val_error: float
    reason: str  # one sentence: why this choice
    candidates: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _per_image_nll(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-log(max(p_{n, y_n}, EPS))`` per image: the terms whose mean is :func:`snapens.metrics.nll`."""
    return -probs.gather(1, labels.view(-1, 1)).squeeze(1).clamp_min(metrics.EPS).log()


def _cross_validated_fit_probs(member_probs: torch.Tensor, labels: torch.Tensor, folds: int
                               ) -> torch.Tensor | None:
    """``[N, C]`` held-out probabilities of NLL-fitted, pruned weights: each fold's images are combined with the
    weights fitted on the other folds (then :func:`~snapens.weighting.prune_weights`). Folds are ``n mod folds``;
    ``None`` when there are fewer than ``2 * folds`` images."""
    n = member_probs.shape[1]
    if n < 2 * folds:
        return None
    fold_of = torch.arange(n) % folds
    held_out = torch.empty(member_probs.shape[1:], dtype=member_probs.dtype)
    for k in range(folds):
        held, rest = fold_of == k, fold_of != k
        w = prune_weights(fit_ensemble_weights(member_probs[:, rest], labels[rest]))
        held_out[held] = weighted_average(member_probs[:, held], w)
    return held_out


def _cross_validated_fit_nll(member_probs: torch.Tensor, labels: torch.Tensor, folds: int) -> float | None:
    """Mean NLL of NLL-fitted weights, each fold scored with weights fitted on the other folds.

    Weights fitted and scored on the same images never lose to equal weights (equal weights are one of the
    points the fit searches), so the comparison must use held-out images. Folds are ``n mod folds``.
    """
    probs = _cross_validated_fit_probs(member_probs, labels, folds)
    return None if probs is None else metrics.nll(probs, labels)


def _candidates(p: torch.Tensor, y: torch.Tensor, folds: int) -> list[dict[str, Any]]:
    """Every combination with its weights, passes and per-image validation NLL (``"_nll"``, dropped later)."""
    m_total = p.shape[0]
    out = []

    def add(use: str, m: int | None, weights: torch.Tensor, probs: torch.Tensor) -> None:
        out.append({"use": use, "m": m, "weights": weights.tolist(), "forward_passes": int((weights > 0).sum()),
                    "val_error": metrics.error_rate(probs, y), "_nll": _per_image_nll(probs, y)})

    for m in range(1, m_total + 1):
        w = torch.zeros(m_total, dtype=torch.float64)
        w[-m:] = 1.0 / m
        add("equal" if m == m_total else "last-m", m, w, weighted_average(p, w))
    held_out = _cross_validated_fit_probs(p, y, folds) if m_total > 1 else None
    if held_out is not None:
        w = prune_weights(fit_ensemble_weights(p, y))
        add("fitted", None, w, held_out)
    return out


def _score(candidates: list[dict[str, Any]]) -> None:
    """Add ``val_nll``, ``nll_gap`` and ``nll_gap_se`` (paired, against the lowest NLL) and ``within_noise``."""
    nlls = [float(c["_nll"].mean()) for c in candidates]
    best = candidates[min(range(len(candidates)), key=lambda i: nlls[i])]
    for c, value in zip(candidates, nlls):
        diff = c["_nll"] - best["_nll"]
        n = diff.shape[0]
        se = float(diff.std()) / math.sqrt(n) if n > 1 else 0.0  # std with Bessel's correction
        gap = value - float(best["_nll"].mean())
        c.update(val_nll=value, nll_gap=gap, nll_gap_se=se,
                 within_noise=gap <= NOISE_STANDARD_ERRORS * se + MIN_GAIN_NLL)


def _choose(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The fewest passes within noise; among those the lowest NLL, preferring the earlier (simpler) candidate
    within :data:`MIN_GAIN_NLL` of it (last-m before equal before fitted)."""
    ok = [c for c in candidates if c["within_noise"]]
    fewest = min(c["forward_passes"] for c in ok)
    cheapest = [c for c in ok if c["forward_passes"] == fewest]
    low = min(c["val_nll"] for c in cheapest)
    return next(c for c in cheapest if c["val_nll"] <= low + MIN_GAIN_NLL)


def _last_m_choice(candidates: list[dict[str, Any]], chosen: dict[str, Any]) -> dict[str, Any]:
    """The recommended last-m ensemble: the chosen one if it is one, else the fewest m within noise of the best
    last-m ensemble (the same rule restricted to them)."""
    if chosen["use"] != "fitted":
        return chosen
    family = [c for c in candidates if c["use"] != "fitted"]
    scored = [dict(c) for c in family]
    _score(scored)
    pick = _choose(scored)
    return next(f for f, c in zip(family, scored) if c is pick)


def _name(c: dict[str, Any], n_members: int) -> str:
    if c["use"] == "equal":
        return f"the equal-weight ensemble of all {n_members} snapshots"
    if c["use"] == "fitted":
        return f"the weights fitted on validation ({c['forward_passes']} of {n_members} members kept)"
    return "only the last snapshot" if c["m"] == 1 else f"the last m={c['m']} snapshots with equal weights"


def _advice(c: dict[str, Any], n_members: int) -> str:
    passes = f"{c['forward_passes']} forward pass{'' if c['forward_passes'] == 1 else 'es'}"
    # The choice is stored in recommended.json and is what from_run and `snapens export` give by default.
    return f"use {_name(c, n_members)}, {passes} (the default of from_run and `snapens export`)"


def _status(rec: dict[str, Any]) -> str:
    """Equal weights against the best member, by NLL and by error, naming which says what."""
    e_nll, b_nll, k = rec["equal_val_nll"], rec["best_member_val_nll"], rec["best_member"] + 1
    e_err, b_err, j = rec["equal_val_error"], rec["best_error_member_val_error"], rec["best_error_member"] + 1
    by_nll = f"validation NLL ({e_nll:.4f} vs {b_nll:.4f} for member {k})"
    by_err = f"validation error ({e_err:.2f} % vs {b_err:.2f} % for member {j})"
    if rec["equal_worse_by_nll"] and rec["equal_worse_by_error"]:
        return f"the equal-weight ensemble is worse than its best member by {by_nll} and by {by_err}"
    # the measures disagree only when one says worse and the other strictly better; a tie is said as a tie
    if rec["equal_worse_by_nll"]:
        if e_err < b_err:
            return (f"the equal-weight ensemble is worse than its best member by {by_nll}, but not by {by_err}: "
                    "the two measures disagree")
        return f"the equal-weight ensemble is worse than its best member by {by_nll}, and tied with it by {by_err}"
    if rec["equal_worse_by_error"]:
        if e_nll < b_nll:
            return (f"the equal-weight ensemble is worse than its best member by {by_err}, but not by {by_nll}: "
                    "the two measures disagree")
        return f"the equal-weight ensemble is worse than its best member by {by_err}, and tied with it by {by_nll}"
    return f"the equal-weight ensemble is at least as good as each of its members by {by_nll} and by {by_err}"


def _reason(chosen: dict[str, Any], best: dict[str, Any], n_members: int) -> str:
    if chosen is best:
        return f"the lowest {_CRITERION.split(' (')[0]} ({chosen['val_nll']:.4f})"
    passes = chosen["forward_passes"]
    cost = (f"{passes} forward pass{'' if passes == 1 else 'es'} instead of {best['forward_passes']}"
            if chosen["forward_passes"] < best["forward_passes"] else "the simpler combination")
    return (f"validation NLL {chosen['val_nll']:.4f}, within {NOISE_STANDARD_ERRORS:g} standard error "
            f"({chosen['nll_gap_se']:.4f}) of the lowest, {best['val_nll']:.4f} for {_name(best, n_members)}, "
            f"with {cost}")


def _error_prefers_equal(chosen: dict[str, Any], equal: dict[str, Any]) -> bool:
    """Whether validation error ranks the equal-weight ensemble above the choice, against the NLL's verdict."""
    return chosen is not equal and chosen["val_error"] > equal["val_error"] and chosen["val_nll"] < equal["val_nll"]


def _hint(rec: dict[str, Any], chosen: dict[str, Any], equal: dict[str, Any]) -> str:
    n_members = rec["n_members"]
    parts = [_status(rec)]
    choice = f"by validation NLL, {_advice(chosen, n_members)}"
    if chosen is not equal:
        choice += f" (NLL {chosen['val_nll']:.4f} vs {equal['val_nll']:.4f} for equal weights)"
    if rec["temperature_fitted"]:
        choice += f", with temperature T={rec['temperature']:.3g}"
    parts.append(choice)
    if _error_prefers_equal(chosen, equal):
        parts.append(f"by validation error the equal-weight ensemble is better ({equal['val_error']:.2f} % vs "
                     f"{chosen['val_error']:.2f} %), but NLL decides: it also counts how confident each prediction "
                     "is")
    hint = "; ".join(parts)
    if rec["equal_worse_than_best"]:
        hint += "; the early snapshots are still weak, so a longer budget or fewer cycles would likely help"
    return hint


def recommend(val_member_probs: Any, val_labels: Any, *, folds: int = CV_FOLDS) -> Recommendation:
    """Choose, on validation only, how to combine the members: the cheapest combination within noise of the best.

    With member probabilities ``p_m`` (``m = 1..M``, in snapshot order) the candidates are

    * last m, ``m = 1..M-1``: ``(1/m) sum_{j > M-m} p_j`` (``m`` forward passes; ``m = 1`` is the last snapshot);
    * equal: ``(1/M) sum_m p_m`` (``M`` passes; the paper);
    * fitted: simplex weights minimising NLL, members below :data:`~snapens.weighting.DROP_BELOW` dropped and
      the rest renormalised (:func:`~snapens.weighting.prune_weights`); scored by ``folds``-fold
      cross-validation (weights fitted on the other folds), since weights fitted and scored on the same images
      never lose to equal ones; absent below ``2 * folds`` images.

    Each is scored by its mean validation NLL. Noise is judged per image: with ``d_n`` the difference of a
    candidate's and the best candidate's NLL on image ``n``, the candidate is within noise when
    ``mean(d) <= NOISE_STANDARD_ERRORS * std(d) / sqrt(N) + MIN_GAIN_NLL`` (paired, so the images' shared
    difficulty cancels). Among those, the fewest forward passes wins; then the lowest NLL, preferring the
    simpler candidate (last m, then equal, then fitted) within :data:`MIN_GAIN_NLL`. A temperature is then fitted
    for the chosen combination and kept only when cross-validation confirms it
    (:func:`~snapens.weighting.fit_temperature_checked`).

    The equal-weight ensemble is *worse than its best member* when its NLL is above the lowest member NLL or its
    error above the lowest member error; the hint says by which measure, and when they disagree.

    Args:
        val_member_probs: ``[M, N, C]`` validation probabilities of the members.
        val_labels: ``[N]`` validation labels.
        folds: cross-validation folds for the fitted weights and the temperature.
    """
    p = check_probs(val_member_probs, "val_member_probs", 3).double().cpu()
    y = torch.as_tensor(val_labels).long().cpu()
    if y.shape != (p.shape[1],):
        raise ValueError(f"val_labels must have shape [{p.shape[1]}], got {tuple(y.shape)}")
    m_total = p.shape[0]
    member_nll = [metrics.nll(p[i], y) for i in range(m_total)]
    member_err = [metrics.error_rate(p[i], y) for i in range(m_total)]
    best = min(range(m_total), key=lambda i: member_nll[i])
    best_err = max(range(m_total), key=lambda i: (-member_err[i], i))
    candidates = _candidates(p, y, folds)
    _score(candidates)
    chosen = _choose(candidates)
    top = min(candidates, key=lambda c: c["val_nll"])
    equal = next(c for c in candidates if c["use"] == "equal")
    last = _last_m_choice(candidates, chosen)
    for c in candidates:
        del c["_nll"]
    fitted = next((c for c in candidates if c["use"] == "fitted"), None)
    weights = torch.tensor(chosen["weights"], dtype=torch.float64)
    temp = weighting.fit_temperature_checked(weighted_average(p, weights), y, folds=folds)
    worse_nll, worse_err = equal["val_nll"] > min(member_nll), equal["val_error"] > min(member_err)
    fields: dict[str, Any] = dict(
        n_members=m_total, equal_val_error=equal["val_error"], equal_val_nll=equal["val_nll"], best_member=best,
        best_member_val_error=member_err[best], best_member_val_nll=member_nll[best],
        equal_worse_than_best=worse_nll or worse_err, last_m=last["m"], last_m_val_nll=last["val_nll"],
        fitted_cv_val_nll=None if fitted is None else fitted["val_nll"], use=chosen["use"],
        equal_worse_by_nll=worse_nll, equal_worse_by_error=worse_err, best_error_member=best_err,
        best_error_member_val_error=member_err[best_err],
        measures_disagree=(worse_nll and equal["val_error"] < min(member_err)
                           or worse_err and equal["val_nll"] < min(member_nll) or _error_prefers_equal(chosen, equal)),
        criterion=_CRITERION, weights=chosen["weights"], temperature=temp.temperature,
        temperature_fitted=temp.fitted, temperature_reason=temp.reason, forward_passes=chosen["forward_passes"],
        chosen_val_nll=chosen["val_nll"], chosen_val_error=chosen["val_error"],
        reason=_reason(chosen, top, m_total), candidates=candidates)
    return Recommendation(**fields, hint=_hint(fields, chosen, equal))
