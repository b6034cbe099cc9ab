"""Tests for snapens.engine: schedule timing, snapshots, best model, NaN, and real kill-and-resume."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snapens import checkpoint, engine, runs
from snapens.engine._background import _SignalGuard
from snapens.schedule import SnapshotLR, make_scheduler, cosine_snapshot_lr, cosine_snapshot_steps, fge_lr, step_decay_lr, swa_lr

TESTS_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- fixtures


class ToyLoader:
    """In-memory batches whose order and noise are a pure function of (seed, epoch), like BatchLoader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int = 0, noise: float = 0.1,
                 shuffle: bool = True, labels_by_epoch: dict[int, int] | None = None,
                 nan_epoch: int | None = None) -> None:
        self.x, self.y, self.batch_size, self.seed, self.noise, self.shuffle = x, y, batch_size, seed, noise, shuffle
        self.labels_by_epoch = labels_by_epoch or {}
        self.nan_epoch = nan_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.y), generator=g) if self.shuffle else torch.arange(len(self.y))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx] + self.noise * torch.randn(self.x[idx].shape, generator=g)
            y = self.y[idx]
            if self.epoch in self.labels_by_epoch:
                y = torch.full_like(y, self.labels_by_epoch[self.epoch])
            if self.epoch == self.nan_epoch:
                x = torch.full_like(x, float("nan"))
            yield x, y


def toy_data(n: int = 40, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()  # 3 classes
    return x, y


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.9) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=1e-4)


def run_toy(run_dir: Path, *, epochs: int = 4, batch_size: int = 8, n_cycles: int = 3, resume: bool = False,
            schedule: str = "cosine-cycles", **kwargs) -> engine.FitResult:
    """The training run the kill-and-resume driver repeats: fixed seeds, CPU, fp32."""
    torch.manual_seed(0)
    x, y = toy_data()
    model = toy_model()
    opt = sgd(model)
    loader = ToyLoader(x, y, batch_size)
    sched = make_scheduler(schedule, opt, total_steps=epochs * len(loader), n_cycles=n_cycles)
    val = ToyLoader(*toy_data(24, seed=7), 8, shuffle=False, noise=0.0)
    return engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=epochs,
                      run_dir=run_dir, model_name="toy", model_kwargs={"width": 4}, val_loader=val,
                      resume=resume, **kwargs)


