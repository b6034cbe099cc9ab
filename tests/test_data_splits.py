"""snapens.data: containers, stratified splits, channel statistics, digits and the spec dispatcher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snapens.data import AugmentSpec, DatasetSplits, Split, channel_stats, list_datasets, load_dataset, stratified_split
from snapens.data.splits import resolve_val_count


def test_split_validates_dtypes_and_lengths() -> None:
    Split(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        Split(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    assert len(Split(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))) == 0


def test_augment_spec() -> None:
    assert not AugmentSpec().enabled
    assert AugmentSpec(pad=4).enabled and AugmentSpec(flip=True).enabled
    with pytest.raises(ValueError, match="-1"):
        AugmentSpec(pad=-1)


@pytest.mark.parametrize(
    ("val_size", "n", "default", "expected"),
    [(None, 100, 10, 10), (None, 100, 0.1, 10), (0, 100, 10, 0), (0.0, 100, 10, 0), (0.25, 10, 0, 2),
     (0.26, 10, 0, 3), (np.int64(7), 100, 0, 7), (99, 100, 0, 99)],
)
def test_resolve_val_count(val_size, n, default, expected) -> None:
    assert resolve_val_count(val_size, n, default) == expected


@pytest.mark.parametrize("bad", [-1, 1.0, 1.5, -0.2, True, "10", 100, 250])
def test_resolve_val_count_rejects(bad) -> None:
    with pytest.raises(ValueError, match="val_size"):
        resolve_val_count(bad, 100, 10)


def test_stratified_split_quotas_by_largest_remainder() -> None:
    # Class counts 50/30/20 and 10 held out: exactly 5/3/2.
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, val = stratified_split(labels, 10, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [5, 3, 2]
    # Counts 5/3/2 and 3 held out: exact shares 1.5/0.9/0.6 -> floors 1/0/0, the 2 left go to classes 1 and 2.
    labels = np.repeat([0, 1, 2], [5, 3, 2])
    _, val = stratified_split(labels, 3, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [1, 1, 1]


def test_stratified_split_disjoint_covering_deterministic() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, size=503)
    train, val = stratified_split(labels, 60, seed=3)
    assert len(val) == 60 and len(train) == 443
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(503))
    counts, val_counts = np.bincount(labels, minlength=7), np.bincount(labels[val], minlength=7)
    assert np.all(np.abs(val_counts - 60 * counts / 503) < 1)
    train2, val2 = stratified_split(labels, 60, seed=3)
    assert np.array_equal(val, val2) and np.array_equal(train, train2)
    _, val3 = stratified_split(labels, 60, seed=4)
    assert not np.array_equal(val, val3)
    train0, val0 = stratified_split(labels, 0, seed=3)
    assert len(val0) == 0 and np.array_equal(train0, np.arange(503))


def test_channel_stats_hand_computed() -> None:
    # One channel with values 0, 255, 255, 255: mean 0.75, std sqrt(0.75 * 0.25) in [0, 1] units.
    images = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.75,))
    assert std == pytest.approx((math.sqrt(0.75 * 0.25),))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8, generator=g)
    mean, std = channel_stats(images)
    as_float = images.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    assert mean == pytest.approx(tuple(as_float.mean(1).tolist()), abs=1e-12)
    assert std == pytest.approx(tuple(as_float.std(1, unbiased=False).tolist()), abs=1e-12)
    with pytest.raises(ValueError, match="empty"):
        channel_stats(torch.zeros(0, 1, 2, 2, dtype=torch.uint8))


def test_digits_default_dataset() -> None:
    ds = load_dataset()
    assert isinstance(ds, DatasetSplits) and ds.name == "digits"
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.train.images.shape[1:] == (1, 8, 8) and ds.train.images.dtype == torch.uint8
    assert len(ds.test) == 359 and len(ds.val) == round(0.1 * (1797 - 359)) == 144
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    # 0..16 scaled to 0..255 by rint(v * 255 / 16): 16 -> 255, 8 -> 128.
    values = set(torch.unique(ds.train.images).tolist())
    assert 255 in values and 0 in values and values <= {round(v * 255 / 16) for v in range(17)}
    assert ds.mean == pytest.approx(channel_stats(ds.train.images)[0])
    assert not ds.augment.enabled
    # The test split is fixed; the validation split follows the seed.
    other = load_dataset("DIGITS", seed=1, val_size=0.2)
    assert torch.equal(ds.test.images, other.test.images) and torch.equal(ds.test.labels, other.test.labels)
    assert len(other.val) == round(0.2 * 1438)
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.val.images, ds.val.images)
    assert np.bincount(ds.test.labels.numpy(), minlength=10).min() >= 35  # stratified: ~36 per class


def test_load_dataset_rejects_bad_specs(tmp_path) -> None:
    with pytest.raises(ValueError, match="'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="folder:PATH"):
        load_dataset("folder:")
    with pytest.raises(ValueError, match="download"):
        load_dataset("svhn", data_dir=tmp_path, download=True)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("digits", seed=True)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=1.5)
    assert "folder:PATH" in list_datasets() and "cifar100" in list_datasets()


def test_limit_splits_are_stratified_seeded_and_keep_validation_honest() -> None:
    from snapens.data import limit_splits

    full = load_dataset("digits", seed=3)
    small = load_dataset("digits", seed=3, limit_train=400, limit_test=100)
    assert (len(small.train), len(small.test)) == (400, 100)
    # Validation, carved from the full training set first, shrinks in the training split's proportion.
    assert len(small.val) == round(len(full.val) * 400 / len(full.train)) == 45
    # Per-class counts are the largest-remainder quotas of each split's own class counts.
    for part, n in (("train", 400), ("val", 45), ("test", 100)):
        counts = torch.bincount(getattr(full, part).labels, minlength=10).double()
        exact = n * counts / counts.sum()
        got = torch.bincount(getattr(small, part).labels, minlength=10).double()
        assert float(got.sum()) == n and bool(((got - exact).abs() < 1).all()), (part, got, exact)

    def rows(split: Split) -> set[bytes]:
        return {bytes(img.numpy().tobytes()) + bytes([int(y)]) for img, y in zip(split.images, split.labels)}

    # Subsets of the full splits: validation images stay out of training, test images stay test images.
    assert rows(small.train) <= rows(full.train) and rows(small.val) <= rows(full.val)
    assert rows(small.test) <= rows(full.test) and not rows(small.train) & rows(small.val)
    # Deterministic; the training subset follows the seed, the test subset does not.
    again = load_dataset("digits", seed=3, limit_train=400, limit_test=100)
    assert torch.equal(again.train.images, small.train.images) and torch.equal(again.test.labels, small.test.labels)
    other = load_dataset("digits", seed=4, limit_train=400, limit_test=100)
    assert not torch.equal(other.train.images, small.train.images)
    assert torch.equal(other.test.images, small.test.images)
    # Statistics are those of the images trained on.
    assert small.mean == channel_stats(small.train.images)[0] and small.mean != full.mean
    # A limit at or above a split's size keeps it whole; bad limits are refused before anything is read.
    assert limit_splits(full, limit_train=10**6, limit_test=len(full.test), seed=3) is full
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match="limit_train must be a positive image count"):
            load_dataset("digits", limit_train=bad)


# ------------------------------------------------------------------------- split fingerprint (issue 20.6)


def _class_sorted(n_per_class: int, seed: int, val_size: int) -> DatasetSplits:
    """A folder-like dataset: labels sorted by class, so the validation labels are the same for every seed."""
    from snapens.data.splits import make_splits

    labels = torch.arange(3).repeat_interleave(n_per_class)
    images = (labels.view(-1, 1, 1, 1) * 40 + torch.arange(len(labels)).view(-1, 1, 1, 1) % 7).to(torch.uint8)
    train = Split(images.expand(-1, 1, 2, 2).contiguous(), labels)
    test = Split(images[:3].expand(-1, 1, 2, 2).contiguous(), labels[:3])
    return make_splits("toy", train, test, ["a", "b", "c"], val_size=val_size, default_val=0, seed=seed,
                       augment=AugmentSpec())


def test_subset_remembers_positions_in_the_loaded_split() -> None:
    split = Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10) % 2)
    assert split.source_index is None
    sub = split.subset(torch.tensor([7, 2, 5]))
    assert sub.source_index.tolist() == [7, 2, 5]
    assert sub.subset(np.array([2, 0])).source_index.tolist() == [5, 7]  # composed, not relative
    assert sub.subset(np.array([2, 0])).images.flatten().tolist() == [5, 7]


def test_split_fingerprint_follows_the_split_not_only_its_sizes() -> None:
    from snapens.data import split_fingerprint

    a, b = _class_sorted(20, seed=0, val_size=6), _class_sorted(20, seed=1, val_size=6)
    # same sizes, same class counts, even the same validation labels in the same order...
    assert (len(a.train), len(a.val), len(a.test)) == (len(b.train), len(b.val), len(b.test)) == (54, 6, 3)
    assert a.val.labels.tolist() == b.val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # ...but other images held out: the fingerprint tells the splits apart
    assert a.val.source_index.tolist() != b.val.source_index.tolist()
    assert split_fingerprint(a) != split_fingerprint(b)
    assert split_fingerprint(a) == split_fingerprint(_class_sorted(20, seed=0, val_size=6))  # reproducible
    fp = split_fingerprint(a)
    assert len(fp) == 64 and int(fp, 16) >= 0
    d1, d2 = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    assert split_fingerprint(d1) == split_fingerprint(d2) != split_fingerprint(load_dataset("digits", seed=3))
    limited = load_dataset("digits", seed=0, limit_train=300, limit_test=90)
    assert split_fingerprint(limited) not in (split_fingerprint(d1),
                                              split_fingerprint(load_dataset("digits", seed=0, limit_train=301,
                                                                             limit_test=90)))


def test_edited_seed_in_config_json_is_refused_by_the_dataset_rebuild(tiny_run, tmp_path, cli_error) -> None:
    import json
    import shutil

    from snapens.data import split_fingerprint
    from snapens.runs import read_run_info
    from snapens.workflows.evaluation import load_run_dataset

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    info = read_run_info(run)
    recorded = info["dataset"]["split_sha256"]
    assert recorded == split_fingerprint(load_run_dataset(info))  # the run's own split passes
    path = run / "config.json"
    raw = json.loads(path.read_text())
    raw["config"]["seed"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"seed 1, val_size .* config.json was likely edited"):
        load_run_dataset(read_run_info(run))
    message = cli_error("evaluate", run, "--device", "cpu", "--quiet")
    assert "is not the one the run was trained on: config.json was likely edited" in message
    # a run folder from before the fingerprint (no dataset.split_sha256) is not checked
    del raw["dataset"]["split_sha256"]
    path.write_text(json.dumps(raw))
    assert len(load_run_dataset(read_run_info(run)).val) == info["dataset"]["num_val"]
