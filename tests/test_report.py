"""snapens.report: the summary's numbers against hand computations on tiny constructed probabilities."""

from __future__ import annotations

import json
import math

import pytest
import torch

from snapens import metrics, weighting
from snapens.report import format_summary, json_safe, summarize, to_json

# Three members, four test images, two classes. Labels are all class 0.
# Test: member 0 gets 2/4 right, member 1 gets 4/4 right, member 2 gets 3/4 right.
TEST_PROBS = torch.tensor(
    [
        [[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]],
        [[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]],
        [[0.2, 0.8], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4]],
    ],
    dtype=torch.float64,
)
TEST_Y = torch.tensor([0, 0, 0, 0])
# Validation: member 0 is the best (3/3), member 1 the worst (1/3), member 2 gets 2/3.
VAL_PROBS = torch.tensor(
    [
        [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]],
        [[0.6, 0.4], [0.6, 0.4], [0.3, 0.7]],
        [[0.8, 0.2], [0.4, 0.6], [0.4, 0.6]],
    ],
    dtype=torch.float64,
)
VAL_Y = torch.tensor([0, 1, 0])
NAMES = ["snapshot-01", "snapshot-02", "snapshot-03"]


def _hand_error(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * sum(int(p.argmax()) != int(y) for p, y in zip(probs, labels)) / len(labels)


def _hand_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return -sum(math.log(float(p[y])) for p, y in zip(probs, labels)) / len(labels)


def _summary(**kw):
    args = dict(member_names=NAMES, optimize=1)
    args.update(kw)
    return summarize(VAL_PROBS, VAL_Y, TEST_PROBS, TEST_Y, **args)


def test_snapshot_rows_match_hand_computation():
    s = _summary()
    assert [r["name"] for r in s["snapshots"]] == NAMES
    for m, row in enumerate(s["snapshots"]):
        assert row["error"] == pytest.approx(_hand_error(TEST_PROBS[m], TEST_Y))
        assert row["nll"] == pytest.approx(_hand_nll(TEST_PROBS[m], TEST_Y), rel=1e-5)
    assert [r["error"] for r in s["snapshots"]] == pytest.approx([50.0, 0.0, 25.0])
    assert [r["val_accuracy"] for r in s["snapshots"]] == pytest.approx([1.0, 1 / 3, 2 / 3])
    assert s["last_snapshot"]["name"] == "snapshot-03"
    assert s["last_snapshot"]["error"] == pytest.approx(25.0)


def test_equal_ensemble_is_the_hand_average_of_member_probs():
    s = _summary()
    avg = TEST_PROBS.mean(0)
    # Hand average: image 1 -> [0.6667, 0.3333] right; image 0 [0.633, 0.367] right; all four right here.
    assert s["ensemble_equal"]["error"] == pytest.approx(_hand_error(avg, TEST_Y))
    assert s["ensemble_equal"]["nll"] == pytest.approx(_hand_nll(avg, TEST_Y), rel=1e-5)
    assert s["ensemble_equal"]["brier"] == pytest.approx(float(metrics.brier(avg, TEST_Y)), rel=1e-5)
    assert s["ensemble_equal"]["ece"] == pytest.approx(float(metrics.ece(avg, TEST_Y)), rel=1e-5, abs=1e-9)
    assert s["ensemble_equal"]["weights"] == pytest.approx([1 / 3] * 3)


def test_single_best_is_chosen_on_validation_not_test():
    s = _summary()
    # On test member 1 is best (0 %), but on validation member 0 is: the summary must not peek at test labels.
    assert s["single_best"]["name"] == "snapshot-01"
    assert s["single_best"]["chosen_by"] == "validation accuracy"
    assert s["single_best"]["error"] == pytest.approx(50.0)


def test_single_best_uses_best_checkpoint_when_given():
    best = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    s = _summary(best_test_probs=best, best_val_acc=0.9)
    assert s["single_best"]["name"] == "best.safetensors"
    assert s["single_best"]["error"] == pytest.approx(25.0)
    assert s["single_best"]["nll"] == pytest.approx(_hand_nll(best, TEST_Y), rel=1e-5)
    assert s["single_best"]["val_accuracy"] == pytest.approx(0.9)


def test_ensemble_size_curve_uses_last_m_members():
    s = _summary()
    curve = s["ensemble_size_curve"]
    assert curve["m"] == [1, 2, 3]
    expected = [_hand_error(TEST_PROBS[3 - m:].mean(0), TEST_Y) for m in (1, 2, 3)]
    assert curve["error"] == pytest.approx(expected)
    assert curve["error"][0] == pytest.approx(25.0)  # the last snapshot alone


def test_diversity_matrices_and_means():
    s = _summary()
    dis = torch.tensor(s["diversity"]["disagreement"])
    assert dis.shape == (3, 3)
    preds = TEST_PROBS.argmax(-1)
    for i in range(3):
        for j in range(3):
            assert float(dis[i, j]) == pytest.approx(float((preds[i] != preds[j]).double().mean()))
    off = [float(dis[i, j]) for i in range(3) for j in range(3) if i != j]
    assert s["diversity"]["mean_disagreement"] == pytest.approx(sum(off) / len(off))
    corr = torch.tensor(s["diversity"]["correlation"])
    assert torch.allclose(corr, corr.T)
    assert s["diversity"]["mean_correlation"] is not None


def test_optimize_1_fits_weights_on_validation():
    # Member 0 is confidently right on every validation image, the others confidently wrong: the NLL fit must
    # put (nearly) all the weight on member 0.
    val = torch.tensor(
        [
            [[0.95, 0.05], [0.05, 0.95], [0.95, 0.05]],
            [[0.1, 0.9], [0.9, 0.1], [0.1, 0.9]],
            [[0.2, 0.8], [0.8, 0.2], [0.2, 0.8]],
        ],
        dtype=torch.float64,
    )
    s = summarize(val, VAL_Y, TEST_PROBS, TEST_Y, member_names=NAMES, optimize=1)
    row = s["ensemble_weighted"]
    assert row["source"] == "fitted"
    w = torch.tensor(row["weights"])
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[0]) > 0.95
    hand = (w.view(3, 1, 1).double() * TEST_PROBS).sum(0)
    assert row["error"] == pytest.approx(_hand_error(hand, TEST_Y))
    assert row["nll"] == pytest.approx(_hand_nll(hand, TEST_Y), rel=1e-4)
    assert s["ensemble_temperature"]["base_weights"] == "fitted"