def folder_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot_tensors(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    store = checkpoint.SnapshotStore(run_dir / "snapshots")
    return [store.load_state_dict(info.index) for info in store.list()]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------- schedule timing


@pytest.mark.parametrize("schedule", ["cosine-cycles", "step"])
def test_snapshots_at_cycle_ends_with_the_lr_each_step_used(tmp_path: Path, schedule: str) -> None:
    # 5 epochs of 3 steps = 15 steps, M = 4: cycles of 4, 4, 4, 3 steps, three snapshots fall mid-epoch.
    x, y = toy_data(24)
    model = toy_model()
    opt = sgd(model, lr=0.2)
    loader = ToyLoader(x, y, 8)
    total, m = 15, 4
    sched = make_scheduler(schedule, opt, total_steps=total, n_cycles=m)
    used_lr: list[float] = []
    weights_after: list[dict[str, torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: used_lr.append(o.param_groups[0]["lr"]))
    opt.register_step_post_hook(lambda o, a, k: weights_after.append(checkpoint.unwrap_state_dict(model)))
    events: list[engine.SnapshotEvent] = []
    result = engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=5,
                        run_dir=tmp_path, model_name="toy", on_cycle_end=events.append, channels_last=False)

    expected = [cosine_snapshot_lr(t, total, m, 0.2) if schedule == "cosine-cycles" else step_decay_lr(t, total, 0.2)
                for t in range(total)]
    assert used_lr == pytest.approx(expected, abs=1e-12)
    bounds = cosine_snapshot_steps(total, m)
    assert bounds == [3, 7, 11, 14]
    assert [s.step for s in result.snapshots] == [b + 1 for b in bounds]
    assert [e.index for e in events] == [1, 2, 3, 4]
    assert [e.lr for e in events] == pytest.approx([expected[b] for b in bounds])
    assert [s.epoch for s in result.snapshots] == pytest.approx([4 / 3, 8 / 3, 4, 5])
    for k, b in enumerate(bounds):
        # Snapshot k holds the weights right after optimizer step b (BatchNorm buffers included).
        assert_same_tensors(snapshot_tensors(tmp_path)[k], {**weights_after[b]})
    assert result.steps == total


@pytest.mark.parametrize("schedule,options,snaps", [
    # 8 epochs of 3 steps, cycles of 2 epochs = 6 steps: the 12 steps after round(0.5 * 24) = 12 hold one cycle and
    # the descent of another (6 + 3); FGE starts at step 15, lows at 17 and 23 (the budget's last step).
    ("fge", {"fge_start": 0.5, "cycle_epochs": 2}, [17, 23]),
    # SWA from step 18: a model at each epoch end of the phase, steps 20 and 23.
    ("swa", {"swa_start": 0.75, "swa_lr": 0.05}, [20, 23]),
])
def test_fit_snapshots_wherever_the_fge_and_swa_schedules_say(tmp_path: Path, schedule: str, options: dict,
                                                              snaps: list[int]) -> None:
    x, y = toy_data(24)
    model = toy_model()
    opt = sgd(model, lr=0.2)
    loader = ToyLoader(x, y, 8)
    sched = make_scheduler(schedule, opt, total_steps=24, n_cycles=5, steps_per_epoch=3, **options)
    assert sched.snapshot_steps == snaps  # n_cycles=5 is ignored: the count follows from the budget
    used_lr: list[float] = []
    weights_after: list[dict[str, torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: used_lr.append(o.param_groups[0]["lr"]))
    opt.register_step_post_hook(lambda o, a, k: weights_after.append(checkpoint.unwrap_state_dict(model)))
    result = engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=8,
                        run_dir=tmp_path, model_name="toy", channels_last=False)
    if schedule == "fge":
        expected = [fge_lr(t, 24, 6, 0.2) for t in range(24)]
        assert expected[17] == expected[23] == pytest.approx(0.2 * 0.005)  # snapshots at the lowest rate
    else:
        expected = [swa_lr(t, 24, 0.2, 0.75, 0.25) for t in range(24)]
        assert expected[18:] == [0.05] * 6
    assert used_lr == pytest.approx(expected, abs=1e-12)
    assert [s.step for s in result.snapshots] == [b + 1 for b in snaps]
    for k, b in enumerate(snaps):
        assert_same_tensors(snapshot_tensors(tmp_path)[k], {**weights_after[b]})
    assert result.steps == 24


def test_fit_equals_a_hand_written_loop(tmp_path: Path) -> None:
    """Same data, same schedule, momentum kept across restarts: bit-identical weights; validation and
    snapshots do not disturb the RNG stream (the model has dropout)."""
    x, y = toy_data()
    epochs, m = 4, 2

    torch.manual_seed(5)
    ref = toy_model()
    opt = sgd(ref)
    loader = ToyLoader(x, y, 8)
    sched = SnapshotLR(opt, total_steps=epochs * len(loader), n_cycles=m)
    torch.manual_seed(9)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            loss = F.cross_entropy(ref(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    torch.manual_seed(5)
    model = toy_model()
    opt2 = sgd(model)
    loader2 = ToyLoader(x, y, 8)
    sched2 = SnapshotLR(opt2, total_steps=epochs * len(loader2), n_cycles=m)
    torch.manual_seed(9)
    engine.fit(model=model, optimizer=opt2, scheduler=sched2, train_loader=loader2, epochs=epochs,
               run_dir=tmp_path, model_name="toy", val_loader=ToyLoader(x, y, 16, shuffle=False),
               channels_last=False)
    assert_same_tensors(checkpoint.unwrap_state_dict(model), checkpoint.unwrap_state_dict(ref))
    assert_same_tensors(snapshot_tensors(tmp_path)[-1], checkpoint.unwrap_state_dict(ref))
    # Momentum buffers survived the restart at the end of cycle 1.
    assert all("momentum_buffer" in s for s in opt2.state.values())


def test_metrics_csv_rows_and_state(tmp_path: Path) -> None:
    result = run_toy(tmp_path, epochs=3, n_cycles=3)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(runs.METRICS_FIELDS)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [5, 10, 15]  # 40 images, batch 8
    for r, mem in zip(rows, result.rows):
        assert float(r["val_acc"]) == pytest.approx(mem["val_acc"], abs=1e-6)
        assert 0 <= float(r["train_acc"]) <= 1 and float(r["train_loss"]) > 0
    # LR column: the rate of each epoch's last step, the cycle minimum here (one cycle per epoch).
    assert [float(r["lr"]) for r in rows] == pytest.approx([cosine_snapshot_lr(4, 15, 3, 0.1)] * 3, rel=1e-5)
    state = runs.load_training_state(tmp_path / "state.pt")
    assert state["finished"] and state["step"] == 15 and len(state["rows"]) == 3


# -------------------------------------------------------------------------------------------- best model


class BiasOnly(nn.Module):
    """Predicts the same class for every input: accuracy on one-class data is exactly 0 or 1."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 2)


def test_best_checkpoint_follows_validation_accuracy(tmp_path: Path) -> None:
    # Each epoch is one cycle restarting at lr 1.0; the training labels are all 0, then all 1, then all 0 again,
    # and the validation labels are all 1: validation accuracy is ~0, 1, ~0, so the best model is epoch 2's,
    # not the last one.
    x, _ = toy_data(32)
    y = torch.zeros(32, dtype=torch.long)
    model = BiasOnly()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = ToyLoader(x, y, 8, labels_by_epoch={0: 0, 1: 1, 2: 0}, noise=0.0)
    val = ToyLoader(x, torch.ones(32, dtype=torch.long), 16, shuffle=False, noise=0.0)
    sched = SnapshotLR(opt, total_steps=12, n_cycles=3)
    at_epoch_end: list[dict[str, torch.Tensor]] = []
    result = engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=3,
                        run_dir=tmp_path, model_name="linear", val_loader=val,
                        on_epoch_end=lambda row: at_epoch_end.append(checkpoint.unwrap_state_dict(model)))
    assert [r["val_acc"] for r in result.rows] == [0.0, 1.0, 0.0]
    weights, meta = checkpoint.load_weights(tmp_path / "best.safetensors")
    assert meta["epoch"] == 2 and meta["val_acc"] == 1.0 and meta["model"]["name"] == "linear"
    assert_same_tensors(weights, at_epoch_end[1])
    assert result.best_epoch == 2 and result.best_val_acc == 1.0


def test_no_best_file_without_validation(tmp_path: Path) -> None:
    x, y = toy_data(16)
    model = toy_model()
    opt = sgd(model)
    loader = ToyLoader(x, y, 8)
    engine.fit(model=model, optimizer=opt, scheduler=SnapshotLR(opt, total_steps=4, n_cycles=2),
               train_loader=loader, epochs=2, run_dir=tmp_path, model_name="toy")
    assert not (tmp_path / "best.safetensors").exists()
    assert len(snapshot_tensors(tmp_path)) == 2


# ------------------------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_earlier_snapshots(tmp_path: Path) -> None:
    x, y = toy_data(16)
    model = toy_model()
    opt = sgd(model)
    loader = ToyLoader(x, y, 8, nan_epoch=2)  # epochs 0 and 1 are fine; each epoch is a cycle
    sched = SnapshotLR(opt, total_steps=8, n_cycles=4)
    with pytest.raises(engine.NonFiniteLossError, match=r"nan in epoch 3"):
        engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=4, run_dir=tmp_path,
                   model_name="toy")
    kept = snapshot_tensors(tmp_path)
    assert len(kept) == 2
    assert all(torch.isfinite(t).all() for sd in kept for t in sd.values() if t.is_floating_point())
    state = runs.load_training_state(tmp_path / "state.pt")
    assert state["epoch"] == 2 and not state["finished"]  # the last good epoch end, resumable
    assert isinstance(engine.NonFiniteLossError("x"), RuntimeError)


def test_refuses_to_overwrite_resume_finished_or_foreign(tmp_path: Path) -> None:
    run_toy(tmp_path / "run", epochs=2, n_cycles=2)
    before = folder_hash(tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a training run"):
        run_toy(tmp_path / "run", epochs=2, n_cycles=2)
    with pytest.raises(ValueError, match="already finished"):
        run_toy(tmp_path / "run", epochs=2, n_cycles=2, resume=True)
    assert folder_hash(tmp_path / "run") == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a snapens run"):
        run_toy(tmp_path / "foreign", epochs=2, n_cycles=2, resume=True)
    assert folder_hash(tmp_path / "foreign") == {"notes.txt": hashlib.sha256(b"hello").hexdigest()}
    torch.save({"something": 1}, tmp_path / "foreign" / "state.pt")
    with pytest.raises(ValueError, match="not a snapens training state"):
        run_toy(tmp_path / "foreign", epochs=2, n_cycles=2, resume=True)


def test_resume_with_a_different_budget_is_refused(tmp_path: Path) -> None:
    run_toy(tmp_path, epochs=2, n_cycles=2)
    state = runs.load_training_state(tmp_path / "state.pt")
    state["finished"] = False
    runs.save_training_state(tmp_path / "state.pt", state)
    with pytest.raises(ValueError, match="total_steps"):
        run_toy(tmp_path, epochs=3, n_cycles=2, resume=True)


def test_scheduler_budget_must_match(tmp_path: Path) -> None:
    x, y = toy_data(16)
    model = toy_model()
    opt = sgd(model)
    with pytest.raises(ValueError, match="scheduler was built for 5 steps"):
        engine.fit(model=model, optimizer=opt, scheduler=SnapshotLR(opt, total_steps=5, n_cycles=2),
                   train_loader=ToyLoader(x, y, 8), epochs=2, run_dir=tmp_path, model_name="toy")
    assert not tmp_path.joinpath("snapshots").exists()


# ---------------------------------------------------------------------------------------- single-cycle


def test_single_cycle_reinitialises_model_and_optimizer(tmp_path: Path) -> None:
    x, y = toy_data(16)
    model = toy_model(seed=0)
    opt = sgd(model)
    loader = ToyLoader(x, y, 8)  # 2 steps per epoch, 3 epochs, 3 cycles: cycle k starts at step 2k
    sched = make_scheduler("single-cycle", opt, total_steps=6, n_cycles=3)
    before: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
    opt.register_step_pre_hook(
        lambda o, a, k: before.__setitem__(sched.last_epoch, (checkpoint.unwrap_state_dict(model), len(o.state))))
    engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=3, run_dir=tmp_path,
               model_name="toy", reinit_factory=lambda: nn.Sequential(*toy_model_unseeded()), reinit_seed=100,
               channels_last=False)
    for k in (1, 2):
        torch.manual_seed(100 + k)  # member k is initialised under reinit_seed + k
        fresh = checkpoint.unwrap_state_dict(nn.Sequential(*toy_model_unseeded()))
        weights, n_state = before[2 * k]
        # Parameters only: the forward pass of this step already moved the BatchNorm running stats.
        params = [name for name, _ in model.named_parameters()]
        assert_same_tensors({n: weights[n] for n in params}, {n: fresh[n] for n in params})
        assert n_state == 0  # no momentum carried over from the previous member
        assert before[2 * k + 1][1] > 0  # momentum inside a cycle
    assert before[1][1] > 0
    snaps = snapshot_tensors(tmp_path)
    assert not torch.equal(snaps[1]["6.weight"], snaps[2]["6.weight"])


def toy_model_unseeded() -> list[nn.Module]:
    return [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]


# ----------------------------------------------------------------------------------------------- precision


def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    result = run_toy(tmp_path, epochs=2, n_cycles=2, precision="bf16")
    assert len(result.snapshots) == 2 and all(math.isfinite(r["train_loss"]) for r in result.rows)
    # Snapshots stay in fp32 (autocast changes the compute, not the stored weights).
    assert all(t.dtype == torch.float32 for t in snapshot_tensors(tmp_path)[0].values() if t.is_floating_point())


# ------------------------------------------------------------------------------------- kill and resume

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from snapens import engine
    from snapens.schedule import SnapshotLR
    from test_engine import run_toy

    kill_step = int(os.environ.get("KILL_AT_STEP", "-1"))
    term_step = int(os.environ.get("TERM_AT_STEP", "-1"))
    kill_replace = os.environ.get("KILL_ON_REPLACE")
    real_step, real_replace = SnapshotLR.step, os.replace

    def step(self, *a, **k):
        real_step(self, *a, **k)
        if self.last_epoch == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.last_epoch == term_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def replace(src, dst, *a, **k):
        if kill_replace and Path(dst).name == kill_replace:
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is complete, the rename never happens
        return real_replace(src, dst, *a, **k)

    SnapshotLR.step = step
    os.replace = replace
    try:
        run_toy(Path(sys.argv[1]), resume=sys.argv[2] == "resume")
    except engine.TrainingInterrupted as exc:
        sys.exit(128 + exc.signum)
""")


def _drive(tmp_path: Path, run_dir: Path, mode: str, **env: int | str) -> int:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS_DIR)))
    full_env = {**os.environ, **{k: str(v) for k, v in env.items()}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(driver), str(run_dir), mode], env=full_env, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode not in (0, -signal.SIGKILL, 128 + signal.SIGTERM):
        raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stderr}")
    return proc.returncode


