"""The evaluation summary of a snapshot ensemble: tensors in, a JSON-serialisable dict out.

Every number in the summary is measured on the TEST split; every choice (which single model is "best", the
ensemble weights, the temperature) is made on the VALIDATION split only, so that no test label leaks into a
reported number (the Keras implementation this project replaces picked its "best" checkpoint and its weights on
the test set).

Rows of the summary, as in the paper's Table 1 and the old predict script:

- each snapshot;
- "single best": ``best.safetensors`` (the training run's best epoch by validation accuracy) when given, else the
  snapshot with the highest validation accuracy;
- "last snapshot";
- "ensemble, equal weights" (the paper): ``p(x) = 1/M * sum_m softmax(f_m(x))``;
- "ensemble, weights fitted on validation": ``w = argmin_{w in simplex} NLL(sum_m w_m p_m, y)`` on validation
  (:func:`snapens.weighting.fit_ensemble_weights`), or the saved weights with ``optimize=0``;
- "ensemble + temperature": ``softmax(log p / T)`` with ``T`` fitted on validation, kept at 1 unless
  cross-validation inside the validation split confirms the fit (``temperature_fitted``, ``temperature_reason``);
- "ensemble, recommended" (:func:`add_recommended`, entry ``ensemble_recommended``): the combination chosen on
  validation by :func:`snapens.guidance.recommend`, the one ``from_run`` and ``snapens export`` give by default;
  it runs only the members with a non-zero weight.

Plus the error of the ensemble of the last ``m`` snapshots for ``m = 1..M`` (over the snapshots only, not an
extra member such as the best model) and the pairwise diversity of the members' test predictions, labelled by
member name.

Numbers that are not finite (a diverged snapshot's NaN loss) become ``null`` in JSON: write and print summaries
with :func:`to_json`, never with a bare ``json.dumps`` (which writes ``NaN``, invalid JSON).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from snapens import _checks, metrics, weighting
from snapens._io import json_safe, to_json

__all__ = ["FORMAT_VERSION", "OPTIMIZE_MODES", "SINGLE_ROWS", "ENSEMBLE_ROWS", "RECOMMENDED_ROW", "summarize",
           "add_recommended", "recommended_label", "add_prices", "format_summary", "json_safe", "to_json"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: The old predict script's ``--optimize`` values: -1 equal weights only, 0 use saved weights, 1 fit weights.
OPTIMIZE_MODES = (-1, 0, 1)
_METRIC_COLUMNS = (("error", "error %", "8.2f"), ("nll", "NLL", "8.4f"), ("ece", "ECE", "8.4f"),
                   ("brier", "Brier", "8.4f"))
#: The price columns (:func:`add_prices`): forward passes per image and measured test-time images per second.
PRICE_COLUMNS = (("forward_passes", "passes", "8.0f"), ("images_per_second", "img/s", "8.0f"))
#: Summary entries that run one model per image, and those that run the whole ensemble.
SINGLE_ROWS = ("single_best", "last_snapshot")
ENSEMBLE_ROWS = ("ensemble_equal", "ensemble_weighted", "ensemble_temperature")
#: The summary entry of the recommended combination: what the user gets (:func:`add_recommended`).
RECOMMENDED_ROW = "ensemble_recommended"


def _as_tensor(x: Any, name: str, ndim: int) -> Tensor:
    return _checks.as_tensor(x, name, ndim).cpu()


def _metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.evaluate_probs(probs, labels).items()}


def _row(name: str, probs: Tensor, labels: Tensor, **extra: Any) -> dict[str, Any]:
    return {"name": name, **_metrics(probs, labels), **extra}


def _off_diagonal_mean(matrix: Tensor) -> float | None:
    m = matrix.shape[0]
    if m < 2:
        return None
    mask = ~torch.eye(m, dtype=torch.bool)
    return float(matrix.to(torch.float64)[mask].mean())


def summarize(
    val_member_probs: Tensor | None,
    val_labels: Tensor | None,
    test_member_probs: Tensor,
    test_labels: Tensor,
    *,
    member_names: Sequence[str],
    best_test_probs: Tensor | None = None,
    best_val_acc: float | None = None,
    weights: Tensor | None = None,
    optimize: int = 1,
    is_snapshot: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Summarise a snapshot ensemble on the test split, with every choice made on validation.

    Args:
        val_member_probs: ``[M, Nv, C]`` member softmax outputs on validation, or ``None`` without a val split.
        val_labels: ``[Nv]`` validation labels, or ``None``.
        test_member_probs: ``[M, Nt, C]`` member softmax outputs on the test split.
        test_labels: ``[Nt]`` test labels.
        member_names: one name per member, e.g. ``"snapshot-01"``; they label the rows and the diversity
            matrices.
        best_test_probs: ``[Nt, C]`` test probabilities of ``best.safetensors`` when the run has one; it is then
            the "single best" row (it was chosen on validation accuracy during training).
        best_val_acc: the validation accuracy recorded with ``best.safetensors`` (fraction or percent; reported
            as given).
        weights: ``[M]`` pre-fitted ensemble weights, required with ``optimize=0``.
        optimize: ``-1`` equal weights only, ``1`` fit weights on validation (NLL), ``0`` use ``weights``.
        is_snapshot: per member, whether it is a snapshot (in training order) rather than an extra member
            such as ``best.safetensors``; ``None`` = all are. The "last snapshot" row and the ensemble-size
            curve use the snapshots only.

    Returns:
        A JSON-serialisable dict (``format_version`` 1); see :func:`format_summary` for its table.

    Raises:
        ValueError: on inconsistent shapes, an unknown ``optimize`` value, ``optimize=0`` without weights, or
            ``is_snapshot`` of the wrong length or without a snapshot.
    """
    if optimize not in OPTIMIZE_MODES:
        raise ValueError(f"optimize must be one of {OPTIMIZE_MODES}, got {optimize!r}")
    test_mp, test_y = _test_inputs(test_member_probs, test_labels)
    n_members, n_test, n_classes = test_mp.shape
    names = [str(n) for n in member_names]
    if len(names) != n_members:
        raise ValueError(f"member_names has {len(names)} names for {n_members} members")
    snap = [True] * n_members if is_snapshot is None else [bool(b) for b in is_snapshot]
    if len(snap) != n_members or not any(snap):
        raise ValueError(f"is_snapshot must have {n_members} entries, at least one True, got {is_snapshot!r}")
    snap_idx = [m for m in range(n_members) if snap[m]]
    val_mp, val_y = _val_inputs(val_member_probs, val_labels, n_members, n_classes)
    has_val = val_mp is not None
    if best_test_probs is not None:
        best_test_probs = _as_tensor(best_test_probs, "best_test_probs", 2)
        if tuple(best_test_probs.shape) != (n_test, n_classes):
            raise ValueError(f"best_test_probs has shape {tuple(best_test_probs.shape)}, expected "
                             f"{(n_test, n_classes)}")

    notes: list[str] = []
    val_acc = [float(metrics.accuracy(val_mp[m], val_y)) for m in range(n_members)] if has_val else None
    snapshots = []
    for m in range(n_members):
        row = _row(names[m], test_mp[m], test_y, snapshot=snap[m])
        if val_acc is not None:
            row["val_accuracy"] = val_acc[m]
        snapshots.append(row)
    single_best = _single_best(snapshots, snap_idx, val_acc, best_test_probs, best_val_acc, test_y, notes)

    equal = torch.full((n_members,), 1.0 / n_members, dtype=torch.float64)
    ensemble_equal = _row("ensemble, equal weights", weighting.weighted_average(test_mp, equal), test_y,
                          weights=equal.tolist())
    chosen, ensemble_weighted = _weighted_row(optimize, weights, test_mp, test_y, val_mp, val_y, notes)
    ensemble_temperature = _temperature_row(chosen if chosen is not None else equal,
                                            "equal" if ensemble_weighted is None else ensemble_weighted["source"],
                                            test_mp, test_y, val_mp, val_y, notes)

    # "last m snapshots": an extra member (the best model) is no snapshot and would shift every m by one.
    curve = [float(e) for e in metrics.ensemble_size_curve(test_mp[snap_idx], test_y)]
    return {
        "format_version": FORMAT_VERSION,
        "split": "test",
        "num_members": n_members,
        "num_classes": n_classes,
        "num_test": n_test,
        "num_val": int(val_y.shape[0]) if has_val else 0,
        "member_names": names,
        "optimize": optimize,
        "snapshots": snapshots,
        "single_best": single_best,
        "last_snapshot": snapshots[snap_idx[-1]],
        "ensemble_equal": ensemble_equal,
        "ensemble_weighted": ensemble_weighted,
        "ensemble_temperature": ensemble_temperature,
        "ensemble_size_curve": {"m": list(range(1, len(snap_idx) + 1)), "error": curve,
                                "members": [names[m] for m in snap_idx]},
        "diversity": _diversity(test_mp, names),
        "notes": notes,
    }


