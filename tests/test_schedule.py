import math

import pytest
import torch

from snapens.schedule import (
    make_scheduler,
    FGELR,
    SnapshotLR,
    StepDecayLR,
    SWAScheduleLR,
    cosine_snapshot_lr,
    cosine_snapshot_steps,
    cycle_lengths,
    fge_cycles,
    fge_lr,
    fge_snapshot_steps,
    keras_epoch_lr,
    step_decay_lr,
    swa_lr,
    swa_snapshot_steps,
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
    assert cosine_snapshot_steps(13, 4) == [3, 6, 9, 12]
    lrs = [cosine_snapshot_lr(s, 13, 4, 1.0) for s in range(13)]
    assert [lrs[i] for i in (0, 4, 7, 10)] == [1.0, 1.0, 1.0, 1.0]
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert lrs[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 3)))


@pytest.mark.parametrize("total,m", BUDGETS)
def test_minima_exactly_at_cosine_snapshot_steps(total, m):
    lrs = [cosine_snapshot_lr(s, total, m, 0.1) for s in range(total)]
    bounds = cosine_snapshot_steps(total, m)
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
    assert keras_epoch_lr(39, 200, 5, 0.1) == pytest.approx(1.541333e-4, rel=1e-5)
    assert keras_epoch_lr(0, 200, 5, 0.1) == 0.1
    assert keras_epoch_lr(40, 200, 5, 0.1) == 0.1
    assert keras_epoch_lr(20, 200, 5, 0.1) == pytest.approx(0.05)
    # T not divisible by M: floor(13/4) = 3, so epoch 12 restarts at lr0 and is never saved.
    assert keras_epoch_lr(12, 13, 4, 0.1) == 0.1


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
    assert snaps == [(b, k) for k, b in enumerate(cosine_snapshot_steps(total, m))]


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
    assert [s for s, _ in snaps] == cosine_snapshot_steps(20, 4)
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

    from snapens.schedule import cheap, cosine, schedulers

    results = [doctest.testmod(module) for module in (cosine, cheap, schedulers)]
    assert sum(r.attempted for r in results) >= 5 and sum(r.failed for r in results) == 0


# ------------------------------------------------------------------------------------- cosine cycle shaping


def test_shaping_defaults_reproduce_plain_schedule_bit_exact():
    for total, m in BUDGETS:
        plain = SnapshotLR(_optimizer((0.1, 0.03)), total_steps=total, n_cycles=m, lr_min=0.001)
        shaped = SnapshotLR(_optimizer((0.1, 0.03)), total_steps=total, n_cycles=m, lr_min=0.001,
                            cycle_decay=1.0, cycle_mult=1.0)
        assert shaped.snapshot_steps == plain.snapshot_steps == cosine_snapshot_steps(total, m)
        for step in range(total):
            base, extra = divmod(total, m)
            lengths = [base + 1 if k < extra else base for k in range(m)]
            start = 0
            for length in lengths:
                if step < start + length:
                    break
                start += length
            expected = 0.001 + (0.1 - 0.001) * 0.5 * (1.0 + math.cos(math.pi * (step - start) / length))
            assert cosine_snapshot_lr(step, total, m, 0.1, 0.001, 1.0, 1.0) == expected  # bit-exact


def test_cycle_mult_lengths_hand_computed():
    assert cycle_lengths(70, 3, cycle_mult=2.0) == [10, 20, 40]
    # ideal 20/7 * (1, 2, 4) = 2.86, 5.71, 11.43: floors 2, 5, 11, the 2 steps left to the largest fractions.
    assert cycle_lengths(20, 3, cycle_mult=2.0) == [3, 6, 11]
    assert cosine_snapshot_steps(20, 3, cycle_mult=2.0) == [2, 8, 19]
    # ideal (1, 1.5, 2.25) * 10 / 4.75 = 2.11, 3.16, 4.74: floors 2, 3, 4, the step left to the third cycle.
    assert cycle_lengths(10, 3, cycle_mult=1.5) == [2, 3, 5]
    for total, m, mult in [(100, 4, 1.3), (37, 5, 2.0), (1000, 6, 1.7), (9, 3, 1.01)]:
        assert sum(cycle_lengths(total, m, mult)) == total


