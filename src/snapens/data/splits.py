"""The containers every loader returns, the stratified validation split, and the channel statistics."""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "Split",
    "AugmentSpec",
    "DatasetSplits",
    "resolve_val_count",
    "stratified_split",
    "channel_stats",
    "make_splits",
    "limit_splits",
    "derive_seed",
    "split_fingerprint",
]

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images and labels of one split, held in memory.

    Attributes:
        images: uint8 tensor ``[N, C, H, W]`` with values 0..255.
        labels: int64 tensor ``[N]``.
        source_index: for a split cut out of another by :meth:`subset`, the positions of its images in the split
            loaded from disk (int64 ``[N]``); ``None`` for a split as loaded (positions ``0..N-1``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    source_index: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be an int64 tensor [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | np.ndarray) -> Split:
        """The images and labels at ``index`` (a copy), remembering where they came from (``source_index``)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        source = index if self.source_index is None else self.source_index[index]
        return Split(self.images[index].contiguous(), self.labels[index].contiguous(), source.contiguous())


@dataclass(frozen=True)
class AugmentSpec:
    """Training-time augmentation: zero-pad by ``pad`` pixels, crop back at a random offset, flip left-right.

    ``AugmentSpec(pad=4, flip=True)`` is the standard CIFAR augmentation (paper section 4.1).
    """

    pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"augmentation pad must be an int >= 0, got {self.pad!r}")

    @property
    def enabled(self) -> bool:
        return self.pad > 0 or bool(self.flip)


@dataclass
class DatasetSplits:
    """A dataset cut into train / validation / test, with its class names, statistics and default augmentation.

    Attributes:
        name: the dataset's name (``"cifar10"``, ``"folder:/abs/path"``, ...).
        train, val, test: the splits; ``val`` may be empty. ``test`` is only ever evaluated.
        classes: class names; label ``k`` is ``classes[k]``.
        mean, std: per-channel mean and (population) standard deviation of ``train`` in [0, 1] units.
        augment: the augmentation this dataset is usually trained with.
    """

    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, e.g. ``("order", seed, epoch)``: the first 8 bytes of its SHA-256.

    Hashing keeps nearby tuples such as ``(0, 1)`` and ``(1, 0)`` from giving related streams.
    """
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_fingerprint(data: DatasetSplits) -> str:
    """SHA-256 (hex) of which images went where: each split's ``source_index`` (``0..N-1`` when it has none) and
    labels, in order, for train, val and test.

    Two loads of a dataset with the same seed, ``val_size`` and limits give the same fingerprint; another seed
    gives another validation split, and so another fingerprint, even where sizes and classes are unchanged.
    """
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        index = split.source_index if split.source_index is not None else torch.arange(len(split))
        digest.update(f"{name}:{len(split)}:".encode())
        digest.update(np.ascontiguousarray(index.numpy(), dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(split.labels.numpy(), dtype="<i8").tobytes())
    return digest.hexdigest()


def resolve_val_count(val_size: int | float | None, n: int, default: int | float) -> int:
    """How many of ``n`` training images to hold out.

    Args:
        val_size: ``None`` (use ``default``), an int count, a float fraction in (0, 1), or 0 for none.
        n: number of training images available.
        default: the dataset's default, interpreted like ``val_size``.

    Returns:
        The count, ``round(fraction * n)`` for fractions.
    """
    value = default if val_size is None else val_size
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"val_size must be an int count, a float fraction or None, got {value!r}")
    if isinstance(value, numbers.Integral):
        count = int(value)
    elif value == 0:
        count = 0
    elif 0.0 < value < 1.0:
        count = int(round(float(value) * n))
    else:
        raise ValueError(f"val_size as a fraction must be in (0, 1), got {value}")
    if count < 0:
        raise ValueError(f"val_size must be >= 0, got {value}")
    if count > 0 and count >= n:
        raise ValueError(f"val_size {value} leaves no training images: the training set has {n}")
    return count


def stratified_split(labels: torch.Tensor | np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``n_val`` indices with the class proportions of ``labels``.

    Class ``c`` with ``n_c`` of the ``N`` images gets ``floor(n_val * n_c / N)`` validation images; the few left
    over go to the classes with the largest fractional parts (ties to the lower class index), so the total is
    exactly ``n_val``. Within each class the images are chosen by a permutation seeded with ``seed``.

    Returns:
        ``(train_index, val_index)``: disjoint, sorted int64 arrays that together cover ``0..N-1``.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    if n_val < 0 or (n_val > 0 and n_val >= n):
        raise ValueError(f"cannot hold out {n_val} of {n} images")
    if n_val == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    exact = n_val * counts / n
    quota = np.floor(exact).astype(np.int64)
    leftover = n_val - int(quota.sum())
    order = np.lexsort((np.arange(len(classes)), -(exact - quota)))
    quota[order[:leftover]] += 1
    rng = np.random.default_rng(seed)
    val_parts = []
    for c, q in zip(classes, quota):
        members = np.flatnonzero(y == c)
        val_parts.append(members[rng.permutation(members.shape[0])[:q]])
    val_index = np.sort(np.concatenate(val_parts))
    mask = np.ones(n, dtype=bool)
    mask[val_index] = False
    return np.flatnonzero(mask).astype(np.int64), val_index.astype(np.int64)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population standard deviation of uint8 images, in [0, 1] units.

    From each channel's histogram ``n_v`` (count of value ``v``) over its ``m = N*H*W`` values, exact integer
    sums ``S1 = sum_v v n_v`` and ``S2 = sum_v v^2 n_v`` give ``mean = S1 / (255 m)`` and
    ``std = sqrt(S2 / m - (S1 / m)^2) / 255``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("cannot compute channel statistics of an empty training split")
    values = torch.arange(256, dtype=torch.int64)
    m = n * h * w
    mean, std = [], []
    for k in range(c):
        counts = torch.bincount(images[:, k].reshape(-1), minlength=256)
        mu = int((counts * values).sum()) / m
        var = max(int((counts * values * values).sum()) / m - mu * mu, 0.0)
        mean.append(mu / 255.0)
        std.append(math.sqrt(var) / 255.0)
    return tuple(mean), tuple(std)


def make_splits(
    name: str,
    train: Split,
    test: Split,
    classes: Sequence[str],
    *,
    val: Split | None = None,
    val_size: int | float | None,
    default_val: int | float,
    seed: int,
    augment: AugmentSpec,
) -> DatasetSplits:
    """Carve a stratified validation split from ``train`` (unless ``val`` is given) and compute statistics."""
    if val is None:
        n_val = resolve_val_count(val_size, len(train), default_val)
        train_idx, val_idx = stratified_split(train.labels, n_val, seed)
        val = train.subset(val_idx)
        train = train.subset(train_idx) if n_val else train
    if len(train) == 0:
        raise ValueError(f"dataset {name!r} has no training images")
    mean, std = channel_stats(train.images)
    # DEBUG: `snapens train` reads the dataset again to evaluate; its CLI says what it loaded, once.
    log.debug("dataset %s: %d train, %d val, %d test, %d classes", name, len(train), len(val), len(test),
              len(classes))
    return DatasetSplits(name, train, val, test, list(classes), mean, std, augment)


def _check_limit(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ValueError(f"{name} must be a positive image count, got {value!r}")


def _stratified_subset(split: Split, keep: int, seed: int) -> Split:
    if keep >= len(split):
        return split
    _, kept = stratified_split(split.labels, keep, seed)  # `keep` images with the class proportions of `split`
    return split.subset(kept)


def limit_splits(
    data: DatasetSplits, *, limit_train: int | None = None, limit_test: int | None = None, seed: int = 0
) -> DatasetSplits:
    """Stratified, seeded subsets of a dataset's splits, for trying a big dataset quickly.

    ``limit_train`` keeps that many training images. The validation split, already carved from the full
    training set, shrinks in the same proportion, ``round(len(val) * limit_train / len(train))`` (at least one
    image when it had any): choices are still made on held-out training images, never on test images.
    ``limit_test`` keeps that many test images. Each subset has its split's class proportions
    (:func:`stratified_split`'s quotas). Training and validation subsets are seeded by ``seed``; the test subset
    by a fixed seed, so every run with the same ``limit_test`` is evaluated on the same images whatever its seed.
    A limit at or above a split's size keeps the split whole. Mean and std are those of the kept training images.

    Raises:
        ValueError: a limit that is not a positive integer.
    """
    _check_limit(limit_train, "limit_train")
    _check_limit(limit_test, "limit_test")
    train, val, test = data.train, data.val, data.test
    if limit_train is not None and limit_train < len(train):
        if len(val):
            n_val = max(1, int(round(len(val) * limit_train / len(train))))
            val = _stratified_subset(val, n_val, derive_seed("limit-val", seed))
        train = _stratified_subset(train, limit_train, derive_seed("limit-train", seed))
    if limit_test is not None:
        test = _stratified_subset(test, limit_test, derive_seed("limit-test"))
    if train is data.train and val is data.val and test is data.test:
        return data
    mean, std = channel_stats(train.images) if train is not data.train else (data.mean, data.std)
    log.debug("dataset %s limited to %d train, %d val, %d test", data.name, len(train), len(val), len(test))
    return DatasetSplits(data.name, train, val, test, list(data.classes), mean, std, data.augment)
