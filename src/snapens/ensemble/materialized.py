"""An ensemble whose M members are submodules: plain tensor code for ``torch.export`` and ``torch.jit.trace``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapens._precision import Precision
from snapens.ensemble._base import Weights, _Ensemble, _prepare_module, _set_layout

__all__ = ["MaterializedEnsemble"]


class MaterializedEnsemble(_Ensemble):
    """All M members held as submodules: plain tensor code, exportable with ``torch.export`` / ``torch.jit.trace``.

    The precision (autocast) and input normalisation are part of ``forward``, so an exported program applies them
    too. ``forward`` does not range-check its input (that would not trace); the prediction methods do.

    Args:
        members: The member networks (same input and number of classes).
        weights: Member weights ``[M]`` (>= 0, summing to 1); ``None`` = equal.
        names: Optional labels, e.g. the snapshot files.
        precision, channels_last, mean, std: as in :class:`SnapshotEnsemble`.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Weights = None, *, names: Sequence[str] | None = None,
                 precision: str | Precision = "auto", channels_last: bool | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(len(members), weights, precision=precision, channels_last=channels_last, mean=mean, std=std)
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
