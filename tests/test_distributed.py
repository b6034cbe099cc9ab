"""Data-parallel training: 2 CPU processes (gloo), through :func:`engine.fit` and through ``torchrun``.

One ``torch.multiprocessing.spawn`` job runs every engine scenario in one process group (starting processes
dominates the cost): a fresh run, a run that rank 1 alone SIGTERMs and its resume, a NaN on rank 1 only, and
errors found on one rank or on all. The parent checks the outcome against a 1-process run with the global
batch. Everything binds to the loopback interface only.
"""

from __future__ import annotations

import csv
import dataclasses
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from snapens import checkpoint, distributed, engine, runs
from snapens.workflows.common import build_loaders
from snapens.distributed import DistContext, launch_context, process_device
from snapens.data import AugmentSpec, BatchLoader, Split
from snapens.schedule import make_scheduler

WORLD = 2
PER_RANK_BATCH = 4
N_TRAIN = 48  # 48 / (4 * 2) = 6 full global batches per epoch: every rank's share has the same size
EPOCHS, M = 3, 3  # 18 steps, snapshots after steps 6, 12 and 18
STOP_CHECK_EVERY = 4
SIGTERM_AT = (1, 1)  # (epoch, batch): rank 1 signals itself before step 8 of 18 ...
STOPPED_AT = (1, 4, 10)  # ... and both ranks stop at the next stop check: (epoch, batch, step)


# --------------------------------------------------------------------------------------- shared fixtures


def toy_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    mean = images.float().mean(dim=(1, 2, 3))
    labels = (mean > 127.5).long() + (images[:, 0, 0, 0] > 200).long()  # 3 classes, learnable
    return Split(images, labels)


