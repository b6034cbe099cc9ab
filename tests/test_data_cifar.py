"""snapens.data: CIFAR archives (format, MD5, safe extraction, download from a local server) and SVHN files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import logging
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from snapens.data import cifar, load_dataset
from snapens.data.cifar import load_cifar, restricted_loads
from snapens.data.download import download_file, safe_extract

N_PER_BATCH = 4
N_TEST = 6


def _cifar_images(first: int, n: int) -> np.ndarray:
    """Rows in the CIFAR layout: image k has R = (i*32 + j + k) % 256, G = 100 + k, B = (200 + k) % 256."""
    rows = np.empty((n, 3072), dtype=np.uint8)
    for r in range(n):
        k = first + r
        rows[r, :1024] = (np.arange(1024) + k) % 256
        rows[r, 1024:2048] = 100 + k
        rows[r, 2048:] = (200 + k) % 256
    return rows


def _batch(first: int, n: int, label_key: str, bytes_keys: bool) -> bytes:
    d = {"batch_label": "fake", "data": _cifar_images(first, n), label_key: [(first + r) % 10 for r in range(n)],
         "filenames": [f"img{first + r}.png" for r in range(n)]}
    if bytes_keys:
        d = {k.encode(): v for k, v in d.items()}
    return pickle.dumps(d, protocol=2)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_cifar_archive(path: Path, which: str = "cifar10") -> Path:
    """A small archive in the official layout: cifar10 has 5 x 4 train images, cifar100 4 (fine labels)."""
    info = cifar.CIFAR_FILES[which]
    with tarfile.open(path, "w:gz") as tf:
        folder = tarfile.TarInfo(info["folder"])
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        if which == "cifar10":
            for i, name in enumerate(info["train"]):
                _add(tf, f"{info['folder']}/{name}", _batch(i * N_PER_BATCH, N_PER_BATCH, "labels", False))
            _add(tf, f"{info['folder']}/test_batch", _batch(100, N_TEST, "labels", False))
            names = [f"class{c}" for c in range(10)]
            _add(tf, f"{info['folder']}/batches.meta", pickle.dumps({"label_names": names, "num_vis": 3072}, 2))
        else:
            # Fine labels differ from coarse ones so using the wrong key would show.
            def batch(first: int, n: int) -> bytes:
                d = pickle.loads(_batch(first, n, "fine_labels", True))
                d[b"fine_labels"] = [(first + r) % 10 + 90 for r in range(n)]
                d[b"coarse_labels"] = [0] * n
                return pickle.dumps(d, protocol=2)

            _add(tf, f"{info['folder']}/train", batch(0, 20))
            _add(tf, f"{info['folder']}/test", batch(100, N_TEST))
            meta = {b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
                    b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]}
            _add(tf, f"{info['folder']}/meta", pickle.dumps(meta, 2))
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_archive_loads(tmp_path, monkeypatch) -> None:
    archive = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar.CIFAR_FILES["cifar10"], "md5", _md5(archive))
    ds = load_dataset("cifar10", data_dir=tmp_path, val_size=0)
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()  # extracted next to the archive
    assert ds.name == "cifar10" and ds.classes == [f"class{c}" for c in range(10)]
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.images.shape == (N_TEST, 3, 32, 32)
    assert ds.train.labels.tolist() == [k % 10 for k in range(20)]
    assert ds.test.labels.tolist() == [(100 + r) % 10 for r in range(N_TEST)]
    img = ds.train.images[7]
    assert img[0, 2, 5].item() == (2 * 32 + 5 + 7) % 256
    assert img[1].unique().tolist() == [107] and img[2].unique().tolist() == [207]
    assert ds.augment.pad == 4 and ds.augment.flip
    # Stratified validation from the extracted folder (second load), seeded.
    ds2 = load_cifar("cifar10", tmp_path, val_size=10, seed=1)
    assert len(ds2.val) == 10 and sorted(ds2.val.labels.tolist()) == list(range(10))
    assert len(ds2.train) == 10
    # data_dir may also be the extracted folder itself.
    ds3 = load_cifar("cifar10", tmp_path / "cifar-10-batches-py", val_size=0)
    assert torch.equal(ds3.train.images, ds.train.images)


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch) -> None:
    archive = make_cifar_archive(tmp_path / "cifar-100-python.tar.gz", "cifar100")
    monkeypatch.setitem(cifar.CIFAR_FILES["cifar100"], "md5", _md5(archive))
    ds = load_dataset("cifar100", data_dir=tmp_path, val_size=0)
    assert len(ds.classes) == 100 and ds.classes[3] == "fine3"
    assert ds.train.labels.tolist() == [k % 10 + 90 for k in range(20)]
    assert ds.train.images.shape == (20, 3, 32, 32)


def test_read_only_data_dir_reads_archive_in_memory(tmp_path, monkeypatch) -> None:
    archive = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar.CIFAR_FILES["cifar10"], "md5", _md5(archive))

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(cifar, "safe_extract", refuse)
    ds = load_cifar("cifar10", tmp_path, val_size=0)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.train.labels[:3].tolist() == [0, 1, 2]


def test_md5_mismatch_and_corrupt_archive(tmp_path, monkeypatch) -> None:
    make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(ValueError, match="c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", data_dir=tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    garbage = bad / "cifar-10-python.tar.gz"
    garbage.write_bytes(b"\x1f\x8b this is not a gzip stream" * 10)
    monkeypatch.setitem(cifar.CIFAR_FILES["cifar10"], "md5", _md5(garbage))
    with pytest.raises(ValueError, match="corrupt archive"):
        load_dataset("cifar10", data_dir=bad)


def test_missing_data_says_where_to_put_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"place cifar-10-python.tar.gz .* in .*nowhere or pass --download"):
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="place train_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path)


def test_incomplete_extracted_folder(tmp_path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar("cifar10", tmp_path)


def test_restricted_unpickler_refuses_code(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    payload = pickle.dumps({"data": Evil(), "labels": [0]}, protocol=2)
    with pytest.raises(ValueError, match="forbidden global"):
        restricted_loads(payload, "evil")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in cifar.CIFAR_FILES["cifar10"]["train"] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(payload)
    with pytest.raises(ValueError, match="forbidden global"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()
    # Plain arrays in every pickle protocol are fine.
    for protocol in (2, 4, 5):
        out = restricted_loads(pickle.dumps({b"data": np.arange(6, dtype=np.uint8)}, protocol=protocol), "ok")
        assert out["data"].tolist() == list(range(6))


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tf:
        _add(tf, "ok/file.txt", b"fine")
        tf.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_safe_extract_refuses_unsafe_members(tmp_path, kind) -> None:
    member = tarfile.TarInfo({"dotdot": "../x", "absolute": "/tmp/snapens-abs-x"}.get(kind, "ok/x"))
    data = b""
    if kind in ("dotdot", "absolute"):
        data = b"escape"
        member.size = len(data)
    elif kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        member.type, member.linkname = tarfile.LNKTYPE, "ok/file.txt"
    else:
        member.type = tarfile.CHRTYPE
    archive = _tar_with(tmp_path / "a.tar", member, data)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="x"):
        safe_extract(archive, dest)
    assert not (tmp_path / "x").exists()
    assert not (dest / "ok").exists()  # nothing extracted, not even the good member
    assert [p.name for p in dest.iterdir()] == []


def test_safe_extract_extracts_good_archive(tmp_path) -> None:
    archive = tmp_path / "good.tar"
    with tarfile.open(archive, "w") as tf:
        _add(tf, "top/sub/a.bin", b"abc")
        _add(tf, "top/b.bin", b"")
    created = safe_extract(archive, tmp_path / "out")
    assert created == [tmp_path / "out" / "top"]
    assert (tmp_path / "out/top/sub/a.bin").read_bytes() == b"abc"
    assert (tmp_path / "out/top/b.bin").read_bytes() == b""


@pytest.fixture
def http_root(tmp_path) -> Iterator[tuple[str, Path]]:
    """A quiet HTTP server on 127.0.0.1 serving a folder; shut down after the test."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_from_local_server(http_root, tmp_path, monkeypatch) -> None:
    base, served = http_root
    archive = make_cifar_archive(served / "cifar-10-python.tar.gz")
    digest = _md5(archive)
    ds = load_cifar("cifar10", tmp_path / "dl", download=True, base_url=base, md5=digest, val_size=0)
    assert _md5(tmp_path / "dl" / "cifar-10-python.tar.gz") == digest
    assert ds.train.images.shape == (20, 3, 32, 32)
    # Through load_dataset: the URL from the environment, the digest from the (patched) table.
    monkeypatch.setenv("SNAPENS_CIFAR_URL", base.rstrip("/"))
    monkeypatch.setitem(cifar.CIFAR_FILES["cifar10"], "md5", digest)
    ds2 = load_dataset("cifar10", data_dir=tmp_path / "dl2", download=True, val_size=0)
    assert torch.equal(ds2.train.images, ds.train.images)