@pytest.mark.parametrize("total,m,mult,decay", [(70, 3, 2.0, 0.5), (20, 3, 2.0, 0.8), (100, 5, 1.0, 0.7),
                                                 (37, 4, 1.5, 1.0)])
def test_shaped_values_and_snapshots(total, m, mult, decay):
    lengths = cycle_lengths(total, m, mult)
    expected, step = [], 0
    for k, length in enumerate(lengths):
        for pos in range(length):
            expected.append(0.2 * decay**k / 2 * (1 + math.cos(math.pi * pos / length)))
            step += 1
    opt = _optimizer((0.2,))
    sched = SnapshotLR(opt, total_steps=total, n_cycles=m, cycle_decay=decay, cycle_mult=mult)
    seen, snaps = _run(sched, opt, total)
    assert [lr for (lr,) in seen] == pytest.approx(expected, abs=1e-15)
    assert snaps == [(b, k) for k, b in enumerate(cosine_snapshot_steps(total, m, mult))]
    assert snaps[-1][0] == total - 1


def test_shaped_hand_values():
    # T=70, M=3, mult 2, decay 0.5: cycles [0, 9], [10, 29], [30, 69]; peaks 0.1, 0.05, 0.025.
    assert cosine_snapshot_lr(10, 70, 3, 0.1, cycle_decay=0.5, cycle_mult=2.0) == pytest.approx(0.05)
    assert cosine_snapshot_lr(20, 70, 3, 0.1, cycle_decay=0.5, cycle_mult=2.0) == pytest.approx(0.025)
    assert cosine_snapshot_lr(30, 70, 3, 0.1, cycle_decay=0.5, cycle_mult=2.0) == pytest.approx(0.025)
    assert cosine_snapshot_lr(50, 70, 3, 0.1, cycle_decay=0.5, cycle_mult=2.0) == pytest.approx(0.0125)


# ----------------------------------------------------------------------------------------------------- FGE


def fge_paper(i: int, c: int, a1: float, a2: float) -> float:
    """Garipov et al. 2018, the cycle's rate at 1-based iteration i, verbatim."""
    t = ((i - 1) % c + 1) / c
    return (1 - 2 * t) * a1 + 2 * t * a2 if t <= 0.5 else (2 - 2 * t) * a2 + (2 * t - 1) * a1


