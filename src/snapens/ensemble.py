"""Snapshot ensembles at test time: the weighted mean of the members' softmax probabilities.

For members :math:`f_1, \\dots, f_M` (snapshots of one architecture) and weights :math:`w_m \\ge 0`,
:math:`\\sum_m w_m = 1` (equal, :math:`w_m = 1/M`, in the paper):

.. math::

    p(y \\mid x) = \\sum_{m=1}^{M} w_m \\, \\mathrm{softmax}(f_m(x))_y

Probabilities are averaged, never logits or weights (Huang et al., 2017, Sec. 3).

Two forms share one scikit-learn-like interface (``member_probs`` [M, N, C], ``predict_proba`` [N, C],
``predict`` [N]):

* :class:`SnapshotEnsemble` (default) keeps the members' state dicts off the device (CPU unless told otherwise)
  and streams them through ONE working model on the device, so device memory holds one model, not M.
* :class:`MaterializedEnsemble` (``SnapshotEnsemble.materialize()``) holds all M members as submodules; its
  ``forward`` is plain tensor code that ``torch.export.export`` and ``torch.jit.trace`` can capture.

Both always run in eval mode (BatchNorm uses its running statistics); the prediction methods run in
``torch.inference_mode``.

Inputs. Built with the training set's per-channel ``mean`` / ``std`` (as :meth:`SnapshotEnsemble.from_run` does
by default), an ensemble takes images as a user has them: a uint8 tensor ``[N, C, H, W]`` with values 0..255, or
a floating tensor ``[N, C, H, W]`` with values in [0, 1] (the uint8 pixels divided by 255), and normalises them
itself, ``(x - mean) / std``; floating input outside [0, 1] is refused. Without ``mean`` / ``std``
(``from_run(..., inputs="normalized")``, or the constructor without them) it takes what the network was trained
on: images already normalised by the caller.

Precision. ``precision="auto"`` (default) runs the members in bf16 autocast where the device computes bf16
natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16) and in fp32 elsewhere; ``"fp32"`` forces fp32
(the numbers of earlier versions, bit for bit), ``"bf16"`` forces bf16 and ``"fp16"`` is fp16 autocast on CUDA.
Softmax and the weighted mean are always computed in fp32. Conv nets run in channels-last memory format
under bf16/fp16 (where it is faster) and in the default format under fp32.

Example:
    >>> ens = SnapshotEnsemble.from_run("runs/c10", build_model, last=3, device="cuda")  # doctest: +SKIP
    >>> probs = ens.predict_proba(test_loader)                                          # doctest: +SKIP
    >>> program = torch.export.export(ens.materialize(), (x,))                          # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapens import _checks, runs
from snapens._precision import autocast as _autocast
from snapens._precision import PRECISIONS, resolve_precision
from snapens.checkpoint import (
    SnapshotError,
    SnapshotStore,
    load_weights,
    state_dict_mismatch,
    strip_wrapper_prefixes,
    unwrap_model,
)

__all__ = ["SnapshotEnsemble", "MaterializedEnsemble", "resolve_member_weights", "validate_weights",
           "DEFAULT_BATCH_SIZE", "INPUTS"]

logger = logging.getLogger(__name__)

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
_NO_STATE_DICT = (
    "a SnapshotEnsemble has no state_dict: its working model holds only the member loaded last. Save the members "
    "with snapens.SnapshotStore (one file per snapshot, what from_run reads), or call materialize() for one "
    "module holding all M members (its state_dict() has them all)"
)


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


def validate_weights(weights: Weights, n_members: int) -> Tensor:
    """Deprecated alias of :func:`resolve_member_weights`."""
    warnings.warn("snapens.ensemble.validate_weights is deprecated; use resolve_member_weights",
                  DeprecationWarning, stacklevel=2)
    return resolve_member_weights(weights, n_members)


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


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())


class _Ensemble(nn.Module):
    """Shared part: the ``weights_`` buffer, input normalisation, precision, eval-only mode, the prediction methods."""

    weights_: Tensor
    input_scale: Tensor | None
    input_shift: Tensor | None

    def __init__(self, n_members: int, weights: Weights, *, precision: str, channels_last: bool | None,
                 mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.register_buffer("weights_", resolve_member_weights(weights, n_members))
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
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16")
        self.requested_precision = precision
        self.requested_channels_last = channels_last
        self._resolved: dict[torch.device, str] = {}

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
        dev = self.device
        if dev not in self._resolved:
            self._resolved[dev] = resolve_precision(self.requested_precision, dev)
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

    def train(self, mode: bool = True) -> _Ensemble:
        """Ensembles stay in eval mode: BatchNorm must use the snapshot's running statistics."""
        if mode:
            logger.debug("%s stays in eval mode", type(self).__name__)
        return super().train(False)

    def check_images(self, x: Tensor) -> None:
        """Refuse floating images outside [0, 1] when the ensemble normalises (a 0..255 float tensor would
        otherwise give confident nonsense), and uint8 images when it does not; pre-normalised input is not
        range-checked."""
        if self.input_mean is None and x.dtype == torch.uint8:
            raise ValueError("got uint8 images, but this ensemble takes normalised inputs: build it with the "
                             "training set's mean and std (from_run does by default) to give it images")
        if self.input_mean is None or not x.is_floating_point() or x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (-_RANGE_SLACK <= lo and hi <= 1.0 + _RANGE_SLACK):
            raise ValueError(
                f"expected images in [0, 1] (uint8 pixels / 255) or a uint8 tensor, got values in [{lo:.4g}, "
                f"{hi:.4g}]; for inputs you normalised yourself build the ensemble without mean/std "
                "(from_run(..., inputs='normalized'))")

    def preprocess(self, x: Tensor) -> Tensor:
        """Model input for ``x``: ``(x - mean) / std`` for float images in [0, 1], ``x * scale - shift`` for uint8
        (bit-identical to :class:`snapens.data.BatchLoader`); ``x`` unchanged without mean/std."""
        if self.input_mean is None:
            return x
        if x.dtype == torch.uint8:
            return x.to(torch.float32).mul_(self.input_scale).sub_(self.input_shift)
        return (x.to(torch.float32) - self.input_mean) / self.input_std

    def _model_input(self, x: Tensor, channels_last: bool) -> Tensor:
        x = self.preprocess(x)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch ``x`` already on :attr:`device`: [M, B, C]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Ensemble probabilities :math:`\\sum_m w_m \\mathrm{softmax}(f_m(x))` for one batch: [B, C], float32.

        ``x`` must be on :attr:`device`; unlike the prediction methods, ``forward`` does not check the range of
        image inputs (it stays traceable)."""
        probs = self.member_probs_batch(x)
        return (self.weights_.to(probs.dtype).view(-1, 1, 1) * probs).sum(dim=0)

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

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Weights = None,
        *,
        names: Sequence[str] | None = None,
        precision: str = "auto",
        channels_last: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
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
        autocast = _autocast(x.device, self.precision)
        probs = []
        for member in self.members:
            with autocast():
                logits = member(x)
            probs.append(F.softmax(logits.float(), dim=-1))
        return torch.stack(probs)


def _check_member(name: str, state: Any, reference: Mapping[str, Tensor]) -> None:
    """Refuse what copy_ would silently cast into nonsense: a module, non-tensors, integer weights, NaN/inf."""
    if isinstance(state, nn.Module):
        raise TypeError(f"{name} is a {type(state).__name__} module, not a state dict: pass module.state_dict() "
                        "(or snapens.checkpoint.unwrap_state_dict(module))")
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} is a {type(state).__name__}, not a state dict (a mapping of names to tensors)")
    for key, want in reference.items():
        value = state.get(key)
        if value is None:
            continue  # reported as a missing key by state_dict_mismatch
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: {key} is a {type(value).__name__}, not a tensor")
        if want.is_floating_point() and not value.is_floating_point():
            raise SnapshotError(f"{name}: tensor {key} has dtype {value.dtype}, but the model's {key} is "
                                f"{want.dtype}: integer or bool weights are not a snapshot")
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise SnapshotError(f"{name}: tensor {key} holds {bad} non-finite (NaN/inf) values")


class SnapshotEnsemble(_Ensemble):
    """Snapshots of one architecture streamed through one working model: device memory for one model, not M.

    Each forward pass loads member m's state dict into the working model (a copy from ``member_device``) and
    runs it, for m = 1..M. A whole tensor passed to :meth:`member_probs` / :meth:`predict_proba` is traversed
    member by member instead (each member copied in once). When the working model is on a GPU and the members
    on the CPU, the members are moved to page-locked memory on first use, for faster copies;
    ``member_device=<the GPU>`` is faster still where M copies of the weights fit on the device. Moving the
    ensemble (``.to("cuda")``) moves the working model and ``weights_``; the member state dicts stay where they
    are. ``state_dict()`` / ``load_state_dict()`` raise: the working model holds only the member loaded last,
    so they could not save or restore the ensemble. Save the snapshots with
    :class:`snapens.checkpoint.SnapshotStore`, or :meth:`materialize` for one module holding all M members.

    Args:
        model_factory: Builds a fresh model of the members' architecture.
        state_dicts: One state dict per member (``module.`` / ``_orig_mod.`` prefixes are stripped).
        weights: Member weights ``[M]`` (>= 0, summing to 1); ``None`` = equal (the paper).
        member_device: Where member state dicts are kept; ``None`` keeps each tensor where it is.
        copy: Copy the member tensors, so the ensemble does not change when a model they came from keeps
            training. ``False`` keeps tensors already on ``member_device`` by reference (saves host memory;
            :meth:`from_run` does this, as it owns freshly loaded tensors).
        names: Optional labels for the members (e.g. their files), used in messages.
        precision: ``"auto"`` (bf16 where the device runs it natively, else fp32), ``"fp32"``, ``"bf16"`` or
            ``"fp16"`` (CUDA only); see :attr:`precision` for the one in use.
        channels_last: Channels-last memory format for the working model and 4-D inputs; ``None`` = on for conv
            nets under bf16/fp16, off under fp32.
        mean, std: The training set's per-channel mean and std in [0, 1] units: the ensemble then takes images
            (uint8 0..255, or float in [0, 1]) and normalises them itself. ``None`` (default here): inputs are
            normalised by the caller.

    Raises:
        SnapshotError: a state dict does not fit the architecture (missing/unexpected keys, shapes), holds
            integer/bool tensors where the model has floating ones, or NaN/inf values; the message names the
            member and the tensor.
        TypeError: a module (or anything but a mapping of tensors) where a state dict belongs.
        ValueError: no members, bad weights, an unknown precision, or bad mean/std.
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        state_dicts: Sequence[Mapping[str, Tensor]],
        weights: Weights = None,
        *,
        member_device: str | torch.device | None = "cpu",
        copy: bool = True,
        names: Sequence[str] | None = None,
        precision: str = "auto",
        channels_last: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if isinstance(state_dicts, Mapping):
            raise TypeError("state_dicts must be a sequence of state dicts, one per member, got a single state "
                            "dict: wrap it in a list")
        if isinstance(state_dicts, nn.Module):
            raise TypeError(f"state_dicts must be a sequence of state dicts, one per member, got a "
                            f"{type(state_dicts).__name__} module: pass [module.state_dict()]")
        state_dicts = list(state_dicts)
        super().__init__(len(state_dicts), weights, precision=precision, channels_last=channels_last, mean=mean,
                         std=std)
        names = list(names) if names is not None else [f"member {m}" for m in range(len(state_dicts))]
        if len(names) != len(state_dicts):
            raise ValueError(f"got {len(names)} names for {len(state_dicts)} members")
        model = _prepare_module(model_factory())
        reference = model.state_dict()
        keys = list(reference)
        members = []
        for name, state in zip(names, state_dicts):
            if isinstance(state, Mapping):
                state = strip_wrapper_prefixes(state)
            _check_member(name, state, reference)
            problems = state_dict_mismatch(model, state)
            if problems:
                raise SnapshotError(f"{name} does not fit {type(model).__name__}: {'; '.join(problems)}")
            # in the model's key order, so a member is copied in by zipping two lists
            members.append({k: _keep(state[k], member_device, copy) for k in keys})
        self.model = model
        self.member_names = names
        self._factory = model_factory
        self._members = members
        self._keys = keys
        self._loaded: int | None = None
        self._targets: list[Tensor] = []
        self._probe: tuple[Any, ...] = ()
        self._pinned = False
        self._layout: bool | None = None
        self.eval()

    def _pin_members(self) -> None:
        # Page-locked host memory makes the per-batch host-to-device copies asynchronous and ~2x faster.
        self._members = [{k: v.pin_memory() if v.device.type == "cpu" else v for k, v in member.items()}
                         for member in self._members]
        self._pinned = True

    def _working_tensors(self) -> list[Tensor]:
        """The working model's parameters and buffers in state-dict order (cached: traversing is slow)."""
        probe = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        # .to() / .half() replace the model's tensors; the first one tells whether the cache is stale.
        key = () if probe is None else (probe.data_ptr(), probe.dtype, probe.device)
        if key != self._probe or probe is None:
            state = self.model.state_dict()
            self._targets = [state[k] for k in self._keys]
            self._probe = key
        return self._targets

    def _ready(self) -> bool:
        """Put the working model in the memory format the precision wants; returns whether it is channels-last."""
        channels_last = self._uses_channels_last(self.model)
        if channels_last != self._layout:
            _set_layout(self.model, channels_last)
            self._layout = channels_last
        return channels_last

    def _load_member(self, m: int) -> None:
        # A plain copy loop: load_state_dict's per-module bookkeeping costs ~20x more than the copies
        # for deep nets, and it would run once per member per batch.
        if self._loaded != m:
            targets = self._working_tensors()
            if targets and targets[0].is_cuda and not self._pinned:
                self._pin_members()
            with torch.no_grad():
                for target, source in zip(targets, self._members[m].values()):
                    # host-to-device copies may overlap; a copy into host memory must not
                    target.copy_(source, non_blocking=target.is_cuda)
            self._loaded = m

    def _run_loaded(self, x: Tensor, autocast: Callable[[], Any]) -> Tensor:
        with autocast():
            logits = self.model(x)
        return F.softmax(logits.float(), dim=-1)  # fp32 softmax, outside autocast

    @torch.inference_mode()
    def member_probs(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE,
                     progress: Any = None) -> Tensor:
        """Every member's softmax probabilities, on CPU: [M, N, C] (see :meth:`_Ensemble.member_probs`).

        A tensor input is traversed once per member, so each member is copied into the working model once
        rather than once per slice; an iterable of batches is traversed once, loading every member per batch.
        Results stay on the device until the end: no host synchronisation per member or per slice.
        ``progress``: an object with ``update(n)`` (a tqdm bar), told of every ``n`` images run through a member.
        """
        if not isinstance(x_or_batches, (Tensor, np.ndarray)):
            return super().member_probs(x_or_batches, batch_size=batch_size)
        if isinstance(x_or_batches, np.ndarray):
            x_or_batches = torch.from_numpy(x_or_batches)
        if x_or_batches.device != self.device and x_or_batches.nbytes <= _ONE_COPY_BYTES:
            x_or_batches = x_or_batches.to(self.device)  # one host-to-device copy, not one per member
        slices = list(_iter_inputs(x_or_batches, batch_size))
        if not slices:
            raise ValueError("no input batches: the input is empty")
        for x in slices:
            self.check_images(x)
        channels_last = self._ready()
        autocast = _autocast(self.device, self.precision)
        per_member = []
        for m in range(self.n_members):
            self._load_member(m)
            chunks = []
            for x in slices:
                chunks.append(self._run_loaded(self._model_input(x.to(self.device, non_blocking=True), channels_last),
                                               autocast))
                if progress is not None:
                    progress.update(len(x))
            per_member.append(torch.cat(chunks))
        return torch.stack(per_member).cpu()

    @torch.inference_mode()
    def predict_proba(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Ensemble probabilities, on CPU: [N, C]; member-major for a tensor input (see :meth:`member_probs`)."""
        if not isinstance(x_or_batches, (Tensor, np.ndarray)):
            return super().predict_proba(x_or_batches, batch_size=batch_size)
        probs = self.member_probs(x_or_batches, batch_size=batch_size)
        return (self.weights_.cpu().to(probs.dtype).view(-1, 1, 1) * probs).sum(dim=0)

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch on :attr:`device`: [M, B, C], float32, no grad."""
        with torch.inference_mode():
            channels_last = self._ready()
            x = self._model_input(x, channels_last)
            autocast = _autocast(self.device, self.precision)
            probs = []
            for m in range(self.n_members):
                self._load_member(m)
                probs.append(self._run_loaded(x, autocast))
            return torch.stack(probs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Refused: the working model holds only the member loaded last (see the class docstring)."""
        raise TypeError(_NO_STATE_DICT)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Refused, as :meth:`state_dict`."""
        raise TypeError(_NO_STATE_DICT)

    def subset(self, indices: Sequence[int], weights: Weights = None) -> SnapshotEnsemble:
        """The ensemble of members ``indices`` (``weights``: theirs, ``None`` = equal), on this ensemble's device,
        with its precision and input normalisation; the member tensors are shared, not copied."""
        picked = [int(i) for i in indices]
        if not picked or any(not 0 <= i < self.n_members for i in picked):
            raise ValueError(f"indices must be a non-empty list of members in [0, {self.n_members}), got {indices!r}")
        stats = {}
        if self.input_mean is not None and self.input_std is not None:
            stats = {"mean": self.input_mean.flatten().tolist(), "std": self.input_std.flatten().tolist()}
        return type(self)(self._factory, [self._members[i] for i in picked], weights, member_device=None,
                          copy=False, names=[self.member_names[i] for i in picked],
                          precision=self.requested_precision, channels_last=self.requested_channels_last,
                          **stats).to(self.device)

    def materialize(self) -> MaterializedEnsemble:
        """All members as submodules on this ensemble's device and dtype (for ``torch.export`` / ``jit.trace``),
        with the same precision and input normalisation. Uses M times the device memory of one model.
        """
        ref = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        modules = []
        for state in self._members:
            module = unwrap_model(self._factory())
            module.load_state_dict(state, strict=True)
            module.to(self.device)
            if ref is not None:
                module.to(ref.dtype)
            modules.append(module)
        stats = {}
        if self.input_mean is not None and self.input_std is not None:
            stats = {"mean": self.input_mean.flatten().tolist(), "std": self.input_std.flatten().tolist()}
        return MaterializedEnsemble(modules, self.weights_.detach().cpu(), names=self.member_names,
                                    precision=self.requested_precision, channels_last=self.requested_channels_last,
                                    **stats).to(self.device)

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        model_builder: Callable[..., nn.Module],
        *,
        last: int | None = None,
        include_best: bool = False,
        weights: Weights = None,
        device: str | torch.device = "cpu",
        member_device: str | torch.device | None = "cpu",
        inputs: Literal["images", "normalized"] = "images",
        precision: str = "auto",
        channels_last: bool | None = None,
    ) -> SnapshotEnsemble:
        """The ensemble of a training run's snapshots (``run_dir/snapshots``), sha256-verified.

        By default it takes images as they come, a uint8 tensor ``[N, C, H, W]`` (0..255) or a float one in
        [0, 1] (uint8 / 255), and normalises them with the training set's mean and std from
        ``run_dir/config.json``, exactly as ``snapens evaluate`` does: ``ens.predict_proba(images)`` gives
        ``evaluate``'s numbers.

        Args:
            run_dir: The run folder.
            model_builder: ``model_builder(name, **kwargs)`` builds the architecture recorded in the manifest
                (e.g. ``snapens.models.build_model``).
            last: Use the last ``m`` snapshots by index (the paper's "last m"); ``None`` = all.
            include_best: Prepend ``run_dir/best.safetensors`` (the Keras implementation's member set).
            weights: One weight per member, the best model first when included; ``None`` = equal.
            device: Where the ensemble computes.
            member_device: Where the members' state dicts are kept (see :class:`SnapshotEnsemble`).
            inputs: ``"images"`` (default): raw images as above; ``"normalized"``: inputs already normalised
                with the run's mean/std by the caller (the behaviour of earlier versions).
            precision: ``"auto"`` (bf16 where native, else fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
            channels_last: see :class:`SnapshotEnsemble`.

        Raises:
            SnapshotError: missing/corrupt manifest or files, snapshots of different architectures, or (with
                ``inputs="images"``) a config.json without the dataset's mean/std.
            ValueError: ``last`` out of range, bad weights, or an unknown ``inputs`` / ``precision``.
        """
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        run_dir = Path(run_dir)
        store = SnapshotStore(run_dir / runs.SNAPSHOT_DIR)
        if not store.manifest_path.exists():  # a FIFO or folder in its place is refused by list()
            raise SnapshotError(f"{store.manifest_path} is missing: {run_dir} holds no snapshots")
        stats = _run_stats(run_dir) if inputs == "images" else {}
        infos = store.list()
        if not infos:
            raise SnapshotError(f"{store.manifest_path} lists no snapshots")
        if last is not None:
            if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= len(infos):
                raise ValueError(f"last must be an integer in [1, {len(infos)}] (snapshots in the run), got {last!r}")
            infos = infos[-last:]
        arch = (infos[-1].model_name, infos[-1].model_kwargs)
        for info in infos:
            if (info.model_name, info.model_kwargs) != arch:
                raise SnapshotError(
                    f"{info.path} holds model {info.model_name} {info.model_kwargs}, but {infos[-1].path} holds "
                    f"{arch[0]} {arch[1]}: members must share one architecture"
                )
        states: list[dict[str, Tensor]] = []
        names: list[str] = []
        if include_best:
            best = run_dir / runs.BEST_FILE
            state, meta = load_weights(best)
            model_meta = meta.get("model")
            if isinstance(model_meta, dict) and model_meta.get("name") not in (None, arch[0]):
                raise SnapshotError(f"{best} holds model {model_meta.get('name')!r}, the snapshots {arch[0]!r}")
            states.append(state)
            names.append(str(best))
        for info in infos:
            states.append(store.load_state_dict(info.index))
            names.append(str(info.path))
        logger.debug("ensemble of %d members from %s: %s", len(states), run_dir, [Path(n).name for n in names])
        name, kwargs = arch
        ensemble = cls(
            lambda: model_builder(name, **kwargs), states, weights, member_device=member_device, copy=False,
            names=names, precision=precision, channels_last=channels_last, **stats,
        )
        return ensemble.to(device)


def _run_stats(run_dir: Path) -> dict[str, list[float]]:
    """The training set's ``mean`` / ``std`` recorded in ``run_dir/config.json`` (``dataset.mean/std``)."""
    path = run_dir / runs.CONFIG_FILE
    hint = "pass inputs='normalized' to feed inputs you normalise yourself"
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))["dataset"]
        stats = {"mean": list(dataset["mean"]), "std": list(dataset["std"])}
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path} is missing: the ensemble cannot normalise images without the run's mean and "
                            f"std; {hint}") from exc
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"{path} holds no readable dataset mean/std ({exc}); {hint}") from exc
    for key, values in stats.items():
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                 for v in values):
            raise SnapshotError(f"{path}: dataset.{key} must be a list of finite numbers, got {values!r}")
    return stats
