from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snapens.checkpoint import SnapshotError, SnapshotStore, save_weights, unwrap_state_dict
from snapens.ensemble import MaterializedEnsemble, SnapshotEnsemble, resolve_member_weights

C = 5  # classes


class TinyNet(nn.Module):
    def __init__(self, width: int = 4, num_classes: int = C) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def member(seed: int, width: int = 4) -> TinyNet:
    """A member with its own weights and non-default BN running statistics, in eval mode."""
    torch.manual_seed(seed)
    net = TinyNet(width)
    net.train()
    net(torch.randn(8, 3, 6, 6) * (1 + seed) + seed)
    with torch.no_grad():
        net.fc.weight.mul_(3.0)  # sharper softmaxes so members disagree
    return net.eval()


def builder(name: str, **kwargs) -> nn.Module:
    assert name == "tiny", name
    return TinyNet(**kwargs)


@pytest.fixture
def nets() -> list[TinyNet]:
    return [member(s) for s in range(3)]


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(10, 3, 6, 6)


def hand_probs(nets: list[nn.Module], weights: list[float], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sum(w * F.softmax(n.eval()(x), dim=-1) for w, n in zip(weights, nets))


def make(nets, weights=None, **kwargs) -> SnapshotEnsemble:
    """An fp32 ensemble (the exact-math tests); precision tests pass their own."""
    return SnapshotEnsemble(TinyNet, [unwrap_state_dict(n) for n in nets], weights, **{"precision": "fp32", **kwargs})


def from_run(run_dir, model_builder, **kwargs) -> SnapshotEnsemble:
    """from_run on inputs normalised by the test (``x`` is randn), in fp32."""
    return SnapshotEnsemble.from_run(run_dir, model_builder, **{"inputs": "normalized", "precision": "fp32", **kwargs})


def test_probs_are_weighted_mean_of_member_softmaxes(nets, x):
    weights = [0.5, 0.3, 0.2]
    ens = make(nets, weights)
    expected = hand_probs(nets, weights, x)
    torch.testing.assert_close(ens.predict_proba(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens(x), expected, rtol=0, atol=1e-6)
    # not the softmax of averaged logits (would differ for disagreeing members)
    avg_logits = sum(w * n(x) for w, n in zip(weights, nets)).softmax(-1)
    assert (ens.predict_proba(x) - avg_logits).abs().max() > 1e-3
    mp = ens.member_probs(x)
    assert mp.shape == (3, 10, C)
    for m, net in enumerate(nets):
        torch.testing.assert_close(mp[m], F.softmax(net(x), dim=-1), rtol=0, atol=1e-7)


def test_default_weights_are_equal(nets, x):
    ens = make(nets)
    assert torch.equal(ens.weights_, torch.full((3,), 1 / 3))
    torch.testing.assert_close(ens.predict_proba(x), hand_probs(nets, [1 / 3] * 3, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(ens.predict_proba(x).sum(-1), torch.ones(10))


def test_ensemble_of_one_equals_its_member(nets, x):
    ens = make(nets[:1])
    assert torch.equal(ens.predict_proba(x), F.softmax(nets[0](x), dim=-1))
    assert torch.equal(ens.materialize()(x), F.softmax(nets[0](x), dim=-1))


def test_predict_is_argmax(nets, x):
    ens = make(nets, [0.2, 0.2, 0.6])
    probs = ens.predict_proba(x)
    pred = ens.predict(x)
    assert pred.dtype == torch.int64 and pred.shape == (10,)
    assert torch.equal(pred, probs.argmax(-1))
    assert torch.equal(pred, hand_probs(nets, [0.2, 0.2, 0.6], x).argmax(-1))


def test_batched_inputs_give_the_same_answer(nets, x):
    ens = make(nets)
    whole = ens.member_probs(x, batch_size=1000)
    y = torch.arange(10) % C
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)
    for inputs in (
        loader,  # (x, y) batches
        [x[:4], x[4:]],  # bare x batches
        (b for b in x.split(6)),  # a one-shot generator
        x.numpy(),
    ):
        torch.testing.assert_close(ens.member_probs(inputs), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens.member_probs(x, batch_size=2), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens.predict_proba(loader), ens.predict_proba(x), rtol=0, atol=1e-6)
    assert torch.equal(ens.predict(loader), ens.predict(x))
    with pytest.raises(ValueError, match="empty"):
        ens.predict_proba([])
    with pytest.raises(ValueError, match="str"):
        ens.predict_proba(["not a tensor"])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.5, 0.5], r"length M=3.*\[0\.5, 0\.5\]"),
        ([1.2, -0.1, -0.1], r">= 0.*-0\.1"),
        ([float("nan"), 0.5, 0.5], r"finite.*nan"),
        ([0.25, 0.25, 0.25], r"sum to 1.*0\.75"),
        ([[0.5, 0.5, 0.0]], r"length M=3.*\(1, 3\)"),
        (["a", "b", "c"], r"numbers.*'a'"),
    ],
)
def test_weights_are_validated(nets, weights, message):
    with pytest.raises(ValueError, match=message):
        make(nets, weights)
    ens = make(nets)
    with pytest.raises(ValueError, match=message):
        ens.set_weights(weights)
    assert torch.equal(ens.weights_, torch.full((3,), 1 / 3))  # unchanged by the failed update


