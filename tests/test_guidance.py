"""snapens.guidance: the recommendation from validation data, against hand-built member probabilities."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from snapens import guidance, metrics
from snapens.guidance import recommend


def _probs(correct_prob: list[float], n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class members that give the true class (label 0) probability ``correct_prob[m]`` on every image."""
    p = torch.tensor(correct_prob, dtype=torch.float64).view(-1, 1).expand(-1, n)
    return torch.stack([p, 1 - p], dim=-1).clone(), torch.zeros(n, dtype=torch.long)


def test_weak_early_snapshots_make_equal_weights_worse_than_the_best_member() -> None:
    # Snapshot 1 is wrong everywhere (0.3 on the truth), the last two are right (0.8, 0.9).
    probs, y = _probs([0.3, 0.8, 0.9])
    rec = recommend(probs, y)
    # equal: mean 0.6667 -> NLL -log(2/3) = 0.405 > best member -log(0.9) = 0.105
    assert rec.equal_val_nll == pytest.approx(-torch.tensor(2 / 3).log().item())
    assert rec.best_member == 2 and rec.best_member_val_nll == pytest.approx(-torch.tensor(0.9).log().item())
    assert rec.equal_worse_than_best
    # last m: m=1 -> -log 0.9 = 0.105, m=2 -> -log 0.85 = 0.163: m=1 wins
    assert rec.last_m == 1 and rec.last_m_val_nll == pytest.approx(rec.best_member_val_nll)
    assert rec.use == "last-m"  # fitted (all weight on the last) ties with it, and does not beat it
    assert "worse than its best member" in rec.hint and "longer budget or fewer cycles" in rec.hint