def test_sigkill_and_sigterm_then_resume_is_bit_identical(tmp_path: Path) -> None:
    # run_toy: 4 epochs of 5 steps, M = 3 cycles of 7, 7, 6 steps: snapshots after steps 7, 14 and 20, the
    # first two in mid-epoch. States are written at the epoch ends, steps 5, 10, 15 and 20.
    ref, run = tmp_path / "ref", tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the driver: the same kernels, the same bits
    try:
        run_toy(ref)
    finally:
        torch.set_num_threads(threads)
    # The assertions below follow from fit's ordering promise ("Files on disk"), not from timing: a snapshot
    # is written only after the writes submitted before it (the background epoch-end state) are complete.
    # (a) SIGKILL in mid-epoch 3, while writing snapshot 2: its temp file is complete but never renamed; the
    # state of epoch 2 (step 10) is on disk, because snapshot 2 waited for it.
    assert _drive(tmp_path, run, "fresh", KILL_ON_REPLACE="snapshot-02.safetensors") == -signal.SIGKILL
    assert [s.index for s in checkpoint.SnapshotStore(run / "snapshots").list()] == [1]
    assert list((run / "snapshots").glob(".snapshot-02.safetensors.*.tmp"))
    assert runs.load_training_state(run / "state.pt")["step"] == 10
    # (b) SIGKILL while renaming the state at the end of epoch 3 (after snapshot 2 reached the disk): snapshot
    # 3 (step 20) waits for that write, so the process dies before it, however slow the writer thread is.
    assert _drive(tmp_path, run, "resume", KILL_ON_REPLACE="state.pt") == -signal.SIGKILL
    assert [s.index for s in checkpoint.SnapshotStore(run / "snapshots").list()] == [1, 2]
    assert runs.load_training_state(run / "state.pt")["step"] == 10
    # (c) SIGTERM in mid-epoch 4 (the replay re-takes snapshot 2 on the way): exit 143, a mid-epoch state.
    assert _drive(tmp_path, run, "resume", TERM_AT_STEP=17) == 128 + signal.SIGTERM
    state = runs.load_training_state(run / "state.pt")
    assert (state["step"], state["epoch"], state["batch"], state["finished"]) == (17, 3, 2, False)
    # (d) resume from the mid-epoch state to the end.
    assert _drive(tmp_path, run, "resume") == 0

    ref_snaps, run_snaps = snapshot_tensors(ref), snapshot_tensors(run)
    assert len(ref_snaps) == len(run_snaps) == 3
    for a, b in zip(ref_snaps, run_snaps):
        assert_same_tensors(a, b)
    assert_same_tensors(checkpoint.load_weights(ref / "best.safetensors")[0],
                        checkpoint.load_weights(run / "best.safetensors")[0])
    strip = lambda p: [line.rsplit(",", 1)[0] for line in p.read_text().splitlines()]  # drop "seconds"
    assert strip(run / "metrics.csv") == strip(ref / "metrics.csv")
    assert len(strip(run / "metrics.csv")) == 5  # header + 4 epochs, none duplicated
    assert not list(run.rglob(".*.tmp"))  # stale temp files were cleaned on resume
    assert runs.load_training_state(run / "state.pt")["finished"]


