"""Data pipeline timings: decoding an image folder cold and warm, and BatchLoader throughput.

Usage (the real CIFAR-10 JPEG folder, from the repository root; --synthetic N skips the folder):

    python benchmarks/bench_data.py --folder ../shared/data/cifar10-jpeg

Cold = decode every image into a fresh, empty cache dir (then written there); warm = the same call again,
served from that cache. Throughput = images per second through BatchLoader at batch 128 on the CPU: index the
in-memory uint8 split, pad-4 crop + flip (CIFAR-style), convert to float and normalise.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import torch

from snapens.data import AugmentSpec, BatchLoader, Split, load_folder


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths))


def time_loader(split: Split, mean, std, *, batch_size: int, batches: int, augment: AugmentSpec | None,
                channels_last: bool, device: str = "cpu") -> float:
    """Images per second over ``batches`` batches (after one warm-up batch), repeating epochs as needed."""
    loader = BatchLoader(split, batch_size, seed=0, augment=augment, mean=mean, std=std, drop_last=True,
                         channels_last=channels_last, device=device)
    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    if len(loader) == 0:
        raise SystemExit(f"the split has {len(split)} images, fewer than one batch of {batch_size}")
    next(iter(loader))
    sync()
    seen, done, epoch, start = 0, 0, 0, time.perf_counter()
    while done < batches:
        loader.set_epoch(epoch)
        for x, _ in loader:
            seen += x.shape[0]
            done += 1
            if done == batches:
                break
        epoch += 1
    sync()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="../shared/data/cifar10-jpeg", help="ImageFolder root (train/, test/)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=300, help="batches timed per loader configuration")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default min(8, cpus))")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="BatchLoader device (cpu, cuda)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="skip the folder; time the loader on N random 3x32x32 images")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    widths = [34, 12]
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        train = Split(torch.randint(0, 256, (args.synthetic, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.zeros(args.synthetic, dtype=torch.int64))
        mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    else:
        cache = tempfile.mkdtemp(prefix="snapens-bench-cache-")
        try:
            t0 = time.perf_counter()
            ds = load_folder(args.folder, cache_dir=cache, workers=args.workers)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            ds = load_folder(args.folder, cache_dir=cache, workers=args.workers)
            warm = time.perf_counter() - t0
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        n = len(ds.train) + len(ds.val) + len(ds.test)
        shape = "x".join(str(s) for s in ds.train.images.shape[1:])
        print(f"\nfolder {args.folder}: {n} images of {shape}, {len(ds.classes)} classes")
        print(_row(["load", "seconds"], widths))
        print(_row(["cold (decode + write cache)", f"{cold:.2f}"], widths))
        print(_row(["warm (from cache)", f"{warm:.2f}"], widths))
        train, mean, std = ds.train, ds.mean, ds.std

    cifar_aug = AugmentSpec(pad=4, flip=True)
    configs = [("no augmentation", None, False), ("pad 4 + crop + flip", cifar_aug, False),
               ("pad 4 + crop + flip, channels_last", cifar_aug, True)]
    print(f"\nBatchLoader on {len(train)} train images, batch {args.batch_size}, {args.batches} batches, {args.device}")
    print(_row(["configuration", "img/s"], [34, 12]))
    for label, aug, cl in configs:
        rate = time_loader(train, mean, std, batch_size=args.batch_size, batches=args.batches,
                           augment=aug, channels_last=cl, device=args.device)
        print(_row([label, f"{rate:,.0f}"], widths))


if __name__ == "__main__":
    main()