@pytest.mark.parametrize("total,c,start,s0", [
    # s0 = T - (n - 1) c - c // 2 with R = T - round(start * T) and n = (R + c - c // 2) // c:
    (100, 10, 0.5, 55),  # R = 50, n = 5
    (60, 4, 0.6, 38),  # R = 24, n = 6: 60 - 20 - 2
    (48, 8, 0.5, 28),  # R = 24, n = 3: 48 - 16 - 4
    (200, 20, 0.8, 170),  # R = 40, n = 2: 200 - 20 - 10
])
def test_fge_matches_paper_formula(total, c, start, s0):
    assert fge_cycles(total, c, start)[0] == s0
    for step in range(total):
        got = fge_lr(step, total, c, 0.1, fge_start=start)
        if step < s0:
            assert got == pytest.approx(step_decay_lr(step, s0, 0.1), abs=1e-15)
        else:
            assert got == pytest.approx(fge_paper(step - s0 + 1, c, 0.05, 0.0005), abs=1e-15)
    assert fge_snapshot_steps(total, c, start) == list(range(s0 + c // 2 - 1, total, c))


def test_fge_hand_values():
    # T=100, c=10: R = 50 steps after round(0.5 * 100) hold 4 cycles and the descent of a fifth (45 steps); the
    # 5 left over go to the step phase, which lasts 55 steps (x0.1 at round(27.5) = 28 and round(41.25) = 41).
    lrs = [fge_lr(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[27] == 0.1 and lrs[28] == pytest.approx(0.01) and lrs[40] == pytest.approx(0.01)
    assert lrs[41] == pytest.approx(0.001) and lrs[54] == pytest.approx(0.001)
    assert lrs[55] == pytest.approx(0.8 * 0.05 + 0.2 * 0.0005)  # t = 0.1
    assert lrs[59] == pytest.approx(0.0005)  # t = 0.5: the lowest rate, a snapshot
    assert lrs[62] == pytest.approx(0.4 * 0.0005 + 0.6 * 0.05)  # t = 0.8
    assert lrs[64] == pytest.approx(0.05)  # t = 1: back at a1
    assert lrs[95] == pytest.approx(0.8 * 0.05 + 0.2 * 0.0005)  # the last cycle starts at step 95 ...
    assert lrs[99] == pytest.approx(0.0005)  # ... and the budget ends at its middle, the lowest rate
    assert fge_lr(150, 100, 10, 0.1) == pytest.approx(0.0005)  # past the budget: the last step's rate
    assert fge_cycles(100, 10) == (55, [10, 10, 10, 10, 5])
    assert fge_snapshot_steps(100, 10) == [59, 69, 79, 89, 99]
    # scaled with lr0: a1 = lr0 / 2, a2 = lr0 / 200
    assert fge_lr(59, 100, 10, 0.2) == pytest.approx(0.001) and fge_lr(64, 100, 10, 0.2) == pytest.approx(0.1)


def test_fge_budget_ends_at_the_last_snapshot():
    # T=103: round(51.5) = 52, R = 51: n = (51 + 5) // 10 = 5 cycles, the last one only down to its middle
    # (4 * 10 + 5 = 45 steps); the 6 steps left lengthen the step phase to 58 (x0.1 at 29 and round(43.5) = 44).
    assert fge_cycles(103, 10) == (58, [10, 10, 10, 10, 5])
    snaps = fge_snapshot_steps(103, 10)
    assert snaps == [62, 72, 82, 92, 102]
    lrs = [fge_lr(s, 103, 10, 0.1) for s in range(103)]
    assert lrs[28] == 0.1 and lrs[29] == pytest.approx(0.01) and lrs[44] == pytest.approx(0.001)
    assert lrs[57] == pytest.approx(0.001) and lrs[58] == pytest.approx(0.8 * 0.05 + 0.2 * 0.0005)
    assert [lrs[s] for s in snaps] == pytest.approx([0.0005] * 5)
    assert min(lrs[58:]) == pytest.approx(0.0005)


def test_fge_odd_cycles_end_at_the_last_snapshot():
    # T=40, c=5: R = 20, n = (20 + 5 - 2) // 5 = 4, start = 40 - 15 - 2 = 23. The collected step is the 2nd of a
    # cycle, t = 2/5: 0.2 a1 + 0.8 a2 = 0.0104, the same as the 3rd (t = 3/5), the cycle's lowest.
    assert fge_cycles(40, 5) == (23, [5, 5, 5, 2])
    assert fge_snapshot_steps(40, 5) == [24, 29, 34, 39]
    lrs = [fge_lr(s, 40, 5, 0.1) for s in range(40)]
    assert [lrs[s] for s in (24, 25, 29, 34, 39)] == pytest.approx([0.0104] * 5)
    assert min(lrs[23:]) == pytest.approx(0.0104)


@pytest.mark.parametrize("total,c,start", [(100, 10, 0.5), (103, 10, 0.5), (97, 7, 0.3), (64, 16, 0.5),
                                           (1000, 39, 0.75), (21, 2, 0.5)])
def test_fge_no_step_is_trained_for_nothing(total, c, start):
    s0, lengths = fge_cycles(total, c, start)
    snaps = fge_snapshot_steps(total, c, start)
    assert snaps[-1] == total - 1 and s0 + sum(lengths) == total
    assert 0 <= s0 - round(start * total) < c  # what cannot make another cycle goes to the step phase
    lrs = [fge_lr(s, total, c, 0.1, fge_start=start) for s in range(total)]
    for k, snap in enumerate(snaps):  # every snapshot sits at its cycle's minimum
        assert lrs[snap] == pytest.approx(min(lrs[s0 + k * c:s0 + (k + 1) * c]))


@pytest.mark.parametrize("total,every,start", [(40, 4, 0.75), (45, 4, 0.75), (103, 7, 0.5), (10, 3, 0.9)])
def test_swa_budget_ends_at_a_snapshot(total, every, start):
    # SWA counts its collection steps back from the last one: no step after the last collected model.
    snaps = swa_snapshot_steps(total, every, start)
    assert snaps[-1] == total - 1 and snaps[0] >= round(start * total)
    assert all(b - a == every for a, b in zip(snaps, snaps[1:]))


def test_fge_scheduler_runs_formula_and_marks_snapshots():
    opt = _optimizer((0.1, 0.04))
    sched = FGELR(opt, total_steps=103, cycle_steps=10)
    seen, snaps = _run(sched, opt, 103)
    assert [a for a, _ in seen] == pytest.approx([fge_lr(s, 103, 10, 0.1) for s in range(103)], abs=1e-15)
    assert [b for _, b in seen] == pytest.approx([fge_lr(s, 103, 10, 0.04) for s in range(103)], abs=1e-15)
    assert snaps == [(s, k) for k, s in enumerate([62, 72, 82, 92, 102])]
    assert sched.n_cycles == 5 and sched.snapshot_steps == [62, 72, 82, 92, 102]


# ----------------------------------------------------------------------------------------------------- SWA


def test_swa_hand_values():
    # T=40, swa_start 0.75: S = 30, t = step / 30.
    assert swa_lr(15, 40, 0.1) == 0.1  # t = 0.5
    assert swa_lr(16, 40, 0.1) == pytest.approx(0.1 * (1 - 0.5 * (16 / 30 - 0.5) / 0.4))
    assert swa_lr(21, 40, 0.1) == pytest.approx(0.075)  # t = 0.7: half-way down
    assert swa_lr(27, 40, 0.1) == pytest.approx(0.05)  # t = 0.9: at the SWA rate
    assert [swa_lr(s, 40, 0.1) for s in range(28, 40)] == [0.05] * 12
    assert swa_lr(39, 40, 0.2, swa_factor=0.25) == 0.05
    assert swa_snapshot_steps(40, 4) == [31, 35, 39]


@pytest.mark.parametrize("total,every,start", [(40, 4, 0.75), (50, 4, 0.75), (100, 7, 0.6), (13, 1, 0.5)])
def test_swa_values_and_snapshots(total, every, start):
    s0 = round(start * total)
    for step in range(total):
        t = step / s0
        factor = 1.0 if t <= 0.5 else (1 - 0.5 * (t - 0.5) / 0.4 if t <= 0.9 else 0.5)
        assert swa_lr(step, total, 0.1, swa_start=start) == pytest.approx(0.1 * factor, abs=1e-15)
    snaps = swa_snapshot_steps(total, every, start)
    assert snaps[-1] == total - 1 and snaps[0] >= s0 and snaps[0] - every < s0
    assert all(b - a == every for a, b in zip(snaps, snaps[1:]))
    opt = _optimizer()
    sched = SWAScheduleLR(opt, total_steps=total, every=every, swa_start=start)
    seen, marked = _run(sched, opt, total)
    assert [s for s, _ in marked] == snaps and [k for _, k in marked] == list(range(len(snaps)))
    assert [lr for (lr,) in seen[s0:]] == [0.05] * (total - s0)


def test_swa_budget_not_divisible_by_interval():
    # T=50: S = round(37.5) = 38, phase 38..49 (12 steps), models every 4 counted back from the last step.
    assert swa_snapshot_steps(50, 4) == [41, 45, 49]
    # T=45: S = round(33.75) = 34, phase 34..44 (11 steps): 44, 40, 36 (32 is before the phase).
    assert swa_snapshot_steps(45, 4) == [36, 40, 44]


# ------------------------------------------------------------------------------------ resume and bad input


@pytest.mark.parametrize("make,total,cut", [
    (lambda o: FGELR(o, total_steps=103, cycle_steps=10), 103, 65),  # mid-cycle, after its snapshot
    (lambda o: SWAScheduleLR(o, total_steps=50, every=4), 50, 43),
    (lambda o: SnapshotLR(o, total_steps=70, n_cycles=3, cycle_decay=0.5, cycle_mult=2.0), 70, 21),
])
def test_new_schedules_resume_mid_cycle_bit_exact(make, total, cut):
    opt = _optimizer((0.1, 0.05))
    full, full_snaps = _run(make(opt), opt, total)
    opt1 = _optimizer((0.1, 0.05))
    sched1 = make(opt1)
    head, head_snaps = _run(sched1, opt1, cut)
    opt_state, sched_state = opt1.state_dict(), sched1.state_dict()
    opt2 = _optimizer((0.7, 0.7))
    sched2 = make(opt2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    tail, tail_snaps = _run(sched2, opt2, total - cut)
    assert head + tail == full  # exact equality: bit-exact rates
    assert head_snaps + tail_snaps == full_snaps and len(full_snaps) >= 3


@pytest.mark.parametrize("build,bad", [
    (lambda: FGELR(_optimizer(), total_steps=100, cycle_steps=10, fge_start=1.2), "got 1.2"),
    (lambda: FGELR(_optimizer(), total_steps=100, cycle_steps=10, fge_start=0), "got 0"),
    (lambda: FGELR(_optimizer(), total_steps=20, cycle_steps=12), "12 steps is longer than the 10 steps left"),
    (lambda: FGELR(_optimizer(), total_steps=100, cycle_steps=1), "got 1"),
    (lambda: FGELR(_optimizer(), total_steps=100, cycle_steps=10, lr2_factor=-1.0), "got -1.0"),
    (lambda: SWAScheduleLR(_optimizer(), total_steps=100, every=5, swa_start=1.2), "got 1.2"),
    (lambda: SWAScheduleLR(_optimizer(), total_steps=4, every=1, swa_start=0.9), "leaves 0 steps of SWA"),
    (lambda: SWAScheduleLR(_optimizer(), total_steps=100, every=0), "got 0"),
    (lambda: SWAScheduleLR(_optimizer(), total_steps=100, every=5, swa_factor=float("nan")), "got nan"),
    (lambda: SnapshotLR(_optimizer(), total_steps=100, n_cycles=4, cycle_mult=0.5), "cycle_mult >= 1 "),
    (lambda: SnapshotLR(_optimizer(), total_steps=10, n_cycles=4, cycle_mult=10.0), "cycle lengths [0, 0, 1, 9]"),
    (lambda: SnapshotLR(_optimizer(), total_steps=100, n_cycles=4, cycle_decay=1.5), "got 1.5"),
    (lambda: SnapshotLR(_optimizer(), total_steps=100, n_cycles=4, cycle_decay=0.0), "got 0.0"),
    (lambda: SnapshotLR(_optimizer(), total_steps=100, n_cycles=4, lr_min=0.05, cycle_decay=0.5),
     "peak to 0.0125"),
])
def test_new_schedules_reject_bad_arguments(build, bad):
    with pytest.raises(ValueError) as info:
        build()
    assert bad in str(info.value)


# ------------------------------------------------------------------------------------------ make_scheduler


def _sgd(lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr, momentum=0.9)


@pytest.mark.parametrize("schedule,kwargs,match", [
    ("step", {"cycle_mult": 2.0}, "cycle_mult do not apply to the 'step' schedule"),
    ("cosine-cycles", {"swa_lr": 0.1}, "swa_lr do not apply"),
    ("fge", {"cycle_epochs": 2}, "needs steps_per_epoch >= 1, got None"),
    ("fge", {"steps_per_epoch": 3}, "needs cycle_epochs"),
    ("swa", {"steps_per_epoch": 3, "lr_min": 0.01}, "lr_min=0.01 applies to the cosine schedules"),
    ("fge", {"steps_per_epoch": 3, "cycle_epochs": 5}, "cycle_epochs=5 (15 steps of 3 per epoch), epochs=8"),
    ("nope", {}, "unknown schedule 'nope'"),
])
def test_make_scheduler_rejects_bad_options(schedule: str, kwargs: dict, match: str) -> None:
    opt = _sgd()
    with pytest.raises(ValueError) as info:
        make_scheduler(schedule, opt, total_steps=24, n_cycles=2, **kwargs)
    assert match in str(info.value)


def test_make_scheduler_shapes_the_cosine_cycles() -> None:
    sched = make_scheduler("cosine-cycles", _sgd(), total_steps=70, n_cycles=3, cycle_mult=2.0,
                           cycle_decay=0.5)
    assert sched.snapshot_steps == [9, 29, 69] and (sched.cycle_mult, sched.cycle_decay) == (2.0, 0.5)
    swa = make_scheduler("swa", _sgd(lr=0.2), total_steps=24, n_cycles=2, steps_per_epoch=3,
                         swa_lr=0.05)
    assert swa.swa_factor == 0.25 and swa.snapshot_steps == [20, 23]

