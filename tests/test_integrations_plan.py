"""snapens.integrations._plan: the schedule the Lightning and transformers callbacks share (no framework needed)."""

from __future__ import annotations

import pytest
import torch

from snapens.integrations._plan import SnapshotPlan, check_budget
from snapens.schedule import cosine_snapshot_lr, cosine_snapshot_steps


@pytest.mark.parametrize("total, m", [(12, 5), (13, 4), (100, 5), (7, 7), (9, 1)])
def test_rates_equal_cosine_snapshot_lr_exactly(total: int, m: int) -> None:
    plan = SnapshotPlan(m, total, [0.2, 0.05], lr_min=0.001)
    assert plan.snapshot_steps == cosine_snapshot_steps(total, m)
    for step in range(total + 3):  # past the budget too: the last cycle's last rate
        assert plan.lrs(step) == [cosine_snapshot_lr(step, total, m, peak, 0.001) for peak in (0.2, 0.05)]


def test_apply_sets_every_group_and_counts_due_snapshots() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.01}], lr=0.1)
    plan = SnapshotPlan(4, 13, [0.1, 0.01])
    plan.apply(opt, 2)
    assert [g["lr"] for g in opt.param_groups] == [cosine_snapshot_lr(2, 13, 4, p) for p in (0.1, 0.01)]
    assert [plan.taken_by(s) for s in (0, 3, 4, 7, 12, 13)] == [0, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="param groups"):
        plan.apply(torch.optim.SGD(a.parameters(), lr=0.1), 0)


def test_budget_and_peak_checks() -> None:
    with pytest.raises(ValueError, match="needs at least 5 optimizer steps"):
        check_budget(4, 5, "x")
    with pytest.raises(ValueError, match="finite training budget"):
        check_budget(float("inf"), 5, "x")
    assert check_budget(12.0, 5, "x") == 12
    with pytest.raises(ValueError, match="> lr_min"):
        SnapshotPlan(2, 10, [0.1], lr_min=0.1)
