"""An ensemble whose M members are submodules: plain tensor code for ``torch.export`` and ``torch.jit.trace``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapens._precision import Precision
from snapens.ensemble._base import _RANGE_SLACK, Weights, _Ensemble, _prepare_module, _set_layout, image_shape_text

__all__ = ["MaterializedEnsemble"]

_RANGE_MESSAGE = ("snapens: expected float32 images in [0, 1] (uint8 pixels / 255), got values outside [0, 1]; "
                  "convert uint8 images with x.float() / 255")


class MaterializedEnsemble(_Ensemble):
    """All M members held as submodules: plain tensor code, exportable with ``torch.export`` / ``torch.jit.trace``.

    The precision (autocast) and input normalisation are part of ``forward``, so an exported program applies them
    too. ``forward`` does not range-check its input (that would not trace); the prediction methods do.

    Args:
        members: The member networks (same input and number of classes).
        weights: Member weights ``[M]`` (>= 0, summing to 1); ``None`` = equal.
        names: Optional labels, e.g. the snapshot files.
        precision, channels_last, mean, std, input_shape: as in :class:`SnapshotEnsemble`.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Weights = None, *, names: Sequence[str] | None = None,
                 precision: str | Precision = "auto", channels_last: bool | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 input_shape: Sequence[int | None] | None = None) -> None:
        super().__init__(len(members), weights, precision=precision, channels_last=channels_last, mean=mean, std=std,
                         input_shape=input_shape)
        self.members = nn.ModuleList(_prepare_module(m) for m in members)
        self.member_names = list(names) if names is not None else [f"member {m}" for m in range(len(members))]
        self._layout: bool | None = None
        self.eval()
        self._ready()  # now, so that tracing for export never changes the modules

    def _ready(self) -> bool:
        channels_last = self._uses_channels_last(self.members[0])
        if channels_last != self._layout:
            for member in self.members:
                _set_layout(member, channels_last)
            self._layout = channels_last
        return channels_last

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch: [M, B, C], float32."""
        x = self._model_input(x, self._ready())
        autocast = self.resolved_precision(x.device).autocast
        probs = []
        for member in self.members:
            with autocast():
                logits = member(x)
            probs.append(F.softmax(logits.float(), dim=-1))
        return torch.stack(probs)

    def _expected_shape(self) -> list[int]:
        if self.input_mean is None or self.input_shape is None:
            raise ValueError("only an ensemble that normalises images (built with mean and std) checks its input "
                             "in an exported module")
        return [-1 if d is None else int(d) for d in self.input_shape]

    def range_checked(self) -> nn.Module:
        """This ensemble behind an in-graph check that float images lie in [0, 1], for ``torch.export``: the
        exported program raises ``RuntimeError`` (the message says what to do) on 0..255 input, uint8 included.
        ``torch.export`` itself refuses other channel counts and image sizes (the sizes of the example it traced
        are fixed) but not other dtypes: the program takes float32 only."""
        self._expected_shape()
        return _RangeChecked(self)

    def scripted_images(self, example: Tensor) -> Any:
        """A TorchScript module (``torch.jit.trace`` of this ensemble on the float ``example``, inside a scripted
        wrapper) that keeps the prediction methods' input contract: uint8 (0..255) or float images in [0, 1] of
        :attr:`input_shape`, anything else refused (``torch.jit.Error`` naming a ``ValueError``); uint8
        images are divided by 255 first."""
        shape = self._expected_shape()
        traced = torch.jit.trace(self, (example.to(torch.float32),), check_trace=False)
        return torch.jit.script(_CheckedImages(traced, shape, image_shape_text(self.input_shape or ())))


class _RangeChecked(nn.Module):
    """torch.export: ``_assert_async`` is the check that an exported program keeps (a Python ``if`` on data is
    not); it runs asynchronously on a GPU."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: Tensor) -> Tensor:
        torch._assert_async(((x >= -_RANGE_SLACK) & (x <= 1.0 + _RANGE_SLACK)).all(), _RANGE_MESSAGE)
        return self.ensemble(x)


class _CheckedImages(nn.Module):
    """TorchScript: a scripted module keeps Python-level checks of dtype, shape and range; ``ensemble`` is traced."""

    def __init__(self, ensemble: Any, shape: list[int], shape_text: str) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.shape = shape
        self.shape_text = shape_text
        self.slack = _RANGE_SLACK

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or any(d != -1 and d != n for d, n in zip(self.shape, x.shape[1:])):
            raise ValueError("snapens: expected images " + self.shape_text + " (the run's channels and image size), "
                             "got a tensor of shape " + str(list(x.shape)))
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 255.0
        elif not x.is_floating_point():
            raise ValueError("snapens: expected uint8 images (0..255) or float images in [0, 1], got another dtype "
                             "(integer or bool): convert 0..255 integers with x.to(torch.uint8)")
        elif x.numel() > 0:
            lo, hi = float(x.min()), float(x.max())
            if not (lo >= -self.slack and hi <= 1.0 + self.slack):  # written so that NaN fails it
                raise ValueError("snapens: expected images in [0, 1] (uint8 pixels / 255) or uint8, got values in ["
                                 + str(lo) + ", " + str(hi) + "]")
        return self.ensemble(x.to(torch.float32))
