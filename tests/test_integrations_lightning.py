"""snapens.integrations.lightning.SnapshotCallback with the real Lightning Trainer, on CPU, with a tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from snapens.checkpoint import SnapshotStore, snapshot_filename  # noqa: E402
from snapens.ensemble import SnapshotEnsemble  # noqa: E402
from snapens.integrations.lightning import SnapshotCallback  # noqa: E402
from snapens.schedule import cosine_snapshot_lr, cosine_snapshot_steps  # noqa: E402

# 7 batches an epoch with accumulation 2 -> 4 optimizer steps an epoch (the last one after a single batch);
# 3 epochs -> T = 12 steps, M = 5 cycles of 3, 3, 2, 2, 2 steps (T is not a multiple of M).
N_SAMPLES, BATCH, ACCUMULATE, EPOCHS, M, LR0 = 28, 4, 2, 3, 5, 0.2
T = 12
WORKER = Path(__file__).with_name("lightning_ddp_worker.py")


class RecordingSGD(torch.optim.SGD):
    """SGD that records, for every step, the rate it runs with and the weights it leaves."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.seen_lrs: list[float] = []
        self.weights_after: list[dict[str, torch.Tensor]] = []
        self.module: nn.Module | None = None

    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # Lightning runs forward/backward (and on_before_optimizer_step) in here
        self.seen_lrs.append(self.param_groups[0]["lr"])
        super().step()
        if self.module is not None:
            self.weights_after.append({k: v.detach().clone() for k, v in self.module.state_dict().items()})
        return loss