def test_optimize_0_uses_saved_weights_and_requires_them():
    weights = torch.tensor([0.0, 0.25, 0.75])
    s = _summary(optimize=0, weights=weights)
    row = s["ensemble_weighted"]
    assert row["source"] == "saved"
    assert row["weights"] == pytest.approx([0.0, 0.25, 0.75])
    hand = 0.25 * TEST_PROBS[1] + 0.75 * TEST_PROBS[2]
    assert row["nll"] == pytest.approx(_hand_nll(hand, TEST_Y), rel=1e-5)
    with pytest.raises(ValueError, match="saved ensemble weights"):
        _summary(optimize=0)
    with pytest.raises(ValueError, match="summing to 1"):
        _summary(optimize=0, weights=torch.tensor([0.5, 0.5, 0.5]))


def test_optimize_minus_1_is_equal_weights_only():
    s = _summary(optimize=-1)
    assert s["ensemble_weighted"] is None
    assert s["ensemble_temperature"]["base_weights"] == "equal"
    # Temperature scaling keeps the argmax: the error equals the equal-weight ensemble's.
    assert s["ensemble_temperature"]["error"] == pytest.approx(s["ensemble_equal"]["error"])
    t = s["ensemble_temperature"]["temperature"]
    scaled = torch.softmax(torch.log(TEST_PROBS.mean(0)) / t, dim=-1)
    assert s["ensemble_temperature"]["nll"] == pytest.approx(_hand_nll(scaled, TEST_Y), rel=1e-4)


