"""scikit-learn's bundled 8x8 handwritten digits: the default dataset, needing no files and no network."""

from __future__ import annotations

import numpy as np
import torch

from snapens.data.splits import AugmentSpec, DatasetSplits, Split, make_splits, stratified_split

__all__ = ["DIGITS_TEST_FRACTION", "DIGITS_TEST_SEED", "load_digits"]

#: The test split is fixed: the same 20 % of the 1,797 images whatever ``seed`` a run uses.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 20170401


def load_digits(*, val_size: int | float | None = None, seed: int = 0) -> DatasetSplits:
    """The 1,797 digits as uint8 ``[N, 1, 8, 8]`` images.

    Pixel values 0..16 become ``round(v * 255 / 16)``. A fixed stratified 20 % is the test split; the validation
    split (default 10 % of the rest) is stratified and seeded by ``seed``. No augmentation: flipping a digit
    changes what it is, and 8x8 images leave no room to crop.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)
    images = np.rint(values * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    everything = Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    n_test = int(round(DIGITS_TEST_FRACTION * len(everything)))
    train_idx, test_idx = stratified_split(labels, n_test, DIGITS_TEST_SEED)
    classes = [str(d) for d in range(10)]
    return make_splits(
        "digits", everything.subset(train_idx), everything.subset(test_idx), classes,
        val_size=val_size, default_val=0.1, seed=seed, augment=AugmentSpec(),
    )
