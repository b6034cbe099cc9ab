"""Precision (snapens._precision): what the hardware runs natively, and the training step it implies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from snapens._precision import Precision, cpu_supports_bf16, resolve_precision
from snapens.distributed import resolve_device


def test_precision_resolution(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_supports_bf16(amx) and not cpu_supports_bf16(plain)
    assert not cpu_supports_bf16(tmp_path / "missing")
    expected_auto = "bf16" if cpu_supports_bf16() else "fp32"
    assert resolve_precision("auto", "cpu") == expected_auto
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_precision_object_steps_as_a_plain_loop_and_resolves_once() -> None:
    torch.manual_seed(0)
    a, x, y = nn.Linear(3, 2), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    prec = Precision.resolve("fp32", "cpu")
    with prec.autocast():
        loss = nn.functional.cross_entropy(a(x), y)
    prec.backward_and_step(loss, opt_a)
    opt_b.zero_grad()
    nn.functional.cross_entropy(b(x), y).backward()
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert prec.scaler is None and prec.state_dict() is None
    assert Precision.resolve(prec, torch.device("cpu")) is prec  # resolved once: passed on as it is
    with pytest.raises(ValueError, match="resolved for cpu"):
        Precision.resolve(prec, "meta")
    with pytest.raises(ValueError, match="'auto'"):
        Precision("auto", torch.device("cpu"))