def test_a_snapshot_is_written_after_the_pending_epoch_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow background writer (a busy machine) must not let a snapshot overtake the epoch-end state before it.
    # The first epoch-end write waits until snapshot 1 is taken (or 2 s, when the engine rightly waits for it).
    import threading

    real = runs.save_training_state
    snapshot_taken = threading.Event()

    def slow_save(path, state):
        if state["step"] == 5:
            snapshot_taken.wait(timeout=2.0)
        real(path, state)

    def on_cycle_end(event: engine.SnapshotEvent) -> None:
        on_disk.append(runs.load_training_state(tmp_path / "run" / "state.pt")["step"])
        snapshot_taken.set()

    monkeypatch.setattr(runs, "save_training_state", slow_save)
    on_disk: list[int] = []
    run_toy(tmp_path / "run", on_cycle_end=on_cycle_end)
    # Snapshots after steps 7, 14, 20; epoch ends at 5, 10, 15, 20 (the state of step 20 comes after snapshot 3).
    assert on_disk == [5, 10, 15]


def test_a_second_signal_during_a_state_write_does_not_cut_it_short(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # First SIGINT in mid-epoch 2; the second arrives while the stop's state is being written. The state must
    # still be the mid-epoch one (after snapshot 1 at step 7), whole, and the second signal must end training right after it.
    real = runs.save_training_state

    def save(path, state):
        if state["batch"]:  # the stop's state: the impatient second Ctrl-C comes now
            os.kill(os.getpid(), signal.SIGINT)
        real(path, state)

    monkeypatch.setattr(runs, "save_training_state", save)
    with pytest.raises(engine.TrainingInterrupted) as info:
        run_toy(tmp_path / "run", on_cycle_end=lambda ev: os.kill(os.getpid(), signal.SIGINT))
    assert info.value.signum == signal.SIGINT
    state = runs.load_training_state(tmp_path / "run" / "state.pt")
    assert (state["step"], state["epoch"], state["batch"]) == (7, 1, 2)


def _run_fge(run_dir: Path, *, resume: bool = False) -> engine.FitResult:
    """8 epochs of 5 steps with FGE from step 25, cycles of 2 epochs: snapshots after steps 29 and 39."""
    torch.manual_seed(0)
    x, y = toy_data()
    model = toy_model()
    opt = sgd(model)
    loader = ToyLoader(x, y, 8)
    sched = make_scheduler("fge", opt, total_steps=8 * len(loader), n_cycles=1, steps_per_epoch=len(loader),
                           fge_start=0.5, cycle_epochs=2)
    val = ToyLoader(*toy_data(24, seed=7), 8, shuffle=False, noise=0.0)
    return engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=8, run_dir=run_dir,
                      model_name="toy", val_loader=val, resume=resume)