def _test_inputs(test_member_probs: Tensor, test_labels: Tensor) -> tuple[Tensor, Tensor]:
    test_mp = _as_tensor(test_member_probs, "test_member_probs", 3)
    test_y = _as_tensor(test_labels, "test_labels", 1).long()
    n_members, n_test, _ = test_mp.shape
    if n_members < 1 or n_test < 1:
        raise ValueError(f"test_member_probs needs at least one member and one sample, got {tuple(test_mp.shape)}")
    if test_y.shape[0] != n_test:
        raise ValueError(f"test_labels has {test_y.shape[0]} entries but test_member_probs has {n_test} samples")
    return test_mp, test_y


def _val_inputs(val_member_probs: Tensor | None, val_labels: Tensor | None, n_members: int,
                n_classes: int) -> tuple[Tensor | None, Tensor | None]:
    """The checked validation tensors, or ``(None, None)`` without a (non-empty) validation split."""
    if val_member_probs is None or val_labels is None:
        return None, None
    val_mp = _as_tensor(val_member_probs, "val_member_probs", 3)
    val_y = _as_tensor(val_labels, "val_labels", 1).long()
    if val_mp.shape[0] != n_members or val_mp.shape[2] != n_classes:
        raise ValueError(f"val_member_probs has shape {tuple(val_mp.shape)}, expected "
                         f"[{n_members}, N, {n_classes}] to match test_member_probs")
    if val_y.shape[0] != val_mp.shape[1]:
        raise ValueError(f"val_labels has {val_y.shape[0]} entries but val_member_probs has "
                         f"{val_mp.shape[1]} samples")
    return (val_mp, val_y) if val_y.shape[0] > 0 else (None, None)


