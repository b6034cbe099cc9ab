"""Engine overhead: ``snapens.engine.fit`` against a minimal hand-written training loop doing the same work.

Both train the same model on the same in-memory batches (same loader, batch size, precision, channels-last,
SGD + SnapshotLR stepped every iteration), from the same initial weights. The engine additionally tracks the
running loss/accuracy, takes a snapshot at every cycle end (``--snapshots`` per run) and writes the resume
state at every epoch end (in a background thread; the last one is waited for); those costs are included in
"all included". "training steps only" is the engine's own clock around its steps, so the difference between
the two rows is the fixed cost of the files, which short runs exaggerate. Runs are interleaved (hand, engine, hand,
engine, ...) after one warm-up of each, and the medians are compared. Target: engine >= 0.97 x hand.

Example:
    python benchmarks/bench_engine.py --model wrn-16-4 --dataset cifar10 --batch-size 128 --epochs 2 --repeats 3
    python benchmarks/bench_engine.py --epochs 1 --repeats 1   # tiny smoke run (digits, cnn-small)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from snapens import engine
from snapens._precision import resolve_precision
from snapens.distributed import resolve_device
from snapens.data import AugmentSpec, BatchLoader, Split, load_dataset
from snapens.models import build_model
from snapens.schedule import SnapshotLR


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(model: torch.nn.Module, loader: BatchLoader, epochs: int, device: torch.device, precision: str,
              channels_last: bool, snapshots: int = 1) -> float:
    """The minimal loop: forward, loss, backward, step, schedule step. Returns seconds."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = SnapshotLR(opt, total_steps=epochs * len(loader), n_cycles=min(snapshots, epochs))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()
    _sync(device)
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            sched.step()
    _sync(device)
    return time.perf_counter() - start


def engine_loop(model: torch.nn.Module, loader: BatchLoader, epochs: int, device: torch.device, precision: str,
                channels_last: bool, name: str, kwargs: dict, snapshots: int = 1) -> tuple[float, float]:
    """``engine.fit`` into a temporary run folder. Returns (wall seconds of fit, fit's own training seconds)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = SnapshotLR(opt, total_steps=epochs * len(loader), n_cycles=min(snapshots, epochs))
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        start = time.perf_counter()
        result = engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=epochs,
                            run_dir=Path(tmp) / "run", model_name=name, model_kwargs=kwargs, device=device,
                            precision=precision, channels_last=channels_last, handle_signals=False)
        _sync(device)
        return time.perf_counter() - start, result.train_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn-small")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    p.add_argument("--snapshots", type=int, default=1, help="cycles (= snapshots) per timed run")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="instead of --dataset: N random 3x32x32 images, 10 classes, CIFAR augmentation")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        train = Split(torch.randint(0, 256, (args.synthetic, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (args.synthetic,), generator=g))
        args.dataset = f"synthetic-{args.synthetic}"
        mean, std, augment, classes, channels = (0.5,) * 3, (0.29,) * 3, AugmentSpec(4, True), 10, 3
    else:
        data = load_dataset(args.dataset, data_dir=args.data_dir, val_size=0)
        train, mean, std, augment = data.train, data.mean, data.std, data.augment
        classes, channels = len(data.classes), data.in_channels
    if args.max_train is not None:
        train = train.subset(torch.arange(min(args.max_train, len(train))))
    loader = BatchLoader(train, args.batch_size, seed=0, augment=augment, mean=mean, std=std, device=device,
                         channels_last=args.channels_last)
    kwargs = {"num_classes": classes, "in_channels": channels}
    images = args.epochs * loader.num_samples

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(args.model, **kwargs)

    print(f"{args.model} on {args.dataset}: {len(train)} images, batch {args.batch_size}, {args.epochs} epoch(s) "
          f"per run, {args.snapshots} snapshot(s), device {device}, precision {precision}, "
          f"threads {torch.get_num_threads()}, "
          f"channels_last {args.channels_last}")
    # Warm-up (kernel selection, allocator, oneDNN primitive caches), untimed.
    hand_loop(fresh(), loader, 1, device, precision, args.channels_last)
    engine_loop(fresh(), loader, 1, device, precision, args.channels_last, args.model, kwargs)

    hand, eng_wall, eng_train = [], [], []
    for r in range(args.repeats):
        hand.append(images / hand_loop(fresh(), loader, args.epochs, device, precision, args.channels_last,
                                       args.snapshots))
        wall, inside = engine_loop(fresh(), loader, args.epochs, device, precision, args.channels_last, args.model,
                                   kwargs, args.snapshots)
        eng_wall.append(images / wall)
        eng_train.append(images / inside)
        print(f"  repeat {r + 1}: hand {hand[-1]:9.1f} img/s   engine {eng_wall[-1]:9.1f} img/s "
              f"(training steps only {eng_train[-1]:9.1f})")
    h, e, t = statistics.median(hand), statistics.median(eng_wall), statistics.median(eng_train)
    print()
    print(f"{'loop':<34}{'img/s (median)':>16}{'vs hand':>10}")
    print(f"{'hand-written':<34}{h:>16.1f}{1.0:>10.3f}")
    print(f"{'engine.fit (all included)':<34}{e:>16.1f}{e / h:>10.3f}")
    print(f"{'engine.fit (training steps only)':<34}{t:>16.1f}{t / h:>10.3f}")


if __name__ == "__main__":
    main()
