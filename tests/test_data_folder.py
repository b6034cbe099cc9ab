"""snapens.data: ImageFolder trees (layout checks, decoding, channel handling) and the decoded-array cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snapens.data import folder as folder_mod
from snapens.data import load_dataset
from snapens.data.folder import load_folder

W, H = 6, 5  # deliberately not square: a transposed decode would show


def _pixel(split: int, cls: int, k: int) -> np.ndarray:
    """Image k of class cls: R = 10*cls + k, G = row index, B = column index + 50 * split."""
    img = np.empty((H, W, 3), dtype=np.uint8)
    img[..., 0] = 10 * cls + k
    img[..., 1] = np.arange(H)[:, None]
    img[..., 2] = np.arange(W)[None, :] + 50 * split
    return img


def make_tree(root: Path, classes=("cat", "ant", "bee"), n_train=4, n_test=2, gray=False, size=None) -> Path:
    for s, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            sorted_index = sorted(classes).index(cls)
            for k in range(n):
                arr = _pixel(s, sorted_index, k)
                im = Image.fromarray(arr[..., 0]) if gray else Image.fromarray(arr)
                if size is not None:
                    im = im.resize(size)
                im.save(folder / f"{k:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SNAPENS_CACHE_DIR", str(tmp_path / "cache"))


def test_folder_loads_pixels_exactly(tmp_path) -> None:
    root = make_tree(tmp_path / "imgs")
    ds = load_dataset(f"folder:{root}", val_size=0)
    assert ds.name == f"folder:{root.resolve()}"
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.train.images.shape == (12, 3, H, W) and ds.test.images.shape == (6, 3, H, W)
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Image 2 of class "bee" (label 1) in train: R = 12, G = row, B = column.
    img = ds.train.images[4 + 2]
    assert img[0].unique().tolist() == [12]
    assert torch.equal(img[1], torch.arange(H, dtype=torch.uint8)[:, None].expand(H, W))
    assert torch.equal(img[2], torch.arange(W, dtype=torch.uint8)[None, :].expand(H, W))
    assert ds.test.images[0, 2, 0, 0].item() == 50
    assert not ds.augment.enabled  # smaller than 32x32
    ds_val = load_folder(root, seed=0)  # default 10 % of 12 -> 1
    assert len(ds_val.val) == 1 and len(ds_val.train) == 11


def test_folder_grayscale_and_mixed(tmp_path) -> None:
    gray = load_folder(make_tree(tmp_path / "g", gray=True), val_size=0)
    assert gray.train.images.shape == (12, 1, H, W) and len(gray.mean) == 1
    assert gray.train.images[5, 0, 0, 0].item() == 11
    mixed = make_tree(tmp_path / "m", gray=True)
    Image.fromarray(_pixel(0, 0, 9)).save(mixed / "train" / "ant" / "rgb.png")
    ds = load_folder(mixed, val_size=0)
    assert ds.train.images.shape == (13, 3, H, W)
    # A grayscale image is replicated into R, G and B.
    assert torch.equal(ds.train.images[1, 0], ds.train.images[1, 2]) and ds.train.images[1, 1, 0, 0].item() == 1


def test_folder_own_val_split_and_32px_augmentation(tmp_path) -> None:
    root = make_tree(tmp_path / "big", classes=("a", "b"), n_train=2, n_test=1, size=(32, 32))
    (root / "val" / "b").mkdir(parents=True)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "val" / "b" / "v.png")
    ds = load_folder(root)
    assert len(ds.val) == 1 and ds.val.labels.tolist() == [1] and len(ds.train) == 4
    assert ds.val.images[0, :, 0, 0].tolist() == [1, 2, 3]
    assert ds.augment.pad == 4 and ds.augment.flip
    with pytest.raises(ValueError, match="own val/"):
        load_folder(root, val_size=0)


def test_cache_hit_skips_decoding(tmp_path, monkeypatch) -> None:
    root = make_tree(tmp_path / "imgs")
    first = load_folder(root, val_size=0)
    files = list((tmp_path / "cache" / "folders").glob("*.npz"))
    assert len(files) == 1

    def no_decoding(path):
        raise AssertionError("decoded despite the cache")

    monkeypatch.setattr(folder_mod, "_decode_image", no_decoding)
    second = load_folder(root, val_size=0)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.mean == second.mean


def test_cache_invalidated_by_changes(tmp_path, monkeypatch) -> None:
    root = make_tree(tmp_path / "imgs")
    load_folder(root, val_size=0)
    calls = []
    real = folder_mod._decode_image
    monkeypatch.setattr(folder_mod, "_decode_image", lambda p: calls.append(p) or real(p))
    # Touch one file (new mtime, same bytes): decoded again.
    target = root / "test" / "ant" / "000.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_folder(root, val_size=0)
    assert len(calls) == 18
    # The stale entry was replaced, and an unchanged folder hits the new one.
    assert len(list((tmp_path / "cache" / "folders").glob("*.npz"))) == 1
    calls.clear()
    load_folder(root, val_size=0)
    assert calls == []
    # Adding a file: decoded again, and it shows up.
    Image.fromarray(_pixel(0, 2, 7)).save(root / "train" / "cat" / "new.png")
    ds = load_folder(root, val_size=0)
    assert len(calls) == 19 and len(ds.train) == 13


def test_unwritable_cache_only_warns(tmp_path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SNAPENS_CACHE_DIR", str(blocker))
    root = make_tree(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="snapens.data"):
        ds = load_folder(root, val_size=0)
    assert len(ds.train) == 12
    assert any("cannot write the image cache" in r.message for r in caplog.records)
    # The data folder itself is never written to.
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]


def test_corrupt_cache_is_ignored(tmp_path) -> None:
    root = make_tree(tmp_path / "imgs")
    first = load_folder(root, val_size=0)
    (cache_file,) = (tmp_path / "cache" / "folders").glob("*.npz")
    cache_file.write_bytes(b"garbage")
    again = load_folder(root, val_size=0)
    assert torch.equal(first.train.images, again.train.images)


@pytest.mark.parametrize(
    ("setup", "error", "match"),
    [
        ("missing", FileNotFoundError, "does not exist"),
        ("no_test", FileNotFoundError, "no test/"),
        ("one_class", ValueError, "at least 2 class"),
        ("empty_class", ValueError, "has no images"),
        ("unknown_test_class", ValueError, "no counterpart"),
        ("mixed_sizes", ValueError, "one size"),
        ("not_an_image", ValueError, "cannot decode"),
    ],
)
def test_folder_errors(tmp_path, setup, error, match) -> None:
    root = tmp_path / "imgs"
    if setup == "missing":
        pass
    elif setup == "one_class":
        make_tree(root, classes=("only",))
    else:
        make_tree(root)
        if setup == "no_test":
            for f in (root / "test").rglob("*.png"):
                f.unlink()
            for d in sorted((root / "test").iterdir()):
                d.rmdir()
            (root / "test").rmdir()
        elif setup == "empty_class":
            (root / "train" / "dog").mkdir()
        elif setup == "unknown_test_class":
            (root / "test" / "zebra").mkdir()
            Image.fromarray(_pixel(1, 0, 0)).save(root / "test" / "zebra" / "z.png")
        elif setup == "mixed_sizes":
            Image.new("RGB", (W + 1, H)).save(root / "train" / "bee" / "wide.png")
        elif setup == "not_an_image":
            (root / "train" / "bee" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(error, match=match):
        load_dataset(f"folder:{root}", val_size=0)


def test_cifar10_jpeg_alias_uses_data_dir(tmp_path) -> None:
    root = make_tree(tmp_path / "cj", classes=("x", "y"), n_train=2, n_test=1)
    ds = load_dataset("cifar10-jpeg", data_dir=root, val_size=0)
    assert ds.name == "cifar10-jpeg" and ds.classes == ["x", "y"] and len(ds.train) == 4
    # folder: with a relative path resolves against data_dir.
    ds2 = load_dataset("folder:cj", data_dir=tmp_path, val_size=0)
    assert torch.equal(ds2.train.images, ds.train.images)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_cache_file_mode_follows_the_umask(tmp_path) -> None:
    # the cache used to be written through tempfile.mkstemp, i.e. always 0o600 (issue 10: one atomic writer)
    old = os.umask(0o022)
    try:
        load_folder(make_tree(tmp_path / "imgs"), val_size=0)
    finally:
        os.umask(old)
    (cache_file,) = (tmp_path / "cache" / "folders").glob("*.npz")
    assert cache_file.stat().st_mode & 0o777 == 0o644


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path) -> None:
    root = make_tree(tmp_path / "g16", gray=True)
    # A 12-bit-style image in a 16-bit container (values 0..3999, mostly above 255) and one spanning 0..65535.
    deep = (np.arange(H * W).reshape(H, W) * 133).astype(np.uint16)
    assert deep.max() == 3857 and (deep > 255).mean() > 0.9
    full = np.resize(np.array([0, 256, 257, 385, 386, 32767, 32768, 65535], dtype=np.uint16), (H, W))
    Image.fromarray(deep).save(root / "train" / "ant" / "deep.png")
    Image.fromarray(full).save(root / "train" / "ant" / "full.tiff")
    assert Image.open(root / "train" / "ant" / "deep.png").mode == "I;16"
    ds = load_folder(root, val_size=0)
    assert ds.train.images.shape == (14, 1, H, W)  # still one channel
    images = {name: ds.train.images[i, 0] for i, name in ((0, "000"), (4, "deep"), (5, "full"))}
    expected_deep = np.floor(deep.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(images["deep"].numpy(), expected_deep) and images["deep"].max().item() == 15
    assert np.array_equal(images["full"].numpy(), np.resize(np.array([0, 1, 1, 1, 2, 127, 128, 255]), (H, W)))
    assert images["000"][0, 0].item() == 0  # 8-bit images of the same folder are untouched
    assert ds.train.images[1, 0, 0, 0].item() == 1


def test_float_and_out_of_range_32_bit_images_are_refused(tmp_path) -> None:
    for name, arr in (("float.tiff", np.full((H, W), 0.5, dtype=np.float32)),
                      ("wide.tiff", np.full((H, W), 70000, dtype=np.int32))):
        root = make_tree(tmp_path / name, gray=True)
        Image.fromarray(arr).save(root / "test" / "bee" / name)
        with pytest.raises(ValueError, match=rf"cannot decode image .*{name}: (32-bit float|its 32-bit integer)"):
            load_folder(root, val_size=0, cache=False)
