from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from snapens import checkpoint, runs
from snapens._io import atomic_write_bytes, atomic_write_json
from snapens.checkpoint import (
    SnapshotError,
    SnapshotStore,
    load_weights,
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
    store.save(trained_net(2), index=1, **save_kwargs(step=1))
    store.save(trained_net(0), index=2, **save_kwargs(step=200, epoch=10.5, lr=1e-3, metrics={"val_acc": 0.75}))
    # re-saved last, listed first: entries are kept sorted by index
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
    for index in (1, 2, 3):
        info = store.save(trained_net(0), index=index, **save_kwargs(step=index))
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

    monkeypatch.setattr(os, "replace", broken_replace)
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

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        store.save(trained_net(1), index=1, **save_kwargs(step=2))
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_bytes() == manifest_before
    assert_state_equal(store.load_state_dict(1), old.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "snapshot-01.safetensors"]


def test_atomic_path_keeps_suffix_and_cleans_up(tmp_path):
    from snapens._io import atomic_path

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


# --------------------------------------------------------------------------- manifest schema (issue 9, item 3)


@pytest.fixture(scope="module")
def _pristine_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("three")
    store = SnapshotStore(folder)
    for index in (1, 2, 3):
        store.save(trained_net(index), index=index, **save_kwargs(step=100 * index, epoch=5 * index))
    return folder


@pytest.fixture()
def three_snapshots(_pristine_store):
    """``make(folder) -> (store, manifest)``: a copy of a store of three snapshots (steps 100, 200, 300)."""
    def make(folder):
        shutil.copytree(_pristine_store, folder, dirs_exist_ok=True)
        store = SnapshotStore(folder)
        return store, json.loads(store.manifest_path.read_text())
    return make


def rewrite(store, manifest) -> None:
    store.manifest_path.write_text(json.dumps(manifest))


def renamed(entry, index):
    return {**entry, "index": index, "file": f"snapshot-{index:02d}.safetensors"}


def _dup(m):
    m["snapshots"].append(m["snapshots"][0])


def _gap(m):
    del m["snapshots"][1]


def _ninety_nine(m):
    m["snapshots"][0]["index"] = 99


def _ninety_nine_renamed(m):
    m["snapshots"][0] = renamed(m["snapshots"][0], 99)


def _swap_numbers(m):
    first, last = m["snapshots"][0], m["snapshots"][2]
    m["snapshots"][0], m["snapshots"][2] = {**first, "index": 3}, {**last, "index": 1}


def _entry(key, value):
    def tamper(m):
        m["snapshots"][1][key] = value
    return tamper


def _drop_key(m):
    del m["snapshots"][1]["sha256"]


def _extra_key(m):
    m["snapshots"][1]["note"] = "hi"


def _top(value):
    def tamper(m):
        m.clear()
        m.update(value) if isinstance(value, dict) else None
    return tamper


@pytest.mark.parametrize("tamper, message", [
    (_dup, r"indices must be 1\.\.4, each once, got \[1, 2, 3, 1\]"),
    (_gap, r"indices must be 1\.\.2, each once, got \[1, 3\]"),
    (_ninety_nine, r"snapshots\[0\] file must be 'snapshot-99\.safetensors' for index 99"),
    (_ninety_nine_renamed, r"indices must be 1\.\.3, each once, got \[99, 2, 3\]"),
    (_swap_numbers, r"snapshots\[0\] file must be 'snapshot-03\.safetensors' for index 3"),
    (_entry("index", "abc"), r"snapshots\[1\] index must be a non-negative integer, got 'abc'"),
    (_entry("index", None), r"snapshots\[1\] index must be a non-negative integer, got None"),
    (_entry("index", True), r"index must be a non-negative integer, got True"),
    (_entry("index", 2.0), r"index must be a non-negative integer, got 2\.0"),
    (_entry("step", -5), r"step must be a non-negative integer, got -5"),
    (_entry("epoch", "ten"), r"epoch must be a finite non-negative number, got 'ten'"),
    (_entry("lr", None), r"lr must be a finite non-negative number, got None"),
    (_entry("model", "tiny"), r"snapshots\[1\] model must be an object"),
    (_entry("model", {"name": "tiny"}), r"snapshots\[1\] model must be an object"),
    (_entry("model", {"name": "", "kwargs": {}}), r"model must be an object"),
    (_entry("model", {"name": "tiny", "kwargs": [1]}), r"model must be an object"),
    (_entry("metrics", [0.5]), r"metrics must be an object"),
    (_entry("metrics", {"val_acc": {"deep": 1}}), r"metrics must be an object"),
    (_entry("sha256", None), r"sha256 must be 64 lowercase hex digits, got None"),
    (_entry("sha256", "abc"), r"sha256 must be 64 lowercase hex digits"),
    (_entry("file", None), r"file must be 'snapshot-02\.safetensors' for index 2, got None"),
    (_entry("file", "../../etc/passwd"), r"file must be 'snapshot-02\.safetensors'"),
    (_entry("created", 5), r"created must be a string, got 5"),
    (_drop_key, r"snapshots\[1\] lacks \['sha256'\]"),
    (_extra_key, r"snapshots\[1\] has unknown keys \['note'\]"),
    (_entry("x", None), r"unknown keys \['x'\]"),
    (_top({"format_version": 1}), r"expected the keys \['format_version', 'snapshots'\], got \['format_version'\]"),
    (_top({"format_version": 1, "snapshots": {"1": {}}}), r"'snapshots' must be a list, got dict"),
    (_top({"format_version": True, "snapshots": []}), r"unsupported format_version True"),
    (_top({"format_version": "1", "snapshots": []}), r"unsupported format_version '1'"),
])
def test_tampered_manifest_is_refused_naming_it(tmp_path, three_snapshots, tamper, message):
    store, manifest = three_snapshots(tmp_path)
    tamper(manifest)
    rewrite(store, manifest)
    for read in (store.list, lambda: store.get(1), lambda: store.load_state_dict(1)):
        with pytest.raises(SnapshotError, match=r"manifest\.json .*" + message):
            read()


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", r"expected a JSON object, got list"),
    ("null", r"expected a JSON object, got NoneType"),
    ('{"format_version": 1, "snapshots": [NaN]}', r"not valid JSON.*NaN"),
    (b"\xff\xfe{}", r"not valid JSON"),
])
def test_manifest_that_is_no_object_or_no_strict_json_is_refused(tmp_path, three_snapshots, text, message):
    store, _ = three_snapshots(tmp_path)
    if isinstance(text, bytes):
        store.manifest_path.write_bytes(text)
    else:
        store.manifest_path.write_text(text)
    with pytest.raises(SnapshotError, match=r"manifest\.json.*" + message):
        store.list()


