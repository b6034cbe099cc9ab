"""Training throughput of the zoo's networks: fp32 against bf16 autocast + channels_last, side by side.

Each (model, mode) pair gets its own model and SGD optimizer and trains on one fixed random batch
(3x32x32, labels uniform over 10 classes); data loading is not measured. After a warm-up, the pairs are
timed in interleaved rounds (round r times every pair once before round r+1 starts), so drifting machine load
hits all pairs alike; the table reports the median images per second over the rounds.

Example (the lead's real measurement, on a quiet machine)::

    python benchmarks/bench_models.py --models resnet-20 wrn-16-4 densenet-40-12 --steps 20 --repeats 5

Quick check that it runs::

    python benchmarks/bench_models.py --models resnet-20 --steps 1 --warmup 1 --repeats 1 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snapens.models import build_model

MODES = ("fp32", "bf16+cl")  # the default comparison
ALL_MODES = ("fp32", "fp32+cl", "bf16", "bf16+cl")


@dataclass
class Case:
    model_name: str
    mode: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    rates: list[float]


def make_case(model_name: str, mode: str, batch_size: int, device: torch.device, seed: int) -> Case:
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=10).to(device)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    if mode.endswith("+cl"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return Case(model_name, mode, model.train(), optimizer, x, y, device, [])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(case: Case, steps: int) -> float:
    """Run ``steps`` SGD steps and return the elapsed wall-clock seconds."""
    autocast = (
        torch.autocast(case.device.type, dtype=torch.bfloat16)
        if case.mode.startswith("bf16")
        else contextlib.nullcontext()
    )
    sync(case.device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = F.cross_entropy(case.model(case.x), case.y)
        case.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        case.optimizer.step()
    sync(case.device)
    return time.perf_counter() - start


def environment(device: torch.device) -> list[str]:
    lines = [
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.platform()}",
        f"threads: intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}",
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()} ({platform.processor() or platform.machine()})",
    ]
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet-20", "wrn-16-4", "densenet-40-12"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps per pair before timing")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=ALL_MODES,
                        help="precision + memory format pairs to compare; the first is the baseline")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    try:
        cases = [make_case(name, mode, args.batch_size, device, args.seed) for name in args.models for mode in args.modes]
    except ValueError as exc:
        parser.error(str(exc))
    for line in environment(device):
        print(line)
    print(f"batch {args.batch_size}, 3x32x32, {args.warmup} warm-up + {args.repeats} x {args.steps} timed steps\n")

    for case in cases:
        if args.warmup:
            train_steps(case, args.warmup)
    for _ in range(args.repeats):
        for case in cases:
            case.rates.append(args.batch_size * args.steps / train_steps(case, args.steps))

    header = f"{'model':<18}{'params':>10}" + "".join(f"{m + ' img/s':>16}" for m in args.modes)
    header += "".join(f"{m + ' / ' + args.modes[0]:>20}" for m in args.modes[1:])
    print(header)
    print("-" * len(header))
    for name in args.models:
        rates = [statistics.median(next(c for c in cases if c.model_name == name and c.mode == m).rates)
                 for m in args.modes]
        params = sum(p.numel() for p in cases[args.models.index(name) * len(args.modes)].model.parameters())
        line = f"{name:<18}{params / 1e6:>9.2f}M" + "".join(f"{r:>16.1f}" for r in rates)
        print(line + "".join(f"{r / rates[0]:>19.2f}x" for r in rates[1:]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
