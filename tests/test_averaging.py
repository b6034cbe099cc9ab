import pytest
import torch
from torch import nn

from snapens.averaging import average_model, average_state_dicts, has_batchnorm, recompute_batchnorm
from snapens.checkpoint import SnapshotError


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5))


def plain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 5))


def trained_state(seed: int) -> dict[str, torch.Tensor]:
    """A BN model's state after a few train-mode forward passes: running stats and counters move."""
    model = bn_model(seed)
    model.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(seed + 1):
            model(torch.randn(8, 2, 4, 4, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


def batches(n: int, seed: int = 3, size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 2, 4, 4, generator=g) * 2 + 1, torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def test_mean_of_identical_snapshots_is_that_snapshot():
    state = trained_state(2)
    for n in (1, 2, 3, 7):
        avg = average_state_dicts([state] * n)
        assert avg.keys() == state.keys()
        for key in state:
            assert avg[key].dtype == state[key].dtype and torch.equal(avg[key], state[key]), key


def test_mean_is_the_elementwise_mean_and_counters_keep_the_largest():
    states = [trained_state(s) for s in (0, 1, 2)]
    avg = average_state_dicts(states)
    for key in ("0.weight", "1.running_mean", "4.bias"):
        hand = (states[0][key].double() + states[1][key].double() + states[2][key].double()) / 3
        assert torch.equal(avg[key], hand.float()), key
    assert [int(s["1.num_batches_tracked"]) for s in states] == [1, 2, 3]
    assert int(avg["1.num_batches_tracked"]) == 3


def test_batchnorm_statistics_after_recompute_equal_a_direct_computation():
    model = bn_model()
    model.load_state_dict(average_state_dicts([trained_state(0), trained_state(1)]))
    data = batches(5)
    used = recompute_batchnorm(model, iter(data), n_batches=3)
    assert used == 3
    # Direct: the BatchNorm input is conv(x); momentum None averages the per-batch mean and unbiased variance.
    conv = model[0]
    with torch.no_grad():
        feats = [conv(x) for x, _ in data[:3]]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    bn = model[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-6, rtol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-6, rtol=1e-6)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1  # momentum restored
    assert model.training  # it was in train mode before: restored
    model.eval()
    recompute_batchnorm(model, data, n_batches=2)
    assert not model.training and int(bn.num_batches_tracked) == 2


def test_average_model_recomputes_batchnorm_on_the_given_batches():
    states = [trained_state(0), trained_state(1)]
    model, used = average_model(bn_model, states, bn_batches=batches(4), n_bn_batches=10)
    assert used == 4 and not model.training
    avg = average_state_dicts(states)
    assert torch.equal(model[0].weight, avg["0.weight"])  # the weights are the mean ...
    assert not torch.allclose(model[1].running_mean, avg["1.running_mean"])  # ... the statistics are not
    with pytest.raises(ValueError, match="BatchNorm"):
        average_model(bn_model, states)  # BatchNorm and no batches: refused, not silently stale


def test_model_without_batchnorm_skips_the_recompute():
    def never():
        raise AssertionError("the batches must not be read")
        yield

    states = [plain_model(0).state_dict(), plain_model(1).state_dict()]
    assert not has_batchnorm(plain_model()) and has_batchnorm(bn_model())
    model, used = average_model(plain_model, states, bn_batches=never())
    assert used == 0
    expected = average_state_dicts(states)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key])


def test_mismatched_architectures_are_refused():
    small = nn.Linear(4, 3).state_dict()
    wide = nn.Linear(4, 5).state_dict()
    with pytest.raises(SnapshotError, match=r"snapshot-02 and snapshot-01 hold different architectures: weight is "
                                            r"\(5, 4\)"):
        average_state_dicts([small, wide], names=["snapshot-01", "snapshot-02"])
    with pytest.raises(SnapshotError, match="keys only in"):
        average_state_dicts([bn_model().state_dict(), plain_model().state_dict()])
    with pytest.raises(SnapshotError, match="dtype|float64"):
        average_state_dicts([small, {k: v.double() for k, v in small.items()}])
    with pytest.raises(SnapshotError, match="does not fit"):  # snapshots agree, but not with the factory
        average_model(plain_model, [bn_model().state_dict()] * 2, bn_batches=batches(1))
    with pytest.raises(SnapshotError, match="no snapshots"):
        average_state_dicts([])


def test_differing_integer_tensors_other_than_counters_are_refused():
    a = {"w": torch.ones(2), "table": torch.tensor([1, 2])}
    b = {"w": torch.zeros(2), "table": torch.tensor([1, 3])}
    with pytest.raises(SnapshotError, match="integer tensor table differs"):
        average_state_dicts([a, b])
    assert torch.equal(average_state_dicts([a, {**b, "table": a["table"]}])["w"], torch.full((2,), 0.5))


def test_recompute_rejects_bad_counts():
    with pytest.raises(ValueError, match="got 0"):
        recompute_batchnorm(bn_model(), batches(2), n_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        recompute_batchnorm(bn_model(), [], n_batches=3)