class TinyModule(L.LightningModule):
    def __init__(self, with_scheduler: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.with_scheduler = with_scheduler
        self.optimizer: RecordingSGD | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        self.optimizer = RecordingSGD(self.parameters(), lr=LR0, momentum=0.9)
        self.optimizer.module = self
        if self.with_scheduler:
            return [self.optimizer], [torch.optim.lr_scheduler.StepLR(self.optimizer, 5)]
        return self.optimizer


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _trainer(callbacks, tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE, accelerator="cpu", devices=1,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def _fit(tmp_path: Path, folder: str = "run/snapshots", **kwargs) -> tuple[TinyModule, SnapshotCallback]:
    torch.manual_seed(0)
    module = TinyModule()
    callback = SnapshotCallback(M, tmp_path / folder)
    _trainer([callback], tmp_path, **kwargs).fit(module, _loader())
    return module, callback


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyModule, SnapshotCallback]:
    """One uninterrupted run: ``<run>/snapshots`` from the callback."""
    run = tmp_path_factory.mktemp("full")
    module, callback = _fit(run, "snapshots")
    return run, module, callback


def test_rate_at_every_step_and_snapshots_at_cycle_ends(full_run) -> None:
    run, module, callback = full_run
    opt = module.optimizer
    assert callback.plan is not None and callback.plan.total_steps == T
    assert opt.seen_lrs == pytest.approx([cosine_snapshot_lr(s, T, M, LR0) for s in range(T)], abs=1e-12)
    bounds = cosine_snapshot_steps(T, M)
    assert bounds == [2, 5, 7, 9, 11]

    store = SnapshotStore(run / "snapshots")
    infos = store.list()
    assert [i.index for i in infos] == list(range(1, M + 1))
    assert [i.step for i in infos] == [b + 1 for b in bounds]
    assert sorted(p.name for p in store.folder.iterdir()) == ["manifest.json"] + [
        snapshot_filename(k) for k in range(1, M + 1)]
    for info, bound in zip(infos, bounds):
        assert info.lr == pytest.approx(cosine_snapshot_lr(bound, T, M, LR0))
        assert info.model_name == "TinyModule"
        saved = store.load_state_dict(info.index)
        expected = opt.weights_after[bound]
        assert saved.keys() == expected.keys()
        for key in expected:
            assert torch.equal(saved[key], expected[key]), (info.index, key)
    assert callback.saved == list(range(1, M + 1))

    # The existing ensemble API reads the folder; its members are the snapshots.
    ens = SnapshotEnsemble.from_run(run, lambda name, **kw: TinyModule(), inputs="normalized", precision="fp32")
    x = torch.randn(5, 6)
    probs = ens.member_probs(x)
    last = TinyModule().eval()
    last.load_state_dict(opt.weights_after[bounds[-1]])
    with torch.no_grad():
        assert torch.allclose(probs[-1], torch.softmax(last(x), dim=-1), atol=1e-6)
    assert probs.shape == (M, 5, 3)


class _Crash(RuntimeError):
    pass


class _CrashAfter(L.Callback):
    """Checkpoint after optimizer step ``step`` (as ModelCheckpoint would), then die."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)
            raise _Crash(f"simulated crash after step {self.step}")


@pytest.mark.parametrize("crash_step", [4, 6], ids=["epoch-end-mid-cycle", "right-after-snapshot-2"])
def test_resume_from_checkpoint_gives_the_same_snapshots(tmp_path: Path, crash_step: int, full_run) -> None:
    full = SnapshotStore(full_run[0] / "snapshots")

    ckpt = tmp_path / "mid.ckpt"
    torch.manual_seed(0)
    callback = SnapshotCallback(M, tmp_path / "resumed")
    with pytest.raises(_Crash):
        _trainer([callback, _CrashAfter(crash_step, ckpt)], tmp_path).fit(TinyModule(), _loader())
    before = [i.index for i in SnapshotStore(tmp_path / "resumed").list()]
    assert before == list(range(1, sum(b < crash_step for b in cosine_snapshot_steps(T, M)) + 1))

    torch.manual_seed(123)  # a fresh process: nothing but the checkpoint carries over
    module = TinyModule()
    callback = SnapshotCallback(M, tmp_path / "resumed")
    _trainer([callback], tmp_path).fit(module, _loader(), ckpt_path=ckpt)
    assert module.optimizer.seen_lrs == pytest.approx(
        [cosine_snapshot_lr(s, T, M, LR0) for s in range(crash_step, T)], abs=1e-12)
    assert callback.saved == list(range(len(before) + 1, M + 1))  # no duplicate, none missing

    resumed = SnapshotStore(tmp_path / "resumed")
    assert [(i.index, i.step) for i in resumed.list()] == [(i.index, i.step) for i in full.list()]
    if crash_step == 4:  # an epoch boundary: Lightning replays the same batches, so the weights match exactly
        for info in full.list():
            a, b = full.load_state_dict(info.index), resumed.load_state_dict(info.index)
            assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), info.index


def test_max_steps_budget(tmp_path: Path) -> None:
    module, callback = _fit(tmp_path, max_steps=7, max_epochs=-1)
    assert callback.plan.total_steps == 7
    assert module.optimizer.seen_lrs == pytest.approx([cosine_snapshot_lr(s, 7, M, LR0) for s in range(7)])
    assert [i.step for i in SnapshotStore(tmp_path / "run" / "snapshots").list()] == [2, 4, 5, 6, 7]


def test_refuses_a_scheduler(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="also returns the scheduler.*StepLR"):
        _trainer([SnapshotCallback(M, tmp_path / "s")], tmp_path).fit(TinyModule(with_scheduler=True), _loader())


def test_refuses_more_snapshots_than_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs at least 13 optimizer steps.*is 12"):
        _trainer([SnapshotCallback(13, tmp_path / "s")], tmp_path).fit(TinyModule(), _loader())
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("bad", [dict(n_snapshots=0), dict(n_snapshots=2.0), dict(lr_min=-1.0),
                                 dict(dirpath="")])
def test_bad_arguments(tmp_path: Path, bad: dict) -> None:
    kwargs = {"n_snapshots": 3, "dirpath": tmp_path, **bad}
    with pytest.raises(ValueError):
        SnapshotCallback(**kwargs)


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "snapens.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install lightning \(or pip install -e .\.\[lightning\]. in a clone\)"):
        import snapens.integrations.lightning  # noqa: F401


def test_importing_snapens_does_not_import_lightning() -> None:
    code = ("import sys, snapens, snapens.integrations, snapens.ensemble; "
            "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_one_copy_by_rank_zero(tmp_path: Path) -> None:
    # The two processes are started here, side by side, as torchrun would (Lightning sees LOCAL_RANK and does
    # not launch them itself): their slow imports overlap. Traffic stays on the loopback interface.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "NODE_RANK": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env={**env, "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    reports = {r["rank"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json"))}
    assert sorted(reports) == [0, 1]
    assert reports[0]["saved"] == list(range(1, reports[0]["M"] + 1))
    assert reports[1]["saved"] == []
    store = SnapshotStore(tmp_path / "snapshots")
    names = sorted(p.name for p in store.folder.iterdir())
    assert names == ["manifest.json"] + [snapshot_filename(k) for k in range(1, reports[0]["M"] + 1)]
    T_ddp, M_ddp = reports[0]["T"], reports[0]["M"]
    assert [i.step for i in store.list()] == [b + 1 for b in cosine_snapshot_steps(T_ddp, M_ddp)]
    # Both ranks ran the same schedule, and the file holds the (synchronised) weights at the cycle end.
    for rank in (0, 1):
        assert reports[rank]["lrs"] == pytest.approx([cosine_snapshot_lr(s, T_ddp, M_ddp, LR0) for s in range(T_ddp)])
    last = store.load_state_dict(M_ddp)
    for rank in (0, 1):
        final = reports[rank]["final"]
        assert all(torch.allclose(last[k], torch.tensor(final[k]), atol=1e-6) for k in final)
