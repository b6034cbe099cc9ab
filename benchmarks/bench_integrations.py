"""Overhead of the Lightning and transformers SnapshotCallbacks per training step, against the same trainer without.

Goal: throughput ratio (steps/s with the callback over steps/s without) >= 0.98.

    OMP_NUM_THREADS=1 python benchmarks/bench_integrations.py
    OMP_NUM_THREADS=1 python benchmarks/bench_integrations.py --frameworks lightning --rounds 7 --epochs 20

For each framework, ``--rounds`` rounds each train the same MLP on random data (``--samples`` rows of 64 features,
``--batch-size``, SGD with momentum, one thread) twice, once with and once without the callback, in alternating
order. A timing callback, present in both, records the wall time between consecutive optimizer steps; each run's
median step time is kept, and the whole fit time (which includes the ``M`` snapshots). Printed: medians over
rounds, and the median over rounds of each round's ratio ``without / with`` (1.0 = no overhead).

On a shared machine those side-by-side ratios carry the noise of the other load, so the time spent inside the
callback's own hooks is measured too (every call timed): the calls that take a snapshot (state dict copy and
atomic writes, ``M`` per run whatever its length: ms per snapshot) apart from all others (the median call times
the number of calls, per step, robust to a call being preempted; and ``1 - that / the median step without``).

Denormal floats are flushed to zero by default (``torch.set_flush_denormal``). The callback changes the learning
rate and so the values the arithmetic sees; without flushing, the transformers run with the callback was up to
~1.6x slower per step in our runs, a gap that vanished with flushing: it came from denormal arithmetic (many times
slower on x86), not from the callback's code. ``--keep-denormals`` measures with them.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frameworks", nargs="+", default=["lightning", "transformers"],
                    choices=["lightning", "transformers"])
    ap.add_argument("--rounds", type=int, default=5, help="paired runs per framework (medians reported)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormal floats to zero")
    return ap.parse_args()


_HOOK_CALLS: dict[str, list[float]] = {}  # seconds of each hook call that took no snapshot, by hook
_SAVE_SECONDS: list[float] = [0.0]  # hook calls that took one or more (state dict copy and writes)
_SAVES: list[int] = [0]


def _time_hooks(callback: Any, names: tuple[str, ...]) -> Any:
    """Time ``callback``'s hooks: into ``_SAVE_SECONDS`` when the call saved a snapshot, else ``_HOOK_CALLS``."""
    module = sys.modules[type(callback).__module__]
    if not hasattr(module.save_snapshot, "bench_counted"):
        save = module.save_snapshot

        def counted(*a: Any, **k: Any) -> Any:
            _SAVES[0] += 1
            return save(*a, **k)

        counted.bench_counted = True  # type: ignore[attr-defined]
        module.save_snapshot = counted
    for name in names:
        method = getattr(callback, name)

        def timed(*a: Any, _method: Any = method, _name: str = name, **k: Any) -> Any:
            saves, start = _SAVES[0], time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                seconds = time.perf_counter() - start
                if _SAVES[0] != saves:
                    _SAVE_SECONDS[0] += seconds
                else:
                    _HOOK_CALLS.setdefault(_name, []).append(seconds)

        setattr(callback, name, timed)
    return callback


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------------------------------ lightning


def _lightning_run(args: argparse.Namespace, with_callback: bool, folder: Path) -> tuple[float, float]:
    import lightning.pytorch as L

    from snapens.integrations.lightning import SnapshotCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(args.hidden)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    stamps: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            stamps.append(time.perf_counter())

    callbacks: list[L.Callback] = [Timer()]
    if with_callback:
        callbacks.insert(0, _time_hooks(SnapshotCallback(args.snapshots, folder), (
            "on_fit_start", "on_train_start", "on_train_batch_start", "on_before_optimizer_step",
            "on_train_batch_end", "on_train_end")))
    x, y = _data(args.samples)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size)
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=folder)
    start = time.perf_counter()
    trainer.fit(Module(), loader)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), time.perf_counter() - start


# --------------------------------------------------------------------------------------------- transformers


def _transformers_run(args: argparse.Namespace, with_callback: bool, folder: Path) -> tuple[float, float]:
    import transformers

    from snapens.integrations.transformers import SnapshotCallback

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(args.hidden)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = _data(args.samples)

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": self.x[i], "labels": self.y[i]}

    stamps: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            stamps.append(time.perf_counter())

    callbacks: list[Any] = [Timer()]
    if with_callback:
        callbacks.insert(0, _time_hooks(SnapshotCallback(args.snapshots, folder / "snapshots"), (
            "on_train_begin", "on_pre_optimizer_step", "on_step_end", "on_train_end")))
    torch.manual_seed(0)
    model = Net()
    training_args = transformers.TrainingArguments(
        output_dir=str(folder / "out"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=Data(), callbacks=callbacks,
                                   optimizers=(optimizer, None))
    trainer.remove_callback(transformers.PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), time.perf_counter() - start


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    flushing = not args.keep_denormals and torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    runs = {"lightning": _lightning_run, "transformers": _transformers_run}
    steps = args.epochs * -(-args.samples // args.batch_size)
    print(f"torch {torch.__version__}, {args.threads} thread(s); MLP 64-{args.hidden}-{args.hidden}-10, "
          f"batch {args.batch_size}, {steps} steps per fit, M={args.snapshots}, {args.rounds} paired rounds, "
          f"denormals {'flushed' if flushing else 'kept'}")
    print(f"{'framework':<13} {'step ms without':>15} {'with':>6} {'ratio':>6} {'fit s without':>13} {'with':>6} "
          f"{'ratio':>6} {'hooks us/step':>13} {'1 - hooks/step':>14} {'ms/snapshot':>11}")
    for name in args.frameworks:
        run = runs[name]
        with tempfile.TemporaryDirectory() as tmp:
            run(args, True, Path(tmp) / "warmup")  # imports, first-call costs
            results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            hook_fraction = []
            for r in range(args.rounds):
                for with_callback in ((True, False) if r % 2 == 0 else (False, True)):
                    _HOOK_CALLS.clear()
                    _SAVE_SECONDS[0] = 0.0
                    step_s, fit_s = run(args, with_callback, Path(tmp) / f"r{r}-{with_callback}")
                    results[with_callback].append((step_s, fit_s))
                    if with_callback:
                        # median call x number of calls: robust to the other load preempting a call
                        per_step = sum(statistics.median(c) * len(c) for c in _HOOK_CALLS.values()) / steps
                        hook_fraction.append((per_step, _SAVE_SECONDS[0] / args.snapshots))
        step = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
        fit = {k: statistics.median(f for _, f in v) for k, v in results.items()}
        step_ratio = statistics.median(a[0] / b[0] for a, b in zip(results[False], results[True]))
        fit_ratio = statistics.median(a[1] / b[1] for a, b in zip(results[False], results[True]))
        hook_us = 1e6 * statistics.median(h for h, _ in hook_fraction)
        hook_ratio = 1 - hook_us / (1e6 * step[False])
        save_ms = 1e3 * statistics.median(m for _, m in hook_fraction)
        print(f"{name:<13} {1e3 * step[False]:>15.3f} {1e3 * step[True]:>6.3f} {step_ratio:>6.3f} "
              f"{fit[False]:>13.2f} {fit[True]:>6.2f} {fit_ratio:>6.3f} {hook_us:>13.1f} {hook_ratio:>14.4f} "
              f"{save_ms:>11.1f}")


if __name__ == "__main__":
    main()
