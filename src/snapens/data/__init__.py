"""Datasets as in-memory uint8 tensors, stratified validation splits, and a seeded batch loader.

``load_dataset(spec)`` understands:

- ``digits``: scikit-learn's bundled 8x8 digits (the default; no files needed).
- ``cifar10`` / ``cifar100``: the official python-format archives under ``data_dir`` (``download=True`` fetches
  them); CIFAR-100 uses the 100 fine labels.
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` under ``data_dir``.
- ``folder:PATH``: an ImageFolder tree ``PATH/{train,test[,val]}/<class>/*`` (decoded once, then cached).
- ``cifar10-jpeg``: ``folder:`` on ``data_dir``, default ``../shared/data/cifar10-jpeg`` (CIFAR-10 as JPEGs).

This package imports nothing of snapens beyond itself and ``snapens.config``.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapens.data.cifar import load_cifar
from snapens.data.digits import load_digits
from snapens.data.download import user_cache_dir
from snapens.data.folder import load_folder
from snapens.data.loader import BatchLoader, augment_batch, epoch_permutation
from snapens.data.splits import (
    AugmentSpec,
    DatasetSplits,
    Split,
    _check_limit,
    channel_stats,
    derive_seed,
    limit_splits,
    split_fingerprint,
    stratified_split,
)
from snapens.data.svhn import load_svhn

__all__ = [
    "Split",
    "AugmentSpec",
    "DatasetSplits",
    "BatchLoader",
    "load_dataset",
    "list_datasets",
    "load_cifar",
    "load_digits",
    "load_folder",
    "load_svhn",
    "stratified_split",
    "limit_splits",
    "split_fingerprint",
    "channel_stats",
    "derive_seed",
    "epoch_permutation",
    "augment_batch",
    "user_cache_dir",
    "DEFAULT_DATA_DIR",
    "DEFAULT_CIFAR10_JPEG",
]

#: Where cifar10/cifar100/svhn files are looked for (relative to the working directory) when no data_dir is given.
DEFAULT_DATA_DIR = "data"
#: The folder the ``cifar10-jpeg`` alias reads when no data_dir is given (relative to the working directory).
DEFAULT_CIFAR10_JPEG = "../shared/data/cifar10-jpeg"

_NAMED = ("digits", "cifar10", "cifar100", "svhn", "cifar10-jpeg")


def list_datasets() -> list[str]:
    """The dataset specs :func:`load_dataset` accepts (``folder:PATH`` stands for any image folder)."""
    return [*_NAMED, "folder:PATH"]


def load_dataset(
    spec: str = "digits",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    val_size: int | float | None = None,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DatasetSplits:
    """Load a dataset by name into train / val / test splits of uint8 tensors.

    Args:
        spec: one of :func:`list_datasets` (case-insensitive names; ``folder:`` keeps the path as written).
        data_dir: folder holding the files (default ``./data``; for ``folder:`` a relative PATH is taken
            relative to it when given).
        download: fetch the CIFAR archives when missing (cifar10 / cifar100 only).
        val_size: images held out of the training set for validation: ``None`` for the dataset's default
            (5,000 CIFAR, 6,000 SVHN, 10 % digits and folders), an int count, a float fraction, or 0.
        seed: seeds the validation split (the test split never depends on it).
        limit_train, limit_test: keep stratified, seeded subsets of that many training / test images
            (:func:`~snapens.data.splits.limit_splits`; the validation split is carved first and shrinks with
            the training split). ``None`` keeps every image.

    Returns:
        The :class:`DatasetSplits`, with mean/std of the training split and the default augmentation.

    Raises:
        ValueError: an unknown spec or a bad argument, naming it.
        FileNotFoundError: missing files; the message says which file to place where.
    """
    _check_limit(limit_train, "limit_train")  # before a long decode or download
    _check_limit(limit_test, "limit_test")
    data = _load(spec, data_dir=data_dir, download=download, val_size=val_size, seed=seed)
    return limit_splits(data, limit_train=limit_train, limit_test=limit_test, seed=seed)


def _load(
    spec: str, *, data_dir: str | os.PathLike[str] | None, download: bool, val_size: int | float | None, seed: int
) -> DatasetSplits:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    spec = spec.strip()
    if spec.lower().startswith("folder:"):
        raw = spec[len("folder:") :]
        if not raw:
            raise ValueError(f"dataset spec {spec!r} needs a path: folder:PATH")
        if download:
            raise ValueError(f"download is only available for cifar10 and cifar100, not {spec!r}")
        path = Path(raw).expanduser()
        if data_dir is not None and not path.is_absolute():
            path = Path(data_dir).expanduser() / path
        return load_folder(path, val_size=val_size, seed=seed)
    name = spec.lower()
    if name not in _NAMED:
        raise ValueError(f"unknown dataset {spec!r}; expected one of {', '.join(list_datasets())}")
    if download and name in ("svhn", "cifar10-jpeg"):
        raise ValueError(f"download is only available for cifar10 and cifar100, not {spec!r}")
    if name == "digits":
        return load_digits(val_size=val_size, seed=seed)
    if name == "cifar10-jpeg":
        return load_folder(Path(data_dir or DEFAULT_CIFAR10_JPEG).expanduser(), val_size=val_size, seed=seed,
                           name="cifar10-jpeg")
    root = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    if name == "svhn":
        return load_svhn(root, val_size=val_size, seed=seed)
    return load_cifar(name, root, download=download, val_size=val_size, seed=seed)
