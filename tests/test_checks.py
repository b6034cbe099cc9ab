"""The shared input checks (snapens._checks): one pass, no copies, the same messages everywhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snapens import _checks, ensemble, metrics, weighting


def _probs(m: int = 3, n: int = 7, c: int = 4) -> torch.Tensor:
    return torch.randn(m, n, c, generator=torch.Generator().manual_seed(0)).softmax(-1)


def test_valid_float_probs_are_returned_without_a_copy() -> None:
    p = _probs()
    got = _checks.check_probs(p, "p", 3)
    assert got.dtype == torch.float32 and got.data_ptr() == p.data_ptr()  # no conversion, no copy
    p64 = p.double()
    assert _checks.check_probs(p64, "p", 3).data_ptr() == p64.data_ptr()
    half = _checks.check_probs(p.bfloat16(), "p", 3)
    assert half.dtype == torch.float32 and torch.allclose(half, p, atol=1e-2)
    arr = p.numpy()
    assert _checks.check_probs(arr, "p", 3).data_ptr() == p.data_ptr()  # numpy memory shared


@pytest.mark.parametrize("poison, message", [
    (math.nan, "found 1 non-finite"), (math.inf, "found 1 non-finite"), (-math.inf, "found 1 non-finite"),
    (-0.25, "not logits.*-0.25"), (0.9, "sum to 1.*off by"),
])
def test_each_bad_value_is_named(poison: float, message: str) -> None:
    p = _probs()
    p[1, 2, 3] = poison
    with pytest.raises(ValueError, match=message):
        _checks.check_probs(p, "member_probs", 3)


def test_labels_and_weights() -> None:
    y = torch.tensor([0, 3, 2])
    assert _checks.check_labels(y, 3, 4).data_ptr() == y.data_ptr()  # int64 already: no copy
    assert _checks.check_labels(np.array([1, 0], dtype=np.int32), 2, 2).dtype == torch.int64
    with pytest.raises(ValueError, match=r"labels in \[0, 3\].*got 4"):
        _checks.check_labels(torch.tensor([0, 4]), 2, 4)
    with pytest.raises(ValueError, match="integer labels"):
        _checks.check_labels(torch.tensor([0.0, 1.0]), 2, 4)
    w = _checks.check_weights([0.25, 0.75], 2)
    assert w.dtype == torch.float64 and w.tolist() == [0.25, 0.75]
    assert _checks.check_weights([2.0, 1.0], 2, sum_to_one=False).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="sum to 1"):
        _checks.check_weights([2.0, 1.0], 2)
    with pytest.raises(ValueError, match="positive sum"):
        _checks.check_weights([0.0, 0.0], 2, sum_to_one=False)


def test_every_module_uses_the_one_set_of_checks() -> None:
    assert weighting.EPS is metrics.EPS is _checks.EPS
    p = _probs()
    p[0, 0, 0] = math.nan
    for call in (lambda: metrics.nll(p[0], torch.zeros(7, dtype=torch.long)),
                 lambda: weighting.fit_ensemble_weights(p, torch.zeros(7, dtype=torch.long)),
                 lambda: weighting.weighted_average(p, [1 / 3] * 3)):
        with pytest.raises(ValueError, match="Expected finite .*found 1 non-finite"):
            call()


def test_the_two_weight_checks_have_distinct_names_and_no_deprecated_alias_is_left() -> None:
    assert weighting.check_simplex_weights([0.5, 0.5], 2).dtype == torch.float64
    assert ensemble.resolve_member_weights(None, 4).tolist() == [0.25] * 4  # None: equal weights
    assert ensemble.resolve_member_weights([0.5, 0.5], 2).dtype == torch.float32
    # issue 19: the deprecated alias validate_weights is gone, not kept beside check_simplex_weights
    assert not hasattr(weighting, "validate_" + "weights") and "validate_" + "weights" not in weighting.__all__