def test_download_rejects_wrong_md5_and_missing_file(http_root, tmp_path) -> None:
    base, served = http_root
    make_cifar_archive(served / "cifar-10-python.tar.gz")
    with pytest.raises(ValueError, match="expected 0123"):
        download_file(base + "cifar-10-python.tar.gz", tmp_path / "x.tar.gz", md5="0123" * 8, timeout=10)
    assert list(tmp_path.glob("*.tar.gz")) == [] and list(tmp_path.glob(".*tmp")) == []
    with pytest.raises(ConnectionError, match="place cifar-100-python.tar.gz in"):
        load_cifar("cifar100", tmp_path / "c100", download=True, base_url=base)
    with pytest.raises(ValueError, match="http"):
        download_file("file:///etc/passwd", tmp_path / "p")


def _write_svhn(path: Path, n: int, first_label: int) -> np.ndarray:
    import scipy.io

    x = np.random.default_rng(n).integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = ((np.arange(n) + first_label) % 10 + 1).reshape(n, 1)  # labels 1..10, 10 meaning digit 0
    scipy.io.savemat(path, {"X": x, "y": y})
    return x


def test_svhn_mat_files(tmp_path, caplog) -> None:
    x = _write_svhn(tmp_path / "train_32x32.mat", 30, 0)
    _write_svhn(tmp_path / "test_32x32.mat", 7, 3)
    with caplog.at_level(logging.INFO, logger="snapens.data"):
        ds = load_dataset("svhn", data_dir=tmp_path, val_size=10, seed=0)
    assert ds.classes == [str(d) for d in range(10)] and not ds.augment.enabled
    assert len(ds.train) == 20 and len(ds.val) == 10 and len(ds.test) == 7
    assert sorted(ds.val.labels.tolist()) == list(range(10))
    full = load_dataset("svhn", data_dir=tmp_path, val_size=0)
    assert full.train.labels.tolist() == [(k + 1) % 10 for k in range(30)]  # label 10 -> 0
    assert torch.equal(full.train.images[4, 2], torch.from_numpy(x[:, :, 2, 4]))
    with pytest.raises(ValueError, match="leaves no training images"):
        load_dataset("svhn", data_dir=tmp_path)  # default 6,000 held out of 30