def toy_model(dropout: float = 0.0) -> nn.Module:
    """No BatchNorm and by default no dropout: the DDP run must match the 1-process run up to rounding."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(64, 3))


def toy_fit(run_dir: Path, *, rank: int, world: int, resume: bool = False, loader_wrapper=None,
            scheduler_steps: int | None = None, dropout: float = 0.0, **kwargs) -> engine.FitResult:
    """One toy run; the 1-process reference has ``world=1`` and the global batch."""
    model = toy_model(dropout)
    torch.manual_seed(1000 + rank)  # each rank its own dropout stream (a resume must restore each one)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    stats = {"mean": (0.5,), "std": (0.25,)}
    loader = BatchLoader(toy_split(N_TRAIN, 1), PER_RANK_BATCH * WORLD // world, seed=3, rank=rank,
                         world_size=world, **stats)
    if loader_wrapper is not None:
        loader = loader_wrapper(loader)
    val = BatchLoader(toy_split(20, 2), 8, shuffle=False, **stats)
    sched = make_scheduler("cosine-cycles", opt, total_steps=scheduler_steps or EPOCHS * len(loader),
                           n_cycles=M)
    return engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=EPOCHS,
                      run_dir=run_dir, model_name="toy", val_loader=val, channels_last=False, resume=resume,
                      stop_check_every=STOP_CHECK_EVERY, **kwargs)


class Faulty:
    """A loader that, at one (epoch, batch), sends this process SIGTERM or yields NaN images."""

    def __init__(self, loader: BatchLoader, at: tuple[int, int], action: str) -> None:
        self.loader, self.at, self.action, self.epoch = loader, at, action, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            if (self.epoch, i) == self.at:
                if self.action == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    x = torch.full_like(x, float("nan"))
            yield x, y


def outcome(call) -> dict:
    """What one rank saw: the rows and steps, or the exception."""
    try:
        result = call()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc), "signum": getattr(exc, "signum", None)}
    return {"error": None, "rows": result.rows, "steps": result.steps, "snapshots": len(result.snapshots)}


def worker(rank: int, tmp: str) -> None:
    """Every scenario, in order, in one 2-rank gloo group (a file store: no port to pick)."""
    faulthandler.enable(all_threads=True)  # a native crash in a worker shows its Python stack
    torch.set_num_threads(1)
    root = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=WORLD)
    results: dict[str, dict] = {}
    try:
        # Rank 1 gets its own folder: anything it wrote would show there.
        results["fresh"] = outcome(lambda: toy_fit(root / ("ddp" if rank == 0 else "ddp-rank1"), rank=rank,
                                                   world=WORLD))
        sigterm = (lambda loader: Faulty(loader, SIGTERM_AT, "sigterm")) if rank == 1 else None
        results["interrupted"] = outcome(lambda: toy_fit(root / "int", rank=rank, world=WORLD,
                                                         loader_wrapper=sigterm))
        if rank == 0:  # read before the resume overwrites it (rank 1 waits for rank 0 inside fit)
            state = runs.load_training_state(root / "int" / "state.pt")
            results["interrupted"]["state"] = {k: state[k] for k in ("epoch", "batch", "step", "world_size")}
            results["interrupted"]["state"]["n_rng"] = len(state["rng_ranks"])
            results["interrupted"]["snapshots"] = len(checkpoint.SnapshotStore(root / "int" / "snapshots"))
        results["resumed"] = outcome(lambda: toy_fit(root / "int", rank=rank, world=WORLD, resume=True))
        # The same with dropout: the resume must give each rank back its own RNG state.
        results["drop"] = outcome(lambda: toy_fit(root / "drop", rank=rank, world=WORLD, dropout=0.3))
        results["drop_int"] = outcome(lambda: toy_fit(root / "drop-int", rank=rank, world=WORLD, dropout=0.3,
                                                      loader_wrapper=sigterm))
        results["drop_resumed"] = outcome(lambda: toy_fit(root / "drop-int", rank=rank, world=WORLD, dropout=0.3,
                                                          resume=True))
        nan = (lambda loader: Faulty(loader, (0, 2), "nan")) if rank == 1 else None
        results["nan"] = outcome(lambda: toy_fit(root / "nan", rank=rank, world=WORLD, loader_wrapper=nan))
        # A bad scheduler on rank 1 only: rank 1 raises its error, rank 0 learns that rank 1 failed.
        results["one_bad"] = outcome(lambda: toy_fit(root / "bad", rank=rank, world=WORLD,
                                                     scheduler_steps=5 if rank == 1 else None))
        results["sync_bn_cpu"] = outcome(lambda: toy_fit(root / "bn", rank=rank, world=WORLD, sync_batchnorm=True))
        # Made by 1 process with the global batch: the same budget, but not the same number of processes.
        results["world_changed"] = outcome(lambda: toy_fit(root / "single-int", rank=rank, world=WORLD, resume=True))
    finally:
        dist.destroy_process_group()
    (root / f"result-{rank}.json").write_text(json.dumps(results))
    # Skip the interpreter's teardown: there, about one job in 20 aborted in a native gloo thread of torch
    # ("terminate called without an active exception") after all of the above had finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------------- the tests


def snapshot_tensors(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    store = checkpoint.SnapshotStore(run_dir / "snapshots")
    return [store.load_state_dict(info.index) for info in store.list()]


def strip_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def folder_hash(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, engine.FitResult]:
    """The 2-rank job (spawned) and the 1-process reference with the global batch (in this process)."""
    root = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = toy_fit(root / "single", rank=0, world=1)
        # An interrupted 1-process run: the 2-rank job must refuse to resume it.
        with pytest.raises(engine.TrainingInterrupted):
            toy_fit(root / "single-int", rank=0, world=1,
                    loader_wrapper=lambda loader: Faulty(loader, (1, 1), "sigterm"))
    finally:
        torch.set_num_threads(threads)
    before = folder_hash(root / "single-int")
    env = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        start = time.perf_counter()
        torch.multiprocessing.spawn(worker, args=(str(root),), nprocs=WORLD, join=True)
        print(f"2-rank job: {time.perf_counter() - start:.1f} s")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    r0, r1 = (json.loads((root / f"result-{r}.json").read_text()) for r in range(WORLD))
    r0["single_int_unchanged"] = folder_hash(root / "single-int") == before
    return root, r0, r1, reference


def test_two_ranks_match_one_process_with_the_global_batch(ddp_job) -> None:
    # DDP averages the ranks' mean-loss gradients: with equal shards, the gradient of the global batch's mean.
    root, r0, r1, reference = ddp_job
    assert r0["fresh"]["error"] is None and r1["fresh"]["error"] is None, (r0["fresh"], r1["fresh"])
    assert r0["fresh"]["steps"] == r1["fresh"]["steps"] == reference.steps == EPOCHS * N_TRAIN // (
        PER_RANK_BATCH * WORLD)
    ddp, single = snapshot_tensors(root / "ddp"), snapshot_tensors(root / "single")
    assert len(ddp) == len(single) == M
    for a, b in zip(ddp, single):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    initial = toy_model().state_dict()
    assert all((ddp[-1][k] - initial[k]).abs().max() > 1e-2 for k in initial)  # training did move every tensor
    steps = [info.step for info in checkpoint.SnapshotStore(root / "ddp" / "snapshots").list()]
    assert steps == [info.step for info in reference.snapshots] == [6, 12, 18]
    # Train metrics summed over the ranks, validation by rank 0 broadcast: the same rows everywhere.
    assert strip_seconds(r0["fresh"]["rows"]) == strip_seconds(r1["fresh"]["rows"])
    for got, want in zip(r0["fresh"]["rows"], reference.rows):
        assert got["step"] == want["step"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key


def test_only_rank_0_writes_the_run_folder(ddp_job) -> None:
    root, r0, r1, _ = ddp_job
    assert not (root / "ddp-rank1").exists()
    files = sorted(str(p.relative_to(root / "ddp")) for p in (root / "ddp").rglob("*") if p.is_file())
    assert files == ["best.safetensors", "metrics.csv", "snapshots/manifest.json", "snapshots/snapshot-01.safetensors",
                     "snapshots/snapshot-02.safetensors", "snapshots/snapshot-03.safetensors", "state.pt"]
    assert (r0["fresh"]["snapshots"], r1["fresh"]["snapshots"]) == (M, 0)
    with open(root / "ddp" / "metrics.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [6, 12, 18]
    state = runs.load_training_state(root / "ddp" / "state.pt")
    assert state["finished"] and state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD
    assert torch.equal(state["rng"]["torch"], state["rng_ranks"][0]["torch"])


def test_sigterm_on_one_rank_stops_both_at_the_same_step_and_resume_matches(ddp_job) -> None:
    root, r0, r1, _ = ddp_job
    for r in (r0, r1):  # rank 0 got no signal: it stops because the all-reduced flag says so
        assert (r["interrupted"]["error"], r["interrupted"]["signum"]) == ("TrainingInterrupted", signal.SIGTERM)
    epoch, batch, step = STOPPED_AT
    assert r0["interrupted"]["state"] == {"epoch": epoch, "batch": batch, "step": step, "world_size": WORLD,
                                          "n_rng": WORLD}
    assert r0["interrupted"]["snapshots"] == 1
    assert r0["resumed"]["error"] is None and r1["resumed"]["error"] is None, (r0["resumed"], r1["resumed"])
    # Bit-identical to the uninterrupted 2-rank run, metrics included (the partial epoch's sums counted once).
    for a, b in zip(snapshot_tensors(root / "int"), snapshot_tensors(root / "ddp"), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_seconds(r0["resumed"]["rows"]) == strip_seconds(r0["fresh"]["rows"])
    assert strip_seconds(r1["resumed"]["rows"]) == strip_seconds(r0["fresh"]["rows"])


def test_resume_restores_every_ranks_own_dropout_stream(ddp_job) -> None:
    root, r0, r1, _ = ddp_job
    for r in (r0, r1):
        assert r["drop_int"]["error"] == "TrainingInterrupted" and r["drop_resumed"]["error"] is None
    state = runs.load_training_state(root / "drop" / "state.pt")
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    for a, b in zip(snapshot_tensors(root / "drop-int"), snapshot_tensors(root / "drop"), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_seconds(r0["drop_resumed"]["rows"]) == strip_seconds(r0["drop"]["rows"])
    # Dropout did act: these runs differ from the ones without it.
    with_dropout, without = snapshot_tensors(root / "drop")[0], snapshot_tensors(root / "ddp")[0]
    assert not torch.equal(with_dropout["4.weight"], without["4.weight"])


def test_nan_on_one_rank_stops_every_rank(ddp_job) -> None:
    root, r0, r1, _ = ddp_job
    assert r0["nan"]["error"] == r1["nan"]["error"] == "NonFiniteLossError"
    assert not (root / "nan" / "snapshots").exists()  # the first snapshot was due after the NaN


def test_errors_before_training_raise_on_every_rank_and_write_nothing(ddp_job) -> None:
    root, r0, r1, _ = ddp_job
    assert r1["one_bad"]["error"] == "ValueError" and "scheduler was built for 5 steps" in r1["one_bad"]["message"]
    assert r0["one_bad"]["error"] == "ValueError" and "rank(s) 1 failed" in r0["one_bad"]["message"]
    for r in (r0, r1):
        assert r["sync_bn_cpu"]["error"] == "ValueError" and "needs CUDA" in r["sync_bn_cpu"]["message"]
        assert r["world_changed"]["error"] == "ValueError"
        assert "world_size is 1 but this call has 2" in r["world_changed"]["message"]
    assert not (root / "bad").exists() and not (root / "bn").exists()
    assert r0["single_int_unchanged"]


# ------------------------------------------------------------------------------------------------ the CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_snapens_train_on_two_cpu_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "snapens", "train", "--epochs", "2", "--snapshots", "2",
           "--no-eval", "--run-dir", str(run_dir), "--quiet", "--device", "cpu", "--threads", "1",
           "--precision", "fp32"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    print(f"torchrun job: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("snapens train:") == 1  # rank 0 alone prints
    assert "2 processes (batch 64 each, global batch 128)" in proc.stdout
    info = json.loads((run_dir / "config.json").read_text())
    assert info["distributed"] == {"world_size": 2, "global_batch_size": 128, "sync_bn": False}
    assert info["environment"]["world_size"] == 2
    full, tail = divmod(info["dataset"]["num_train"], 128)
    per_epoch = full + (tail >= 2)  # BatchLoader keeps a short last global batch that every rank can share
    with open(run_dir / "metrics.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [per_epoch, 2 * per_epoch]
    infos = checkpoint.SnapshotStore(run_dir / "snapshots").list()
    assert [i.step for i in infos] == [per_epoch, 2 * per_epoch]
    state = runs.load_training_state(run_dir / "state.pt")
    assert state["finished"] and state["world_size"] == 2


# ----------------------------------------------------------------------------------- launch helpers


def test_launch_context_reads_torchrun_variables() -> None:
    assert launch_context({}) == DistContext(0, 1, 0)
    ctx = launch_context({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled, ctx.is_main) == (3, 4, 1, True, False)
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        launch_context({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="'two'"):
        launch_context({"WORLD_SIZE": "two"})


def test_process_device() -> None:
    assert process_device("cpu", DistContext(1, 2, 1)) == torch.device("cpu")
    assert process_device("auto", DistContext()) == distributed.resolve_device("auto")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
            process_device(f"cuda:{torch.cuda.device_count()}", DistContext(0, 2, 0))
    else:
        with pytest.raises(ValueError, match="not available"):
            process_device("cuda", DistContext(0, 2, 0))


def test_build_loaders_shards_training_batches_only() -> None:
    from snapens.config import TrainConfig
    from snapens.data import DatasetSplits

    splits = DatasetSplits(name="toy", train=toy_split(N_TRAIN, 1), val=toy_split(10, 2), test=toy_split(10, 3),
                           classes=["a", "b", "c"], mean=(0.5,), std=(0.25,), augment=AugmentSpec())
    cfg = TrainConfig(batch_size=5, channels_last=False)
    shards = [build_loaders(cfg, splits, "cpu", rank=r, world_size=2) for r in range(2)]
    whole, _ = build_loaders(dataclasses.replace(cfg, batch_size=10), splits, "cpu")
    assert len(shards[0][0]) == len(shards[1][0]) == len(whole) == 5  # 48 = 4 * 10 + 8 -> 4 + 4 per rank
    for (x0, y0), (x1, y1), (x, y) in zip(shards[0][0], shards[1][0], whole, strict=True):
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    for _, val in shards:  # rank 0 validates alone, on the whole split
        assert val.num_samples == 10


def test_single_process_helpers_are_identities() -> None:
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.raise_if_any_rank_failed(None)
    with pytest.raises(KeyError):
        distributed.raise_if_any_rank_failed(KeyError("x"))
    with pytest.raises(ValueError, match="bad"), distributed.all_ranks_agree():
        raise ValueError("bad")