def _single_best(snapshots: list[dict[str, Any]], snap_idx: list[int], val_acc: list[float] | None,
                 best_test_probs: Tensor | None, best_val_acc: float | None, test_y: Tensor,
                 notes: list[str]) -> dict[str, Any]:
    """best.safetensors when given, else the member with the best validation accuracy (ties: the later one,
    trained longer), else the last snapshot; chosen on validation only."""
    if best_test_probs is not None:
        return _row("best.safetensors", best_test_probs, test_y, chosen_by="best.safetensors",
                    val_accuracy=None if best_val_acc is None else float(best_val_acc))
    if val_acc is not None:
        top = max(range(len(snapshots)), key=lambda m: (val_acc[m], m))
        return {**snapshots[top], "chosen_by": "validation accuracy"}
    notes.append("no validation split: 'single best' is the last snapshot")
    return {**snapshots[snap_idx[-1]], "chosen_by": "last snapshot (no validation split)"}


def _weighted_row(optimize: int, weights: Tensor | None, test_mp: Tensor, test_y: Tensor, val_mp: Tensor | None,
                  val_y: Tensor | None, notes: list[str]) -> tuple[Tensor | None, dict[str, Any] | None]:
    """``(weights, row)`` of the weighted ensemble: fitted on validation (1), the saved ones (0), none (-1)."""
    n_members = test_mp.shape[0]
    if optimize == 1:
        if val_mp is None:
            notes.append("no validation split: ensemble weights not fitted")
            return None, None
        fitted = torch.as_tensor(weighting.fit_ensemble_weights(val_mp, val_y, method="nll"), dtype=torch.float64)
        return fitted, _row("ensemble, weights fitted on validation", weighting.weighted_average(test_mp, fitted),
                            test_y, weights=fitted.tolist(), source="fitted")
    if optimize == 0:
        if weights is None:
            raise ValueError("optimize=0 uses saved ensemble weights, but none were given")
        saved = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if saved.shape[0] != n_members or bool((saved < 0).any()) or not math.isclose(
                float(saved.sum()), 1.0, abs_tol=1e-6):
            raise ValueError(f"saved weights must be {n_members} non-negative numbers summing to 1, got "
                             f"{saved.tolist()}")
        return saved, _row("ensemble, saved weights", weighting.weighted_average(test_mp, saved), test_y,
                           weights=saved.tolist(), source="saved")
    notes.append("optimize=-1: equal weights only")
    return None, None