def test_without_validation_split():
    s = summarize(None, None, TEST_PROBS, TEST_Y, member_names=NAMES, optimize=1)
    assert s["num_val"] == 0
    assert s["ensemble_weighted"] is None and s["ensemble_temperature"] is None
    assert s["single_best"]["name"] == "snapshot-03"
    assert any("no validation split" in n for n in s["notes"])
    assert "single best (snapshot-03, no val split)" in format_summary(s)


def test_single_member():
    s = summarize(VAL_PROBS[:1], VAL_Y, TEST_PROBS[:1], TEST_Y, member_names=NAMES[:1], optimize=1)
    assert s["ensemble_equal"]["error"] == pytest.approx(s["snapshots"][0]["error"]) == pytest.approx(50.0)
    assert s["ensemble_weighted"]["weights"] == pytest.approx([1.0])
    assert s["ensemble_size_curve"]["error"] == pytest.approx([50.0])
    assert s["diversity"]["mean_disagreement"] is None and s["diversity"]["mean_correlation"] is None
    assert "Diversity" not in format_summary(s)


def test_summary_is_json_serialisable_and_formatted():
    s = _summary()
    again = json.loads(json.dumps(s))
    assert again["format_version"] == 1
    assert again["ensemble_equal"]["error"] == pytest.approx(s["ensemble_equal"]["error"])
    text = format_summary(s)
    for label in ("snapshot-01 ", "single best (snapshot-01, by val accuracy)",
                  "last snapshot (snapshot-03)", "ensemble, equal weights (M=3)",
                  "ensemble, weights fitted on validation", "ensemble + temperature", "m=3:", "disagreement"):
        assert label in text
    ens_line = next(line for line in text.splitlines() if line.startswith("ensemble, equal weights"))
    assert f"{s['ensemble_equal']['error']:.2f}" in ens_line
    assert f"{s['ensemble_equal']['nll']:.4f}" in ens_line


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="optimize"):
        _summary(optimize=2)
    with pytest.raises(ValueError, match="member_names"):
        summarize(VAL_PROBS, VAL_Y, TEST_PROBS, TEST_Y, member_names=NAMES[:2])
    with pytest.raises(ValueError, match="test_labels"):
        summarize(VAL_PROBS, VAL_Y, TEST_PROBS, TEST_Y[:3], member_names=NAMES)
    with pytest.raises(ValueError, match="val_member_probs"):
        summarize(VAL_PROBS[:2], VAL_Y, TEST_PROBS, TEST_Y, member_names=NAMES)


def test_extra_member_is_not_a_snapshot_in_the_curve_or_the_labels():
    # Member 0 plays best.safetensors (not a snapshot); members 1 and 2 are the snapshots in training order.
    names = ["best", "snapshot-01", "snapshot-02"]
    s = _summary(member_names=names, is_snapshot=[False, True, True], best_test_probs=TEST_PROBS[0])
    curve = s["ensemble_size_curve"]
    assert curve["m"] == [1, 2] and curve["members"] == ["snapshot-01", "snapshot-02"]
    # last 1 = member 2 alone (3/4 right: 25 %); last 2 = members 1 and 2 averaged (all right: 0 %).
    assert curve["error"] == pytest.approx([25.0, 0.0])
    assert curve["error"] == pytest.approx([_hand_error(TEST_PROBS[3 - m:].mean(0), TEST_Y) for m in (1, 2)])
    assert [r["snapshot"] for r in s["snapshots"]] == [False, True, True]
    assert s["last_snapshot"]["name"] == "snapshot-02"
    # The equal-weight ensemble still has all three members; diversity is labelled by member name.
    assert s["ensemble_equal"]["error"] == pytest.approx(_hand_error(TEST_PROBS.mean(0), TEST_Y))
    assert s["diversity"]["members"] == names and len(s["diversity"]["correlation"]) == 3
    text = format_summary(s)
    assert "best (ensemble member)" in text and "snapshot 1" not in text
    assert "m=1: 25.00  m=2: 0.00" in text