def test_weights_within_tolerance_and_set_weights(nets, x):
    w = resolve_member_weights([0.5, 0.5 + 5e-7, 0.0], 3)
    assert w.dtype == torch.float32 and w.shape == (3,)
    ens = make(nets)
    ens.set_weights(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ens.predict_proba(x), F.softmax(nets[1](x), dim=-1), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="at least one member"):
        SnapshotEnsemble(TinyNet, [])


def test_always_eval_and_no_grad(nets, x):
    ens = make(nets)
    ens.train()
    assert not ens.training and not ens.model.training and not ens.model.bn.training
    running = ens._members[0]["bn.running_mean"].clone()
    single = ens.predict_proba(x[:1])
    torch.testing.assert_close(single, ens.predict_proba(x)[:1], rtol=0, atol=1e-6)  # no batch statistics used
    assert torch.equal(ens._members[0]["bn.running_mean"], running)
    xg = x.clone().requires_grad_(True)
    assert not ens(xg).requires_grad
    assert not ens.predict_proba(xg).requires_grad
    mat = ens.materialize()
    mat.train()
    assert not any(m.training for m in mat.modules())
    assert not any(p.requires_grad for p in mat.parameters())


def test_streaming_keeps_one_model_and_members_on_cpu(nets):
    ens = make(nets)
    one_model = sum(p.numel() for p in TinyNet().parameters())
    assert sum(p.numel() for p in ens.parameters()) == one_model
    assert all(t.device.type == "cpu" for sd in ens._members for t in sd.values())
    mat = ens.materialize()
    assert sum(p.numel() for p in mat.parameters()) == 3 * one_model


def test_dtype_move_after_use_still_loads_every_member(nets, x):
    ens = make(nets, [0.5, 0.3, 0.2])
    ens.predict_proba(x)  # caches the working model's tensors
    ens.double()  # replaces them
    assert ens.model.fc.weight.dtype == torch.float64
    expected = hand_probs([n.double() for n in nets], [0.5, 0.3, 0.2], x.double())
    torch.testing.assert_close(ens.predict_proba(x.double()), expected.float(), rtol=0, atol=1e-6)
    assert ens._members[0]["fc.weight"].dtype == torch.float32  # members stay as they were
    torch.testing.assert_close(ens.materialize()(x.double()), expected.float(), rtol=0, atol=1e-6)


def test_members_are_snapshots_not_live_references(nets, x):
    ens = SnapshotEnsemble(TinyNet, [n.state_dict() for n in nets], precision="fp32")  # live views of the nets' weights
    shared = SnapshotEnsemble(TinyNet, [n.state_dict() for n in nets], copy=False, precision="fp32")
    before = ens.predict_proba(x)
    with torch.no_grad():
        nets[0].fc.weight.add_(5.0)
    assert torch.equal(ens.predict_proba(x), before)
    torch.testing.assert_close(shared.predict_proba(x), hand_probs(nets, [1 / 3] * 3, x), rtol=0, atol=1e-6)


def test_streaming_and_materialized_agree(nets, x):
    ens = make(nets, [0.1, 0.6, 0.3])
    mat = ens.materialize()
    assert isinstance(mat, MaterializedEnsemble) and len(mat) == 3
    assert torch.equal(mat.weights_, ens.weights_)
    assert torch.equal(mat.member_probs(x), ens.member_probs(x))
    assert torch.equal(mat.predict_proba(x), ens.predict_proba(x))
    assert torch.equal(mat(x), ens(x))
    direct = MaterializedEnsemble(nets, [0.1, 0.6, 0.3], precision="fp32")
    torch.testing.assert_close(direct(x), ens(x), rtol=0, atol=1e-7)


