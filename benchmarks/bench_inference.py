"""Test-time cost of a snapshot ensemble against its physical limit, M forward passes of the best single model.

Prints, side by side in one run and for each device (CPU; CUDA when there is one):

* one model's img/s at fp32 and at the auto precision (bf16 + channels-last where the hardware runs bf16
  natively), plus ``torch.compile`` of it with ``--compile``;
* the ensemble's img/s (``SnapshotEnsemble.predict_proba`` on a uint8 image tensor, auto precision) for
  M = 1..``--max-members``, and ``ratio`` = ensemble img/s / (best single-model img/s / M): 1.00 is the limit.
  Each repeat times M passes of the best single model and one pass of the ensemble (alternating which goes
  first), and the ratio is the median of the pairs' ratios, so that load from other processes cancels out;
* with ``--run-dir``, the wall time of ``snapens evaluate`` on that run (validation + test splits, members at the
  auto precision), against the sum of its members' forward passes at the best single-model speed.

Members are freshly initialised models (throughput does not depend on the weights); images are random uint8,
normalised by the ensemble as it does for real runs. Timings are medians over ``--repeats`` runs after a warm-up.

    python benchmarks/bench_inference.py --threads 1
    python benchmarks/bench_inference.py --threads 1 --run-dir runs/c10-resnet20      # + evaluate's wall time
    python benchmarks/bench_inference.py --device cuda --images 10000 --batch-size 1000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's, for realistic normalisation


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet-20", help="a snapens model name (default: resnet-20)")
    ap.add_argument("--images", type=int, default=2000, help="test images per timed pass (default 2000)")
    ap.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    ap.add_argument("--max-members", type=int, default=8, help="ensembles of M = 1..this (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row, median reported (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one core)")
    ap.add_argument("--device", default="all", help="cpu, cuda or all (= cpu, and cuda when there is one)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the single model")
    ap.add_argument("--run-dir", default=None, help="a run folder: also time `snapens evaluate` on it")
    ap.add_argument("--data-dir", default=None, help="with --run-dir: where the run's dataset is now")
    return ap.parse_args()


def _median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up: allocator, oneDNN / cuDNN kernel choice, lazy imports
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _bench_device(args: argparse.Namespace, device: Any) -> None:
    import torch
    import torch.nn.functional as F

    from snapens._precision import autocast, resolve_precision
    from snapens.ensemble import SnapshotEnsemble
    from snapens.models import build_model

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    auto = resolve_precision("auto", device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g, dtype=torch.uint8)
    x_dev = images.to(device)
    scale = (1.0 / (255.0 * torch.tensor(STD))).view(1, 3, 1, 1).to(device)
    shift = (torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1).to(device)

    def factory() -> torch.nn.Module:
        return build_model(args.model, num_classes=10)

    def single(precision: str, compiled: bool = False) -> Callable[[], None]:
        torch.manual_seed(0)
        model = factory().eval().to(device)
        channels_last = precision != "fp32"
        if channels_last:
            model.to(memory_format=torch.channels_last)
        run = torch.compile(model) if compiled else model
        ctx = autocast(device, precision)

        def go() -> None:
            with torch.inference_mode():
                for x in x_dev.split(args.batch_size):
                    x = x.to(torch.float32).mul_(scale).sub_(shift)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with ctx():
                        logits = run(x)
                    F.softmax(logits.float(), dim=-1)
        return go

    n = args.images
    print(f"\n== {device} ({torch.get_num_threads()} threads), {args.model}, {n} images, batches of "
          f"{args.batch_size}, auto = {auto}")
    rows = [("single model, fp32", "fp32", False)]
    if auto != "fp32":
        rows.append((f"single model, {auto} + channels-last (auto)", auto, False))
    if args.compile:
        rows.append((f"single model, {auto}, torch.compile", auto, True))
    speeds = {}
    for label, precision, compiled in rows:
        t0 = time.perf_counter()
        fn = single(precision, compiled)
        seconds = _median_seconds(fn, args.repeats, sync)
        speeds[label] = n / seconds
        extra = f"  (first call incl. compile: {time.perf_counter() - t0 - seconds * args.repeats:.1f} s)" \
            if compiled else ""
        print(f"{label:<48} {n / seconds:>9.0f} img/s{extra}")
    best_label = max((k for k in speeds if "compile" not in k), key=speeds.__getitem__)
    best_fn = single(auto)
    best_fn()
    # The ratio is measured pairwise (best single model, then the ensemble, per repeat) and its median taken,
    # so that load from other processes on a shared machine cancels out.
    print(f"best single model: {best_label}; per M, each repeat pairs M passes of it with one of the ensemble")
    print(f"{'M':>3} {'ensemble img/s':>15} {'single img/s':>13} {'limit (single/M)':>17} {'ratio':>7}")
    torch.manual_seed(1)
    states = [factory().state_dict() for _ in range(args.max_members)]
    for m in range(1, args.max_members + 1):
        ens = SnapshotEnsemble(factory, states[:m], mean=MEAN, std=STD, precision="auto").to(device)
        ens.predict_proba(images, batch_size=args.batch_size)  # warm-up
        pairs = []
        for r in range(args.repeats):
            # M passes of the single model against one ensemble pass: equal lengths, alternating order, so a
            # change in the machine's load hits both sides alike.
            single_m = lambda: [best_fn() for _ in range(m)]  # noqa: E731
            ensemble = lambda: ens.predict_proba(images, batch_size=args.batch_size)  # noqa: E731
            if r % 2:
                t_ens, t_single_m = _timed(ensemble, sync), _timed(single_m, sync)
            else:
                t_single_m, t_ens = _timed(single_m, sync), _timed(ensemble, sync)
            pairs.append((t_single_m / m, t_ens))
        single_s = statistics.median(n / a for a, _ in pairs)
        ens_s = statistics.median(n / b for _, b in pairs)
        ratio = statistics.median(m * a / b for a, b in pairs)
        print(f"{m:>3} {ens_s:>15.0f} {single_s:>13.0f} {single_s / m:>17.0f} {ratio:>7.2f}")
    best = speeds[best_label]

    if args.run_dir:
        from snapens.workflows.evaluation import evaluate_run

        t0 = time.perf_counter()
        summary = evaluate_run(args.run_dir, optimize=-1, device=device, data_dir=args.data_dir, precision="auto")
        wall = time.perf_counter() - t0
        m, n_eval = summary["num_members"], summary["num_val"] + summary["num_test"]
        forward = m * n_eval / best
        print(f"snapens evaluate {args.run_dir}: {wall:.1f} s wall for {m} members x {n_eval} images "
              f"(precision {summary['run']['precision']}); members' forward passes at the best single-model speed: "
              f"{forward:.1f} s; ratio {wall / forward:.2f} (includes loading the data and the files)")


def main() -> None:
    args = _parse()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch starts its thread pool
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    for device in devices:
        _bench_device(args, device)


if __name__ == "__main__":
    main()