def _diverse(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two members, each right on a different half of the images with probability 0.9 and unsure (0.55) on the
    other half: averaging gives 0.725 everywhere, and neither member alone is as good."""
    a = torch.tensor([0.9] * (n // 2) + [0.55] * (n // 2), dtype=torch.float64)
    b = a.flip(0)
    return torch.stack([torch.stack([a, 1 - a], -1), torch.stack([b, 1 - b], -1)]), torch.zeros(n, dtype=torch.long)


def _hand_gap_se(n: int) -> tuple[float, float]:
    """Mean and standard error of the per-image NLL of the last member (b) minus the equal ensemble's, by hand:
    half the images give -log 0.55 + log 0.725, the other half -log 0.9 + log 0.725."""
    d1, d2 = -math.log(0.55) + math.log(0.725), -math.log(0.9) + math.log(0.725)
    mean = (d1 + d2) / 2
    var = n / 2 * ((d1 - mean) ** 2 + (d2 - mean) ** 2) / (n - 1)
    return mean, math.sqrt(var / n)


def test_diverse_members_make_equal_weights_the_choice_and_no_warning() -> None:
    # 400 images: the last member's NLL is 0.0300 above the equal ensemble's with a standard error of 0.0123, so
    # the gap is beyond noise and the 2-pass equal ensemble is worth its price.
    probs, y = _diverse(400)
    rec = recommend(probs, y)
    assert not rec.equal_worse_than_best and not rec.measures_disagree
    assert rec.equal_val_nll == pytest.approx(-math.log(0.725))
    assert rec.equal_val_nll < rec.best_member_val_nll
    last = rec.candidates[0]
    gap, se = _hand_gap_se(400)
    assert last["use"] == "last-m" and last["m"] == 1
    assert last["nll_gap"] == pytest.approx(gap) and last["nll_gap_se"] == pytest.approx(se)
    assert gap == pytest.approx(0.0300, abs=1e-4) and se == pytest.approx(0.0123, abs=1e-4)
    assert not last["within_noise"]
    assert rec.use == "equal" and rec.last_m == 2
    assert rec.weights == [0.5, 0.5] and rec.forward_passes == 2
    assert rec.chosen_val_nll == pytest.approx(-math.log(0.725))
    assert "worse" not in rec.hint and "by validation NLL" in rec.hint
    assert "the equal-weight ensemble of all 2 snapshots" in rec.hint


def test_a_last_snapshot_within_noise_of_the_best_is_chosen_for_its_one_pass() -> None:
    # The same members on 40 images: the gap 0.0300 is below one standard error (0.0394), so the last snapshot
    # alone (1 forward pass) is as good as the equal ensemble (2) within noise.
    probs, y = _diverse(40)
    rec = recommend(probs, y)
    gap, se = _hand_gap_se(40)
    assert se == pytest.approx(0.0394, abs=1e-4) and gap < se
    assert rec.candidates[0]["within_noise"] and rec.candidates[0]["nll_gap_se"] == pytest.approx(se)
    assert rec.use == "last-m" and rec.last_m == 1
    assert rec.weights == [0.0, 1.0] and rec.forward_passes == 1
    assert rec.chosen_val_nll == pytest.approx(rec.equal_val_nll + gap)
    assert "within 1 standard error" in rec.reason and "1 forward pass instead of 2" in rec.reason
    assert "only the last snapshot" in rec.hint and "1 forward pass" in rec.hint


def test_fitted_weights_one_hot_on_the_last_keep_one_member() -> None:
    probs, y = _probs([0.3, 0.8, 0.9], n=40)
    rec = recommend(probs, y)
    fitted = next(c for c in rec.candidates if c["use"] == "fitted")
    # the fit's tiny weights on the first two members are pruned: exactly one-hot after prune_weights
    assert fitted["weights"] == [0.0, 0.0, 1.0] and fitted["forward_passes"] == 1
    assert fitted["val_nll"] == pytest.approx(-math.log(0.9), abs=1e-6)
    assert rec.weights == [0.0, 0.0, 1.0] and rec.forward_passes == 1
    # last-m and fitted tie at one pass: the simpler last-m is named
    assert rec.use == "last-m" and rec.last_m == 1


def test_fitted_weights_that_drop_a_weak_middle_member_are_chosen() -> None:
    # X and Z are the diverse pair of _diverse(400), Y (the middle snapshot) is wrong everywhere (0.3): the fit
    # keeps X and Z at 1/2 each (0.725 everywhere, NLL -log 0.725) and drops Y; every last-m ensemble and equal
    # weights include Y or miss X and are worse beyond noise.
    pair, y = _diverse(400)
    weak = torch.tensor([0.3, 0.7], dtype=torch.float64).expand(400, 2)
    probs = torch.stack([pair[0], weak, pair[1]])
    rec = recommend(probs, y)
    assert rec.use == "fitted" and rec.forward_passes == 2
    assert rec.weights == pytest.approx([0.5, 0.0, 0.5], abs=1e-4) and rec.weights[1] == 0.0
    assert sum(rec.weights) == pytest.approx(1.0)
    assert rec.fitted_cv_val_nll == pytest.approx(-math.log(0.725), abs=1e-5)
    # equal: (0.9 + 0.3 + 0.55) / 3 = 0.5833 everywhere; right everywhere, as the best members are
    assert rec.equal_val_nll == pytest.approx(-math.log(1.75 / 3))
    # tied by error (all right): no disagreement (review fix: a tie was called one)
    assert rec.equal_worse_by_nll and not rec.equal_worse_by_error and not rec.measures_disagree
    assert "2 of 3 members kept" in rec.hint and "the default of from_run and `snapens export`" in rec.hint
    # the last-m ensembles: m=1 is Z (NLL 0.3516), m=2 is Y and Z; the recommended one among them is m=1
    assert rec.last_m == 1


def test_the_hint_names_the_measure_and_says_when_nll_and_error_disagree() -> None:
    # Issue 20: on validation the equal ensemble had the lower error but the higher NLL than the last snapshot,
    # and the hint said "worse" without saying by which measure. 100 images, 2 members, true-class probs:
    #   2 images: early 0.001 (confidently wrong), last 0.9  -> equal 0.4505: wrong
    #   3 images: early 0.9, last 0.45 (wrong)               -> equal 0.675: right
    #   5 images: early 0.4 (wrong), last 0.95               -> equal 0.675: right
    #   90 images: both 0.95
    # errors: early 7 %, last 3 %, equal 2 %; NLL: last 0.0748 < equal 0.0936 (hand sums below).
    groups = [(2, 0.001, 0.9), (3, 0.9, 0.45), (5, 0.4, 0.95), (90, 0.95, 0.95)]
    early = torch.tensor([a for k, a, _ in groups for _ in range(k)], dtype=torch.float64)
    last = torch.tensor([b for k, _, b in groups for _ in range(k)], dtype=torch.float64)
    probs = torch.stack([torch.stack([early, 1 - early], -1), torch.stack([last, 1 - last], -1)])
    y = torch.zeros(100, dtype=torch.long)
    hand_equal = sum(-k * math.log((a + b) / 2) for k, a, b in groups) / 100
    hand_last = sum(-k * math.log(b) for k, _, b in groups) / 100
    rec = recommend(probs, y)
    assert rec.equal_val_nll == pytest.approx(hand_equal) and rec.best_member_val_nll == pytest.approx(hand_last)
    assert rec.equal_val_error == pytest.approx(2.0) and rec.best_error_member_val_error == pytest.approx(3.0)
    assert rec.equal_worse_by_nll and not rec.equal_worse_by_error and rec.measures_disagree
    assert rec.use == "last-m" and rec.last_m == 1 and rec.chosen_val_error == pytest.approx(3.0)
    assert (f"worse than its best member by validation NLL ({hand_equal:.4f} vs {hand_last:.4f} for member 2), "
            "but not by validation error (2.00 % vs 3.00 % for member 2): the two measures disagree") in rec.hint
    assert "by validation error the equal-weight ensemble is better (2.00 % vs 3.00 %), but NLL decides" in rec.hint
    assert "validation NLL" in rec.criterion


def test_the_recommendation_is_storable_and_its_temperature_is_checked() -> None:
    probs, y = _probs([0.3, 0.8, 0.9], n=40)
    rec = recommend(probs, y)
    # every prediction of the choice is right: T cannot be identified, so T = 1 with the reason
    assert rec.temperature == 1.0 and not rec.temperature_fitted and "correct" in rec.temperature_reason
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["weights"] == [0.0, 0.0, 1.0] and d["forward_passes"] == 1 and d["use"] == "last-m"
    assert {c["use"] for c in d["candidates"]} == {"last-m", "equal", "fitted"}
    assert len(d["candidates"]) == 4  # last 1, last 2, equal (= last 3), fitted


def test_worse_by_error_alone_is_flagged() -> None:
    # Member 2 is right on all images at 0.51; member 1 is wrong at 0.45 on all: ensemble 0.48 -> wrong
    # everywhere, although its NLL is between the two members'.
    probs, y = _probs([0.45, 0.51])
    rec = recommend(probs, y)
    assert metrics.error_rate(probs.mean(0), y) == 100.0 and rec.equal_val_error == 100.0
    assert rec.equal_worse_than_best


def test_fitted_weights_are_scored_on_held_out_folds() -> None:
    probs, y = _probs([0.3, 0.8, 0.9])
    fitted = guidance._cross_validated_fit_nll(probs, y, folds=5)
    # every fold's fit puts all weight on the 0.9 member: held-out NLL is -log 0.9
    assert fitted == pytest.approx(-torch.tensor(0.9).log().item(), abs=1e-6)
    assert guidance._cross_validated_fit_nll(probs[:, :6], y[:6], folds=5) is None  # too few to fold


def test_bad_inputs_are_refused() -> None:
    probs, y = _probs([0.3, 0.8])
    with pytest.raises(ValueError, match="val_labels"):
        recommend(probs, y[:-1])
    with pytest.raises(ValueError):
        recommend(probs[0], y)


def test_evaluate_gives_the_guidance_validation_data_only(tiny_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What evaluate hands the guidance is the validation members and labels, never the test split's."""
    from snapens.runs import read_run_info
    from snapens.workflows.evaluation import evaluate_run, load_run_dataset

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    seen = []

    def spy(member_probs, labels, **kwargs):
        seen.append((member_probs, labels))
        return recommend(member_probs, labels, **kwargs)

    monkeypatch.setattr(guidance, "recommend", spy)
    summary = evaluate_run(run, optimize=-1, precision="fp32")
    data = load_run_dataset(read_run_info(run))
    (member_probs, labels), = seen
    assert member_probs.shape[:2] == (summary["num_members"], len(data.val))
    assert torch.equal(torch.as_tensor(labels), torch.as_tensor(data.val.labels))
    assert summary["recommendation"]["n_members"] == summary["num_members"]
    assert summary["recommendation"]["hint"]


def test_tied_errors_are_a_tie_not_a_disagreement() -> None:
    # Review fix: equal weights worse by NLL and tied by error (2.08 % vs 2.08 %) was called "the two measures
    # disagree". 48 images, true-class probs: image 0 early 0.2 / last 0.3 (both wrong, equal 0.25 wrong), the
    # other 47 early 0.6 / last 0.95 (all right): errors 1/48 = 2.08 % each; NLL last < equal.
    early = torch.tensor([0.2] + [0.6] * 47, dtype=torch.float64)
    last = torch.tensor([0.3] + [0.95] * 47, dtype=torch.float64)
    probs = torch.stack([torch.stack([early, 1 - early], -1), torch.stack([last, 1 - last], -1)])
    rec = recommend(probs, torch.zeros(48, dtype=torch.long))
    assert rec.equal_val_error == pytest.approx(100 / 48) == rec.best_error_member_val_error
    assert rec.equal_worse_by_nll and not rec.equal_worse_by_error and not rec.measures_disagree
    assert "and tied with it by validation error (2.08 % vs 2.08 % for member 2)" in rec.hint
    assert "disagree" not in rec.hint
