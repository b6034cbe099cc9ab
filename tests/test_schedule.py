import math

import pytest
import torch

from snapens.schedule import (
    SnapshotLR,
    StepDecayLR,
    cosine_snapshot_lr,
    cycle_bounds,
    cycle_lengths,
    seed_epoch_lr,
    step_decay_lr,
)

BUDGETS = [(100, 5), (13, 4), (7, 7), (10, 1), (1, 1), (301, 6), (20, 3)]


def eq2(t: int, total: int, m: int, lr0: float) -> float:
    """Paper Eq. 2, verbatim, with a 1-based iteration t."""
    period = math.ceil(total / m)
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % period) / period) + 1)


@pytest.mark.parametrize("total,m", [(100, 5), (60, 6), (10, 1), (12, 4)])
def test_equals_eq2_when_budget_divisible(total, m):
    for step in range(total):
        assert cosine_snapshot_lr(step, total, m, 0.2) == pytest.approx(eq2(step + 1, total, m, 0.2), abs=1e-15)


@pytest.mark.parametrize("total,m", BUDGETS)
def test_values_match_formula_per_cycle(total, m):
    lengths = cycle_lengths(total, m)
    assert sum(lengths) == total and max(lengths) - min(lengths) <= 1
    step = 0
    for length in lengths:
        for pos in range(length):
            expected = 0.01 + (0.1 - 0.01) / 2 * (1 + math.cos(math.pi * pos / length))
            assert cosine_snapshot_lr(step, total, m, 0.1, lr_min=0.01) == pytest.approx(expected, abs=1e-15)
            step += 1


def test_uneven_budget_splits_into_balanced_cycles():
    # Eq. 2's ceil would give 4 + 4 + 4 + 1; we give 4 + 3 + 3 + 3.
    assert cycle_lengths(13, 4) == [4, 3, 3, 3]
    assert cycle_bounds(13, 4) == [3, 6, 9, 12]
    lrs = [cosine_snapshot_lr(s, 13, 4, 1.0) for s in range(13)]
    assert [lrs[i] for i in (0, 4, 7, 10)] == [1.0, 1.0, 1.0, 1.0]
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert lrs[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 3)))


@pytest.mark.parametrize("total,m", BUDGETS)
def test_minima_exactly_at_cycle_bounds(total, m):
    lrs = [cosine_snapshot_lr(s, total, m, 0.1) for s in range(total)]
    bounds = cycle_bounds(total, m)
    assert len(bounds) == m and bounds[-1] == total - 1
    start = 0
    for end in bounds:
        cycle = lrs[start:end + 1]
        assert min(cycle) == cycle[-1] and cycle[0] == 0.1
        start = end + 1


def test_single_cycle_is_plain_cosine():
    assert [cosine_snapshot_lr(s, 4, 1, 1.0) for s in range(4)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_seed_formula_known_values():
    # The Keras seed: floor(T/M) = 40, 0-based epoch; epoch 39 is one step before the restart.
    assert seed_epoch_lr(39, 200, 5, 0.1) == pytest.approx(1.541333e-4, rel=1e-5)
    assert seed_epoch_lr(0, 200, 5, 0.1) == 0.1
    assert seed_epoch_lr(40, 200, 5, 0.1) == 0.1
    assert seed_epoch_lr(20, 200, 5, 0.1) == pytest.approx(0.05)
    # T not divisible by M: floor(13/4) = 3, so epoch 12 restarts at lr0 and is never saved.
    assert seed_epoch_lr(12, 13, 4, 0.1) == 0.1


def test_step_decay_baseline():
    lrs = [step_decay_lr(s, 100, 0.1) for s in range(100)]
    assert lrs[49] == 0.1 and lrs[50] == pytest.approx(0.01) and lrs[74] == pytest.approx(0.01)
    assert lrs[75] == pytest.approx(0.001) and lrs[99] == pytest.approx(0.001)


@pytest.mark.parametrize("kwargs,bad", [
    (dict(step=0, total_steps=10, n_cycles=0, lr_max=0.1), "got 0"),
    (dict(step=0, total_steps=3, n_cycles=4, lr_max=0.1), "got 3"),
    (dict(step=0, total_steps=10, n_cycles=2, lr_max=0.1, lr_min=0.1), "lr_max > lr_min (0.1), but got 0.1"),
    (dict(step=0, total_steps=10, n_cycles=2, lr_max=-0.5), "got -0.5"),
    (dict(step=0, total_steps=10, n_cycles=2, lr_max=0.1, lr_min=-0.01), "got -0.01"),
    (dict(step=-7, total_steps=10, n_cycles=2, lr_max=0.1), "got -7"),
    (dict(step=0, total_steps=10, n_cycles=2, lr_max=float("nan")), "got nan"),
])
def test_bad_input_raises_with_value(kwargs, bad):
    with pytest.raises(ValueError) as info:
        cosine_snapshot_lr(**kwargs)
    assert bad in str(info.value)


def test_one_step_cycles_warn(caplog):
    opt = _optimizer()
    with caplog.at_level("WARNING", logger="snapens.schedule"):
        SnapshotLR(opt, total_steps=5, n_cycles=5)
    assert "cycles of one step" in caplog.text


def _optimizer(lrs=(0.1,)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], momentum=0.9)


