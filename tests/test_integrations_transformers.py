"""snapens.integrations.transformers.SnapshotCallback with the real Hugging Face Trainer, on CPU, tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from snapens.checkpoint import SnapshotStore, snapshot_filename  # noqa: E402
from snapens.ensemble import SnapshotEnsemble  # noqa: E402
from snapens.integrations.transformers import SnapshotCallback  # noqa: E402
from snapens.schedule import cosine_snapshot_lr, cosine_snapshot_steps  # noqa: E402

# 7 batches an epoch with accumulation 2 -> 4 optimizer steps an epoch (the last after a single batch);
# 3 epochs -> T = 12, M = 5 cycles of 3, 3, 2, 2, 2 steps (T is not a multiple of M).
N_SAMPLES, BATCH, ACCUMULATE, EPOCHS, M, LR0 = 28, 4, 2, 3, 5, 0.2
T = 12


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.net(x)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_SAMPLES, 6, generator=g)
        self.y = torch.randint(0, 3, (N_SAMPLES,), generator=g)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class RecordingSGD(torch.optim.SGD):
    """SGD that records, for every step, the rate it runs with and the weights it leaves."""

    def __init__(self, module: nn.Module, **kwargs) -> None:
        super().__init__(module.parameters(), **kwargs)
        self.module = module
        self.seen_lrs: list[float] = []
        self.weights_after: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[override]
        self.seen_lrs.append(self.param_groups[0]["lr"])
        loss = super().step(closure)
        self.weights_after.append({k: v.detach().clone() for k, v in self.module.state_dict().items()})
        return loss


def _args(out: Path, **kwargs) -> transformers.TrainingArguments:
    options = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
        num_train_epochs=EPOCHS, learning_rate=LR0, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0,
    )
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def _trainer(out: Path, callbacks, *, optimizer=None, args=None) -> tuple[transformers.Trainer, RecordingSGD]:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = optimizer or RecordingSGD(model, lr=LR0, momentum=0.9)
    trainer = transformers.Trainer(model=model, args=args or _args(out), train_dataset=DictDataset(),
                                   callbacks=callbacks, optimizers=(optimizer, None))
    return trainer, optimizer


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.Trainer, RecordingSGD,
                                                                SnapshotCallback]:
    """One uninterrupted run: ``<run>/snapshots`` from the callback."""
    run = tmp_path_factory.mktemp("full")
    callback = SnapshotCallback(M, run / "snapshots")
    trainer, opt = _trainer(run / "out", [callback])
    trainer.train()
    return run, trainer, opt, callback


def test_rate_at_every_step_and_snapshots_at_cycle_ends(full_run) -> None:
    run, trainer, opt, callback = full_run
    assert trainer.state.max_steps == T and callback.plan.total_steps == T
    assert opt.seen_lrs == pytest.approx([cosine_snapshot_lr(s, T, M, LR0) for s in range(T)], abs=1e-12)

    bounds = cosine_snapshot_steps(T, M)
    store = SnapshotStore(run / "snapshots")
    infos = store.list()
    assert [(i.index, i.step) for i in infos] == [(k, b + 1) for k, b in enumerate(bounds, start=1)]
    assert sorted(p.name for p in store.folder.iterdir()) == ["manifest.json"] + [
        snapshot_filename(k) for k in range(1, M + 1)]
    for info, bound in zip(infos, bounds):
        assert info.lr == pytest.approx(cosine_snapshot_lr(bound, T, M, LR0))
        assert info.model_name == "TinyNet"
        saved, expected = store.load_state_dict(info.index), opt.weights_after[bound]
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k], expected[k]) for k in expected), info.index
    assert callback.saved == list(range(1, M + 1))

    ens = SnapshotEnsemble.from_run(run, lambda name, **kw: TinyNet(), inputs="normalized", precision="fp32")
    x = torch.randn(5, 6)
    last = TinyNet().eval()
    last.load_state_dict(opt.weights_after[bounds[-1]])
    with torch.no_grad():
        assert torch.allclose(ens.member_probs(x)[-1], torch.softmax(last(x), dim=-1), atol=1e-6)


def test_trainers_own_optimizer_peak_is_learning_rate(tmp_path: Path) -> None:
    callback = SnapshotCallback(M, tmp_path / "snaps", lr_min=0.01)
    torch.manual_seed(0)
    trainer = transformers.Trainer(model=TinyNet(), args=_args(tmp_path / "out", optim="sgd"),
                                   train_dataset=DictDataset(), callbacks=[callback])
    seen: list[float] = []
    original = trainer.create_optimizer

    def create_optimizer(*a, **kw):
        opt = original(*a, **kw)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt

    trainer.create_optimizer = create_optimizer
    trainer.train()
    assert seen == pytest.approx([cosine_snapshot_lr(s, T, M, LR0, 0.01) for s in range(T)], abs=1e-12)
    assert len(SnapshotStore(tmp_path / "snaps")) == M


class _Crash(RuntimeError):
    pass


class _CrashAfterSave(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Crash(f"simulated crash after the checkpoint at step {self.step}")


@pytest.mark.parametrize("crash_step", [5, 6], ids=["mid-cycle", "right-after-snapshot-2"])
def test_resume_from_checkpoint_gives_the_same_snapshots(tmp_path: Path, crash_step: int, full_run) -> None:
    full = SnapshotStore(full_run[0] / "snapshots")

    args = _args(tmp_path / "out", save_strategy="steps", save_steps=crash_step)
    first = SnapshotCallback(M, tmp_path / "resumed")
    with pytest.raises(_Crash):
        _trainer(tmp_path / "out", [first, _CrashAfterSave(crash_step)], args=args)[0].train()
    assert first.saved == list(range(1, sum(b < crash_step for b in cosine_snapshot_steps(T, M)) + 1))

    second = SnapshotCallback(M, tmp_path / "resumed")
    trainer, opt = _trainer(tmp_path / "out", [second], args=args)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / f"checkpoint-{crash_step}"))
    assert opt.seen_lrs == pytest.approx([cosine_snapshot_lr(s, T, M, LR0) for s in range(crash_step, T)],
                                         abs=1e-12)
    assert second.saved == list(range(len(first.saved) + 1, M + 1))  # no duplicate, none missing
    resumed = SnapshotStore(tmp_path / "resumed")
    assert [(i.index, i.step) for i in resumed.list()] == [(i.index, i.step) for i in full.list()]
    for info in full.list():  # the Trainer restores RNG and skips the batches done: the same weights
        a, b = full.load_state_dict(info.index), resumed.load_state_dict(info.index)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), info.index


@pytest.mark.parametrize("kwargs", [dict(lr_scheduler_type="linear"), dict(lr_scheduler_type="cosine"),
                                    dict(lr_scheduler_type="constant_with_warmup", warmup_steps=2)])
def test_refuses_a_schedule_that_changes_the_rate(tmp_path: Path, kwargs: dict) -> None:
    trainer, _ = _trainer(tmp_path, [SnapshotCallback(M, tmp_path / "s")], args=_args(tmp_path, **kwargs))
    with pytest.raises(ValueError, match="lr_scheduler_type='constant'"):
        trainer.train()
    assert not (tmp_path / "s").exists()


def test_refuses_a_scheduler_passed_to_the_trainer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR0)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=DictDataset(),
                                   callbacks=[SnapshotCallback(M, tmp_path / "s")],
                                   optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, 4)))
    with pytest.raises(ValueError, match="StepLR"):
        trainer.train()


def test_refuses_more_snapshots_than_steps(tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, [SnapshotCallback(13, tmp_path / "s")])
    with pytest.raises(ValueError, match=r"needs at least 13 optimizer steps.*is 12"):
        trainer.train()
    assert not (tmp_path / "s").exists()


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "snapens.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install transformers accelerate \(or pip install -e .\.\[transformers\]. in a clone\)"):
        import snapens.integrations.transformers  # noqa: F401
