"""Batches from in-memory uint8 tensors with batched, seeded augmentation on the loader's device.

Everything random is a pure function of ``(seed, epoch, batch index)``: the epoch's order comes from a
``torch.Generator`` seeded from ``(seed, epoch)`` and each batch's crop offsets and flips from one seeded from
``(seed, epoch, batch index)``. A resumed run that calls ``set_epoch(e)`` replays exactly the batches of the
original epoch ``e``, and no worker processes are involved.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from snapens.data.splits import AugmentSpec, Split, derive_seed

__all__ = ["BatchLoader", "epoch_permutation", "augment_batch"]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``n`` samples in epoch ``epoch``: ``randperm`` from a generator seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(n, generator=generator)


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad, crop and flip a batch of images at once, each image with its own offset and coin.

    With ``P`` the image zero-padded by ``pad`` on every side, output pixel ``(i, j)`` of image ``b`` is
    ``P[b, :, dy + i, dx + j]``, or ``P[b, :, dy + i, dx + W - 1 - j]`` when ``flips[b]`` (crop, then mirror).

    Args:
        images: ``[B, C, H, W]`` (any dtype).
        offsets: int64 ``[B, 2]``, ``(dy, dx)`` each in ``[0, 2 * pad]``.
        flips: bool ``[B]``.
        pad: padding in pixels.

    Returns:
        ``[B, C, H, W]``, same dtype and device as ``images``.
    """
    b, c, h, w = images.shape
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(
            f"offsets must be [{b}, 2] and flips [{b}], got {tuple(offsets.shape)} and {tuple(flips.shape)}"
        )
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    wp = w + 2 * pad
    device = images.device
    offsets, flips = offsets.to(device), flips.to(device)
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = offsets[:, :1] + ar_h  # [B, H]
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)  # [B, W]
    # One gather over the flattened padded plane, shared by all channels (~3x faster than two on CPU).
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat_index).view(b, c, h, w)


class BatchLoader:
    """Shuffled, augmented, normalised mini-batches over a :class:`~snapens.data.Split` held in memory.

    The split is moved to ``device`` once; indexing, augmentation and normalisation run there. Each batch is
    ``(x, y)`` with ``x = (u8 / 255 - mean) / std`` float32 ``[B, C, H, W]`` and ``y`` int64 ``[B]``.

    Sharding: the epoch's permutation (identical on every rank) is cut into global batches of
    ``batch_size * world_size``; rank ``r`` takes the ``r``-th block of ``batch_size`` from each. The ranks'
    batches are disjoint and together cover the permutation once. A last, short global batch is split as
    evenly as possible (sizes differ by at most one); if it holds fewer images than there are ranks it is
    dropped so every rank yields the same number of batches. Augmentation draws are made per global batch and
    position, so rank ``r`` sees the same augmented images a single process with ``batch_size * world_size``
    would produce in those positions.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); without it every pass repeats
    epoch 0.

    Example:
        >>> loader = BatchLoader(ds.train, 64, seed=0, augment=ds.augment, mean=ds.mean, std=ds.std)
        >>> loader.set_epoch(3)
        >>> for x, y in loader: ...
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: AugmentSpec | None = None,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        channels = int(split.images.shape[1])
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got {list(mean)} and {list(std)}")
        if any(not s > 0 for s in std):
            raise ValueError(f"std values must be > 0, got {list(std)}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.augment = augment if augment is not None and augment.enabled else None
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._images = split.images.to(self.device)
        self._labels = split.labels.to(self.device)
        std_t = torch.tensor(list(std), dtype=torch.float32)
        mean_t = torch.tensor(list(mean), dtype=torch.float32)
        # (u8/255 - mean)/std == u8 * scale - shift, one multiply-subtract per element.
        self._scale = (1.0 / (255.0 * std_t)).view(1, channels, 1, 1).to(self.device)
        self._shift = (mean_t / std_t).view(1, channels, 1, 1).to(self.device)

    @property
    def dataset_size(self) -> int:
        return int(self._labels.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n, g = self.dataset_size, self._global_batch()
        full, tail = divmod(n, g)
        return full + (1 if not self.drop_last and tail >= self.world_size else 0)

    def _rank_bounds(self, size: int) -> tuple[int, int]:
        # Position of this rank's block inside a global batch of `size` images.
        if size == self._global_batch():
            return self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        q, r = divmod(size, self.world_size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (1 if self.rank < r else 0)

    @property
    def num_samples(self) -> int:
        """Images this rank yields per epoch."""
        n, g = self.dataset_size, self._global_batch()
        total = 0
        for b in range(len(self)):
            lo, hi = self._rank_bounds(min(g, n - b * g))
            total += hi - lo
        return total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, g = self.dataset_size, self._global_batch()
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for b in range(len(self)):
            start = b * g
            size = min(g, n - start)
            lo, hi = self._rank_bounds(size)
            index = order[start + lo : start + hi]
            x = self._images[index]
            if self.augment is not None:
                x = self._augment(x, b, size, lo, hi)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = x.to(torch.float32).mul_(self._scale).sub_(self._shift)
            yield x, self._labels[index]

    def _augment(self, x: torch.Tensor, batch: int, size: int, lo: int, hi: int) -> torch.Tensor:
        spec = self.augment
        assert spec is not None
        # Drawn on the CPU for the whole global batch, so the values do not depend on device or world size.
        generator = torch.Generator().manual_seed(derive_seed("augment", self.seed, self.epoch, batch))
        offsets = torch.randint(0, 2 * spec.pad + 1, (size, 2), generator=generator)
        coins = torch.randint(0, 2, (size,), generator=generator).bool()
        flips = coins if spec.flip else torch.zeros_like(coins)
        return augment_batch(x, offsets[lo:hi], flips[lo:hi], spec.pad)

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}, "
            f"rank={self.rank}/{self.world_size})"
        )