def test_is_snapshot_is_checked():
    with pytest.raises(ValueError, match="is_snapshot"):
        _summary(is_snapshot=[True, True])
    with pytest.raises(ValueError, match="is_snapshot"):
        _summary(is_snapshot=[False, False, False])


def _strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_in_strict_json():
    s = _summary()
    s["snapshots"][1]["nll"] = float("nan")
    s["ensemble_equal"]["brier"] = float("inf")
    s["diversity"]["correlation"][0][1] = float("-inf")
    with pytest.raises(ValueError, match="NaN"):
        _strict_loads(json.dumps(s))  # what a bare json.dumps writes is not JSON
    again = _strict_loads(to_json(s))
    assert again["snapshots"][1]["nll"] is None and again["ensemble_equal"]["brier"] is None
    assert again["diversity"]["correlation"][0][1] is None
    assert again["snapshots"][1]["error"] == pytest.approx(s["snapshots"][1]["error"])
    assert again == json_safe(s)
    assert json_safe({"a": (1.0, float("nan")), "b": "nan", "c": 3}) == {"a": [1.0, None], "b": "nan", "c": 3}
    # The table renders a summary read back from JSON: None shows as nan.
    line = next(line for line in format_summary(again).splitlines() if line.startswith("snapshot-02"))
    assert line.split()[1:3] == [f"{s['snapshots'][1]['error']:.2f}", "nan"]


def test_to_json_rejects_what_json_cannot_hold():
    with pytest.raises(ValueError, match="cannot write"):
        to_json({"x": object()})


def test_temperature_not_identifiable_on_validation_is_kept_at_1_and_said():
    # Two members, both right on every validation image with confident probabilities (a digits run): the
    # validation NLL cannot identify a temperature, so the report keeps T = 1 and says why.
    g = torch.Generator().manual_seed(5)
    val_y, test_y = torch.arange(60) % 3, torch.arange(30) % 3

    def members(labels: torch.Tensor, boost: float) -> torch.Tensor:
        logits = torch.randn(2, labels.shape[0], 3, generator=g, dtype=torch.float64)
        logits[:, torch.arange(labels.shape[0]), labels] += boost
        return logits.softmax(dim=-1)

    val_mp, test_mp = members(val_y, 8.0), members(test_y, 1.0)
    test_y = test_y.clone()
    test_y[0] = 1 - test_y[0] if test_y[0] < 2 else 0  # the test split has a mistake the validation split lacks
    summary = summarize(val_mp, val_y, test_mp, test_y, member_names=["snapshot-01", "snapshot-02"])
    row = summary["ensemble_temperature"]
    assert row["temperature"] == 1.0 and row["temperature_fitted"] is False
    equal_like = summary["ensemble_weighted"]
    assert row["nll"] == pytest.approx(equal_like["nll"], rel=1e-9)  # T = 1 leaves the probabilities alone
    assert any("temperature not fitted, T=1 kept: every one of the 60 validation predictions is correct" in n
               for n in summary["notes"])
    text = format_summary(summary)
    assert "ensemble + temperature (T=1.000 not fitted, fitted weights)" in text
    assert "Note: temperature not fitted, T=1 kept" in text


