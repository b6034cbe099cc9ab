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

Both always run in eval mode (BatchNorm uses its running statistics); the prediction methods run without grad.

Example:
    >>> ens = SnapshotEnsemble.from_run("runs/c10", build_model, last=3, device="cuda")  # doctest: +SKIP
    >>> probs = ens.predict_proba(test_loader)                                          # doctest: +SKIP
    >>> program = torch.export.export(ens.materialize(), (x,))                          # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapens import weighting
from snapens.checkpoint import (
    SnapshotError,
    SnapshotStore,
    load_weights,
    state_dict_mismatch,
    strip_wrapper_prefixes,
    unwrap_model,
)

__all__ = ["SnapshotEnsemble", "MaterializedEnsemble", "validate_weights", "DEFAULT_BATCH_SIZE"]

logger = logging.getLogger(__name__)

#: Rows per forward pass when a whole tensor is passed to the prediction methods.
DEFAULT_BATCH_SIZE = 256
_WEIGHT_TOL = 1e-6

#: A tensor (or array) of inputs, or an iterable of ``x`` or ``(x, y, ...)`` batches (a DataLoader, BatchLoader).
Inputs = Union[Tensor, np.ndarray, Iterable[Any]]


def validate_weights(weights: Sequence[float] | Tensor | np.ndarray | None, n_members: int) -> Tensor:
    """Check ensemble weights and return them as float32 ``[M]``; ``None`` gives equal weights ``1/M``.

    Raises:
        ValueError: no members, wrong length, not finite, negative, or not summing to 1 within 1e-6
            (see :func:`snapens.weighting.validate_weights`).
    """
    if n_members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {n_members}")
    if weights is None:
        return torch.full((n_members,), 1.0 / n_members, dtype=torch.float32)
    return weighting.validate_weights(weights, n_members).to(torch.float32)


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


