"""SVHN (cropped digits, format 2) from ``train_32x32.mat`` and ``test_32x32.mat``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from snapens.data.splits import AugmentSpec, DatasetSplits, Split, make_splits

__all__ = ["SVHN_FILES", "SVHN_URL", "load_svhn"]

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _read_mat(path: Path) -> Split:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError) as exc:
        raise ValueError(f"cannot read SVHN file {path}: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"SVHN file {path} lacks 'X' or 'y'")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0]:
        raise ValueError(f"SVHN file {path}: expected X [H, W, 3, N] and y [N], got {x.shape} and {y.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"SVHN file {path}: expected uint8 images, got {x.dtype}")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise ValueError(f"SVHN file {path}: labels outside 0..10")
    labels[labels == 10] = 0  # the digit 0 is stored as class 10
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def load_svhn(
    data_dir: str | os.PathLike[str], *, val_size: int | float | None = None, seed: int = 0
) -> DatasetSplits:
    """Load SVHN's train and test sets; classes ``"0"``..``"9"``, label 10 in the files means digit 0.

    The paper holds out 6,000 training images for validation and trains without augmentation (section 4.1),
    which is the default here. The ``extra`` set is not used.

    Raises:
        FileNotFoundError: a file is missing; the message names it and where to put it.
    """
    root = Path(data_dir).expanduser()
    splits = {}
    for split_name, file_name in SVHN_FILES.items():
        path = root / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"svhn not found: place {file_name} (from {SVHN_URL}) in {root.resolve()}"
            )
        splits[split_name] = _read_mat(path)
    classes = [str(d) for d in range(10)]
    return make_splits(
        "svhn", splits["train"], splits["test"], classes, val_size=val_size, default_val=6000, seed=seed,
        augment=AugmentSpec(),
    )