def _run(sched, opt, steps):
    """Record the lr each optimizer step runs with, and where snapshots fall."""
    seen, snaps = [], []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if sched.is_cycle_end():
            snaps.append((sched.last_epoch, sched.cycle))
        sched.step()
    return seen, snaps


@pytest.mark.parametrize("total,m", BUDGETS)
def test_scheduler_sets_lr_before_each_step(total, m):
    opt = _optimizer((0.1, 0.02))
    sched = SnapshotLR(opt, total_steps=total, n_cycles=m, lr_min=0.001)
    seen, snaps = _run(sched, opt, total)
    for step, (lr_a, lr_b) in enumerate(seen):
        assert lr_a == pytest.approx(cosine_snapshot_lr(step, total, m, 0.1, 0.001), abs=1e-15)
        # Each group keeps its own peak.
        assert lr_b == pytest.approx(cosine_snapshot_lr(step, total, m, 0.02, 0.001), abs=1e-15)
    assert snaps == [(b, k) for k, b in enumerate(cycle_bounds(total, m))]


def test_no_lag_at_restart():
    # The peer pitfall: a scheduler stepped after optimizer.step() runs the first batch of a cycle at the minimum.
    opt = _optimizer()
    sched = SnapshotLR(opt, total_steps=10, n_cycles=2)
    seen, _ = _run(sched, opt, 10)
    assert seen[5][0] == 0.1 and seen[4][0] < 0.01


def test_state_dict_resumes_mid_cycle():
    total, m = 23, 3
    opt = _optimizer((0.1, 0.05))
    sched = SnapshotLR(opt, total_steps=total, n_cycles=m)
    full, full_snaps = _run(sched, opt, total)

    opt1 = _optimizer((0.1, 0.05))
    sched1 = SnapshotLR(opt1, total_steps=total, n_cycles=m)
    head, head_snaps = _run(sched1, opt1, 11)
    opt_state, sched_state = opt1.state_dict(), sched1.state_dict()

    opt2 = _optimizer((0.7, 0.7))  # wrong lrs on purpose: the state must restore them
    sched2 = SnapshotLR(opt2, total_steps=total, n_cycles=m)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    tail, tail_snaps = _run(sched2, opt2, total - 11)
    assert head + tail == full
    assert head_snaps + tail_snaps == full_snaps


def test_step_decay_scheduler_marks_same_snapshot_steps():
    opt = _optimizer()
    sched = StepDecayLR(opt, total_steps=20, n_cycles=4)
    seen, snaps = _run(sched, opt, 20)
    assert [s for s, _ in snaps] == cycle_bounds(20, 4)
    assert [lr for (lr,) in seen] == pytest.approx([step_decay_lr(s, 20, 0.1) for s in range(20)])


def test_scheduler_rejects_bad_budget():
    with pytest.raises(ValueError, match="n_cycles"):
        SnapshotLR(_optimizer(), total_steps=10, n_cycles=0)
    with pytest.raises(ValueError, match="total_steps"):
        SnapshotLR(_optimizer(), total_steps=2, n_cycles=3)
    with pytest.raises(ValueError, match="lr_max"):
        SnapshotLR(_optimizer(), total_steps=10, n_cycles=2, lr_min=0.5)


def test_docstring_examples_run():
    import doctest

    import snapens.schedule

    result = doctest.testmod(snapens.schedule)
    assert result.attempted >= 5 and result.failed == 0
