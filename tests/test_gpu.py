"""CUDA checks of the engine and the ensemble (marked `gpu`; skipped without a CUDA device)."""

import pytest
import torch
from torch import nn

from snapens import SnapshotEnsemble
from snapens._precision import resolve_precision
from snapens.checkpoint import SnapshotStore
from snapens.engine import fit
from snapens.runs import load_training_state
from snapens.schedule import make_scheduler

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _batches(n_batches: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(n_batches)]


def _fit(tmp_path, precision: str, epochs: int = 3, **kwargs):
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    train = _batches()
    sched = make_scheduler("cosine-cycles", opt, total_steps=epochs * len(train), n_cycles=3)
    return fit(model=model, optimizer=opt, scheduler=sched, train_loader=train, val_loader=_batches(2, seed=1),
               epochs=epochs, run_dir=tmp_path, model_name="net", device="cuda", precision=precision, **kwargs)


def test_auto_precision_on_cuda():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_fit_on_cuda_takes_finite_snapshots(tmp_path, precision):
    result = _fit(tmp_path, precision)
    infos = SnapshotStore(tmp_path / "snapshots").list()
    assert [i.index for i in infos] == [1, 2, 3] and result.steps == 18
    state = load_training_state(tmp_path / "state.pt")
    assert (state["scaler"] is not None) == (precision == "fp16")  # the grad scaler is resumable state
    for info in infos:
        sd = SnapshotStore(tmp_path / "snapshots").load_state_dict(info.index)
        assert all(t.device.type == "cpu" and torch.isfinite(t.float()).all() for t in sd.values())


def test_ensemble_on_cuda_matches_cpu(tmp_path):
    _fit(tmp_path, "fp32")
    x = torch.randn(32, 3, 8, 8)
    on_cpu = SnapshotEnsemble.from_run(tmp_path, lambda name, **kw: _net(), inputs="normalized",
                                       precision="fp32").predict_proba(x)
    on_gpu = SnapshotEnsemble.from_run(tmp_path, lambda name, **kw: _net(), device="cuda", inputs="normalized",
                                       precision="fp32").predict_proba(x)
    assert on_gpu.device.type == "cpu" and torch.allclose(on_cpu, on_gpu, atol=1e-4)
