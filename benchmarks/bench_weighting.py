"""Time the post-hoc fits of snapens.weighting on synthetic snapshot-like member probabilities.

Target: M=6, N=5000, C=100 fits method="nll" in under 0.5 s on one core.

    python benchmarks/bench_weighting.py --threads 1
    python benchmarks/bench_weighting.py --members 6 --samples 5000 --classes 100 --repeats 7 --threads 1

The input checks (``snapens._checks``, the first row) must cost no more than the "nll" fit itself.

Prints the median and minimum wall time of each fit over ``--repeats`` runs (after one warm-up run that also pays
for the lazy scipy import), and the validation NLL each fit reaches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=6, help="M, number of snapshots")
    ap.add_argument("--samples", type=int, default=5000, help="N, validation samples")
    ap.add_argument("--classes", type=int, default=100, help="C, classes")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per fit (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1: one core)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), out


def main() -> None:
    args = _parse()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))  # before numpy / torch load their thread pools
    import torch

    from snapens import metrics
    from snapens.weighting import apply_temperature, fit_ensemble_weights, fit_temperature, weighted_average

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    m, n, c = args.members, args.samples, args.classes
    labels = torch.randint(0, c, (n,), generator=g)
    # snapshot-like members: a shared "basin" plus per-member noise, members getting slightly better over time
    base = 2.0 * torch.randn(n, c, generator=g)
    logits = base + 1.5 * torch.randn(m, n, c, generator=g)
    logits[:, torch.arange(n), labels] += torch.linspace(2.0, 3.0, m).view(m, 1)
    member_probs = logits.softmax(dim=2)  # float32, as the ensemble produces them

    from snapens import _checks

    rows = []
    med, best, _ = _time(lambda: (_checks.check_probs(member_probs, "val_member_probs", 3),
                                  _checks.check_labels(labels, n, c)), args.repeats)
    rows.append(("input checks only", med, best, float("nan")))
    for method in ("equal", "nll", "greedy"):
        med, best, w = _time(lambda method=method: fit_ensemble_weights(member_probs, labels, method), args.repeats)
        rows.append((f"weights {method}", med, best, metrics.nll(weighted_average(member_probs, w), labels)))
    ens = weighted_average(member_probs, torch.full((m,), 1.0 / m))
    med, best, _ = _time(lambda: fit_temperature(ens, labels), args.repeats)
    t = fit_temperature(ens, labels)
    rows.append((f"temperature (T={t:.3f})", med, best, metrics.nll(apply_temperature(ens, t), labels)))

    print(f"M={m} N={n} C={c} threads={args.threads} repeats={args.repeats} torch={torch.__version__}")
    print(f"{'fit':<24} {'median s':>10} {'min s':>10} {'val NLL':>10}")
    for name, med, best, f in rows:
        print(f"{name:<24} {med:>10.4f} {best:>10.4f} {f:>10.5f}")


if __name__ == "__main__":
    main()
