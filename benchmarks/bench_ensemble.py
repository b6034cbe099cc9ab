"""Inference cost of a snapshot ensemble: streaming members through one model vs holding all M (materialized).

Prints images/s and peak device memory for both forms, and the time to load one member's weights.

Examples:
    python benchmarks/bench_ensemble.py --steps 2                         # tiny smoke run on CPU
    python benchmarks/bench_ensemble.py --model wrn-16-4 --device cuda    # needs snapens.models
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from snapens.checkpoint import unwrap_state_dict
from snapens.ensemble import SnapshotEnsemble


def conv_net(width: int, num_classes: int = 10) -> nn.Module:
    """A plain conv net with BatchNorm, used when no snapens model name is given."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def factory_for(name: str, width: int) -> Callable[[], nn.Module]:
    if name == "conv":
        return lambda: conv_net(width)
    from snapens.models import build_model  # only benchmarks reach into models

    return lambda: build_model(name, num_classes=10)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    fn()  # warm-up (allocator, kernels)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def memory_before(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, baseline: int) -> float:
    """Peak device memory (MiB) since :func:`memory_before`, above what was allocated then."""
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="conv", help="'conv' (built in) or a snapens.models name")
    parser.add_argument("--width", type=int, default=32, help="width of the built-in conv net")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--n", type=int, default=1024, help="images per prediction")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions")
    args = parser.parse_args()

    device = torch.device(args.device)
    factory = factory_for(args.model, args.width)
    torch.manual_seed(0)
    states = [unwrap_state_dict(factory()) for _ in range(args.members)]
    n_params = sum(p.numel() for p in factory().parameters())
    x = torch.randn(args.n, 3, args.size, args.size)
    x_dev = x.to(device)

    builders: dict[str, Callable[[], nn.Module]] = {
        "stream (members on cpu)": lambda: SnapshotEnsemble(factory, states).to(device),
        f"stream (members on {device.type})": lambda: SnapshotEnsemble(
            factory, states, member_device=device
        ).to(device),
        "materialized": lambda: SnapshotEnsemble(factory, states).materialize().to(device),
    }
    rows = []
    for label, build in builders.items():
        # built one at a time, so the memory column holds this form's weights and activations only
        baseline = memory_before(device)
        ens = build()
        seconds = timed(lambda e=ens: e.predict_proba(x_dev, batch_size=args.batch_size), device, args.steps)
        rows.append((label, args.n / seconds, peak_since(device, baseline)))
        if label.startswith("stream (members on cpu)"):
            def load_one(e: SnapshotEnsemble = ens) -> None:
                e._loaded = None
                e._load_member(0)

            load_s = timed(load_one, device, max(args.steps, 3))
        del ens

    print(f"model {args.model} ({n_params / 1e6:.2f} M params), M={args.members}, N={args.n}, "
          f"batch {args.batch_size}, {args.size}x{args.size}, device {device}")
    print(f"{'form':<28} {'img/s':>10} {'peak MiB':>10}")
    for label, ips, mem in rows:
        print(f"{label:<28} {ips:>10.1f} {mem:>10.1f}")
    print(f"load one member from cpu: {load_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