def _temperature_row(chosen: Tensor, base: str, test_mp: Tensor, test_y: Tensor, val_mp: Tensor | None,
                     val_y: Tensor | None, notes: list[str]) -> dict[str, Any] | None:
    """The ensemble with weights ``chosen`` and a temperature fitted on validation NLL (None without val).

    The temperature is kept at 1 unless cross-validation inside the validation split confirms the fit
    (:func:`snapens.weighting.fit_temperature_checked`); the row says why in ``temperature_reason``.
    """
    if val_mp is None:
        notes.append("no validation split: temperature not fitted")
        return None
    fit = weighting.fit_temperature_checked(weighting.weighted_average(val_mp, chosen), val_y, explain=notes)
    scaled = weighting.apply_temperature(weighting.weighted_average(test_mp, chosen), fit.temperature)
    return _row("ensemble + temperature", scaled, test_y, temperature=fit.temperature, base_weights=base,
                temperature_fitted=fit.fitted, temperature_reason=fit.reason, temperature_candidate=fit.candidate,
                temperature_cv_val_nll=fit.cv_nll)


def _diversity(test_mp: Tensor, names: list[str]) -> dict[str, Any]:
    disagreement = metrics.pairwise_disagreement(test_mp).to(torch.float64)
    correlation = metrics.pairwise_correlation(test_mp).to(torch.float64)
    return {
        "members": names,
        "disagreement": disagreement.tolist(),
        "correlation": correlation.tolist(),
        "mean_disagreement": _off_diagonal_mean(disagreement),
        "mean_correlation": _off_diagonal_mean(correlation),
    }


def recommended_label(choice: dict[str, Any]) -> str:
    """The recommended combination in words, e.g. ``"last m=2 snapshots, T=1.31"`` (``choice``: a stored
    recommendation, or the :data:`RECOMMENDED_ROW` entry)."""
    n, k = len(choice["weights"]), sum(1 for w in choice["weights"] if w > 0)
    what = {"equal": f"equal weights, M={n}", "fitted": f"fitted weights, {k} of {n} members",
            "last-m": "last snapshot" if k == 1 else f"last m={k} snapshots"}.get(choice["use"], choice["use"])
    return what + (f", T={_num(choice['temperature'], '.3f')}" if choice.get("temperature_fitted") else "")


