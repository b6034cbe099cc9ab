"""What both ensembles share: member weights, input normalisation, precision, eval-only mode and the prediction
methods (:mod:`snapens.ensemble` describes inputs and precision)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from snapens import _checks, weighting
from snapens._precision import PRECISIONS, Precision
from snapens.checkpoint import unwrap_model

__all__ = ["DEFAULT_BATCH_SIZE", "INPUTS", "Inputs", "Weights", "resolve_member_weights"]

logger = logging.getLogger("snapens.ensemble")

#: Rows per forward pass when a whole tensor is passed to the prediction methods.
DEFAULT_BATCH_SIZE = 256
#: What :meth:`SnapshotEnsemble.from_run` can take: raw ``"images"`` (normalised by the ensemble with the run's
#: mean/std) or inputs already ``"normalized"`` by the caller.
INPUTS = ("images", "normalized")
#: Inputs up to this size are copied to the device once for all members (a test set of 32x32 uint8 images is
#: ~30 MB); larger ones are copied slice by slice, once per member.
_ONE_COPY_BYTES = 1 << 30
#: Slack for float images in [0, 1]: resampling or colour conversion can overshoot by a rounding error.
_RANGE_SLACK = 1e-3

#: A tensor (or array) of inputs, or an iterable of ``x`` or ``(x, y, ...)`` batches (a DataLoader, BatchLoader).
Inputs = Union[Tensor, np.ndarray, Iterable[Any]]
Weights = Union[Sequence[float], Tensor, np.ndarray, None]


def resolve_member_weights(weights: Weights, n_members: int) -> Tensor:
    """Check ensemble weights and return them as float32 ``[M]``; ``None`` gives equal weights ``1/M``.

    Raises:
        ValueError: no members, wrong length, not finite, negative, or not summing to 1 within 1e-6
            (see :func:`snapens.weighting.check_simplex_weights`).
    """
    if n_members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {n_members}")
    if weights is None:
        return torch.full((n_members,), 1.0 / n_members, dtype=torch.float32)
    return _checks.check_weights(weights, n_members).to(torch.float32)


def _iter_inputs(x_or_batches: Inputs, batch_size: int) -> Iterator[Tensor]:
    """Yield input tensors: slices of a tensor, or the ``x`` of each batch of an iterable."""
    if isinstance(x_or_batches, np.ndarray):
        x_or_batches = torch.from_numpy(x_or_batches)
    if isinstance(x_or_batches, Tensor):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        yield from x_or_batches.split(batch_size)
        return
    if not isinstance(x_or_batches, Iterable):
        raise ValueError(f"expected a tensor or an iterable of batches, got {type(x_or_batches).__name__}")
    for i, batch in enumerate(x_or_batches):
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"batch {i} is an empty {type(batch).__name__}")
            batch = batch[0]
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if not isinstance(batch, Tensor):
            raise ValueError(f"batch {i}: expected a tensor or an (x, y) tuple, got {type(batch).__name__}")
        yield batch


def _channel_stats(values: Any, name: str) -> Tensor:
    try:
        t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers, one per channel, got {values!r}") from exc
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite numbers, one per channel, got {values!r}")
    return t


def _image_shape(shape: Sequence[int | None] | None, channels: int | None) -> tuple[int | None, ...] | None:
    """The expected ``(C, H, W)`` of one image (``None`` for a size not known), or ``None`` when nothing is known."""
    if shape is None:
        return None if channels is None else (channels, None, None)
    dims = tuple(None if d is None else int(d) for d in shape)
    if len(dims) != 3 or any(d is not None and d < 1 for d in dims):
        raise ValueError(f"input_shape must be the [C, H, W] of one image (positive sizes), got {list(shape)!r}")
    if channels is not None and dims[0] not in (None, channels):
        raise ValueError(f"input_shape {list(shape)} has {dims[0]} channels, but mean/std have {channels}")
    return (channels if dims[0] is None else dims[0], dims[1], dims[2])


def image_shape_text(shape: Sequence[int | None]) -> str:
    """``[N, 3, 32, 32]``, with ``?`` for a size not known."""
    return "[N, " + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())


class _Ensemble(nn.Module):
    """Shared part: the ``weights_`` buffer, input normalisation, precision, eval-only mode, the prediction methods."""

    weights_: Tensor
    input_scale: Tensor | None
    input_shift: Tensor | None

    def __init__(self, n_members: int, weights: Weights, *, precision: str | Precision, channels_last: bool | None,
                 mean: Sequence[float] | None, std: Sequence[float] | None,
                 input_shape: Sequence[int | None] | None = None) -> None:
        super().__init__()
        self.register_buffer("weights_", resolve_member_weights(weights, n_members))
        self.temperature = 1.0  # see set_temperature
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std (the ensemble normalises images), or neither")
        if mean is not None and std is not None:
            mean_t, std_t = _channel_stats(mean, "mean"), _channel_stats(std, "std")
            if mean_t.shape != std_t.shape or not bool((std_t > 0).all()):
                raise ValueError(f"mean and std need one value per channel, std > 0; got {list(mean)}, {list(std)}")
            # (u8/255 - mean)/std == u8 * scale - shift: the same float32 numbers as snapens.data.BatchLoader.
            self.register_buffer("input_scale", (1.0 / (255.0 * std_t)).view(1, -1, 1, 1))
            self.register_buffer("input_shift", (mean_t / std_t).view(1, -1, 1, 1))
            self.register_buffer("input_mean", mean_t.view(1, -1, 1, 1))
            self.register_buffer("input_std", std_t.view(1, -1, 1, 1))
        else:
            for name in ("input_scale", "input_shift", "input_mean", "input_std"):
                self.register_buffer(name, None)
        #: The ``(C, H, W)`` of one input image that the prediction methods insist on (``None``: a size not known);
        #: the channels are mean/std's when the ensemble normalises. ``None``: shapes are not checked.
        self.input_shape = _image_shape(input_shape, None if self.input_mean is None else self.input_mean.shape[1])
        if not isinstance(precision, Precision) and precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16")
        self.requested_precision = precision
        self.requested_channels_last = channels_last
        self._resolved: dict[torch.device, Precision] = {}

    @property
    def n_members(self) -> int:
        """M, the number of members."""
        return int(self.weights_.numel())

    def __len__(self) -> int:
        return self.n_members

    @property
    def device(self) -> torch.device:
        """The device the ensemble computes on (where ``weights_`` and the member model(s) live)."""
        return self.weights_.device

    @property
    def normalizes_inputs(self) -> bool:
        """Whether the ensemble takes raw images (uint8, or float in [0, 1]) and normalises them itself."""
        return self.input_mean is not None

    @property
    def precision(self) -> str:
        """The precision the members run in on :attr:`device`: ``fp32``, ``bf16`` or ``fp16`` (``auto`` resolved)."""
        return self.resolved_precision().name

    def resolved_precision(self, device: torch.device | None = None) -> Precision:
        """The :class:`~snapens._precision.Precision` (the engine's) the members run in on ``device`` (default:
        :attr:`device`), resolved once per device from the ``precision`` the ensemble was built with."""
        dev = self.device if device is None else device
        if dev not in self._resolved:
            self._resolved[dev] = Precision.resolve(self.requested_precision, dev)
        return self._resolved[dev]

    def _uses_channels_last(self, model: nn.Module) -> bool:
        if self.requested_channels_last is not None:
            return bool(self.requested_channels_last)
        # channels-last is what oneDNN / cuDNN want for reduced precision; fp32 keeps the default layout, so
        # its numbers are the same as before precision existed.
        return self.precision != "fp32" and _has_conv(model)

    def set_weights(self, weights: Weights) -> None:
        """Replace the member weights (validated as in the constructor; ``None`` = equal)."""
        self.weights_.copy_(resolve_member_weights(weights, self.n_members))

    def set_temperature(self, temperature: float) -> None:
        """Apply ``softmax(log p / T)`` to the weighted mean ``p`` of the members' probabilities
        (:func:`snapens.weighting.apply_temperature`); ``T = 1`` (the default) leaves ``p`` as it is."""
        t = float(temperature)
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = t

    def _combine(self, member_probs: Tensor) -> Tensor:
        """``[M, B, C]`` member probabilities -> the ensemble's ``[B, C]``: weighted mean, then the temperature."""
        probs = (self.weights_.to(member_probs.device, member_probs.dtype).view(-1, 1, 1) * member_probs).sum(dim=0)
        return probs if self.temperature == 1.0 else weighting.scale_by_temperature(probs, self.temperature)

    def train(self, mode: bool = True) -> _Ensemble:
        """Ensembles stay in eval mode: BatchNorm must use the snapshot's running statistics."""
        if mode:
            logger.debug("%s stays in eval mode", type(self).__name__)
        return super().train(False)

    def check_images(self, x: Tensor) -> None:
        """The input contract of the prediction methods: refuse what would otherwise give confident nonsense.

        An ensemble that normalises takes uint8 images (0..255) or floating ones in [0, 1]; any other dtype (int64,
        int16, bool, ...) and floating values outside [0, 1] (0..255 floats) are refused. One that does not takes
        pre-normalised inputs (not range-checked) and refuses uint8. Where :attr:`input_shape` is known, images
        must be ``[N, C, H, W]`` with those sizes (no 1-channel image broadcast to 3 channels, no 16x16 image for a
        32x32 run)."""
        self._check_form(x)
        if self.input_mean is None or not x.is_floating_point() or x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (-_RANGE_SLACK <= lo and hi <= 1.0 + _RANGE_SLACK):
            raise ValueError(
                f"expected images in [0, 1] (uint8 pixels / 255) or a uint8 tensor, got values in [{lo:.4g}, "
                f"{hi:.4g}]; for inputs you normalised yourself build the ensemble without mean/std "
                "(from_run(..., inputs='normalized'))")

    def _check_form(self, x: Tensor) -> None:
        """The data-independent part of :meth:`check_images` (dtype and shape, not the values): ``forward`` runs
        it too, since it does not depend on the values and so traces and exports."""
        if self.input_mean is None and x.dtype == torch.uint8:
            raise ValueError("got uint8 images, but this ensemble takes normalised inputs: build it with the "
                             "training set's mean and std (from_run does by default) to give it images")
        if self.input_mean is not None and x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"got {str(x.dtype).replace('torch.', '')} images; expected uint8 pixels (0..255) or "
                             "floating point images in [0, 1] (uint8 / 255): convert 0..255 integers with "
                             "x.to(torch.uint8)")
        expected = self.input_shape
        if torch.jit.is_tracing():  # sizes are tensors there: the scripted wrapper checks the shape instead
            return
        if expected is not None and (x.dim() != 4 or any(d is not None and d != n
                                                         for d, n in zip(expected, x.shape[1:]))):
            raise ValueError(f"expected images {image_shape_text(expected)} (the run's channels and image size), "
                             f"got a tensor of shape {list(x.shape)}")

    def preprocess(self, x: Tensor) -> Tensor:
        """Model input for ``x``: ``(x - mean) / std`` for float images in [0, 1], ``x * scale - shift`` for uint8
        (bit-identical to :class:`snapens.data.BatchLoader`); ``x`` unchanged without mean/std."""
        if self.input_mean is None:
            return x
        if x.dtype == torch.uint8:
            return x.to(torch.float32).mul_(self.input_scale).sub_(self.input_shift)
        return (x.to(torch.float32) - self.input_mean) / self.input_std

    def _model_input(self, x: Tensor, channels_last: bool) -> Tensor:
        self._check_form(x)  # every path into the members (forward, member_probs_batch) passes here
        x = self.preprocess(x)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch ``x`` already on :attr:`device`: [M, B, C]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Ensemble probabilities :math:`\\sum_m w_m \\mathrm{softmax}(f_m(x))` for one batch: [B, C], float32
        (temperature-scaled where :meth:`set_temperature` set one).

        ``x`` must be on :attr:`device`. Like the prediction methods, ``forward`` refuses other dtypes and image
        shapes (``ValueError``); unlike them it does not check the range of the values (it stays traceable)."""
        return self._combine(self.member_probs_batch(x))

    def _batches(self, x_or_batches: Inputs, batch_size: int) -> Iterator[Tensor]:
        for x in _iter_inputs(x_or_batches, batch_size):
            self.check_images(x)
            yield x.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def member_probs(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Every member's softmax probabilities, on CPU: [M, N, C].

        Args:
            x_or_batches: A tensor [N, ...] (run in slices of ``batch_size``) or an iterable of ``x`` or
                ``(x, y)`` batches, iterated once. Images as described in the module docstring.
            batch_size: Slice size for tensor input.
        """
        chunks = [self.member_probs_batch(x) for x in self._batches(x_or_batches, batch_size)]
        if not chunks:
            raise ValueError("no input batches: the input is empty")
        return torch.cat(chunks, dim=1).cpu()

    @torch.inference_mode()
    def predict_proba(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Ensemble probabilities (weighted mean of member softmaxes), on CPU: [N, C]. Inputs as in
        :meth:`member_probs`."""
        chunks = [self(x) for x in self._batches(x_or_batches, batch_size)]
        if not chunks:
            raise ValueError("no input batches: the input is empty")
        return torch.cat(chunks, dim=0).cpu()

    @torch.inference_mode()
    def predict(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Predicted classes, ``argmax`` of :meth:`predict_proba`: [N] int64 on CPU."""
        return self.predict_proba(x_or_batches, batch_size=batch_size).argmax(dim=-1)


def _keep(tensor: Tensor, device: str | torch.device | None, copy: bool) -> Tensor:
    tensor = tensor.detach()
    if device is None:
        return tensor.clone() if copy else tensor
    return tensor.to(device, copy=copy)


def _prepare_module(module: nn.Module) -> nn.Module:
    module = unwrap_model(module)
    module.requires_grad_(False)
    return module.eval()


def _set_layout(module: nn.Module, channels_last: bool) -> None:
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
