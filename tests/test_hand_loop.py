"""The library in a user's own training loop: SnapshotLR + SnapshotStore + SnapshotEnsemble, no engine."""

import copy
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from snapens import SnapshotEnsemble, SnapshotLR, SnapshotStore, cosine_snapshot_steps

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_hand_loop_takes_m_snapshots_that_reload_bit_exactly(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    total, m = 7 * 5, 3  # 7 epochs of 5 batches; 35 steps do not split evenly into 3 cycles
    sched = SnapshotLR(opt, total_steps=total, n_cycles=m)
    store = SnapshotStore(tmp_path / "snapshots")
    expected, lrs_at_snapshots = [], []
    for epoch in range(7):
        for batch in range(5):
            idx = slice(8 * batch, 8 * batch + 8)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched.is_cycle_end():
                lr = opt.param_groups[0]["lr"]
                store.save(model, index=sched.cycle + 1, step=sched.steps_done, epoch=sched.steps_done / 5,
                           lr=lr, model_name="net", model_kwargs={})
                expected.append(copy.deepcopy(model.state_dict()))
                lrs_at_snapshots.append(lr)
            sched.step()

    infos = store.list()
    assert [i.index for i in infos] == [1, 2, 3]
    assert [i.step for i in infos] == [s + 1 for s in cosine_snapshot_steps(total, m)] == [12, 24, 35]
    assert [i.lr for i in infos] == lrs_at_snapshots
    for info, state in zip(infos, expected):
        loaded = store.load_state_dict(info.index)
        assert loaded.keys() == state.keys()  # BatchNorm buffers included
        assert all(torch.equal(loaded[k], state[k]) for k in state)

    # The last snapshot is the final model; an ensemble of just it reproduces its softmax exactly.
    model.eval()
    solo = SnapshotEnsemble(_net, [store.load_state_dict(3)], precision="fp32")  # exact: fp32
    assert torch.allclose(solo.predict_proba(x), model(x).softmax(-1), atol=1e-6)


def test_custom_loop_example_runs():
    results = runpy.run_path(str(EXAMPLES / "custom_loop.py"))["main"](["--epochs", "8", "--snapshots", "2"])
    assert set(results) == {"last snapshot", "ensemble of 2"}
    assert all(0 <= err < 15 for err in results.values())  # digits: a few % error after 8 epochs


def test_hand_loop_and_fit_write_the_same_manifest(tmp_path):
    """The README's loop and engine.fit mean the same by a snapshot's step (optimizer steps done) and epoch."""
    from snapens.engine import fit

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 1, 6, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    loader = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 30, 6)]  # 5 batches per epoch
    epochs, m = 5, 3  # 25 steps: cycles of 9, 8 and 8 steps end mid-epoch

    def manifest(run_dir, train):
        torch.manual_seed(0)
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = SnapshotLR(opt, total_steps=epochs * len(loader), n_cycles=m)
        train(model, opt, sched, run_dir)
        return SnapshotStore(run_dir / "snapshots").list()

    def readme_loop(model, opt, sched, run_dir):
        store = SnapshotStore(run_dir / "snapshots")
        for _epoch in range(epochs):
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(); loss.backward(); opt.step()
                if sched.is_cycle_end():
                    store.save(model, index=sched.cycle + 1, step=sched.steps_done,
                               epoch=sched.steps_done / len(loader), lr=opt.param_groups[0]["lr"],
                               model_name="net", model_kwargs={})
                sched.step()

    def engine_fit(model, opt, sched, run_dir):
        fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=epochs, run_dir=run_dir,
            model_name="net", device="cpu", precision="fp32", channels_last=False, handle_signals=False)

    by_hand, by_fit = manifest(tmp_path / "hand", readme_loop), manifest(tmp_path / "fit", engine_fit)
    assert [i.index for i in by_hand] == [i.index for i in by_fit] == [1, 2, 3]
    assert [i.step for i in by_hand] == [i.step for i in by_fit] == [9, 17, 25]
    assert [i.epoch for i in by_hand] == pytest.approx([i.epoch for i in by_fit]) == [1.8, 3.4, 5.0]
    assert [i.lr for i in by_hand] == [i.lr for i in by_fit]
