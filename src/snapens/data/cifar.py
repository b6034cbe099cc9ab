"""CIFAR-10 and CIFAR-100 from the official python-format archives.

The batches are Python pickles. They are only ever read with :class:`RestrictedUnpickler`, which resolves
nothing but the few numpy names needed to rebuild an ndarray, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapens.data.download import download_file, file_md5, read_tar_members, safe_extract
from snapens.data.splits import AugmentSpec, DatasetSplits, Split, make_splits

__all__ = ["CIFAR_URL", "CIFAR_FILES", "RestrictedUnpickler", "restricted_loads", "load_cifar"]

log = logging.getLogger(__name__)

#: Where the official archives live; ``$SNAPENS_CIFAR_URL`` (or ``load_cifar(base_url=...)``) overrides it.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


#: archive name, MD5 of the official archive, folder inside it, train batches, test batch, meta file,
#: label key, label-names key.
CIFAR_FILES: dict[str, dict[str, Any]] = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
    },
}

_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core; old pickles name the old one


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    reconstruct = _NP_CORE.multiarray._reconstruct
    frombuffer = _NP_CORE.numeric._frombuffer
    import _codecs

    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 protocol-2 pickles spell a bytes object as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _codecs.encode,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: builtin containers plus numpy array reconstruction, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a CIFAR batch")
        return allowed[(module, name)]


def restricted_loads(data: bytes, source: str) -> dict[str, Any]:
    """Unpickle one CIFAR batch (``latin1`` for the Python 2 strings) and return it as a str-keyed dict.

    Raises:
        ValueError: naming ``source`` when the bytes are not a safe pickled dict.
    """
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"cannot read CIFAR batch {source}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR batch {source} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _as_str(name: Any) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def _decode_batches(blobs: list[tuple[str, bytes]], label_key: str) -> Split:
    images, labels = [], []
    for source, blob in blobs:
        batch = restricted_loads(blob, source)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"CIFAR batch {source} lacks 'data' or {label_key!r} (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"CIFAR batch {source}: expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
        y = np.asarray(batch[label_key], dtype=np.int64)
        if y.shape != (data.shape[0],):
            raise ValueError(f"CIFAR batch {source}: {data.shape[0]} images but labels of shape {y.shape}")
        # Each row is the red plane, then green, then blue, each 32x32 row-major: exactly [3, 32, 32].
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _resolve_url(base_url: str | None, archive: str) -> str:
    base = base_url or os.environ.get("SNAPENS_CIFAR_URL") or CIFAR_URL
    return base.rstrip("/") + "/" + archive


def load_cifar(which: str, data_dir: str | os.PathLike[str], *, download: bool = False,
               val_size: int | float | None = None, seed: int = 0, base_url: str | None = None,
               md5: str | None = None) -> DatasetSplits:
    """Load CIFAR-10 or CIFAR-100 (fine labels) from ``data_dir``.

    Looks for, in order: the extracted folder (``data_dir/cifar-10-batches-py``, or ``data_dir`` itself when it
    is that folder), then the archive ``data_dir/cifar-10-python.tar.gz``, which is MD5-checked and extracted
    (read in memory instead when ``data_dir`` is read-only), then, with ``download=True``, the archive from
    ``base_url`` (default ``$SNAPENS_CIFAR_URL`` or :data:`CIFAR_URL`).

    Args:
        which: ``"cifar10"`` or ``"cifar100"``.
        data_dir: the folder holding (or to receive) the archive.
        download: fetch the archive when it is missing.
        val_size: held-out training images (default 5,000, stratified, seeded by ``seed``).
        base_url: overrides the download location (tests point it at a local server).
        md5: expected archive digest; default the official one.

    Raises:
        FileNotFoundError: no data and ``download`` is False; the message names the file and the folder.
        ValueError: a corrupt or tampered archive or batch.
    """
    if which not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR variant {which!r}; expected one of {', '.join(CIFAR_FILES)}")
    info = CIFAR_FILES[which]
    expected_md5 = md5 or info["md5"]
    root = Path(data_dir).expanduser()
    folder = root if root.name == info["folder"] else root / info["folder"]
    archive = root / info["archive"]
    names = [*info["train"], *info["test"], info["meta"]]

    blobs: dict[str, bytes]
    if not folder.is_dir():
        if not archive.is_file():
            if not download:
                raise FileNotFoundError(
                    f"{which} not found: place {info['archive']} (or its extracted folder {info['folder']}/) "
                    f"in {root.resolve()} or pass --download"
                )
            download_file(_resolve_url(base_url, info["archive"]), archive, md5=expected_md5)
        digest = file_md5(archive)
        if digest != expected_md5:
            raise ValueError(
                f"{archive} has MD5 {digest}, expected {expected_md5}: the file is damaged or not the official "
                f"archive; delete it and pass --download, or place the official {info['archive']} there"
            )
        try:
            safe_extract(archive, root)
        except PermissionError:
            log.warning("cannot extract %s into %s (read-only); reading the archive in memory", archive, root)
    if folder.is_dir():
        blobs = {}
        for name in names:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{which}: {path} is missing; the extracted folder is incomplete")
            blobs[name] = path.read_bytes()
    else:
        prefix = info["folder"] + "/"
        raw = read_tar_members(archive, lambda n: n.startswith(prefix) and n[len(prefix) :] in names)
        blobs = {n[len(prefix) :]: b for n, b in raw.items()}
        missing = [n for n in names if n not in blobs]
        if missing:
            raise ValueError(f"archive {archive} lacks {', '.join(prefix + m for m in missing)}")

    train = _decode_batches([(str(folder / n), blobs[n]) for n in info["train"]], info["labels"])
    test = _decode_batches([(str(folder / n), blobs[n]) for n in info["test"]], info["labels"])
    meta = restricted_loads(blobs[info["meta"]], str(folder / info["meta"]))
    if info["names"] not in meta:
        raise ValueError(f"{folder / info['meta']} lacks {info['names']!r}")
    classes = [_as_str(c) for c in meta[info["names"]]]
    for split_name, split in (("train", train), ("test", test)):
        if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= len(classes)):
            raise ValueError(f"{which} {split_name} labels fall outside 0..{len(classes) - 1}")
    return make_splits(
        which, train, test, classes, val_size=val_size, default_val=5000, seed=seed,
        augment=AugmentSpec(pad=4, flip=True),
    )
