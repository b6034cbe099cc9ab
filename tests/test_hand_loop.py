"""The library in a user's own training loop: SnapshotLR + SnapshotStore + SnapshotEnsemble, no engine."""

import copy
import runpy
from pathlib import Path

import torch
from torch import nn

from snapens import SnapshotEnsemble, SnapshotLR, SnapshotStore, cycle_bounds

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
                store.save(model, index=sched.cycle + 1, step=sched.last_epoch, epoch=epoch, lr=lr,
                           model_name="net", model_kwargs={})
                expected.append(copy.deepcopy(model.state_dict()))
                lrs_at_snapshots.append(lr)
            sched.step()

    infos = store.list()
    assert [i.index for i in infos] == [1, 2, 3]
    assert [i.step for i in infos] == cycle_bounds(total, m) == [11, 23, 34]
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
