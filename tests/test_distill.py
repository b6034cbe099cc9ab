"""snapens.distill: the Hinton loss against a hand computation, the teacher's logits, agreement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from snapens import distill
from snapens.ensemble import SnapshotEnsemble


def _hand_loss(s: torch.Tensor, z: torch.Tensor, y: torch.Tensor, t: float, a: float) -> float:
    """(1 - a) CE + a T^2 KL(softmax(z/T) || softmax(s/T)), written out with sums over rows and classes."""
    total = 0.0
    for i in range(s.shape[0]):
        ce = -s[i, y[i]].item() + math.log(sum(math.exp(v) for v in s[i].tolist()))
        pz = [math.exp(v / t) for v in z[i].tolist()]
        ps = [math.exp(v / t) for v in s[i].tolist()]
        p = [v / sum(pz) for v in pz]
        q = [v / sum(ps) for v in ps]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        total += (1 - a) * ce + a * t * t * kl
    return total / s.shape[0]


@pytest.mark.parametrize(("t", "a"), [(1.0, 0.5), (4.0, 0.9), (2.5, 1.0), (3.0, 0.0)])
def test_loss_is_the_hand_computed_hinton_loss(t: float, a: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, z = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3, torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    got = distill.distillation_loss(s, z, y, temperature=t, alpha=a)
    assert float(got) == pytest.approx(_hand_loss(s.float().double(), z.double(), y, t, a), rel=1e-5)


def test_soft_term_is_zero_when_the_student_matches_the_teacher_and_gradients_reach_only_the_student() -> None:
    z = torch.randn(4, 3)
    s = (z + 7.0).clone().requires_grad_(True)  # a constant shift: the same softmax
    y = torch.tensor([0, 1, 2, 0])
    loss = distill.distillation_loss(s, z, y, temperature=3.0, alpha=1.0)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().max()) < 1e-6


@pytest.mark.parametrize(("t", "a", "match"), [(0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"),
                                               (math.inf, 0.5, "temperature"), (2.0, 1.5, "alpha")])
def test_bad_settings_are_refused(t: float, a: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        distill.distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                                  temperature=t, alpha=a)


def _factory() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_teacher_logits_are_the_calibrated_ensemble_run_on_the_batch_without_gradients() -> None:
    torch.manual_seed(0)
    states = []
    for _ in range(3):
        m = _factory()
        m[2].running_mean.normal_()  # eval mode must use these, not the batch's statistics
        states.append(m.state_dict())
    ens = SnapshotEnsemble(_factory, states, weights=[0.2, 0.3, 0.5], precision="fp32")
    teacher = distill.EnsembleTeacher(ens, calibration_temperature=0.5)
    x = torch.randn(8, 1, 2, 2)
    z = teacher.logits(x)
    assert not z.requires_grad
    expected = torch.softmax(torch.log(ens.member_probs(x).mul(torch.tensor([0.2, 0.3, 0.5]).view(3, 1, 1))
                                       .sum(0)) / 0.5, dim=1)
    assert torch.allclose(torch.softmax(z, dim=1), expected, atol=1e-6)
    # The loss hook runs the teacher on the x it is given (the augmented batch), and backpropagates.
    seen = []
    ens.model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    loss_fn = distill.make_loss_fn(teacher, temperature=2.0, alpha=0.7)
    student = torch.zeros(8, 3, requires_grad=True)
    loss = loss_fn(student, torch.zeros(8, dtype=torch.long), x)
    loss.backward()
    assert len(seen) == 3 and all(torch.equal(s, x) for s in seen)
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert float(loss) == pytest.approx(_hand_loss(student.detach().double(), z.double(),
                                                   torch.zeros(8, dtype=torch.long), 2.0, 0.7), rel=1e-5)


def test_top1_agreement() -> None:
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    b = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.1, 0.9]])
    assert distill.top1_agreement(a, b) == 75.0
    with pytest.raises(ValueError):
        distill.top1_agreement(a, b[:2])