def test_state_dict_is_refused_and_materialize_saves_every_member(nets, x):
    ens = make(nets, [0.1, 0.6, 0.3])
    ens.predict_proba(x)  # the working model now holds the last member only
    with pytest.raises(TypeError, match="materialize\\(\\).*all M members"):
        ens.state_dict()
    with pytest.raises(TypeError, match="SnapshotStore"):
        ens.load_state_dict({})
    with pytest.raises(TypeError, match="no state_dict"):
        nn.Sequential(ens).state_dict()  # a parent module cannot save it silently either
    saved = ens.materialize().state_dict()  # the promised way: every member's tensors are in it
    restored = MaterializedEnsemble([member(99) for _ in nets], precision="fp32")
    restored.load_state_dict(saved)
    torch.testing.assert_close(restored.predict_proba(x), ens.predict_proba(x), rtol=0, atol=1e-7)


def test_torch_export_round_trip(nets, x):
    ens = make(nets, [0.25, 0.25, 0.5])
    program = torch.export.export(ens.materialize(), (x,))
    exported = program.module()
    torch.testing.assert_close(exported(x), ens(x), rtol=1e-6, atol=1e-7)
    x2 = torch.randn_like(x)  # other values, same shape: nothing was baked in
    torch.testing.assert_close(exported(x2), ens(x2), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torch_jit_trace_round_trip(nets, x):
    ens = make(nets, [0.25, 0.25, 0.5])
    traced = torch.jit.trace(ens.materialize(), x)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(traced(x), ens(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(traced(x2), ens(x2), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, still supported
def test_scripted_images_refuses_nan_like_out_of_range_values(nets, images):
    """`lo < -slack or hi > 1 + slack` is False for NaN: the .pt module took NaN images and returned NaN."""
    ens = make(nets, mean=MEAN, std=STD, input_shape=[3, 6, 6]).materialize()
    floats = images.float() / 255
    scripted = ens.scripted_images(floats)
    with torch.no_grad():
        torch.testing.assert_close(scripted(floats), ens.predict_proba(floats), rtol=0, atol=1e-6)
        for bad in (floats.clone().fill_(float("nan")), torch.where(floats > 0.5, float("nan"), floats),
                    floats + 2):
            with pytest.raises(torch.jit.Error, match=r"snapens: expected images in \[0, 1\]"):
                scripted(bad)
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\]"):  # as the prediction methods say
        ens.predict_proba(floats.clone().fill_(float("nan")))


def test_wrapped_state_dicts_and_wrong_architecture(nets, x):
    prefixed = [{f"module.{k}": v for k, v in n.state_dict().items()} for n in nets]
    ens = SnapshotEnsemble(TinyNet, prefixed, precision="fp32")
    torch.testing.assert_close(ens(x), make(nets)(x), rtol=0, atol=0)
    wide = unwrap_state_dict(member(9, width=6))
    with pytest.raises(SnapshotError, match=r"member 1 does not fit TinyNet.*shape mismatch"):
        SnapshotEnsemble(TinyNet, [nets[0].state_dict(), wide])


def fake_run(tmp_path, n_snapshots: int = 5, width: int = 4) -> tuple[list[TinyNet], TinyNet]:
    """A run folder as the engine writes it: snapshots/ (SnapshotStore) and best.safetensors."""
    store = SnapshotStore(tmp_path / "snapshots")
    snaps = [member(10 + k, width) for k in range(n_snapshots)]
    for k, net in enumerate(snaps, start=1):
        store.save(net, index=k, step=10 * k, epoch=k, lr=0.0, model_name="tiny", model_kwargs={"width": width})
    best = member(99, width)
    save_weights(tmp_path / "best.safetensors", best, {"model": {"name": "tiny", "kwargs": {"width": width}}})
    return snaps, best


def write_toy_config(run_dir, *, val_size: int, snapshots: int) -> dict:
    """A fake_run's config.json as ``snapens train`` writes it (toy data, the tiny model); returns the dict."""
    config = {"config": {"dataset": "toy", "seed": 0, "val_size": val_size, "batch_size": 4, "epochs": 2,
                         "snapshots": snapshots, "lr": 0.1, "schedule": "cosine-cycles"},
              "model": {"name": "tiny", "kwargs": {}},
              "dataset": {"classes": [0, 1, 2], "num_train": 8, "num_val": val_size, "num_test": 4, "mean": list(MEAN),
                          "std": list(STD)}}
    (run_dir / "config.json").write_text(json.dumps(config))
    return config


def test_from_run_picks_last_m_and_best(tmp_path, x):
    snaps, best = fake_run(tmp_path)
    ens = from_run(tmp_path, builder, last=3)
    assert [n.rsplit("/", 1)[-1] for n in ens.member_names] == [f"snapshot-0{k}.safetensors" for k in (3, 4, 5)]
    torch.testing.assert_close(ens.predict_proba(x), hand_probs(snaps[2:], [1 / 3] * 3, x), rtol=0, atol=1e-6)

    ens_all = from_run(tmp_path, builder)
    assert len(ens_all) == 5
    torch.testing.assert_close(ens_all.predict_proba(x), hand_probs(snaps, [0.2] * 5, x), rtol=0, atol=1e-6)

    w = [0.4, 0.1, 0.2, 0.3]
    ens_best = from_run(tmp_path, builder, last=3, include_best=True, weights=w)
    assert ens_best.member_names[0].endswith("best.safetensors") and len(ens_best) == 4
    torch.testing.assert_close(ens_best.predict_proba(x), hand_probs([best, *snaps[2:]], w, x), rtol=0, atol=1e-6)

    one = from_run(tmp_path, builder, last=1)
    assert torch.equal(one.predict_proba(x), F.softmax(snaps[-1](x), dim=-1))


def _store_recommendation(run_dir, members, weights, temperature=1.0, fitted=False, name="recommended.json"):
    (run_dir / name).write_text(json.dumps({
        "format_version": 1, "members": members, "weights": weights, "temperature": temperature,
        "temperature_fitted": fitted, "use": "fitted", "reason": "test"}))


def test_from_run_uses_the_stored_recommendation_and_loads_only_its_members(tmp_path, x, monkeypatch):
    """Issue 21: the default is the stored recommendation; members of weight 0 are neither loaded nor run, and
    a fitted temperature is applied as weighting.apply_temperature defines it (temperature=False: T = 1)."""
    from snapens import weighting

    snaps, _ = fake_run(tmp_path, n_snapshots=3)
    names = [f"snapshot-0{k}" for k in (1, 2, 3)]
    _store_recommendation(tmp_path, names, [0.0, 0.25, 0.75], temperature=1.7, fitted=True)
    loaded = []
    real = SnapshotStore.load_state_dict
    monkeypatch.setattr(SnapshotStore, "load_state_dict", lambda self, i: loaded.append(i) or real(self, i))
    ens = from_run(tmp_path, builder)
    assert loaded == [2, 3] and len(ens) == 2 and ens.temperature == 1.7
    assert [n.rsplit("/", 1)[-1] for n in ens.member_names] == ["snapshot-02.safetensors", "snapshot-03.safetensors"]
    expected = weighting.apply_temperature(hand_probs(snaps[1:], [0.25, 0.75], x), 1.7)
    torch.testing.assert_close(ens.predict_proba(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens.materialize()(x), expected, rtol=0, atol=1e-6)
    cold = from_run(tmp_path, builder, temperature=False)
    torch.testing.assert_close(cold.predict_proba(x), hand_probs(snaps[1:], [0.25, 0.75], x), rtol=0, atol=1e-6)
    paper = from_run(tmp_path, builder, weights="equal")
    assert len(paper) == 3 and paper.temperature == 1.0
    torch.testing.assert_close(paper.predict_proba(x), hand_probs(snaps, [1 / 3] * 3, x), rtol=0, atol=1e-6)


def test_from_run_keeps_every_member_when_equal_weights_are_recommended(tmp_path, x):
    """Issue 21 (b): validation members where equal weights win -> the recommendation keeps them all."""
    from snapens.guidance import recommend

    # two members, each confidently right on its own half of the images and unsure on the other: averaging wins
    n, c = 200, 4
    y = torch.arange(n) % c
    p = torch.full((2, n, c), 0.1)
    for m in range(2):
        half = (torch.arange(n) % 2) == m
        p[m, half, :] = 0.02
        p[m, half, y[half]] = 0.94
        p[m, ~half, :] = 0.25
    rec = recommend(p, y)
    assert rec.use == "equal" and rec.weights == pytest.approx([0.5, 0.5]) and rec.forward_passes == 2
    snaps, _ = fake_run(tmp_path, n_snapshots=2)
    _store_recommendation(tmp_path, ["snapshot-01", "snapshot-02"], rec.weights)
    ens = from_run(tmp_path, builder)
    assert len(ens) == 2 and ens.temperature == 1.0
    torch.testing.assert_close(ens.predict_proba(x), hand_probs(snaps, [0.5, 0.5], x), rtol=0, atol=1e-6)


def test_from_run_recommended_errors(tmp_path):
    fake_run(tmp_path, n_snapshots=2)
    assert len(from_run(tmp_path, builder)) == 2  # no config.json: nothing chose, equal weights
    config = write_toy_config(tmp_path, val_size=2, snapshots=2)
    with pytest.raises(FileNotFoundError, match=r"recommended\.json is missing.*snapens evaluate .*weights='equal'"):
        from_run(tmp_path, builder)
    with pytest.raises(FileNotFoundError, match=r"recommended-last1\.json is missing.*--last 1"):
        from_run(tmp_path, builder, last=1)
    assert len(from_run(tmp_path, builder, weights="equal")) == 2
    _store_recommendation(tmp_path, ["snapshot-01", "snapshot-09"], [0.5, 0.5])
    with pytest.raises(ValueError, match="was chosen for the members"):
        from_run(tmp_path, builder)
    _store_recommendation(tmp_path, ["snapshot-01", "snapshot-02"], [0.5, 0.6])
    with pytest.raises(ValueError, match="not a valid recommendation"):
        from_run(tmp_path, builder)
    with pytest.raises(ValueError, match="weights must be 'recommended', 'equal'"):
        from_run(tmp_path, builder, weights="best")
    _store_recommendation(tmp_path, ["snapshot-02"], [1.0], name="recommended-last1.json")
    assert len(from_run(tmp_path, builder, last=1)) == 1


@pytest.mark.parametrize("last", [0, 6, -1, 2.0, True])
def test_from_run_rejects_bad_last(tmp_path, last):
    fake_run(tmp_path)
    with pytest.raises(ValueError, match=rf"last must be .*\[1, 5\].*{last!r}"):
        from_run(tmp_path, builder, last=last)


def test_from_run_errors_name_the_file(tmp_path):
    with pytest.raises(SnapshotError, match=r"manifest\.json is missing"):
        from_run(tmp_path, builder)
    fake_run(tmp_path, n_snapshots=2)
    with pytest.raises(ValueError, match=r"length M=2"):
        from_run(tmp_path, builder, weights=[1.0])
    snap = tmp_path / "snapshots" / "snapshot-01.safetensors"
    data = bytearray(snap.read_bytes())
    data[-3] ^= 0x01
    snap.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors.*sha256"):
        from_run(tmp_path, builder)
    # last=1 reads only snapshot-02, so the damaged first file does not matter
    assert len(from_run(tmp_path, builder, last=1)) == 1


def test_from_run_wrong_architecture_and_mixed_snapshots(tmp_path):
    fake_run(tmp_path, n_snapshots=2)
    store = SnapshotStore(tmp_path / "snapshots")
    # an architecture that does not fit the files: builder ignores the recorded kwargs
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors does not fit.*shape mismatch"):
        from_run(tmp_path, lambda name, **kw: TinyNet(width=7))
    store.save(member(5, width=6), index=3, step=30, epoch=3, lr=0.0, model_name="tiny", model_kwargs={"width": 6})
    with pytest.raises(SnapshotError, match=r"snapshot-01\.safetensors.*one architecture"):
        from_run(tmp_path, builder)
    assert len(from_run(tmp_path, builder, last=1)) == 1  # the last one alone is fine
    with pytest.raises(SnapshotError, match=r"best\.safetensors does not fit"):
        from_run(tmp_path, builder, last=1, include_best=True)


def test_from_run_without_best_file(tmp_path):
    fake_run(tmp_path, n_snapshots=2)
    (tmp_path / "best.safetensors").unlink()
    with pytest.raises(SnapshotError, match=r"best\.safetensors is missing"):
        from_run(tmp_path, builder, include_best=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streaming_matches_cpu(tmp_path, x):
    snaps, _ = fake_run(tmp_path, n_snapshots=3)
    cpu = from_run(tmp_path, builder)
    gpu = from_run(tmp_path, builder, device="cuda")
    assert gpu.device.type == "cuda" and gpu.model.fc.weight.device.type == "cuda"
    assert all(t.device.type == "cpu" for sd in gpu._members for t in sd.values())
    probs = gpu.predict_proba(x)
    assert probs.device.type == "cpu"
    assert all(t.is_pinned() for sd in gpu._members for t in sd.values())
    torch.testing.assert_close(probs, cpu.predict_proba(x), rtol=1e-4, atol=1e-5)
    mat = gpu.materialize()
    assert all(p.device.type == "cuda" for p in mat.parameters())
    torch.testing.assert_close(mat(x.cuda()).cpu(), probs, rtol=1e-5, atol=1e-6)
    on_gpu = from_run(tmp_path, builder, device="cuda", member_device="cuda")
    torch.testing.assert_close(on_gpu.predict_proba(x), probs, rtol=1e-5, atol=1e-6)
    moved = cpu.to("cuda")
    torch.testing.assert_close(moved.predict_proba(x), probs, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(moved.weights_.sum()), 1.0, rel_tol=1e-6)


def test_tensor_input_loads_each_member_once_and_matches_batches(monkeypatch):
    ens = SnapshotEnsemble(TinyNet, [member(s).state_dict() for s in range(3)], precision="fp32")
    x = torch.randn(10, 3, 8, 8)
    loads = []
    original = ens._load_member
    monkeypatch.setattr(ens, "_load_member", lambda m: (loads.append(m), original(m)))
    member_major = ens.member_probs(x, batch_size=4)
    assert loads == [0, 1, 2]  # three slices, yet each member copied in once
    batch_major = ens.member_probs([x[:4], x[4:8], x[8:]])
    assert torch.allclose(member_major, batch_major, atol=1e-6)
    assert torch.allclose(ens.predict_proba(x, batch_size=4), ens.predict_proba([x[:4], x[4:8], x[8:]]), atol=1e-6)


# ------------------------------------------------------------------------------- members refused (issue 9, item 4)
@pytest.mark.parametrize("poison, message", [
    (lambda t: t.long(), r"member 1: tensor conv\.weight has dtype torch\.int64.*not a snapshot"),
    (lambda t: t > 0, r"member 1: tensor conv\.weight has dtype torch\.bool"),
    (lambda t: t.index_fill(0, torch.tensor([0]), math.nan), r"member 1: tensor conv\.weight holds \d+ non-finite"),
    (lambda t: t.index_fill(0, torch.tensor([0]), math.inf), r"member 1: tensor conv\.weight holds \d+ non-finite"),
])
def test_integer_or_non_finite_member_is_refused_naming_member_and_tensor(nets, poison, message):
    states = [unwrap_state_dict(n) for n in nets]
    states[1]["conv.weight"] = poison(states[1]["conv.weight"])
    with pytest.raises(SnapshotError, match=message):
        SnapshotEnsemble(TinyNet, states)


def test_a_module_where_a_state_dict_belongs_is_a_type_error(nets):
    with pytest.raises(TypeError, match=r"member 0 is a TinyNet module, not a state dict: pass module\.state_dict"):
        SnapshotEnsemble(TinyNet, nets)
    with pytest.raises(TypeError, match=r"sequence of state dicts.*a single state dict: wrap it in a list"):
        SnapshotEnsemble(TinyNet, nets[0].state_dict())
    with pytest.raises(TypeError, match=r"sequence of state dicts.*a TinyNet module: pass \[module\.state_dict\(\)\]"):
        SnapshotEnsemble(TinyNet, nets[0])
    bad = unwrap_state_dict(nets[0])
    bad["fc.bias"] = bad["fc.bias"].numpy()
    with pytest.raises(TypeError, match=r"member 0: fc\.bias is a ndarray, not a tensor"):
        SnapshotEnsemble(TinyNet, [bad])


# ------------------------------------------------------------------------ the ensemble's own preprocessing (item 6)
MEAN, STD = (0.2, 0.5, 0.4), (0.3, 0.25, 0.2)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(0, 256, (9, 3, 6, 6), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def test_images_in_0_1_or_uint8_are_normalised_by_the_ensemble(nets, images):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    by_hand = make(nets).predict_proba((images.float() / 255 - mean) / std)  # the caller normalises
    ens = make(nets, mean=MEAN, std=STD)
    assert ens.normalizes_inputs and not make(nets).normalizes_inputs
    torch.testing.assert_close(ens.predict_proba(images.float() / 255), by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens.predict_proba(images), by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(ens.materialize()(images.float() / 255), by_hand, rtol=0, atol=1e-6)
    # the uint8 path computes u8 * (1 / (255 std)) - mean / std in float32, exactly as BatchLoader does
    from snapens.data import BatchLoader, Split

    loader = BatchLoader(Split(images, torch.zeros(9, dtype=torch.long)), 4, shuffle=False, augment=None,
                         mean=MEAN, std=STD)
    assert torch.equal(ens.member_probs(images, batch_size=4), make(nets).member_probs(loader))


def test_images_out_of_range_are_refused(nets, images):
    ens = make(nets, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\].*\[0, 255\].*inputs='normalized'"):
        ens.predict_proba(images.float())  # 0..255 floats: the classic mistake
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\]"):
        ens.member_probs([torch.randn(4, 3, 6, 6)])  # already normalised, given to an image ensemble
    with pytest.raises(ValueError, match="got uint8 images, but this ensemble takes normalised inputs"):
        make(nets).predict_proba(images)
    with pytest.raises(ValueError, match="both mean and std"):
        make(nets, mean=MEAN)


def test_from_run_takes_raw_images_by_default_and_normalized_on_request(tmp_path, images):
    snaps, _ = fake_run(tmp_path, n_snapshots=2)
    with pytest.raises(SnapshotError, match=r"config\.json is missing.*inputs='normalized'"):
        SnapshotEnsemble.from_run(tmp_path, builder)
    config = write_toy_config(tmp_path, val_size=0, snapshots=2)
    raw = SnapshotEnsemble.from_run(tmp_path, builder, precision="fp32")
    x = images.float() / 255
    normalized = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(raw.predict_proba(x), hand_probs(snaps, [0.5, 0.5], normalized), rtol=0, atol=1e-6)
    old = SnapshotEnsemble.from_run(tmp_path, builder, precision="fp32", inputs="normalized")
    torch.testing.assert_close(old.predict_proba(normalized), raw.predict_proba(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="inputs must be one of"):
        SnapshotEnsemble.from_run(tmp_path, builder, inputs="raw")


# ----------------------------------------------------------------------------------- precision (issue 13)
def test_auto_precision_is_bf16_where_native_and_agrees_with_fp32(nets, x):
    from snapens._precision import cpu_supports_bf16

    fp32 = make(nets, precision="fp32")
    auto = make(nets, precision="auto")
    assert fp32.precision == "fp32"
    assert auto.precision == ("bf16" if cpu_supports_bf16() else "fp32")
    bf16 = make(nets, precision="bf16")
    exact, low = fp32.predict_proba(x), bf16.predict_proba(x)
    assert low.dtype == torch.float32  # softmax and the mean in fp32
    assert 0 < float((low - exact).abs().max()) < 2e-2  # bf16 really ran, and is close
    assert bf16.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fp32.model.conv.weight.is_contiguous()  # fp32 keeps the layout, so its numbers do not move
    mat = bf16.materialize()
    assert mat.precision == "bf16"
    torch.testing.assert_close(mat(x), low, rtol=0, atol=1e-6)
    torch.testing.assert_close(bf16.predict_proba([x[:4], x[4:]]), low, rtol=0, atol=1e-6)


def test_bf16_on_a_cpu_without_native_bf16_warns(nets, x, monkeypatch, caplog):
    import snapens._precision

    monkeypatch.setattr(snapens._precision, "cpu_supports_bf16", lambda *a: False)
    assert make(nets, precision="auto").precision == "fp32"
    with caplog.at_level("WARNING"):
        assert make(nets, precision="bf16").precision == "bf16"
    assert any("emulated" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        make(nets, precision="fp16").predict_proba(x)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        make(nets, precision="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_cuda_reduced_precision_is_close_to_fp32(nets, x, precision):
    exact = make(nets).predict_proba(x)
    ens = make(nets, precision=precision).to("cuda")
    expected = {"auto": "bf16" if torch.cuda.is_bf16_supported() else "fp32"}.get(precision, precision)
    assert ens.precision == expected
    probs = ens.predict_proba(x)
    assert probs.device.type == "cpu" and probs.dtype == torch.float32
    torch.testing.assert_close(probs, exact, rtol=0, atol=2e-2)
    torch.testing.assert_close(ens.materialize()(x.cuda()).cpu(), probs, rtol=0, atol=1e-3)


def test_the_ensemble_takes_the_engines_precision_object(nets, x):
    from snapens._precision import Precision

    prec = Precision.resolve("fp32", torch.device("cpu"))  # what engine.fit takes, resolved once
    ens = make(nets, precision=prec)
    assert ens.precision == "fp32" and ens.resolved_precision() is prec
    torch.testing.assert_close(ens.predict_proba(x), make(nets, precision="fp32").predict_proba(x), rtol=0, atol=0)
    assert ens.materialize().resolved_precision() is prec
    with pytest.raises(ValueError, match="unknown precision"):
        make(nets, precision="fp64")


# ----------------------------------------------------------------------- one input contract (issue 20.3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.bool])
def test_integer_images_other_than_uint8_are_refused(nets, images, dtype):
    ens = make(nets, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"got .* images; expected uint8 pixels \(0\.\.255\) or floating point"):
        ens.predict_proba(images.to(dtype))
    with pytest.raises(ValueError, match="expected uint8 pixels"):
        ens.materialize().member_probs([images.to(dtype)])
    # an ensemble on pre-normalised inputs keeps taking what its network takes
    assert make(nets).predict_proba(torch.randn(2, 3, 6, 6)).shape == (2, C)


def test_image_shape_is_checked_where_known(nets, images):
    ens = make(nets, mean=MEAN, std=STD)  # channels known from mean/std, sizes not
    assert ens.input_shape == (3, None, None)
    one_channel = images[:, :1].float() / 255
    with pytest.raises(ValueError, match=r"expected images \[N, 3, \?, \?\] .* got a tensor of shape \[9, 1, 6, 6\]"):
        ens.predict_proba(one_channel)  # before: broadcast to 3 channels by (x - mean) / std
    assert ens.predict_proba(torch.rand(2, 3, 16, 16)).shape == (2, C)  # sizes unknown: not checked
    sized = make(nets, mean=MEAN, std=STD, input_shape=[3, 6, 6])
    assert sized.subset([0]).input_shape == sized.materialize().input_shape == (3, 6, 6)
    for bad in (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 3, 3), torch.rand(3, 6, 6), images[:, :1]):
        with pytest.raises(ValueError, match=r"expected images \[N, 3, 6, 6\]"):
            sized.predict_proba(bad)
    torch.testing.assert_close(sized.predict_proba(images), ens.predict_proba(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has 1 channels, but mean/std have 3"):
        make(nets, mean=MEAN, std=STD, input_shape=[1, 6, 6])
    with pytest.raises(ValueError, match=r"input_shape must be the \[C, H, W\]"):
        make(nets, input_shape=[3, 6])


def test_from_run_on_digits_refuses_int64_images_instead_of_confident_nonsense(tiny_run):
    from snapens.data import load_dataset
    from snapens.models import build_model

    info = json.loads((tiny_run / "config.json").read_text())
    assert info["dataset"]["image_shape"] == [1, 8, 8]
    test = load_dataset("digits", seed=info["config"]["seed"]).test
    ens = SnapshotEnsemble.from_run(tiny_run, build_model, precision="fp32", weights="equal")  # never evaluated
    assert ens.input_shape == (1, 8, 8)
    right = ens.predict_proba(test.images)
    torch.testing.assert_close(ens.predict_proba(test.images.float() / 255), right, rtol=0, atol=1e-5)
    for bad in (test.images.long(), test.images.int(), test.images.short(), test.images > 0):
        with pytest.raises(ValueError, match="expected uint8 pixels"):
            ens.predict_proba(bad)
    for bad in (torch.rand(4, 1, 16, 16), torch.rand(4, 1, 4, 4), torch.rand(4, 3, 8, 8)):
        with pytest.raises(ValueError, match=r"expected images \[N, 1, 8, 8\]"):
            ens.predict_proba(bad)


def test_forward_and_member_probs_batch_refuse_other_dtypes_and_shapes_too(tiny_run):
    """ens(x.long()) gave ~90 % error silently while predict_proba refused it: the dtype and shape checks are
    data-independent, so forward and member_probs_batch run them as well (the range check stays out)."""
    from snapens.data import load_dataset
    from snapens.models import build_model

    info = json.loads((tiny_run / "config.json").read_text())
    test = load_dataset("digits", seed=info["config"]["seed"]).test
    ens = SnapshotEnsemble.from_run(tiny_run, build_model, precision="fp32", weights="equal")
    materialized = ens.materialize()
    with torch.no_grad():
        for module in (ens, materialized):
            torch.testing.assert_close(module(test.images[:5]), ens.predict_proba(test.images[:5]), rtol=0,
                                       atol=1e-5)
            for call in (module, module.forward, module.member_probs_batch):
                for bad in (test.images[:5].long(), test.images[:5] > 0):
                    with pytest.raises(ValueError, match="expected uint8 pixels"):
                        call(bad)
                with pytest.raises(ValueError, match=r"expected images \[N, 1, 8, 8\]"):
                    call(torch.rand(4, 3, 8, 8))
            assert module(test.images[:5].float()).shape == (5, 10)  # 0..255 floats: range not checked here


def test_from_run_of_an_old_run_checks_the_channels_and_a_bad_shape_entry_is_refused(tmp_path, images):
    fake_run(tmp_path, n_snapshots=1)
    config = write_toy_config(tmp_path, val_size=0, snapshots=1)
    old = SnapshotEnsemble.from_run(tmp_path, builder, precision="fp32")  # no dataset.image_shape
    assert old.input_shape == (3, None, None)
    config["dataset"]["image_shape"] = [1, 6, 6]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SnapshotError, match=r"dataset\.image_shape must be the \[C, H, W\]"):
        SnapshotEnsemble.from_run(tmp_path, builder)
