"""The price of a prediction (snapens.cost): forward passes counted, images/s timed on the timed pass only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snapens import cost
from snapens.ensemble import SnapshotEnsemble


def _factory() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))


def _ensemble(m: int) -> SnapshotEnsemble:
    torch.manual_seed(0)
    return SnapshotEnsemble(_factory, [_factory().state_dict() for _ in range(m)], precision="fp32")


class _Clock:
    """A fake perf_counter that advances one second per image run through the counted network's forward."""

    def __init__(self, network: nn.Module) -> None:
        self.now = 0.0
        network.register_forward_pre_hook(self._tick)

    def _tick(self, module: nn.Module, args: tuple) -> None:
        self.now += float(args[0].shape[0])

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("members", [1, 3])
def test_an_ensemble_of_m_runs_m_passes_and_is_timed_on_them(members: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ens = _ensemble(members)
    clock = _Clock(ens.model)
    monkeypatch.setattr(cost.time, "perf_counter", clock)
    images = torch.rand(40, 3, 2, 2)
    got = cost.measure_inference(lambda x: ens.predict_proba(x, batch_size=16), images, network=ens.model,
                                 warmup_images=16)
    assert got.forward_passes == members  # counted, not declared
    # One fake second per image per member in the timed pass only (the 16 warm-up images are not timed):
    # img/s = N / (M * N) = 1 / M exactly, so the ensemble's rate is the single model's divided by M.
    assert got.images == 40 and got.seconds == pytest.approx(40.0 * members)
    assert got.images_per_second == pytest.approx(1.0 / members)
    assert got.to_dict() == {"forward_passes": float(members), "images_per_second": pytest.approx(1.0 / members)}


def test_subset_shares_members_and_keeps_the_outputs() -> None:
    ens = _ensemble(3)
    x = torch.rand(7, 3, 2, 2)
    sub = ens.subset([2])
    assert sub.n_members == 1 and sub.member_names == ["member 2"]
    assert torch.equal(sub.predict_proba(x), ens.member_probs(x)[2])
    pair = ens.subset([0, 1], weights=[0.25, 0.75])
    expected = 0.25 * ens.member_probs(x)[0] + 0.75 * ens.member_probs(x)[1]
    assert torch.allclose(pair.predict_proba(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="indices"):
        ens.subset([3])


def test_a_predict_that_runs_the_network_twice_counts_two_and_empty_input_is_refused() -> None:
    model = _factory()
    got = cost.measure_inference(lambda x: (model(x), model(x)), torch.rand(5, 3, 2, 2), network=model)
    assert got.forward_passes == 2.0 and got.images_per_second > 0
    with pytest.raises(ValueError, match="at least one image"):
        cost.measure_inference(model, torch.rand(0, 3, 2, 2), network=model)
