"""Tests for snapens.models: sizes against the papers, shapes, training, equivalences, errors, round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snapens.models import (
    build_model,
    densenet_name_from_legacy,
    list_models,
    model_forms,
    wrn_name_from_legacy,
)

# Small valid members of each family: forward/backward tests stay fast on a loaded 2-core machine.
TINY = ["resnet-8", "wrn-10-1", "wrn-8-2", "densenet-10-4", "densenet-bc-10-4", "cnn-small"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: on a shared 2-core machine intra-op threads mostly wait on each other (measured
    # 4x slower with 2 threads under load), so this file runs single-threaded and restores the setting after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- sizes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, expected",
    [
        ("wrn-16-4", 2.75e6),
        ("wrn-28-10", 36.5e6),
        ("densenet-40-12", 1.02e6),
        ("densenet-bc-100-12", 0.77e6),
        ("densenet-100-24", 27.2e6),
        ("resnet-110", 1.73e6),
        ("resnet-20", 0.27e6),
    ],
)
def test_parameter_counts_match_papers(name: str, expected: float) -> None:
    # Construction on the meta device allocates nothing: counting WRN-28-10's 36.5M parameters is free.
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    assert abs(n_params(model) / expected - 1) < 0.02


def test_resnet_shortcut_b_adds_exactly_the_projections() -> None:
    a = build_model("resnet-20", num_classes=10)
    b = build_model("resnet-20", num_classes=10, shortcut="B")
    # Two projections (16->32, 32->64): 1x1 conv weights plus BN weight and bias.
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_resnet_20_exact_count_by_hand() -> None:
    conv = lambda i, o: 9 * i * o  # noqa: E731
    stem = conv(3, 16) + 2 * 16
    stage1 = 3 * (2 * conv(16, 16) + 4 * 16)
    stage2 = conv(16, 32) + conv(32, 32) + 4 * 32 + 2 * (2 * conv(32, 32) + 4 * 32)
    stage3 = conv(32, 64) + conv(64, 64) + 4 * 64 + 2 * (2 * conv(64, 64) + 4 * 64)
    fc = 64 * 10 + 10
    assert n_params(build_model("resnet-20", num_classes=10)) == stem + stage1 + stage2 + stage3 + fc


@pytest.mark.parametrize("name, blocks, width", [("wrn-16-4", 2, 64), ("wrn-28-10", 4, 160), ("wrn-32-4", 5, 64),
                                                 ("wrn-10-1", 1, 16), ("wrn-8-2", 1, 32)])
def test_wrn_depth_conventions(name: str, blocks: int, width: int) -> None:
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    assert len(model.stage1) == len(model.stage2) == len(model.stage3) == blocks
    assert model.stage1[0].conv1.out_channels == width
    assert model.stage3[-1].conv2.out_channels == 4 * width


@pytest.mark.parametrize("name, layers, stem, final", [("densenet-40-12", 12, 16, 16 + 3 * 12 * 12),
                                                       ("densenet-bc-100-12", 16, 24, 342)])
def test_densenet_structure(name: str, layers: int, stem: int, final: int) -> None:
    model = build_model(name, num_classes=10)
    blocks = [m for m in model.features if hasattr(m, "layers")]
    assert [len(b.layers) for b in blocks] == [layers] * 3
    assert model.stem.out_channels == stem
    # BC: 24 + 16*12 = 216 -> 108; 108 + 192 = 300 -> 150; 150 + 192 = 342.
    assert model.fc.in_features == final


def test_legacy_names() -> None:
    assert wrn_name_from_legacy(2, 4) == "wrn-16-4"
    assert wrn_name_from_legacy(4, 10) == "wrn-28-10"
    assert densenet_name_from_legacy(40, 12) == "densenet-40-12"
    build_model(wrn_name_from_legacy(1, 1), num_classes=3)
    for bad in [(0, 4), (2, 0), (2.0, 4)]:
        with pytest.raises(ValueError, match="wrn_"):
            wrn_name_from_legacy(*bad)
    with pytest.raises(ValueError, match="41"):
        densenet_name_from_legacy(41, 12)
    with pytest.raises(ValueError, match="growth"):
        densenet_name_from_legacy(40, 0)


def test_list_models_all_build_and_forms_cover_families() -> None:
    names = list_models()
    assert {"wrn-16-4", "wrn-28-10", "wrn-32-4", "densenet-40-12", "densenet-100-24", "densenet-bc-100-12",
            "resnet-20", "resnet-110", "cnn-small"} <= set(names)
    with torch.device("meta"):
        for name in names:
            build_model(name, num_classes=10)
    forms = [f.split(":")[0] for f in model_forms()]
    assert forms == ["wrn-D-K", "densenet-D-K", "densenet-bc-D-K", "resnet-D", "cnn-small"]


# --- init ----------------------------------------------------------------------------------------------------------

def test_standard_initialisation() -> None:
    model = build_model("wrn-16-4", num_classes=10)
    conv = model.stage3[1].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    expected_std = math.sqrt(2.0 / (256 * 9))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)


# --- forward shapes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (2, 9, 11)])
def test_forward_shapes(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, num_classes=7, in_channels=shape[0])
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet-20", "wrn-16-4", "densenet-40-12", "densenet-bc-100-12"])
def test_real_size_forward(name: str) -> None:
    model = build_model(name, num_classes=100).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


# --- training ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_optimizer_steps_reduce_loss(name: str) -> None:
    model = build_model(name, num_classes=4, in_channels=3)
    x, y = torch.randn(16, 3, 12, 12), torch.arange(16) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


@pytest.mark.slow
def test_cnn_small_learns_digits() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    model = build_model("cnn-small", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for _ in range(3):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.95


# --- equivalences --------------------------------------------------------------------------------------------------

def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass (what memory-efficient mode is meant to cut)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


@pytest.mark.parametrize("name", ["densenet-10-4", "densenet-bc-16-4"])
def test_memory_efficient_matches_plain(name: str) -> None:
    plain = build_model(name, num_classes=5)
    efficient = build_model(name, num_classes=5, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 16, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = plain(x1), efficient(x2)
    torch.testing.assert_close(out2, out1)
    weights = torch.randn_like(out1)
    (out1 * weights).sum().backward()
    (out2 * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    for (n1, p1), (_, p2) in zip(plain.named_parameters(), efficient.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, msg=n1)
    # The recomputation must not update the BatchNorm running statistics a second time.
    torch.testing.assert_close(efficient.state_dict(), plain.state_dict())
    assert _saved_bytes(efficient, x) < 0.9 * _saved_bytes(plain, x)
    # In eval mode nothing is checkpointed and both agree as well.
    plain.eval(), efficient.eval()
    with torch.no_grad():
        torch.testing.assert_close(efficient(x), plain(x))


@pytest.mark.parametrize("name", TINY + ["resnet-8/B"])
@pytest.mark.parametrize("train", [False, True])
def test_channels_last_matches_contiguous(name: str, train: bool) -> None:
    name, _, shortcut = name.partition("/")
    kwargs = {"shortcut": shortcut} if shortcut else {}
    model = build_model(name, num_classes=6, **kwargs).train(train)
    reference = build_model(name, num_classes=6, **kwargs).train(train)
    reference.load_state_dict(model.state_dict())
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16)
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_dropout_only_in_train_mode(name: str) -> None:
    x = torch.randn(4, 3, 16, 16)
    model = build_model(name, num_classes=5, dropout=0.5)
    # Train mode: BatchNorm uses batch statistics (deterministic), so only dropout can make two passes differ.
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    no_dropout = build_model(name, num_classes=5)
    torch.testing.assert_close(no_dropout(x), no_dropout(x), rtol=0, atol=0)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    model = build_model("resnet-8", num_classes=3)
    shortcut = model.stage2[0].shortcut
    x = torch.randn(2, 16, 9, 9)
    out = shortcut(x)
    assert out.shape == (2, 32, 5, 5)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert torch.all(out[:, 16:] == 0)
    assert sum(p.numel() for p in shortcut.parameters()) == 0


# --- names, options, round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    ["wrn-17-4", "wrn-16-0", "wrn-4-4", "densenet-bc-41-12", "densenet-41-12", "densenet-40-0", "resnet-21",
     "resnet-2", "vgg-16", "WRN-16-4", "wrn-16", "cnn-big", "", "resnet-20 "],
)
def test_bad_names_raise_listing_forms(name: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(name, num_classes=10)
    message = str(info.value)
    assert repr(name) in message
    for form in ["wrn-D-K", "densenet-D-K", "densenet-bc-D-K", "resnet-D", "cnn-small"]:
        assert form in message


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="memory_efficient"):
        build_model("resnet-20", num_classes=10, memory_efficient=True)
    with pytest.raises(ValueError, match="'C'"):
        build_model("resnet-20", num_classes=10, shortcut="C")
    with pytest.raises(ValueError, match="1.5"):
        build_model("wrn-10-1", num_classes=10, dropout=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn-small", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("cnn-small", num_classes=10, in_channels=0)
    with pytest.raises(ValueError, match="must be a string"):
        build_model(None, num_classes=10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("wrn-10-2", {"dropout": 0.3}),
        ("densenet-bc-10-4", {"memory_efficient": True, "dropout": 0.2}),
        ("densenet-10-4", {}),
        ("resnet-8", {"shortcut": "B"}),
        ("cnn-small", {"dropout": 0.1}),
    ],
)
def test_rebuild_from_name_and_kwargs(name: str, kwargs: dict) -> None:
    # What a snapshot manifest stores: the name and JSON kwargs (num_classes and in_channels included).
    stored = json.loads(json.dumps({"name": name, "kwargs": {"num_classes": 5, "in_channels": 1, **kwargs}}))
    first = build_model(stored["name"], **stored["kwargs"])
    x = torch.randn(3, 1, 8, 8)
    first(x)  # move the BatchNorm running statistics away from their initial values
    torch.manual_seed(123)
    second = build_model(stored["name"], **stored["kwargs"])
    second.load_state_dict(first.state_dict(), strict=True)
    first.eval(), second.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)
