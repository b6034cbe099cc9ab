"""Metrics against hand computations on tiny examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snapens import metrics
from snapens.weighting import weighted_average

# Four samples, three classes; every confidence (row max) lies inside its own 15-bin ECE bin.
PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # label 0: argmax 0, right; conf 0.70 -> bin 10 = (10/15, 11/15]
        [0.15, 0.55, 0.30],  # label 2: argmax 1, wrong; conf 0.55 -> bin 8 = (8/15, 9/15]
        [0.30, 0.25, 0.45],  # label 2: argmax 2, right; conf 0.45 -> bin 6 = (6/15, 7/15]
        [0.50, 0.40, 0.10],  # label 1: argmax 0, wrong; conf 0.50 -> bin 7 = (7/15, 8/15]
    ],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 2, 2, 1])


def test_accuracy_and_error_rate_by_hand() -> None:
    # right, wrong, right, wrong
    assert metrics.accuracy(PROBS, LABELS) == pytest.approx(2 / 4)
    assert metrics.error_rate(PROBS, LABELS) == pytest.approx(50.0)


def test_nll_by_hand() -> None:
    # true-class probabilities: 0.7, 0.3, 0.45, 0.4
    expected = -(math.log(0.7) + math.log(0.3) + math.log(0.45) + math.log(0.4)) / 4  # = 0.8679...
    assert metrics.nll(PROBS, LABELS) == pytest.approx(expected, abs=1e-12)


def test_nll_clips_zero_probability() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # sample 0: -log(max(0, 1e-12)) = 27.631...; sample 1: -log(0.5)
    expected = (-math.log(metrics.EPS) - math.log(0.5)) / 2
    assert metrics.nll(probs, torch.tensor([1, 0])) == pytest.approx(expected, rel=1e-6)


def test_brier_by_hand() -> None:
    # sample 0 (y=0): 0.3^2 + 0.2^2 + 0.1^2 = 0.09 + 0.04 + 0.01 = 0.14
    # sample 1 (y=2): 0.15^2 + 0.55^2 + 0.7^2 = 0.0225 + 0.3025 + 0.49 = 0.815
    # sample 2 (y=2): 0.3^2 + 0.25^2 + 0.55^2 = 0.09 + 0.0625 + 0.3025 = 0.455
    # sample 3 (y=1): 0.5^2 + 0.6^2 + 0.1^2 = 0.25 + 0.36 + 0.01 = 0.62
    assert metrics.brier(PROBS, LABELS) == pytest.approx((0.14 + 0.815 + 0.455 + 0.62) / 4, abs=1e-12)


def test_ece_by_hand_one_sample_per_bin() -> None:
    # four non-empty bins with one sample each: |acc - conf| = |1-0.7|, |0-0.55|, |1-0.45|, |0-0.5|
    expected = (0.3 + 0.55 + 0.55 + 0.5) / 4  # = 0.475
    assert metrics.ece(PROBS, LABELS) == pytest.approx(expected, abs=1e-12)
    # one bin: |acc - mean conf| = |0.5 - (0.7 + 0.55 + 0.45 + 0.5) / 4| = |0.5 - 0.55| = 0.05
    assert metrics.ece(PROBS, LABELS, n_bins=1) == pytest.approx(0.05, abs=1e-12)


def test_ece_edges_go_to_the_lower_bin() -> None:
    # n_bins=4: bins [0, .25], (.25, .5], (.5, .75], (.75, 1]; all edges exact in binary.
    probs = torch.tensor(
        [
            [0.50, 0.50, 0.00, 0.00],  # y=1, argmax 0 (tie -> lowest index): wrong, conf 0.50 on an edge -> bin 1
            [0.30, 0.25, 0.25, 0.20],  # y=0 right, conf 0.30 -> bin 1
            [0.10, 0.90, 0.00, 0.00],  # y=1 right, conf 0.90 -> bin 3
            [0.80, 0.10, 0.10, 0.00],  # y=2 wrong, conf 0.80 -> bin 3
            [0.75, 0.25, 0.00, 0.00],  # y=0 right, conf 0.75 on an edge -> bin 2
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([1, 0, 1, 2, 0])
    # bin 1: 2 samples, acc 1/2, conf (0.5 + 0.3)/2 = 0.4  -> 2/5 * 0.1  = 0.04
    # bin 2: 1 sample,  acc 1,   conf 0.75               -> 1/5 * 0.25 = 0.05
    # bin 3: 2 samples, acc 1/2, conf (0.9 + 0.8)/2 = 0.85 -> 2/5 * 0.35 = 0.14
    # (edges to the upper bin instead would give 0.14 + 0.05 + 0.14 = 0.33 or 0.04 + 0.09 = 0.13)
    assert metrics.ece(probs, labels, n_bins=4) == pytest.approx(0.23, abs=1e-12)


def test_ece_zero_when_calibrated() -> None:
    # conf 0.75 everywhere and 3 of 4 right -> acc 0.75 in the single non-empty bin
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert metrics.ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_top_k_accuracy_by_hand() -> None:
    # label ranks: sample 0 -> 0, sample 1 (p_y=0.3) -> 1, sample 2 -> 0, sample 3 (p_y=0.4) -> 1
    assert metrics.top_k_accuracy(PROBS, LABELS, 1) == pytest.approx(0.5)
    assert metrics.top_k_accuracy(PROBS, LABELS, 2) == pytest.approx(1.0)
    assert metrics.top_k_accuracy(PROBS, LABELS, 3) == pytest.approx(1.0)


def test_top_k_ties_match_argmax() -> None:
    probs = torch.tensor([[0.4, 0.4, 0.2]] * 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # argmax is class 0 (tie -> lowest index): samples 0, 1 right, sample 2 wrong -> 2/3;
    # label 1 has rank 1 (tied with class 0, which comes first), so top-2 gets all three
    assert metrics.top_k_accuracy(probs, labels, 1) == metrics.accuracy(probs, labels) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(probs, labels, 2) == pytest.approx(1.0)


def test_evaluate_probs_keys_and_values() -> None:
    out = metrics.evaluate_probs(PROBS, LABELS)
    assert set(out) == {"error", "nll", "brier", "ece"}  # C = 3 < 5: no top-5
    assert out["error"] == pytest.approx(50.0)
    assert out["brier"] == pytest.approx(0.5075, abs=1e-12)
    assert out["ece"] == pytest.approx(0.475, abs=1e-12)

    # C = 5: label ranks 4 and 0 -> top-5 covers everything (0 % error), top-1 error 50 %
    probs5 = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1], [0.3, 0.2, 0.2, 0.2, 0.1]])
    out5 = metrics.evaluate_probs(probs5, np.array([4, 0], dtype=np.int32))
    assert out5["error"] == pytest.approx(50.0)
    assert out5["top5_error"] == pytest.approx(0.0)


def test_numpy_and_float32_inputs_agree() -> None:
    p32 = PROBS.float().numpy()
    assert metrics.nll(p32, LABELS.numpy()) == pytest.approx(metrics.nll(PROBS, LABELS), rel=1e-6)
    assert metrics.brier(p32, LABELS.numpy()) == pytest.approx(metrics.brier(PROBS, LABELS), rel=1e-6)


# Three members, two samples, two classes, labels [0, 0] (members in snapshot order).
MEMBERS = torch.tensor(
    [
        [[1.0, 0.0], [0.9, 0.1]],  # member 0: predicts 0, 0
        [[0.2, 0.8], [0.8, 0.2]],  # member 1: predicts 1, 0
        [[0.4, 0.6], [0.3, 0.7]],  # member 2: predicts 1, 1
    ],
    dtype=torch.float64,
)
MEMBER_LABELS = torch.tensor([0, 0])


def test_ensemble_size_curve_uses_last_members() -> None:
    # m=1: member 2 -> both wrong -> 100 %
    # m=2: members 1, 2: class-0 prob (0.2+0.4)/2 = 0.3 (wrong), (0.8+0.3)/2 = 0.55 (right) -> 50 %
    # m=3: (1.0+0.2+0.4)/3 = 0.533 (right), (0.9+0.8+0.3)/3 = 0.667 (right) -> 0 %
    # (the FIRST m members would give 0, 50, 0)
    assert metrics.ensemble_size_curve(MEMBERS, MEMBER_LABELS) == pytest.approx([100.0, 50.0, 0.0])


def test_ensemble_size_curve_with_weights() -> None:
    # weights (0.1, 0.1, 0.8): m=2 renormalises (0.1, 0.8)/0.9 on members 1, 2:
    #   sample 0: (0.1*0.2 + 0.8*0.4)/0.9 = 0.378 wrong; sample 1: (0.1*0.8 + 0.8*0.3)/0.9 = 0.356 wrong
    # m=3: 0.1*1.0 + 0.1*0.2 + 0.8*0.4 = 0.44 wrong; 0.09 + 0.08 + 0.24 = 0.41 wrong
    assert metrics.ensemble_size_curve(MEMBERS, MEMBER_LABELS, [0.1, 0.1, 0.8]) == pytest.approx([100.0] * 3)
    # weights (0.5, 0.5, 0): m=1 has zero total weight -> nan; m=2 is member 1 alone -> 50 %; m=3 -> 0 %
    curve = metrics.ensemble_size_curve(MEMBERS, MEMBER_LABELS, torch.tensor([0.5, 0.5, 0.0]))
    assert math.isnan(curve[0]) and curve[1:] == pytest.approx([50.0, 0.0])
    # the full-size entry equals the error of the weighted average
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    full = metrics.ensemble_size_curve(MEMBERS, MEMBER_LABELS, w)[-1]
    assert full == pytest.approx(metrics.error_rate(weighted_average(MEMBERS, w), MEMBER_LABELS))


def test_pairwise_disagreement_by_hand() -> None:
    # predictions: member 0 -> (0, 0), member 1 -> (1, 0), member 2 -> (1, 1)
    expected = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(metrics.pairwise_disagreement(MEMBERS), expected)


def test_pairwise_correlation_by_hand() -> None:
    # flattened outputs (mean 1/C = 0.5 each), centred:
    # d0 = (0.5, -0.5, 0.4, -0.4), d1 = (-0.3, 0.3, 0.3, -0.3), d2 = (-0.1, 0.1, -0.2, 0.2)
    # |d0|^2 = 0.82, |d1|^2 = 0.36, |d2|^2 = 0.10; d0.d1 = -0.06, d0.d2 = -0.26, d1.d2 = -0.06
    r01 = -0.06 / math.sqrt(0.82 * 0.36)  # -0.1104
    r02 = -0.26 / math.sqrt(0.82 * 0.10)  # -0.9080
    r12 = -0.06 / math.sqrt(0.36 * 0.10)  # -0.3162
    expected = torch.tensor([[1.0, r01, r02], [r01, 1.0, r12], [r02, r12, 1.0]], dtype=torch.float64)
    got = metrics.pairwise_correlation(MEMBERS)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, torch.from_numpy(np.corrcoef(MEMBERS.reshape(3, -1).numpy())))


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (PROBS, LABELS[:3], r"labels of shape \[4\].*\(3,\)"),
        (PROBS, torch.tensor([0, 2, 3, 1]), r"labels in \[0, 2\].*got 3"),
        (PROBS, torch.tensor([0, -1, 2, 1]), r"got -1"),
        (PROBS, LABELS.float(), "integer labels"),
        (PROBS[0], LABELS, r"shape \[N, C\].*\(3,\)"),
        (torch.log(PROBS), LABELS, "not logits"),
        (PROBS * 2, LABELS, "sum to 1"),
        (torch.full((4, 3), float("nan")), LABELS, "finite"),
    ],
)
def test_bad_inputs_raise(probs: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metrics.evaluate_probs(probs, labels)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="k in \\[1, 3\\].*4"):
        metrics.top_k_accuracy(PROBS, LABELS, 4)
    with pytest.raises(ValueError, match="n_bins.*0"):
        metrics.ece(PROBS, LABELS, n_bins=0)
    with pytest.raises(ValueError, match=r"3 weights.*\(2,\)"):
        metrics.ensemble_size_curve(MEMBERS, MEMBER_LABELS, [0.5, 0.5])
    with pytest.raises(ValueError, match="-0.5"):
        metrics.ensemble_size_curve(MEMBERS, MEMBER_LABELS, [1.0, 0.5, -0.5])
    with pytest.raises(ValueError, match=r"\[M, N, C\].*\(3, 4\)"):
        metrics.pairwise_disagreement(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"labels of shape \[2\]"):
        metrics.ensemble_size_curve(MEMBERS, torch.tensor([0, 0, 0]))
