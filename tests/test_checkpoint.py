from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from snapens import checkpoint
from snapens.checkpoint import (
    SnapshotError,
    SnapshotStore,
    atomic_write_bytes,
    atomic_write_json,
    capture_rng_state,
    load_training_state,
    load_weights,
    restore_rng_state,
    save_training_state,
    save_weights,
    unwrap_model,
    unwrap_state_dict,
)


class TinyNet(nn.Module):
    """Conv + BatchNorm + linear: parameters and BN buffers (running stats, num_batches_tracked)."""

    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class DDPLike(nn.Module):
    """Stands in for DistributedDataParallel: the real model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def trained_net(seed: int, width: int = 4) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(width)
    net.train()
    for _ in range(2):  # moves the BN running statistics and num_batches_tracked off their defaults
        net(torch.randn(4, 2, 6, 6))
    return net.eval()


def save_kwargs(**overrides):
    kw = dict(step=100, epoch=5, lr=0.0, model_name="tiny", model_kwargs={"width": 4}, metrics={"val_acc": 0.5})
    kw.update(overrides)
    return kw


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_snapshot_round_trip_is_bit_exact_including_bn_buffers(tmp_path):
    net = trained_net(0)
    assert net.bn.num_batches_tracked.item() == 2
    store = SnapshotStore(tmp_path / "snaps")
    store.save(net, index=1, **save_kwargs())

    fresh = TinyNet()
    assert not torch.equal(fresh.bn.running_mean, net.bn.running_mean)
    info = store.load_into(fresh, 1)
    assert info.index == 1
    assert_state_equal(fresh.state_dict(), net.state_dict())
    assert_state_equal(store.load_state_dict(1), net.state_dict())
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(fresh.eval()(x), net(x))


# importing torch.compile's machinery makes torch warn about its own deprecated torch.jit internals
_TORCH_JIT_DEPRECATION = "ignore:`torch.jit:DeprecationWarning"


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
def test_unwrap_state_dict_strips_ddp_and_compile_prefixes():
    net = trained_net(1)
    plain = net.state_dict()
    ddp = DDPLike(net)
    assert all(k.startswith("module.") for k in ddp.state_dict())
    compiled = torch.compile(net)  # lazy: nothing is compiled until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    both = DDPLike(torch.compile(net))
    assert all(k.startswith("module._orig_mod.") for k in both.state_dict())

    for wrapped in (ddp, compiled, both, ddp.state_dict(), compiled.state_dict(), both.state_dict()):
        assert_state_equal(unwrap_state_dict(wrapped), plain)
    assert unwrap_model(compiled) is net
    # nn.DataParallel is unwrapped by type; DDPLike only by its keys
    assert unwrap_model(nn.DataParallel(net)) is net


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
def test_save_from_wrapped_model_loads_into_plain_and_wrapped(tmp_path):
    net = trained_net(2)
    store = SnapshotStore(tmp_path)
    store.save(DDPLike(torch.compile(net)), index=1, **save_kwargs())
    assert set(store.load_state_dict(1)) == set(net.state_dict())
    target = torch.compile(TinyNet())
    store.load_into(target, 1)  # through the compile wrapper
    assert_state_equal(unwrap_model(target).state_dict(), net.state_dict())


def test_unwrap_state_dict_copies_and_untangles_shared_tensors(tmp_path):
    net = trained_net(3)
    snap = unwrap_state_dict(net)
    with torch.no_grad():
        net.fc.weight.add_(1.0)
    assert not torch.equal(snap["fc.weight"], net.fc.weight)  # a snapshot, not a view of the live weights
    # tied weights share storage; safetensors refuses that unless the tensors are separated
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    save_weights(tmp_path / "tied.safetensors", tied)
    state, _ = load_weights(tmp_path / "tied.safetensors")
    assert torch.equal(state["0.weight"], state["1.weight"])
    with pytest.raises(ValueError, match="'x'"):
        unwrap_state_dict({"x": 3})


def test_manifest_contents(tmp_path):
    store = SnapshotStore(tmp_path / "snaps")
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    store.save(trained_net(0), index=2, **save_kwargs(step=200, epoch=10.5, lr=1e-3, metrics={"val_acc": 0.75}))
    store.save(trained_net(1), index=1, **save_kwargs(step=100, epoch=5, lr=0.0, metrics=None))
    manifest = json.loads((tmp_path / "snaps" / "manifest.json").read_text())

    assert manifest["format_version"] == 1
    entries = manifest["snapshots"]
    assert [e["index"] for e in entries] == [1, 2]
    e1, e2 = entries
    assert e2["file"] == "snapshot-02.safetensors" and e1["file"] == "snapshot-01.safetensors"
    assert (e2["step"], e2["epoch"], e2["lr"], e2["metrics"]) == (200, 10.5, 1e-3, {"val_acc": 0.75})
    assert (e1["step"], e1["epoch"], e1["lr"], e1["metrics"]) == (100, 5, 0.0, {})
    assert e2["model"] == {"name": "tiny", "kwargs": {"width": 4}}
    for e in entries:
        data = (tmp_path / "snaps" / e["file"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        created = dt.datetime.fromisoformat(e["created"])
        assert created.tzinfo is not None and created >= before
    infos = store.list()
    assert [i.index for i in infos] == [1, 2] and len(store) == 2
    assert infos[1].path == tmp_path / "snaps" / "snapshot-02.safetensors"
    assert infos[1].model_name == "tiny" and infos[1].model_kwargs == {"width": 4}
    assert infos[1].to_entry() == e2
    # the file describes itself as well
    _, meta = load_weights(infos[1].path)
    assert meta["index"] == 2 and meta["model"] == e2["model"] and meta["format_version"] == 1


def test_resaving_an_index_replaces_it(tmp_path):
    store = SnapshotStore(tmp_path)
    first, second = trained_net(0), trained_net(1)
    store.save(first, index=1, **save_kwargs(step=10))
    old_sha = store.get(1).sha256
    store.save(second, index=1, **save_kwargs(step=20))
    infos = store.list()
    assert len(infos) == 1 and infos[0].step == 20 and infos[0].sha256 != old_sha
    assert_state_equal(store.load_state_dict(1), second.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "snapshot-01.safetensors"]


def test_truncated_snapshot_names_the_file(tmp_path):
    store = SnapshotStore(tmp_path)
    info = store.save(trained_net(0), index=1, **save_kwargs())
    data = info.path.read_bytes()
    info.path.write_bytes(data[: len(data) - 10])
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors.*truncated"):
        store.load_state_dict(1)
    info.path.write_bytes(data[:5])
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors"):
        store.load_into(TinyNet(), 1)


def test_truncated_or_garbage_weights_file_names_the_file(tmp_path):
    path = tmp_path / "best.safetensors"
    save_weights(path, trained_net(0), {"epoch": 3})
    state, meta = load_weights(path)
    assert meta == {"epoch": 3}
    assert_state_equal(state, trained_net(0).state_dict())
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(SnapshotError, match=r"best\.safetensors.*truncated"):
        load_weights(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SnapshotError, match=r"best\.safetensors"):
        load_weights(path)
    with pytest.raises(SnapshotError, match=r"missing\.safetensors"):
        load_weights(tmp_path / "missing.safetensors")


def test_tampered_bytes_fail_the_sha256_check(tmp_path):
    store = SnapshotStore(tmp_path)
    info = store.save(trained_net(0), index=3, **save_kwargs())
    data = bytearray(info.path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: safetensors alone would load it happily
    info.path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"snapshot-03\.safetensors.*sha256"):
        store.load_state_dict(3)


def test_missing_manifest_or_file(tmp_path):
    store = SnapshotStore(tmp_path / "snaps")
    assert store.list() == [] and len(store) == 0  # nothing saved yet is not an error
    with pytest.raises(SnapshotError, match=r"manifest\.json"):
        store.load_state_dict(1)
    store.save(trained_net(0), index=1, **save_kwargs())
    with pytest.raises(SnapshotError, match=r"manifest\.json.*index 7"):
        store.load_state_dict(7)
    (tmp_path / "snaps" / "snapshot-01.safetensors").rename(tmp_path / "elsewhere")
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors is missing"):
        store.load_state_dict(1)
    (tmp_path / "elsewhere").rename(tmp_path / "snaps" / "snapshot-01.safetensors")
    (tmp_path / "snaps" / "manifest.json").unlink()
    with pytest.raises(SnapshotError, match=r"manifest\.json is missing"):
        store.load_state_dict(1)
    with pytest.raises(SnapshotError, match=r"manifest\.json is missing"):
        store.list()


def test_corrupt_manifest_names_it(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save(trained_net(0), index=1, **save_kwargs())
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "snapshots": [')
    with pytest.raises(SnapshotError, match=r"manifest\.json"):
        store.list()
    (tmp_path / "manifest.json").write_text('{"format_version": 99, "snapshots": []}')
    with pytest.raises(SnapshotError, match=r"manifest\.json.*99"):
        store.list()


def test_wrong_architecture_names_the_file(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save(trained_net(0, width=4), index=1, **save_kwargs())
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors.*shape mismatch.*conv\.weight"):
        store.load_into(TinyNet(width=8), 1)

    class Bigger(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors.*missing keys extra\.weight"):
        store.load_into(Bigger(), 1)
    smaller = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False))
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors.*unexpected keys"):
        store.load_into(smaller, 1)


def test_save_validates_its_arguments(tmp_path):
    store = SnapshotStore(tmp_path)
    net = trained_net(0)
    with pytest.raises(ValueError, match="index.*0"):
        store.save(net, index=0, **save_kwargs())
    with pytest.raises(ValueError, match="lr.*nan"):
        store.save(net, index=1, **save_kwargs(lr=float("nan")))
    with pytest.raises(ValueError, match="step.*-1"):
        store.save(net, index=1, **save_kwargs(step=-1))
    with pytest.raises(ValueError, match="model_kwargs"):
        store.save(net, index=1, **save_kwargs(model_kwargs={"f": object()}))
    with pytest.raises(ValueError, match="metric 'bad'"):
        store.save(net, index=1, **save_kwargs(metrics={"bad": [1, 2]}))
    assert os.listdir(tmp_path) == []
    info = store.save(net, index=1, **save_kwargs(metrics={"val_acc": torch.tensor(0.25), "n": np.int64(3)}))
    assert info.metrics == {"val_acc": 0.25, "n": 3}


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old contents")

    def broken_replace(src, dst):
        raise OSError("disk fell off")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk fell off"):
        atomic_write_bytes(target, b"new contents")
    with pytest.raises(OSError, match="disk fell off"):
        atomic_write_json(target, {"a": 1})
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_snapshot_save_keeps_old_snapshot_and_manifest(tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path)
    old = trained_net(0)
    store.save(old, index=1, **save_kwargs(step=1))
    manifest_before = (tmp_path / "manifest.json").read_bytes()

    def broken_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        store.save(trained_net(1), index=1, **save_kwargs(step=2))
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_bytes() == manifest_before
    assert_state_equal(store.load_state_dict(1), old.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "snapshot-01.safetensors"]


def test_training_state_writer_failure_midway_keeps_old_state(tmp_path):
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 1})
    with pytest.raises(Exception):  # pickling a lambda fails part-way through torch.save
        save_training_state(path, {"step": 2, "fn": lambda: 0})
    assert load_training_state(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.pt"]


def test_training_state_round_trip_with_rng(tmp_path):
    torch.manual_seed(5)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    opt.step()
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    path = tmp_path / "state.pt"
    save_training_state(
        path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "rng": capture_rng_state()}
    )
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state = load_training_state(path)
    assert state["step"] == 7
    restore_rng_state(state["rng"])
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    assert torch.equal(got[0], expected[0])
    assert got[1:3] == expected[1:3]
    np.testing.assert_array_equal(got[3], expected[3])
    assert got[4] == expected[4]

    model2 = TinyNet()
    model2.load_state_dict(state["model"])
    assert_state_equal(model2.state_dict(), model.state_dict())
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    opt2.load_state_dict(state["optimizer"])
    buf1 = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf1)
    assert opt2.param_groups[0]["lr"] == 0.1


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_training_state_refuses_corrupt_or_code_carrying_files(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(SnapshotError, match=r"state\.pt is missing"):
        load_training_state(path)
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(SnapshotError, match=r"state\.pt"):
        load_training_state(path)
    torch.save({"x": _Evil()}, path)  # a pickle that would run a command under weights_only=False
    with pytest.raises(SnapshotError, match=r"state\.pt.*unsafe"):
        load_training_state(path)
    with pytest.raises(ValueError, match="list"):
        save_training_state(path, [1, 2])


def test_restore_rng_state_requires_all_parts():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="numpy"):
        restore_rng_state(state)


def test_atomic_path_keeps_suffix_and_cleans_up(tmp_path):
    from snapens.checkpoint import atomic_path

    target = tmp_path / "Model-1.weights.h5"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".weights.h5") and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