def test_fge_interrupted_mid_cycle_then_resumed_is_bit_identical(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from snapens.schedule import FGELR

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert [s.step for s in _run_fge(ref).snapshots] == [30, 40]
    real_step = FGELR.step

    def step(self, *a, **k):
        real_step(self, *a, **k)
        if self.last_epoch == 33:  # mid-epoch, in the second cycle, after the first snapshot
            os.kill(os.getpid(), signal.SIGTERM)  # caught by fit: the state is saved, TrainingInterrupted raised

    monkeypatch.setattr(FGELR, "step", step)
    with pytest.raises(engine.TrainingInterrupted):
        _run_fge(run)
    monkeypatch.setattr(FGELR, "step", real_step)
    state = runs.load_training_state(run / "state.pt")
    assert state["step"] == 33 and not state["finished"] and state["snapshot_steps"] == [29, 39]
    _run_fge(run, resume=True)
    ref_snaps, run_snaps = snapshot_tensors(ref), snapshot_tensors(run)
    assert len(ref_snaps) == len(run_snaps) == 2
    for a, b in zip(ref_snaps, run_snaps):
        assert_same_tensors(a, b)


# ------------------------------------------------------------------------------------------ many processes


def test_a_state_from_several_processes_is_not_resumed_by_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_toy(run, epochs=2, n_cycles=2)
    state = runs.load_training_state(run / "state.pt")
    assert state["world_size"] == 1 and state["rng_ranks"] is None  # a single process stores its own RNG only
    state.update(finished=False, world_size=2)  # as torchrun --nproc_per_node=2 would have left it
    runs.save_training_state(run / "state.pt", state)
    before = folder_hash(run)
    with pytest.raises(ValueError, match="world_size is 2 but this call has 1"):
        run_toy(run, epochs=2, n_cycles=2, resume=True)
    assert folder_hash(run) == before


def test_patient_signal_guard_only_flags_a_second_signal(tmp_path: Path) -> None:
    # Under torchrun a Ctrl-C reaches each worker twice (terminal and launcher): both must end in one stop.
    with _SignalGuard(True, tmp_path / "state.pt", second_raises=False) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert guard.signum == signal.SIGINT
    with pytest.raises(engine.TrainingInterrupted), _SignalGuard(True, tmp_path / "state.pt") as guard:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
