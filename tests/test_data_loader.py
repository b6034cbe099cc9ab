"""snapens.data.BatchLoader: seeded order, sharding, vectorised augmentation and normalisation."""

from __future__ import annotations

import pytest
import torch

from snapens.data import AugmentSpec, BatchLoader, Split, augment_batch, epoch_permutation

IDENTITY = dict(mean=(0.0,), std=(1.0 / 255.0,))  # x = u8 * 1.0 exactly: batches show the raw pixel values


def numbered_split(n: int, c: int = 1, h: int = 4, w: int = 4) -> Split:
    """Image k is filled with k % 256 and has label k, so labels identify samples."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, c, h, w).contiguous()
    return Split(images, torch.arange(n, dtype=torch.int64))


def collect(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_order_is_a_function_of_seed_and_epoch() -> None:
    split = numbered_split(50)
    a = BatchLoader(split, 8, seed=7, **IDENTITY)
    b = BatchLoader(split, 8, seed=7, **IDENTITY)
    for epoch in (0, 1, 2, 3):
        a.set_epoch(epoch)
    b.set_epoch(3)  # jumping straight to epoch 3 (a resumed run) replays the same batches
    batches_a, batches_b = collect(a), collect(b)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b))
    assert torch.equal(torch.cat([y for _, y in batches_a]), epoch_permutation(50, 7, 3))
    b.set_epoch(4)
    assert not torch.equal(torch.cat([y for _, y in collect(b)]), torch.cat([y for _, y in batches_a]))
    other_seed = BatchLoader(split, 8, seed=8, **IDENTITY)
    other_seed.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in collect(other_seed)]), torch.cat([y for _, y in batches_a]))
    # Every sample exactly once, values matching labels.
    assert sorted(torch.cat([y for _, y in batches_a]).tolist()) == list(range(50))
    assert all(torch.equal(x[:, 0, 0, 0], y.float()) for x, y in batches_a)


def test_lengths_drop_last_and_no_shuffle() -> None:
    split = numbered_split(50)
    loader = BatchLoader(split, 8, shuffle=False, **IDENTITY)
    sizes = [len(y) for _, y in loader]
    assert len(loader) == 7 and sizes == [8] * 6 + [2] and loader.num_samples == 50
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(50))
    dropped = BatchLoader(split, 8, drop_last=True, **IDENTITY)
    assert len(dropped) == 6 and [len(y) for _, y in dropped] == [8] * 6 and dropped.num_samples == 48
    empty = BatchLoader(numbered_split(0), 8, **IDENTITY)
    assert len(empty) == 0 and list(empty) == []


@pytest.mark.parametrize(
    ("n", "batch", "world", "expected_len"), [(50, 4, 3, 4), (51, 4, 3, 5), (10, 3, 4, 1), (13, 3, 4, 1), (24, 4, 3, 2)]
)
def test_sharded_ranks_are_disjoint_and_cover(n, batch, world, expected_len) -> None:
    split = numbered_split(n)
    loaders = [BatchLoader(split, batch, seed=1, rank=r, world_size=world, **IDENTITY) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(2)
    per_rank = [torch.cat([y for _, y in loader]) if len(loader) else torch.zeros(0) for loader in loaders]
    assert {len(loader) for loader in loaders} == {expected_len}  # equal batch counts on every rank
    seen = torch.cat(per_rank).tolist()
    assert len(seen) == len(set(seen))  # disjoint
    g = batch * world
    tail = n % g
    covered = n if tail >= world else n - tail  # a tail shorter than the world size is dropped
    assert len(seen) == covered == sum(loader.num_samples for loader in loaders)
    assert set(seen) <= set(range(n))
    # Rank r's b-th batch is the r-th block of the b-th global batch of the shared permutation.
    perm = epoch_permutation(n, 1, 2)
    first = [y for _, y in loaders[1]][0]
    expected = perm[batch : 2 * batch] if n >= g else torch.tensor_split(perm, world)[1]
    assert torch.equal(first, expected)


def test_sharded_augmentation_matches_single_process() -> None:
    split = Split(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                  torch.arange(40))
    aug = AugmentSpec(pad=2, flip=True)
    single = BatchLoader(split, 12, seed=5, augment=aug, mean=(0.5,) * 3, std=(0.25,) * 3)
    ranks = [BatchLoader(split, 4, seed=5, augment=aug, mean=(0.5,) * 3, std=(0.25,) * 3, rank=r, world_size=3)
             for r in range(3)]
    for loader in (single, *ranks):
        loader.set_epoch(1)
    joined = [torch.cat(parts) for parts in zip(*[[x for x, _ in r] for r in ranks])]
    expected = [x for x, _ in single]
    assert len(joined) == len(expected) == 4
    assert all(torch.equal(a, b) for a, b in zip(joined, expected))


def test_augment_batch_exact_windows_and_mirror() -> None:
    # Two 1x3x4 images numbered 1..12 (row-major); pad 1 gives a 5x6 canvas with a zero border.
    img = torch.arange(1, 13, dtype=torch.uint8).view(1, 1, 3, 4).repeat(2, 1, 1, 1)
    offsets = torch.tensor([[0, 0], [2, 1]])
    flips = torch.tensor([False, True])
    out = augment_batch(img, offsets, flips, pad=1)
    assert out.shape == img.shape and out.dtype == torch.uint8
    # dy=0, dx=0: the window starts one row above and one column left of the image.
    assert out[0, 0].tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7]]
    # dy=2, dx=1: rows 2..3 of the image and the bottom border, columns 0..3; then mirrored left-right.
    assert out[1, 0].tolist() == [[8, 7, 6, 5], [12, 11, 10, 9], [0, 0, 0, 0]]
    # pad 0, no flip: identity; pad 0 with flip: exact mirror.
    same = augment_batch(img, torch.zeros(2, 2, dtype=torch.int64), torch.tensor([False, False]), pad=0)
    assert torch.equal(same, img)
    mirrored = augment_batch(img, torch.zeros(2, 2, dtype=torch.int64), torch.tensor([True, True]), pad=0)
    assert torch.equal(mirrored, img.flip(3))


def test_loader_augmentation_draws_valid_crops() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(1, 256, (64, 2, 6, 6), dtype=torch.uint8, generator=g)  # no zeros: border is visible
    split = Split(images, torch.arange(64))
    pad = 2
    raw = dict(mean=(0.0, 0.0), std=(1 / 255, 1 / 255))  # x = u8 exactly
    loader = BatchLoader(split, 16, seed=0, augment=AugmentSpec(pad=pad, flip=True), **raw)
    keys = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)]
    offsets = torch.tensor([k[:2] for k in keys])
    flips = torch.tensor([k[2] for k in keys])
    seen_flip = seen_shift = False
    for x, y in loader:
        assert x.shape == (len(y), 2, 6, 6) and x.dtype == torch.float32
        for img, k in zip(x, y.tolist()):
            candidates = augment_batch(images[k : k + 1].expand(len(keys), -1, -1, -1), offsets, flips, pad).float()
            matches = [key for key, c in zip(keys, candidates) if torch.equal(c, img)]
            assert matches, f"sample {k} is not a pad/crop/flip of its source"
            seen_flip |= any(m[2] for m in matches)
            seen_shift |= any(m[:2] != (pad, pad) for m in matches)
    assert seen_flip and seen_shift
    # Same seed and epoch, fresh loader: identical augmented batches.
    again = BatchLoader(split, 16, seed=0, augment=AugmentSpec(pad=pad, flip=True), **raw)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader, again))


def test_normalisation_numbers_and_channels_last() -> None:
    images = torch.empty(2, 3, 2, 2, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 51, 0, 255
    split = Split(images, torch.zeros(2, dtype=torch.int64))
    loader = BatchLoader(split, 2, shuffle=False, mean=(0.1, 0.5, 0.5), std=(0.2, 0.25, 0.5))
    (x, _), = list(loader)
    # (51/255 - 0.1)/0.2 = 0.5; (0 - 0.5)/0.25 = -2; (1 - 0.5)/0.5 = 1.
    assert torch.allclose(x[:, 0], torch.full((2, 2, 2), 0.5), atol=1e-6)
    assert torch.allclose(x[:, 1], torch.full((2, 2, 2), -2.0), atol=1e-6)
    assert torch.allclose(x[:, 2], torch.full((2, 2, 2), 1.0), atol=1e-6)
    cl = BatchLoader(split, 2, shuffle=False, mean=(0.1, 0.5, 0.5), std=(0.2, 0.25, 0.5), channels_last=True)
    (x_cl, _), = list(cl)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(x_cl, x)


def test_loader_rejects_bad_arguments() -> None:
    split = numbered_split(10)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(split, 0, **IDENTITY)
    with pytest.raises(ValueError, match="one per channel"):
        BatchLoader(split, 2, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="std"):
        BatchLoader(split, 2, mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="rank=2"):
        BatchLoader(split, 2, rank=2, world_size=2, **IDENTITY)
    loader = BatchLoader(split, 2, **IDENTITY)
    with pytest.raises(ValueError, match="-1"):
        loader.set_epoch(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_matches_cpu() -> None:
    g = torch.Generator().manual_seed(4)
    split = Split(torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(300))
    kwargs = dict(seed=9, augment=AugmentSpec(pad=4, flip=True), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
                  channels_last=True)
    cpu = BatchLoader(split, 64, device="cpu", **kwargs)
    gpu = BatchLoader(split, 64, device="cuda", **kwargs)
    cpu.set_epoch(2)
    gpu.set_epoch(2)
    pairs = list(zip(cpu, gpu))
    assert len(pairs) == 5
    for (xc, yc), (xg, yg) in pairs:
        assert xg.device.type == "cuda" and xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
