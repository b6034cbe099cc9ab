"""The price of a prediction: forward passes per image, and images per second measured on a device.

An ensemble of M members runs M forward passes per image; a single model, a weight average (SWA) or a
distilled student runs one. :func:`measure_inference` does not take that on trust: it counts the images that
go through the network's ``forward`` during a timed prediction pass,

.. math::

    \\text{passes} = \\frac{\\text{images seen by forward}}{N}, \\qquad
    \\text{img/s} = \\frac{N}{t_{\\text{pass}}},

after a warm-up pass on the first batch (lazy initialisation, cuDNN autotuning and caches are not timed). On a
CUDA device the clock is read after ``torch.cuda.synchronize``. Images per second are wall-clock numbers of
this device under its current load: compare rows measured in one process, not across machines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["InferenceCost", "measure_inference"]


@dataclass(frozen=True)
class InferenceCost:
    """What one prediction pass over ``images`` cost."""

    #: images run through the counted network's forward, divided by the number of images predicted
    forward_passes: float
    #: images predicted per second of wall-clock time (warm-up excluded)
    images_per_second: float
    images: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """``{"forward_passes", "images_per_second"}`` (what a summary row stores)."""
        return {"forward_passes": self.forward_passes, "images_per_second": self.images_per_second}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_inference(
    predict: Callable[[Tensor], Any],
    images: Tensor,
    *,
    network: nn.Module,
    device: str | torch.device = "cpu",
    warmup_images: int = 256,
) -> InferenceCost:
    """Time ``predict(images)`` after a warm-up call on ``images[:warmup_images]``, counting forward passes.

    Args:
        predict: the prediction pass, e.g. ``ensemble.predict_proba``; it must run every image through
            ``network`` (the working model of an ensemble, or the model itself).
        images: the inputs, in the form ``predict`` takes them (e.g. uint8 images for a
            :class:`~snapens.ensemble.SnapshotEnsemble` that normalises itself).
        network: the module whose ``forward`` calls are counted (the first dimension of its first input).
        device: where ``predict`` computes (synchronised before the clock is read on CUDA).
        warmup_images: images of the untimed warm-up call.

    Raises:
        ValueError: no images.
    """
    n = int(images.shape[0])
    if n < 1:
        raise ValueError("measure_inference needs at least one image")
    device = torch.device(device)
    predict(images[:max(1, warmup_images)])
    seen = [0]

    def count(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen[0] += int(args[0].shape[0])

    handle = network.register_forward_pre_hook(count)
    try:
        _sync(device)
        start = time.perf_counter()
        predict(images)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return InferenceCost(forward_passes=seen[0] / n, images_per_second=n / max(seconds, 1e-9), images=n,
                         seconds=seconds)
