"""snapens.guidance: the recommendation from validation data, against hand-built member probabilities."""

from __future__ import annotations

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


def test_diverse_members_make_equal_weights_the_choice_and_no_warning() -> None:
    # Two members, each right on a different half of the images with probability 0.9, and unsure (0.55)
    # on the other half: averaging helps (0.725 everywhere) and neither member alone is as good.
    n = 40
    a = torch.tensor([0.9] * (n // 2) + [0.55] * (n // 2), dtype=torch.float64)
    b = a.flip(0)
    probs = torch.stack([torch.stack([a, 1 - a], -1), torch.stack([b, 1 - b], -1)])
    y = torch.zeros(n, dtype=torch.long)
    rec = recommend(probs, y)
    assert not rec.equal_worse_than_best
    assert rec.equal_val_nll == pytest.approx(-torch.tensor(0.725, dtype=torch.float64).log().item())
    assert rec.equal_val_nll < rec.best_member_val_nll
    assert rec.use == "equal" and rec.last_m == 2
    assert "worse" not in rec.hint


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