def test_manifest_that_drops_its_last_entry_is_refused(tmp_path, three_snapshots):
    # indices 1..2 are contiguous, but snapshot-03 is on disk: the ensemble would shrink without a word
    store, manifest = three_snapshots(tmp_path)
    del manifest["snapshots"][2]
    rewrite(store, manifest)
    with pytest.raises(SnapshotError, match=r"snapshot-03\.safetensors is not listed in .*manifest\.json"):
        store.list()


def test_file_whose_own_metadata_disagrees_with_the_manifest_is_refused(tmp_path, three_snapshots):
    store, manifest = three_snapshots(tmp_path)
    files = {e["index"]: tmp_path / e["file"] for e in manifest["snapshots"]}
    # renumbered consistently: files swapped on disk and the entries with them, so every sha256 matches
    a, b = files[1].read_bytes(), files[3].read_bytes()
    files[1].write_bytes(b)
    files[3].write_bytes(a)
    e1, e3 = manifest["snapshots"][0], manifest["snapshots"][2]
    manifest["snapshots"][0], manifest["snapshots"][2] = renamed(e3, 1), renamed(e1, 3)
    rewrite(store, manifest)
    assert [i.index for i in store.list()] == [1, 2, 3]  # the manifest alone is consistent
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors says it is snapshot 3 .*lists it as "
                                            r"snapshot 1.*disagree on 'index'"):
        store.load_state_dict(1)
    # an extra entry pointing at a copy of a real file
    store, manifest = three_snapshots(tmp_path / "extra")
    (tmp_path / "extra" / "snapshot-04.safetensors").write_bytes((tmp_path / "extra" / "snapshot-03.safetensors")
                                                                 .read_bytes())
    manifest["snapshots"].append(renamed(manifest["snapshots"][2], 4))
    rewrite(store, manifest)
    assert len(store.list()) == 4
    with pytest.raises(SnapshotError, match=r"snapshot-04\.safetensors says it is snapshot 3 .*'index'"):
        store.load_state_dict(4)
    # the step recorded in the manifest edited
    manifest["snapshots"] = manifest["snapshots"][:3]
    (tmp_path / "extra" / "snapshot-04.safetensors").unlink()
    manifest["snapshots"][1]["step"] = 150
    rewrite(store, manifest)
    with pytest.raises(SnapshotError, match=r"snapshot-02\.safetensors says it is snapshot 2 \(step 200.*"
                                            r"\(step 150.*disagree on 'step'"):
        store.load_state_dict(2)


def test_file_without_snapshot_metadata_is_refused(tmp_path, three_snapshots):
    import safetensors.torch

    store, manifest = three_snapshots(tmp_path)
    data = safetensors.torch.save(unwrap_state_dict(trained_net(2)))  # a plain safetensors file
    (tmp_path / "snapshot-02.safetensors").write_bytes(data)
    manifest["snapshots"][1]["sha256"] = hashlib.sha256(data).hexdigest()
    rewrite(store, manifest)
    with pytest.raises(SnapshotError, match=r"snapshot-02\.safetensors has no snapens snapshot metadata"):
        store.load_state_dict(2)