class _Ensemble(nn.Module):
    """Shared part: the ``weights_`` buffer, eval-only mode, and the batched prediction methods."""

    weights_: Tensor

    def __init__(self, n_members: int, weights: Sequence[float] | Tensor | np.ndarray | None) -> None:
        super().__init__()
        self.register_buffer("weights_", validate_weights(weights, n_members))

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

    def set_weights(self, weights: Sequence[float] | Tensor | np.ndarray | None) -> None:
        """Replace the member weights (validated as in the constructor; ``None`` = equal)."""
        self.weights_.copy_(validate_weights(weights, self.n_members))

    def train(self, mode: bool = True) -> _Ensemble:
        """Ensembles stay in eval mode: BatchNorm must use the snapshot's running statistics."""
        if mode:
            logger.debug("%s stays in eval mode", type(self).__name__)
        return super().train(False)

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch ``x`` already on :attr:`device`: [M, B, C]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Ensemble probabilities :math:`\\sum_m w_m \\mathrm{softmax}(f_m(x))` for one batch: [B, C], float32."""
        probs = self.member_probs_batch(x)
        return (self.weights_.to(probs.dtype).view(-1, 1, 1) * probs).sum(dim=0)

    @torch.no_grad()
    def member_probs(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Every member's softmax probabilities, on CPU: [M, N, C].

        Args:
            x_or_batches: A tensor [N, ...] (run in slices of ``batch_size``) or an iterable of ``x`` or
                ``(x, y)`` batches, iterated once.
            batch_size: Slice size for tensor input.
        """
        chunks = [self.member_probs_batch(x.to(self.device)).cpu() for x in _iter_inputs(x_or_batches, batch_size)]
        if not chunks:
            raise ValueError("no input batches: the input is empty")
        return torch.cat(chunks, dim=1)

    @torch.no_grad()
    def predict_proba(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Ensemble probabilities (weighted mean of member softmaxes), on CPU: [N, C]. Inputs as in
        :meth:`member_probs`."""
        chunks = [self(x.to(self.device)).cpu() for x in _iter_inputs(x_or_batches, batch_size)]
        if not chunks:
            raise ValueError("no input batches: the input is empty")
        return torch.cat(chunks, dim=0)

    @torch.no_grad()
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


class MaterializedEnsemble(_Ensemble):
    """All M members held as submodules: plain tensor code, exportable with ``torch.export`` / ``torch.jit.trace``.

    Args:
        members: The member networks (same input and number of classes).
        weights: Member weights ``[M]`` (>= 0, summing to 1); ``None`` = equal.
        names: Optional labels, e.g. the snapshot files.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float] | Tensor | np.ndarray | None = None,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(len(members), weights)
        self.members = nn.ModuleList(_prepare_module(m) for m in members)
        self.member_names = list(names) if names is not None else [f"member {m}" for m in range(len(members))]
        self.eval()

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch: [M, B, C], float32."""
        return torch.stack([F.softmax(member(x).float(), dim=-1) for member in self.members])


class SnapshotEnsemble(_Ensemble):
    """Snapshots of one architecture streamed through one working model: device memory for one model, not M.

    Each forward pass loads member m's state dict into the working model (a copy from ``member_device``) and
    runs it, for m = 1..M. When the working model is on a GPU and the members on the CPU, the members are
    moved to page-locked memory on first use, for faster copies; ``member_device=<the GPU>`` is faster still
    where M copies of the weights fit on the device. Moving the ensemble (``.to("cuda")``) moves the working model and ``weights_``;
    the member state dicts stay where they are. The ensemble's own ``state_dict()`` is no save format (it holds
    whichever member was loaded last); snapshots are saved with :class:`snapens.checkpoint.SnapshotStore`.

    Args:
        model_factory: Builds a fresh model of the members' architecture.
        state_dicts: One state dict per member (``module.`` / ``_orig_mod.`` prefixes are stripped).
        weights: Member weights ``[M]`` (>= 0, summing to 1); ``None`` = equal (the paper).
        member_device: Where member state dicts are kept; ``None`` keeps each tensor where it is.
        copy: Copy the member tensors, so the ensemble does not change when a model they came from keeps
            training. ``False`` keeps tensors already on ``member_device`` by reference (saves host memory;
            :meth:`from_run` does this, as it owns freshly loaded tensors).
        names: Optional labels for the members (e.g. their files), used in messages.

    Raises:
        SnapshotError: a state dict does not fit the architecture (missing/unexpected keys, shapes); the message
            names the member.
        ValueError: no members, or bad weights.
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        state_dicts: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float] | Tensor | np.ndarray | None = None,
        *,
        member_device: str | torch.device | None = "cpu",
        copy: bool = True,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(len(state_dicts), weights)
        names = list(names) if names is not None else [f"member {m}" for m in range(len(state_dicts))]
        if len(names) != len(state_dicts):
            raise ValueError(f"got {len(names)} names for {len(state_dicts)} members")
        model = _prepare_module(model_factory())
        keys = list(model.state_dict())
        members = []
        for name, state in zip(names, state_dicts):
            state = strip_wrapper_prefixes(state)
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

    @torch.no_grad()
    def member_probs(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Every member's softmax probabilities, on CPU: [M, N, C] (see :meth:`_Ensemble.member_probs`).

        A tensor input is traversed once per member, so each member is copied into the working model once
        rather than once per slice; an iterable of batches is traversed once, loading every member per batch.
        """
        if not isinstance(x_or_batches, (Tensor, np.ndarray)):
            return super().member_probs(x_or_batches, batch_size=batch_size)
        slices = list(_iter_inputs(x_or_batches, batch_size))
        if not slices:
            raise ValueError("no input batches: the input is empty")
        per_member = []
        for m in range(self.n_members):
            self._load_member(m)
            per_member.append(torch.cat([F.softmax(self.model(x.to(self.device)).float(), dim=-1).cpu()
                                         for x in slices]))
        return torch.stack(per_member)

    @torch.no_grad()
    def predict_proba(self, x_or_batches: Inputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        """Ensemble probabilities, on CPU: [N, C]; member-major for a tensor input (see :meth:`member_probs`)."""
        if not isinstance(x_or_batches, (Tensor, np.ndarray)):
            return super().predict_proba(x_or_batches, batch_size=batch_size)
        probs = self.member_probs(x_or_batches, batch_size=batch_size)
        return (self.weights_.cpu().to(probs.dtype).view(-1, 1, 1) * probs).sum(dim=0)

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch on :attr:`device`: [M, B, C], float32, no grad."""
        with torch.no_grad():
            probs = []
            for m in range(self.n_members):
                self._load_member(m)
                probs.append(F.softmax(self.model(x).float(), dim=-1))
            return torch.stack(probs)

    def materialize(self) -> MaterializedEnsemble:
        """All members as submodules on this ensemble's device and dtype (for ``torch.export`` / ``jit.trace``).

        Uses M times the device memory of one model.
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
        return MaterializedEnsemble(modules, self.weights_.detach().cpu(), names=self.member_names).to(self.device)

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        model_builder: Callable[..., nn.Module],
        *,
        last: int | None = None,
        include_best: bool = False,
        weights: Sequence[float] | Tensor | np.ndarray | None = None,
        device: str | torch.device = "cpu",
        member_device: str | torch.device | None = "cpu",
    ) -> SnapshotEnsemble:
        """The ensemble of a training run's snapshots (``run_dir/snapshots``), sha256-verified.

        Args:
            run_dir: The run folder.
            model_builder: ``model_builder(name, **kwargs)`` builds the architecture recorded in the manifest
                (e.g. ``snapens.models.build_model``).
            last: Use the last ``m`` snapshots by index (the paper's "last m"); ``None`` = all.
            include_best: Prepend ``run_dir/best.safetensors`` (the Keras implementation's member set).
            weights: One weight per member, the best model first when included; ``None`` = equal.
            device: Where the ensemble computes.
            member_device: Where the members' state dicts are kept (see :class:`SnapshotEnsemble`).

        Raises:
            SnapshotError: missing/corrupt manifest or files, or snapshots of different architectures.
            ValueError: ``last`` out of range, or bad weights.
        """
        run_dir = Path(run_dir)
        store = SnapshotStore(run_dir / "snapshots")
        if not store.manifest_path.exists():  # a FIFO or folder in its place is refused by list()
            raise SnapshotError(f"{store.manifest_path} is missing: {run_dir} holds no snapshots")
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
            best = run_dir / "best.safetensors"
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
            lambda: model_builder(name, **kwargs), states, weights, member_device=member_device, copy=False, names=names
        )
        return ensemble.to(device)