def add_recommended(summary: dict[str, Any], choice: dict[str, Any], test_member_probs: Tensor,
                    test_labels: Tensor) -> dict[str, Any]:
    """Add the :data:`RECOMMENDED_ROW` entry to a :func:`summarize` dict, in place, and return it.

    ``choice``: ``weights`` (one per member, summing to 1; zeros are members not run), ``temperature`` and
    ``temperature_fitted``, ``use`` and ``reason`` (what ``snapens evaluate`` stores as recommended.json). The
    row's probabilities are ``softmax(log(sum_m w_m p_m) / T)`` (:func:`snapens.weighting.apply_temperature`;
    ``T`` only where ``temperature_fitted``) on the test split.
    """
    test_mp, test_y = _test_inputs(test_member_probs, test_labels)
    probs = weighting.weighted_average(test_mp, choice["weights"])
    if choice.get("temperature_fitted"):
        probs = weighting.apply_temperature(probs, choice["temperature"])
    summary[RECOMMENDED_ROW] = _row(
        f"ensemble, recommended ({recommended_label(choice)})", probs, test_y, weights=list(choice["weights"]),
        temperature=choice["temperature"] if choice.get("temperature_fitted") else 1.0,
        temperature_fitted=bool(choice.get("temperature_fitted")), use=choice["use"], reason=choice["reason"],
        members_run=sum(1 for w in choice["weights"] if w > 0))
    return summary


def add_prices(summary: dict[str, Any], *, single: dict[str, float], ensemble: dict[str, float],
               device: str, recommended: dict[str, float] | None = None) -> dict[str, Any]:
    """Add the price columns to a :func:`summarize` dict, in place, and return it.

    ``single`` and ``ensemble`` are :meth:`snapens.cost.InferenceCost.to_dict` of a one-member and of the
    evaluated ensemble's prediction pass: every member row, "single best" and "last snapshot" get ``single``
    (one network of the same architecture), the ensemble rows get ``ensemble`` (the temperature and the weights
    cost nothing measurable next to M forward passes), the :data:`RECOMMENDED_ROW` gets ``recommended`` (its own
    members only). ``summary["price"]`` records them and the device.
    """
    for row in summary["snapshots"]:
        row.update(single)
    for key in SINGLE_ROWS:
        summary[key].update(single)
    for key in ENSEMBLE_ROWS:
        if summary.get(key):
            summary[key].update(ensemble)
    summary["price"] = {"device": device, "single": dict(single), "ensemble": dict(ensemble)}
    if recommended is not None and summary.get(RECOMMENDED_ROW):
        summary[RECOMMENDED_ROW].update(recommended)
        summary["price"]["recommended"] = dict(recommended)
    return summary


def _num(value: float | None, spec: str) -> str:
    # None is how JSON stores a non-finite number (see json_safe).
    return format(float("nan") if value is None else value, spec)


def _table_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    # Members are labelled by name: with --last or --include-best, "snapshot k" would not be snapshot k.
    rows = [(r["name"] if r.get("snapshot", True) else f"{r['name']} (ensemble member)", r)
            for r in summary["snapshots"]]
    best = summary["single_best"]
    how = {"validation accuracy": ", by val accuracy", "best.safetensors": ""}.get(best["chosen_by"], ", no val split")
    rows.append((f"single best ({best['name']}{how})", best))
    rows.append((f"last snapshot ({summary['last_snapshot']['name']})", summary["last_snapshot"]))
    rows.append((f"ensemble, equal weights (M={summary['num_members']})", summary["ensemble_equal"]))
    if summary.get("ensemble_weighted"):
        rows.append((summary["ensemble_weighted"]["name"], summary["ensemble_weighted"]))
    if summary.get("ensemble_temperature"):
        t = summary["ensemble_temperature"]
        kept = "" if t.get("temperature_fitted", True) else " not fitted"
        rows.append((f"ensemble + temperature (T={_num(t['temperature'], '.3f')}{kept}, {t['base_weights']} weights)",
                     t))
    if summary.get(RECOMMENDED_ROW):
        rows.append((summary[RECOMMENDED_ROW]["name"], summary[RECOMMENDED_ROW]))
    return rows