def _sharp_members(labels: torch.Tensor, seed: int, boost: float, sharpen: float = 1.0) -> torch.Tensor:
    """Two members' softmax of random 10-class logits with a true-class boost, multiplied by ``sharpen``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, labels.shape[0], 10, generator=g, dtype=torch.float64)
    logits[:, torch.arange(labels.shape[0]), labels] += boost
    return (logits * sharpen).softmax(dim=-1)


def test_temperature_fitted_to_one_validation_mistake_is_kept_at_1_by_cross_validation():
    # Issue 20: a digits-like validation split of 144 confident predictions with one mistake. The in-sample fit
    # gives a sharp T < 1, but the fold holding the mistake, scored with a T fitted on mistake-free folds, makes
    # the held-out NLL worse than T = 1: T = 1 is kept and said.
    val_y, test_y = torch.arange(144) % 10, torch.arange(50) % 10
    wrong = val_y.clone()
    wrong[0] = 1  # image 0 (class 0): both members put class 1 just above the true class
    val_mp, test_mp = _sharp_members(wrong, 1, 8.0), _sharp_members(test_y, 2, 3.0)
    val_mp[:, 0] = torch.tensor([0.45, 0.55] + [0.0] * 8, dtype=torch.float64)
    ensemble = val_mp.mean(0)
    assert int((ensemble.argmax(1) != val_y).sum()) == 1
    in_sample = weighting.fit_temperature(ensemble, val_y, folds=None)
    assert in_sample < 1.0
    s = summarize(val_mp, val_y, test_mp, test_y, member_names=["snapshot-01", "snapshot-02"], optimize=-1)
    row = s["ensemble_temperature"]
    assert row["temperature"] == 1.0 and row["temperature_fitted"] is False
    assert row["temperature_candidate"] == pytest.approx(in_sample)
    assert "does not lower the validation NLL under 5-fold cross-validation" in row["temperature_reason"]
    assert row["temperature_cv_val_nll"] > metrics.nll(ensemble, val_y)
    assert row["nll"] == pytest.approx(s["ensemble_equal"]["nll"], rel=1e-9)  # T = 1 leaves the probabilities
    assert any(n.startswith("temperature not fitted, T=1 kept: the fitted T=") for n in s["notes"])
    assert "ensemble + temperature (T=1.000 not fitted, equal weights)" in format_summary(s)


def test_temperature_confirmed_by_cross_validation_is_fitted():
    # 300 validation images from members whose log-probabilities are twice too sharp: cross-validation confirms.
    g = torch.Generator().manual_seed(4)
    z = 2.0 * torch.randn(300, 10, generator=g, dtype=torch.float64)
    val_y = torch.multinomial(z.softmax(dim=1), 1, generator=g).squeeze(1)
    val_mp = torch.stack([(z * 2.0).softmax(1), (z * 2.0 + 0.1).softmax(1)])
    test_y = torch.arange(20) % 10
    s = summarize(val_mp, val_y, _sharp_members(test_y, 3, 1.0), test_y, member_names=["a", "b"], optimize=-1)
    row = s["ensemble_temperature"]
    assert row["temperature_fitted"] is True and row["temperature_reason"] is None
    assert row["temperature"] == pytest.approx(weighting.fit_temperature(val_mp.mean(0), val_y))
    assert row["temperature"] == row["temperature_candidate"] == pytest.approx(2.0, rel=0.15)
    assert row["temperature_cv_val_nll"] < metrics.nll(val_mp.mean(0), val_y)
    assert not any("temperature" in n for n in s["notes"])


def test_the_recommendation_lines_state_the_criterion_and_the_combination():
    from snapens.guidance import recommend

    s = _summary()
    a = torch.tensor([0.9] * 20 + [0.55] * 20, dtype=torch.float64)
    probs = torch.stack([torch.stack([a, 1 - a], -1), torch.stack([a.flip(0), 1 - a.flip(0)], -1)])
    s["recommendation"] = json.loads(to_json(recommend(probs, torch.zeros(40, dtype=torch.long)).to_dict()))
    lines = format_summary(s).splitlines()
    rec_line = next(line for line in lines if line.startswith("Recommendation"))
    assert rec_line.startswith("Recommendation (validation only, chosen by validation NLL (5-fold cross-validated")
    assert "by validation NLL" in rec_line.split("): ", 1)[1]
    assert any(line.startswith("Recommended combination: weights 0.000, 1.000 (1 forward pass per image), "
                               "T=1 (not fitted); validation NLL") for line in lines)
    # a summary.json written before the choice was recorded still renders
    s["recommendation"] = {"hint": "old hint"}
    assert "Recommendation (validation only, chosen by validation NLL): old hint" in format_summary(s)
