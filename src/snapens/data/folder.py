"""Image folders in the ImageFolder layout, decoded once with Pillow and cached as uint8 arrays.

Layout: ``ROOT/train/<class>/*``, ``ROOT/test/<class>/*`` and optionally ``ROOT/val/<class>/*``. Class names are
the sorted sub-folder names of ``train/``; every image must have the same height and width. Images are RGB,
or single-channel when every image in the folder is grayscale. 16-bit grayscale images (Pillow modes ``I;16*``
and ``I``, e.g. 16-bit PNG or TIFF) are read at their depth and scaled to 8 bits over the full 16-bit range,
``round(v * 255 / 65535)``; 32-bit float images are refused.

The decoded arrays are cached in ``<user cache dir>/folders/`` under a key hashed from the folder's absolute
path and each file's relative path, size and modification time, so any change to the folder decodes it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from snapens._io import atomic_open
from snapens.data.download import user_cache_dir
from snapens.data.splits import AugmentSpec, DatasetSplits, Split, make_splits

__all__ = ["IMAGE_EXTENSIONS", "scan_folder", "folder_cache_path", "decode_images", "load_folder"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_EXTENSION_SUFFIXES = tuple(IMAGE_EXTENSIONS)
_GRAY_MODES = frozenset({"1", "L", "LA"})
# v2: 16-bit images are scaled to 8 bits (v1 clipped them at 255), so v1 caches of such folders are wrong.
_CACHE_FORMAT = "snapens-folder-cache-v2"
_SPLITS = ("train", "val", "test")

#: One scanned file: (split, class index, path relative to the root, size in bytes, mtime in ns).
FileEntry = tuple[str, int, str, int, int]


def _visible_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_folder(root: str | os.PathLike[str]) -> tuple[list[str], list[FileEntry]]:
    """List the classes and image files of an ImageFolder tree, checking its layout.

    Returns:
        ``(classes, entries)``: sorted class names from ``train/`` and one entry per image, ordered by split,
        class and file name.

    Raises:
        FileNotFoundError: ``root``, ``root/train`` or ``root/test`` is missing.
        ValueError: fewer than two classes, an empty class folder, or a class in ``test/``/``val/`` that
            ``train/`` lacks.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise FileNotFoundError(
                f"image folder {root} has no {required}/ sub-folder (expected {required}/<class>/*)"
            )
    classes = _visible_dirs(root / "train")
    if len(classes) < 2:
        raise ValueError(f"image folder {root / 'train'} needs at least 2 class folders, found {classes}")
    index = {c: k for k, c in enumerate(classes)}
    entries: list[FileEntry] = []
    for split in _SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for cls in _visible_dirs(split_dir):
            if cls not in index:
                raise ValueError(f"class folder {split_dir / cls} has no counterpart in {root / 'train'}")
            found = []
            for e in os.scandir(split_dir / cls):
                if e.name.startswith(".") or not e.name.lower().endswith(_EXTENSION_SUFFIXES):
                    continue
                if e.is_file():
                    st = e.stat()
                    found.append((split, index[cls], f"{split}/{cls}/{e.name}", st.st_size, st.st_mtime_ns))
            if not found:
                raise ValueError(
                    f"class folder {split_dir / cls} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            entries.extend(sorted(found, key=lambda f: f[2]))
    return classes, entries


def folder_cache_path(root: str | os.PathLike[str], entries: list[FileEntry], cache_dir: Path | None = None) -> Path:
    """The cache file for this folder's current contents: ``<cache>/folders/<path hash>-<content hash>.npz``."""
    absolute = str(Path(root).resolve())
    path_hash = hashlib.sha256(absolute.encode()).hexdigest()[:16]
    content = hashlib.sha256(json.dumps([_CACHE_FORMAT, absolute, entries]).encode()).hexdigest()[:24]
    return (cache_dir or user_cache_dir()) / "folders" / f"{path_hash}-{content}.npz"


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit values to uint8 over the full range: ``round(v * 255 / 65535)`` (= ``v / 257``, rounded)."""
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"its 32-bit integer values {lo}..{hi} do not fit 16 bits; save it as an 8- or 16-bit "
                         "image")
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _decode_image(path: str) -> tuple[np.ndarray, bool]:
    """One image as ``[H, W]`` (grayscale, flag True) or ``[H, W, 3]`` uint8; 16-bit grayscale is scaled."""
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    try:
        with open(path, "rb") as f:
            data = f.read()  # one read call; Pillow's many small reads on the file cost more for tiny images
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode == "I" or im.mode.startswith("I;16"):
                # Pillow's conversion to L clips these at 255 instead of scaling them.
                return _sixteen_bit_to_uint8(np.asarray(im)), True
            if im.mode == "F":
                raise ValueError("32-bit float images are not supported; save it as an 8- or 16-bit image")
            gray = im.mode in _GRAY_MODES
            target = "L" if gray else "RGB"
            return np.asarray(im if im.mode == target else im.convert(target)), gray
    except (UnidentifiedImageError, DecompressionBombError, OSError, ValueError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc


def decode_images(paths: list[str], *, workers: int | None = None, chunk: int = 256) -> np.ndarray:
    """Decode same-sized images into one uint8 array ``[N, C, H, W]`` using a thread pool.

    Pillow releases the GIL while decoding, so threads overlap. ``C`` is 1 when every image is grayscale, else
    3 (grayscale images are replicated into the three channels, as Pillow's L -> RGB conversion does).

    Raises:
        ValueError: an image cannot be decoded or its size differs from the first image's.
    """
    if not paths:
        raise ValueError("no images to decode")
    first, first_gray = _decode_image(paths[0])
    h, w = first.shape[:2]
    out = np.empty((len(paths), 3, h, w), dtype=np.uint8)
    gray = np.zeros(len(paths), dtype=bool)

    def work(start: int) -> None:
        for i in range(start, min(start + chunk, len(paths))):
            arr, is_gray = (first, first_gray) if i == 0 else _decode_image(paths[i])
            if arr.shape[:2] != (h, w):
                raise ValueError(
                    f"image {paths[i]} is {arr.shape[1]}x{arr.shape[0]} (WxH) but {paths[0]} is {w}x{h}; "
                    "all images of a folder must have one size"
                )
            out[i] = arr[None] if is_gray else arr.transpose(2, 0, 1)
            gray[i] = is_gray

    n_workers = workers or min(8, os.cpu_count() or 1)
    starts = range(0, len(paths), chunk)
    if n_workers <= 1 or len(paths) <= chunk:
        for s in starts:
            work(s)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for _ in pool.map(work, starts):  # re-raises the first worker exception
                pass
    if gray.all():
        return np.ascontiguousarray(out[:, :1])
    return out


def _read_cache(path: Path, classes: list[str], n: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring unreadable folder cache %s: %s", path, exc)
        return None
    images, labels = arrays.get("images"), arrays.get("labels")
    if (
        images is None or labels is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n
        or labels.shape != (n,) or list(arrays.get("classes", [])) != classes
    ):
        log.warning("ignoring inconsistent folder cache %s", path)
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            np.savez(f, **arrays)
        # Older caches of the same folder are stale now: drop them.
        for old in path.parent.glob(path.name.split("-")[0] + "-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        log.info("cached decoded images in %s", path)
    except OSError as exc:
        log.warning("cannot write the image cache %s (%s); the folder will be decoded again next time", path, exc)


def load_folder(
    root: str | os.PathLike[str],
    *,
    val_size: int | float | None = None,
    seed: int = 0,
    name: str | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> DatasetSplits:
    """Load an ImageFolder tree (see the module docstring).

    Validation comes from ``root/val/`` when it exists (then ``val_size`` must be left ``None``); otherwise a
    stratified ``val_size`` (default 10 %) is carved from ``train/``, seeded by ``seed``. Default augmentation:
    pad 4 + crop + flip when the images are at least 32x32 (CIFAR-style), none for smaller ones.

    Args:
        root: the folder holding ``train/`` and ``test/``.
        name: the dataset's name; default ``"folder:<absolute root>"``.
        cache: read and write the decoded-array cache.
        cache_dir: the cache root; default :func:`~snapens.data.download.user_cache_dir`.
        workers: decoding threads; default ``min(8, cpu count)``.
    """
    root = Path(root).expanduser()
    classes, entries = scan_folder(root)
    has_val = any(e[0] == "val" for e in entries)
    if has_val and val_size is not None:
        raise ValueError(
            f"image folder {root} has its own val/ split, so val_size must be left unset (got {val_size!r})"
        )
    cache_file = folder_cache_path(root, entries, Path(cache_dir) if cache_dir is not None else None)
    arrays = _read_cache(cache_file, classes, len(entries)) if cache else None
    if arrays is None:
        log.info("decoding %d images from %s", len(entries), root)
        images = decode_images([str(root / e[2]) for e in entries], workers=workers)
        arrays = {
            "images": images,
            "labels": np.array([e[1] for e in entries], dtype=np.int64),
            "classes": np.array(classes),
        }
        if cache:
            _write_cache(cache_file, arrays)
    else:
        log.info("loaded %d decoded images of %s from cache %s", len(entries), root, cache_file)
    images_t, labels_t = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])
    # Entries are ordered train, val, test, so each split is a contiguous slice (a view, no copy).
    parts, start = {}, 0
    for split in _SPLITS:
        stop = start + sum(1 for e in entries if e[0] == split)
        parts[split] = Split(images_t[start:stop], labels_t[start:stop])
        start = stop
    h, w = images_t.shape[2], images_t.shape[3]
    augment = AugmentSpec(pad=4, flip=True) if h >= 32 and w >= 32 else AugmentSpec()
    return make_splits(
        name or f"folder:{root.resolve()}", parts["train"], parts["test"], classes,
        val=parts["val"] if has_val else None, val_size=val_size, default_val=0.1, seed=seed, augment=augment,
    )