def _you_get(row: dict[str, Any]) -> str:
    """The headline under the table: the row the user gets (from_run, export) and why."""
    passes = row.get("forward_passes", row.get("members_run"))
    price = "" if passes is None else f" ({_num(passes, '.0f')} pass{'' if passes == 1 else 'es'}/img)"
    return f"You get: {row['name']}{price} - {row['reason']}"


def _recommendation_lines(rec: dict[str, Any]) -> list[str]:
    """The recommendation's hint, the criterion it was chosen by and, where recorded, the combination itself.

    Summaries written before the recommendation carried its choice (no ``criterion``/``weights``) still render.
    """
    criterion = rec.get("criterion", "validation NLL")
    lines = [f"Recommendation (validation only, chosen by {criterion}): {rec['hint']}"]
    if rec.get("weights") is not None:
        passes = rec["forward_passes"]
        temperature = (f"T={_num(rec['temperature'], '.3f')}" if rec.get("temperature_fitted")
                       else "T=1 (not fitted)")
        lines.append("Recommended combination: weights " + ", ".join(_num(w, ".3f") for w in rec["weights"])
                     + f" ({passes} forward pass{'' if passes == 1 else 'es'} per image), {temperature}; "
                     f"{rec['reason']}")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """Render a :func:`summarize` dict as a fixed-width table, the ensemble-size curve and the diversity means.

    Accepts the dict as returned or as read back from JSON (non-finite numbers as ``None``, shown as ``nan``).
    """
    rows = _table_rows(summary)
    width = max(len(label) for label, _ in rows)
    columns = _METRIC_COLUMNS + (PRICE_COLUMNS if summary.get("price") else ())
    header = f"{'':<{width}}" + "".join(f"{title:>9}" for _, title, _ in columns)
    chosen = (f"choices made on {summary['num_val']} validation images" if summary["num_val"]
              else "no validation split")
    precision = (summary.get("run") or {}).get("precision")
    lines = [f"Test split: {summary['num_test']} images, {summary['num_classes']} classes, "
             f"{summary['num_members']} member{'' if summary['num_members'] == 1 else 's'} ({chosen})"
             + (f", precision {precision}" if precision else ""),
             header, "-" * len(header)]
    for label, row in rows:
        cells = "".join(" " + (_num(row[key], spec) if key in row else f"{'-':>8}") for key, _, spec in columns)
        lines.append(f"{label:<{width}}{cells}")
    if summary.get(RECOMMENDED_ROW):
        lines.append(_you_get(summary[RECOMMENDED_ROW]))
    curve = summary["ensemble_size_curve"]
    lines.append("")
    lines.append("Error % of the ensemble of the last m snapshots (equal weights):")
    lines.append("  " + "  ".join(f"m={m}: {_num(e, '.2f')}" for m, e in zip(curve["m"], curve["error"])))
    div = summary["diversity"]
    if div["mean_disagreement"] is not None:
        lines.append(f"Diversity (test, mean over member pairs): disagreement {_num(div['mean_disagreement'], '.4f')}"
                     f", correlation {_num(div['mean_correlation'], '.4f')}")
    weighted = summary.get("ensemble_weighted")
    if weighted:
        lines.append(f"Weights ({weighted['source']}): " + ", ".join(_num(w, ".3f") for w in weighted["weights"]))
    if summary.get("price"):
        lines.append(f"Price: forward passes per test image, and test images per second measured on "
                     f"{summary['price']['device']} (one warm-up batch, then one timed pass)")
    rec = summary.get("recommendation")
    if rec:
        lines.extend(_recommendation_lines(rec))
    for note in summary.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines)
