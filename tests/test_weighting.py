"""Ensemble weights and temperature: closed-form optima, KKT conditions, brute force and validation."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from snapens import metrics, weighting
from snapens.weighting import apply_temperature, fit_ensemble_weights, fit_temperature, weighted_average


def _random_members(seed: int, m: int = 5, n: int = 300, c: int = 10, scale: float = 2.0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = scale * torch.randn(m, n, c, generator=g, dtype=torch.float64)
    # members of different quality: member k gets a true-class boost of k
    logits[:, torch.arange(n), labels] += torch.arange(m, dtype=torch.float64).view(m, 1)
    return logits.softmax(dim=2), labels


def _true_class(member_probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return np.clip(member_probs[:, torch.arange(len(labels)), labels].numpy(), weighting.EPS, None)


def _objective(w: np.ndarray, p_true: np.ndarray) -> np.ndarray:
    """-(1/N) sum_n log(sum_m w_m P[m, n]) for one weight vector or a batch [G, M]."""
    return -np.log(w @ p_true).mean(axis=-1)


# Two members, two classes, closed-form optimum.
#   sample 0 (y=0): A = (0.9, 0.1), B = (0.3, 0.7)   -> true-class probs A 0.9, B 0.3
#   sample 1 (y=1): A = (0.9, 0.1), B = (0.4, 0.6)   -> true-class probs A 0.1, B 0.6
# f(w) = -1/2 [log(0.3 + 0.6 w) + log(0.6 - 0.5 w)] with w the weight of A;
# f'(w) = 0  <=>  0.6 (0.6 - 0.5 w) = 0.5 (0.3 + 0.6 w)  <=>  0.36 - 0.3 w = 0.15 + 0.3 w  <=>  w = 0.35.
TWO = np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.3, 0.7], [0.4, 0.6]]])
TWO_LABELS = np.array([0, 1])


def test_weighted_average_by_hand() -> None:
    w = [0.25, 0.75]
    # sample 0: 0.25 * (0.9, 0.1) + 0.75 * (0.3, 0.7) = (0.225 + 0.225, 0.025 + 0.525) = (0.45, 0.55)
    # sample 1: 0.25 * (0.9, 0.1) + 0.75 * (0.4, 0.6) = (0.225 + 0.3, 0.025 + 0.45) = (0.525, 0.475)
    expected = torch.tensor([[0.45, 0.55], [0.525, 0.475]], dtype=torch.float64)
    torch.testing.assert_close(weighted_average(TWO, w), expected)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, 0.4], "sum to 0.9"),
        ([1.5, -0.5], "-0.5"),
        ([1.0], r"2 weights.*\(1,\)"),
        ([float("nan"), 1.0], "nan"),
    ],
)
def test_weighted_average_rejects_bad_weights(weights: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(TWO, weights)


def test_equal_weights() -> None:
    w = fit_ensemble_weights(TWO, TWO_LABELS, method="equal")
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_nll_closed_form_interior_optimum_and_kkt() -> None:
    w = fit_ensemble_weights(TWO, TWO_LABELS, method="nll")
    assert w.dtype == torch.float64 and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(w.numpy(), [0.35, 0.65], atol=1e-5)
    # KKT: r_m = (1/N) sum_n P[m, n] / s_n = 1 for both (interior) members.
    # s = (0.3 + 0.21, 0.6 - 0.175) = (0.51, 0.425)
    # r_A = (0.9/0.51 + 0.1/0.425)/2 = (1.7647 + 0.2353)/2 = 1, r_B = (0.3/0.51 + 0.6/0.425)/2 = (0.5882 + 1.4118)/2 = 1
    p_true = _true_class(torch.from_numpy(TWO), torch.from_numpy(TWO_LABELS))
    r = p_true @ (1.0 / (w.numpy() @ p_true)) / 2
    np.testing.assert_allclose(r, [1.0, 1.0], atol=1e-5)


def test_nll_puts_all_weight_on_a_perfect_member() -> None:
    probs, labels = _random_members(0, m=4)
    probs[2] = torch.nn.functional.one_hot(labels, probs.shape[2]).double()
    # at w = e_2: r_m = mean_n P[m, n] / 1 < 1 for every other member, so e_2 satisfies KKT
    for method in ("nll", "greedy"):
        w = fit_ensemble_weights(probs, labels, method=method)
        assert float(w[2]) > 1 - 1e-6, (method, w)


def test_nll_matches_brute_force_grid_on_three_members() -> None:
    probs, labels = _random_members(3, m=3, n=200, c=5, scale=1.5)
    p_true = _true_class(probs, labels)
    step = 0.005
    grid = np.array([(i * step, j * step, 1 - (i + j) * step) for i, j in itertools.product(range(201), repeat=2)
                     if i + j <= 200])
    grid = np.clip(grid, 0.0, None)
    f_grid = _objective(grid, p_true)
    w = fit_ensemble_weights(probs, labels, method="nll").numpy()
    assert _objective(w, p_true) <= f_grid.min() + 1e-12
    # the optimum is unique here (strictly convex): the weights agree with the grid minimiser to its resolution
    np.testing.assert_allclose(w, grid[np.argmin(f_grid)], atol=2 * step)


@pytest.mark.parametrize("seed", range(6))
def test_nll_fit_satisfies_kkt_and_beats_equal_and_greedy(seed: int) -> None:
    probs, labels = _random_members(seed, m=3 + seed % 4)
    p_true = _true_class(probs, labels)
    w = fit_ensemble_weights(probs, labels, method="nll").numpy()
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
    r = p_true @ (1.0 / (w @ p_true)) / p_true.shape[1]
    support = w > 1e-6
    np.testing.assert_allclose(r[support], 1.0, atol=1e-5)  # stationarity on the support
    assert np.all(r[~support] <= 1 + 1e-6)  # no zero-weight member would help
    m = probs.shape[0]
    f_fit = metrics.nll(weighted_average(probs, torch.from_numpy(w)), labels)
    f_equal = metrics.nll(weighted_average(probs, torch.full((m,), 1 / m)), labels)
    w_greedy = fit_ensemble_weights(probs, labels, method="greedy")
    f_greedy = metrics.nll(weighted_average(probs, w_greedy), labels)
    f_single = min(metrics.nll(probs[k], labels) for k in range(m))
    assert f_fit <= f_equal + 1e-12
    assert f_fit <= f_greedy + 1e-9
    assert f_greedy <= f_single + 1e-12  # greedy's first round is the best single member


def test_greedy_by_hand() -> None:
    # true-class probs A = (0.9, 0.1), B = (0.3, 0.6); default rounds 2M = 4.
    # round 1: NLL(A) = -(ln .9 + ln .1)/2 = 1.2040, NLL(B) = -(ln .3 + ln .6)/2 = 0.8574 -> B
    # round 2: {B,A} avg (0.6, 0.35) -> 0.7803; {B,B} -> 0.8574 -> A
    # round 3: {B,A,A} avg (0.7, 0.2667) -> 0.8392; {B,A,B} avg (0.5, 0.4333) -> 0.7647 -> B
    # round 4: +A avg (0.6, 0.35) -> 0.7803; +B avg (0.45, 0.475) -> 0.7715; both > 0.7647 -> stop
    w = fit_ensemble_weights(TWO, TWO_LABELS, method="greedy")
    np.testing.assert_allclose(w.numpy(), [1 / 3, 2 / 3], atol=1e-12)
    # with one round it is the best single member
    np.testing.assert_allclose(fit_ensemble_weights(TWO, TWO_LABELS, "greedy", n_rounds=1).numpy(), [0.0, 1.0])


def test_nll_handles_zero_probabilities() -> None:
    # A: true-class prob 1, 1, 1, 0; B: 0.5 everywhere (two classes).
    # f(w) = -1/4 [3 log(0.5 + 0.5 w) + log(0.5 - 0.5 w)] (A's 0 is clipped to EPS, negligible)
    # f'(w) = 0 <=> 3 / (1 + w) = 1 / (1 - w) <=> w = 0.5
    a = np.array([[1.0, 0.0]] * 3 + [[1.0, 0.0]])
    b = np.full((4, 2), 0.5)
    labels = np.array([0, 0, 0, 1])
    w = fit_ensemble_weights(np.stack([a, b]).astype(np.float32), labels, method="nll")
    np.testing.assert_allclose(w.numpy(), [0.5, 0.5], atol=1e-5)


def test_single_member_gets_weight_one() -> None:
    for method in ("nll", "greedy", "equal"):
        torch.testing.assert_close(fit_ensemble_weights(TWO[:1], TWO_LABELS, method),
                                   torch.ones(1, dtype=torch.float64))


def test_fit_weights_validation() -> None:
    with pytest.raises(ValueError, match="method.*'softmax'"):
        fit_ensemble_weights(TWO, TWO_LABELS, method="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[M, N, C\].*\(2, 2\)"):
        fit_ensemble_weights(TWO[0], TWO_LABELS)
    with pytest.raises(ValueError, match=r"val_labels of shape \[2\].*\(3,\)"):
        fit_ensemble_weights(TWO, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"val_labels in \[0, 1\].*got 2"):
        fit_ensemble_weights(TWO, np.array([0, 2]))
    with pytest.raises(ValueError, match="n_rounds.*0"):
        fit_ensemble_weights(TWO, TWO_LABELS, method="greedy", n_rounds=0)
    with pytest.raises(ValueError, match="not logits"):
        fit_ensemble_weights(np.log(TWO), TWO_LABELS)


def test_apply_temperature_by_hand() -> None:
    p = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    # T = 2: softmax(log p / 2) = sqrt(p) / sum sqrt(p); sqrt(0.8) = 2 sqrt(0.2) -> (2/3, 1/3)
    torch.testing.assert_close(apply_temperature(p, 2.0), torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64))
    # T = 0.5: p^2 / sum p^2 = (0.64, 0.04) / 0.68
    torch.testing.assert_close(apply_temperature(p, 0.5), torch.tensor([[0.64, 0.04]], dtype=torch.float64) / 0.68)


def test_temperature_one_leaves_probs_unchanged() -> None:
    probs, _ = _random_members(1)
    torch.testing.assert_close(apply_temperature(probs[0], 1.0), probs[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("t0", [0.5, 2.0])
def test_fit_temperature_recovers_known_temperature(t0: float) -> None:
    # labels drawn from softmax(z); the model reports softmax(z * t0); dividing its log-probs by T = t0 restores z
    g = torch.Generator().manual_seed(7)
    z = 2.0 * torch.randn(20000, 10, generator=g, dtype=torch.float64)
    labels = torch.multinomial(z.softmax(dim=1), 1, generator=g).squeeze(1)
    probs = (z * t0).softmax(dim=1)
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(t0, rel=0.03)
    # and it is a minimum of the NLL of the tempered probabilities
    f = metrics.nll(apply_temperature(probs, t), labels)
    assert f <= metrics.nll(apply_temperature(probs, t * 1.02), labels)
    assert f <= metrics.nll(apply_temperature(probs, t / 1.02), labels)
    assert f < metrics.nll(probs, labels)


def test_temperature_validation(caplog: pytest.LogCaptureFixture) -> None:
    p = torch.tensor([[0.8, 0.2]])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature > 0"):
            apply_temperature(p, bad)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(p, torch.tensor([0]), bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"\[N, C\].*\(2, 2, 2\)"):
        fit_temperature(TWO, TWO_LABELS)



def _confident_digits_like(n: int = 144, n_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation probabilities as a well-trained digits ensemble gives them: every image right, mostly with
    p(true) > 0.99, a few less sure."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    logits = torch.randn(n, n_classes, generator=g, dtype=torch.float64)
    logits[torch.arange(n), labels] += 4.0 + 6.0 * torch.rand(n, generator=g, dtype=torch.float64)
    return logits.softmax(dim=1), labels


def test_temperature_is_kept_at_1_when_every_validation_prediction_is_right(caplog: pytest.LogCaptureFixture) -> None:
    probs, labels = _confident_digits_like()
    assert bool((probs.argmax(dim=1) == labels).all())  # 100 % validation accuracy
    reasons: list[str] = []
    with caplog.at_level(logging.INFO, logger="snapens.weighting"):
        t = fit_temperature(probs, labels, explain=reasons)
    # The NLL falls towards 0 as T -> 0: no minimum to find. The old fit returned a T of a few hundredths.
    assert metrics.nll(apply_temperature(probs, 0.05), labels) < metrics.nll(probs, labels)
    assert t == 1.0
    assert len(reasons) == 1 and "every one of the 144 validation predictions is correct" in reasons[0]
    assert "T=1 kept" in caplog.text
    # Without a list to explain to, the same answer.
    assert fit_temperature(probs, labels) == 1.0


def test_temperature_is_kept_at_1_when_the_minimum_is_outside_the_bounds() -> None:
    # labels drawn from softmax(z), the model reports softmax(z * 4): the NLL's minimum is at T = 4
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5000, 5, generator=g, dtype=torch.float64)
    labels = torch.multinomial(z.softmax(dim=1), 1, generator=g).squeeze(1)
    probs = (z * 4.0).softmax(dim=1)
    assert fit_temperature(probs, labels) == pytest.approx(4.0, rel=0.1)
    reasons: list[str] = []
    assert fit_temperature(probs, labels, bounds=(0.1, 2.0), explain=reasons) == 1.0
    assert len(reasons) == 1 and "no minimum inside the search bounds 0.1 <= T <= 2" in reasons[0]


def test_one_validation_mistake_is_enough_for_the_in_sample_fit() -> None:
    probs, labels = _confident_digits_like()
    labels = labels.clone()
    labels[0] = (labels[0] + 1) % 10  # one confident mistake
    reasons: list[str] = []
    t = fit_temperature(probs, labels, folds=None, explain=reasons)  # the in-sample fit
    assert reasons == [] and 0.01 < t < 100 and t != 1.0
    f = metrics.nll(apply_temperature(probs, t), labels)  # a true interior minimum
    assert f <= metrics.nll(apply_temperature(probs, t * 1.02), labels)
    assert f <= metrics.nll(apply_temperature(probs, t / 1.02), labels)


def test_fit_ensemble_weights_takes_val_member_probs_by_keyword():
    p = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.4, 0.6]]])
    y = torch.tensor([0, 1])
    assert weighting.fit_ensemble_weights(val_member_probs=p, val_labels=y).shape == (2,)


def test_prune_weights_drops_small_weights_and_renormalises():
    # 0.0005 < DROP_BELOW = 1e-3 is dropped; the rest, 0.5 and 0.4995, are divided by their sum 0.9995.
    w = weighting.prune_weights([0.5, 0.4995, 0.0005])
    assert w.dtype == torch.float64 and float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    assert w.tolist() == pytest.approx([0.5 / 0.9995, 0.4995 / 0.9995, 0.0])
    assert weighting.DROP_BELOW == 1e-3
    # exactly at the threshold is kept; threshold 0 only renormalises
    assert weighting.prune_weights([0.999, 0.001]).tolist() == pytest.approx([0.999, 0.001])
    assert weighting.prune_weights([0.2, 0.3, 0.5], 0.0).tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert weighting.prune_weights([0.2, 0.3, 0.5], 0.25).tolist() == pytest.approx([0.0, 0.375, 0.625])


def test_prune_weights_keeps_the_largest_when_all_are_below():
    assert weighting.prune_weights([0.3, 0.45, 0.25], 0.5).tolist() == [0.0, 1.0, 0.0]
    assert weighting.prune_weights([0.25] * 4, 0.5).tolist() == [0.0, 0.0, 0.0, 1.0]  # ties: the later member


@pytest.mark.parametrize(("weights", "threshold", "match"), [
    ([0.5, 0.6], 1e-3, "sum"), ([1.2, -0.2], 1e-3, "negative|>= 0"), ([0.5, 0.5], -1.0, "threshold"),
    ([0.5, 0.5], float("nan"), "threshold")])
def test_prune_weights_refuses_bad_input(weights: list, threshold: float, match: str):
    with pytest.raises(ValueError, match=match):
        weighting.prune_weights(weights, threshold)


def test_a_temperature_fitted_on_one_mistake_is_not_confirmed_by_cross_validation(
        caplog: pytest.LogCaptureFixture) -> None:
    # The digits SWA case (issue 20): confident validation predictions with one mistake. The in-sample fit finds
    # a T < 1, but the fold holding the mistake is scored by a fit on mistake-free folds (T at its lower bound),
    # so the held-out NLL is far above NLL(T=1) and T = 1 is kept.
    probs, labels = _confident_digits_like()
    labels = labels.clone()
    labels[0] = (labels[0] + 1) % 10
    in_sample = fit_temperature(probs, labels, folds=None)
    assert in_sample < 1.0
    reasons: list[str] = []
    with caplog.at_level(logging.INFO, logger="snapens.weighting"):
        fit = weighting.fit_temperature_checked(probs, labels, explain=reasons)
    assert fit.temperature == 1.0 and not fit.fitted and fit.candidate == pytest.approx(in_sample)
    assert fit.val_nll == pytest.approx(metrics.nll(probs, labels))
    # hand check of the held-out NLL: fold 0 (images 0, 5, 10, ...) holds the mistake; its T is the lower bound
    folds = torch.arange(144) % 5
    hand = 0.0
    for k in range(5):
        rest = folds != k
        t_k = 0.01 if k == 0 else fit_temperature(probs[rest], labels[rest], folds=None)
        hand += metrics.nll(apply_temperature(probs[folds == k], t_k), labels[folds == k]) * int((folds == k).sum())
    assert fit.cv_nll == pytest.approx(hand / 144, rel=1e-4) and fit.cv_nll > fit.val_nll
    assert len(reasons) == 1 and "does not lower the validation NLL under 5-fold cross-validation" in reasons[0]
    assert reasons[0].startswith("temperature not fitted, T=1 kept: ") and "T=1 kept" in caplog.text
    assert fit_temperature(probs, labels) == 1.0  # the default cross-validates


def test_a_temperature_confirmed_by_cross_validation_is_fitted() -> None:
    # 300 images of a model whose log-probs are twice too sharp (T0 = 0.5): every fold's fit finds ~0.5 and the
    # held-out NLL drops well below NLL(T=1).
    g = torch.Generator().manual_seed(7)
    z = 2.0 * torch.randn(300, 10, generator=g, dtype=torch.float64)
    labels = torch.multinomial(z.softmax(dim=1), 1, generator=g).squeeze(1)
    probs = (z * 0.5).softmax(dim=1)
    reasons: list[str] = []
    fit = weighting.fit_temperature_checked(probs, labels, explain=reasons)
    assert fit.fitted and reasons == [] and fit.reason is None
    assert fit.temperature == fit.candidate == pytest.approx(fit_temperature(probs, labels, folds=None))
    assert fit_temperature(probs, labels) == fit.temperature  # the default cross-validates too
    assert fit.temperature == pytest.approx(0.5, rel=0.1)
    assert fit.cv_nll < fit.val_nll
    assert fit.to_dict()["temperature"] == fit.temperature


def test_checked_temperature_keeps_1_on_too_few_images_and_refuses_bad_folds() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    fit = weighting.fit_temperature_checked(probs, labels)
    assert fit.temperature == 1.0 and fit.candidate is not None and fit.cv_nll is None
    assert "only 3 validation images" in fit.reason
    with pytest.raises(ValueError, match="folds"):
        weighting.fit_temperature_checked(probs, labels, folds=1)