def test_save_refuses_an_index_that_leaves_a_gap(tmp_path):
    store = SnapshotStore(tmp_path)
    with pytest.raises(ValueError, match=r"index 2 would leave a gap.*next index is 1"):
        store.save(trained_net(0), index=2, **save_kwargs())
    assert os.listdir(tmp_path) == []
    store.save(trained_net(0), index=1, **save_kwargs())
    with pytest.raises(ValueError, match=r"index 3 would leave a gap.*1\.\.1"):
        store.save(trained_net(0), index=3, **save_kwargs())
    assert [i.index for i in store.list()] == [1]


# ------------------------------------------------------------ dtype and non-finite tensors (issue 9, item 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_weights_of_another_dtype_kind_are_refused_naming_file_and_tensor(tmp_path, dtype):
    state = unwrap_state_dict(trained_net(0))
    state["fc.weight"] = (state["fc.weight"] * 10).to(dtype)
    store = SnapshotStore(tmp_path)
    store.save(state, index=1, **save_kwargs())
    assert store.load_state_dict(1)["fc.weight"].dtype == dtype  # the file is read as it is...
    with pytest.raises(SnapshotError, match=rf"snapshot-01\.safetensors does not fit TinyNet: dtype mismatch "
                                            rf"fc\.weight: file {dtype} vs model torch\.float32"):
        store.load_into(TinyNet(), 1)  # ...but never cast into a float model
    # num_batches_tracked is an integer buffer: a float one is refused the same way
    state = unwrap_state_dict(trained_net(0))
    state["bn.num_batches_tracked"] = state["bn.num_batches_tracked"].float()
    with pytest.raises(SnapshotError, match=r"dtype mismatch bn\.num_batches_tracked: file torch\.float32"):
        checkpoint.verify_state_dict(TinyNet(), state, source="x")


def test_float_precision_differences_still_load(tmp_path):
    net = trained_net(0)
    store = SnapshotStore(tmp_path)
    store.save({k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}, index=1,
               **save_kwargs())
    fresh = TinyNet()
    store.load_into(fresh, 1)
    torch.testing.assert_close(fresh.fc.weight, net.fc.weight.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, bad):
    state = unwrap_state_dict(trained_net(0))
    state["bn.running_var"][1] = bad
    store = SnapshotStore(tmp_path / "snaps")
    store.save(state, index=1, **save_kwargs())
    message = r"snapshot-01\.safetensors holds non-finite values \(NaN/inf\) in tensor 'bn\.running_var' \(1 of 4\)"
    with pytest.raises(SnapshotError, match=message):
        store.load_state_dict(1)
    with pytest.raises(SnapshotError, match=message):
        store.load_into(TinyNet(), 1)
    save_weights(tmp_path / "best.safetensors", state)
    with pytest.raises(SnapshotError, match=r"best\.safetensors holds non-finite values .*'bn\.running_var'"):
        load_weights(tmp_path / "best.safetensors")


# ----------------------------------------------------------- non-regular files (issue 9, item 15)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_named_like_a_snapshot_or_manifest_is_refused(tmp_path, three_snapshots, without_blocking_on):
    def refused(fifo, call, match):
        with pytest.raises(SnapshotError, match=match):
            without_blocking_on(fifo, call)

    store, _ = three_snapshots(tmp_path)
    snap = tmp_path / "snapshot-02.safetensors"
    snap.unlink()
    os.mkfifo(snap)
    refused(snap, lambda: store.load_state_dict(2),
            r"snapshot file .*snapshot-02\.safetensors is a FIFO \(named pipe\), not a regular file")
    assert store.load_state_dict(1)  # the others still load
    manifest = store.manifest_path
    manifest.unlink()
    os.mkfifo(manifest)
    refused(manifest, store.list, r"manifest\.json is a FIFO")
    best = tmp_path / "best.safetensors"
    os.mkfifo(best)
    refused(best, lambda: load_weights(best), r"weights file .*best\.safetensors is a FIFO")
    state = tmp_path / "state.pt"
    os.mkfifo(state)
    refused(state, lambda: runs.load_training_state(state), r"training state .*state\.pt is a FIFO")
    folder = tmp_path / "snapshot-09.safetensors"
    folder.mkdir()
    with pytest.raises(SnapshotError, match=r"snapshot-09\.safetensors is a folder"):
        load_weights(folder)


def test_any_truncation_is_a_snapshot_error_naming_the_file(tmp_path):
    # issue 10: safetensors itself reports truncation (no hand-written header parser); every cut must still be
    # one clear SnapshotError that names the file, never another exception
    path = tmp_path / "best.safetensors"
    save_weights(path, trained_net(0), {"epoch": 3})
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cuts = sorted({0, 1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(data) - 1,
                   *range(0, len(data), max(1, len(data) // 40))})
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(SnapshotError, match=r"best\.safetensors is truncated or not a safetensors file"):
            load_weights(path)
    path.write_bytes(data + b"\0")  # trailing bytes: not the file that was written either
    with pytest.raises(SnapshotError, match=r"best\.safetensors is truncated or not a safetensors file"):
        load_weights(path)
