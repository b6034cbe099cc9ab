"""Snapshots of one architecture streamed through one working model: device memory for one model, not M."""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapens import runs
from snapens._precision import Precision
from snapens.checkpoint import (
    SnapshotError,
    SnapshotStore,
    load_weights,
    state_dict_mismatch,
    strip_wrapper_prefixes,
    unwrap_model,
)
from snapens.ensemble._base import (
    _ONE_COPY_BYTES,
    DEFAULT_BATCH_SIZE,
    INPUTS,
    Inputs,
    Weights,
    _Ensemble,
    _iter_inputs,
    _keep,
    _prepare_module,
    _set_layout,
)
from snapens.ensemble.materialized import MaterializedEnsemble

__all__ = ["SnapshotEnsemble"]

logger = logging.getLogger("snapens.ensemble")

_NO_STATE_DICT = (
    "a SnapshotEnsemble has no state_dict: its working model holds only the member loaded last. Save the members "
    "with snapens.SnapshotStore (one file per snapshot, what from_run reads), or call materialize() for one "
    "module holding all M members (its state_dict() has them all)"
)


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
            ``"fp16"`` (CUDA only), resolved once per device; or a :class:`~snapens._precision.Precision` resolved
            before (the object :func:`snapens.engine.fit` takes). See :attr:`precision` for the one in use.
        channels_last: Channels-last memory format for the working model and 4-D inputs; ``None`` = on for conv
            nets under bf16/fp16, off under fp32.
        mean, std: The training set's per-channel mean and std in [0, 1] units: the ensemble then takes images
            (uint8 0..255, or float in [0, 1]) and normalises them itself. ``None`` (default here): inputs are
            normalised by the caller.
        input_shape: The ``[C, H, W]`` of one input image (``None`` for a size not known), which the prediction
            methods insist on; ``None`` (default): the channels of mean/std, if given (:meth:`from_run` passes the
            run's).

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
        precision: str | Precision = "auto",
        channels_last: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_shape: Sequence[int | None] | None = None,
    ) -> None:
        if isinstance(state_dicts, Mapping):
            raise TypeError("state_dicts must be a sequence of state dicts, one per member, got a single state "
                            "dict: wrap it in a list")
        if isinstance(state_dicts, nn.Module):
            raise TypeError(f"state_dicts must be a sequence of state dicts, one per member, got a "
                            f"{type(state_dicts).__name__} module: pass [module.state_dict()]")
        state_dicts = list(state_dicts)
        super().__init__(len(state_dicts), weights, precision=precision, channels_last=channels_last, mean=mean,
                         std=std, input_shape=input_shape)
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
        autocast = self.resolved_precision().autocast
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
        return self._combine(self.member_probs(x_or_batches, batch_size=batch_size))

    def member_probs_batch(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member for one batch on :attr:`device`: [M, B, C], float32, no grad."""
        with torch.inference_mode():
            channels_last = self._ready()
            x = self._model_input(x, channels_last)
            autocast = self.resolved_precision().autocast
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
        with its precision, temperature and input normalisation; the member tensors are shared, not copied."""
        picked = [int(i) for i in indices]
        if not picked or any(not 0 <= i < self.n_members for i in picked):
            raise ValueError(f"indices must be a non-empty list of members in [0, {self.n_members}), got {indices!r}")
        stats = {}
        if self.input_mean is not None and self.input_std is not None:
            stats = {"mean": self.input_mean.flatten().tolist(), "std": self.input_std.flatten().tolist()}
        ensemble = type(self)(self._factory, [self._members[i] for i in picked], weights, member_device=None,
                              copy=False, names=[self.member_names[i] for i in picked],
                              precision=self.requested_precision, channels_last=self.requested_channels_last,
                              input_shape=self.input_shape, **stats)
        ensemble.set_temperature(self.temperature)
        return ensemble.to(self.device)

    def materialize(self) -> MaterializedEnsemble:
        """All members as submodules on this ensemble's device and dtype (for ``torch.export`` / ``jit.trace``),
        with the same weights, temperature, precision and input normalisation. Uses M times the device memory of
        one model.
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
        materialized = MaterializedEnsemble(modules, self.weights_.detach().cpu(), names=self.member_names,
                                            precision=self.requested_precision,
                                            channels_last=self.requested_channels_last, input_shape=self.input_shape,
                                            **stats)
        materialized.set_temperature(self.temperature)
        return materialized.to(self.device)

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        model_builder: Callable[..., nn.Module],
        *,
        last: int | None = None,
        include_best: bool = False,
        weights: Weights | str = "recommended",
        temperature: bool = True,
        device: str | torch.device = "cpu",
        member_device: str | torch.device | None = "cpu",
        inputs: Literal["images", "normalized"] = "images",
        precision: str | Precision = "auto",
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
            weights: ``"recommended"`` (default): the combination ``snapens evaluate`` chose on validation and
                stored in ``run_dir/recommended.json`` (:func:`snapens.runs.recommended_file` for ``last`` /
                ``include_best``); members with weight 0 are not loaded and not run, so ``len(ens)`` is the
                forward passes per image. A run without a validation split, or without ``config.json`` (written
                by a loop of your own), has nothing to choose on and gets equal weights, as evaluate would store.
                ``"equal"`` or ``None``: every member, equal weights (the paper). Or one weight per member, the
                best model first when included.
            temperature: With ``weights="recommended"``, apply the stored temperature where validation identified
                one (``temperature_fitted``; see :meth:`set_temperature`); ``False``: ``T = 1``.
            device: Where the ensemble computes.
            member_device: Where the members' state dicts are kept (see :class:`SnapshotEnsemble`).
            inputs: ``"images"`` (default): raw images as above; ``"normalized"``: inputs already normalised
                with the run's mean/std by the caller (the behaviour of earlier versions).
            precision: ``"auto"`` (bf16 where native, else fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"``, or a
                :class:`~snapens._precision.Precision` (see :class:`SnapshotEnsemble`).
            channels_last: see :class:`SnapshotEnsemble`.

        Raises:
            SnapshotError: missing/corrupt manifest or files, snapshots of different architectures, or (with
                ``inputs="images"``) a config.json without the dataset's mean/std.
            FileNotFoundError: ``weights="recommended"`` for a run with a config.json but no stored
                recommendation (never evaluated): the message says to run ``snapens evaluate`` or pass
                ``weights="equal"``.
            ValueError: ``last`` out of range, bad weights, an unknown ``inputs`` / ``precision``, or a stored
                recommendation for other members.
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
        paths = ([run_dir / runs.BEST_FILE] if include_best else []) + [Path(info.path) for info in infos]
        weights, temp, kept = _choice(run_dir, weights, temperature, [p.stem for p in paths], last, include_best)
        states: list[dict[str, Tensor]] = []
        names: list[str] = []
        for m in kept:  # members with weight 0 are not even loaded
            if include_best and m == 0:
                state, meta = load_weights(paths[0])
                model_meta = meta.get("model")
                if isinstance(model_meta, dict) and model_meta.get("name") not in (None, arch[0]):
                    raise SnapshotError(f"{paths[0]} holds model {model_meta.get('name')!r}, the snapshots "
                                        f"{arch[0]!r}")
                states.append(state)
            else:
                states.append(store.load_state_dict(infos[m - int(include_best)].index))
            names.append(str(paths[m]))
        logger.debug("ensemble of %d members from %s: %s", len(states), run_dir, [Path(n).name for n in names])
        name, kwargs = arch
        ensemble = cls(
            lambda: model_builder(name, **kwargs), states, weights, member_device=member_device, copy=False,
            names=names, precision=precision, channels_last=channels_last, **stats,
        )
        ensemble.set_temperature(temp)
        return ensemble.to(device)


def _choice(run_dir: Path, weights: Weights | str, temperature: bool, stems: list[str], last: int | None,
            include_best: bool) -> tuple[Weights, float, list[int]]:
    """``(weights of the kept members, temperature, indices of the kept members)`` for :meth:`from_run`."""
    everyone = list(range(len(stems)))
    if isinstance(weights, str) and weights == "equal":
        return None, 1.0, everyone
    if not isinstance(weights, str):
        return weights, 1.0, everyone
    if weights != "recommended":
        raise ValueError(f"weights must be 'recommended', 'equal' or one weight per member, got {weights!r}")
    rec = runs.read_recommended(run_dir, last, include_best)
    path = run_dir / runs.recommended_file(last, include_best)
    if rec is None:
        if not _has_validation(run_dir):
            logger.info("%s has no validation split (or no config.json): nothing to choose the combination on, so "
                        "equal weights", run_dir)
            return None, 1.0, everyone
        flags = "".join([f" --last {last}" if last is not None else "", " --include-best" if include_best else ""])
        raise FileNotFoundError(
            f"{path} is missing: no combination of the members was chosen on {run_dir}'s validation split yet; run "
            f"`snapens evaluate {run_dir}{flags}` (it stores the choice), or pass weights='equal' for the paper's "
            "equal weights")
    if rec["members"] != stems:
        raise ValueError(f"{path} was chosen for the members {rec['members']}, not for {stems}; run `snapens "
                         "evaluate` again (with the same --last / --include-best)")
    kept = [m for m, w in enumerate(rec["weights"]) if w > 0]
    use_t = temperature and bool(rec.get("temperature_fitted"))
    logger.debug("recommended combination from %s: members %s, T=%s", path, kept, rec["temperature"] if use_t else 1)
    return [rec["weights"][m] for m in kept], rec["temperature"] if use_t else 1.0, kept


def _has_validation(run_dir: Path) -> bool:
    """Whether ``run_dir/config.json`` records a non-empty validation split (what evaluate chooses on)."""
    if not (run_dir / runs.CONFIG_FILE).exists():
        return False
    try:
        return int(runs.read_run_info(run_dir)["dataset"]["num_val"]) > 0
    except (ValueError, TypeError):
        return True  # unreadable: refuse, as for a run that has one (evaluate will name the problem)


def _run_stats(run_dir: Path) -> dict[str, Any]:
    """The training set's ``mean`` / ``std`` recorded in ``run_dir/config.json`` (read by
    :func:`snapens.runs.read_run_info`, as ``snapens evaluate`` reads it), and the ``input_shape`` of its images
    (``dataset.image_shape``; runs from before it: the channels of mean/std alone)."""
    hint = "pass inputs='normalized' to feed inputs you normalise yourself"
    path = run_dir / runs.CONFIG_FILE
    if not path.exists():
        raise SnapshotError(f"{path} is missing: the ensemble cannot normalise images without the run's mean and "
                            f"std; {hint}")
    try:
        dataset = runs.read_run_info(run_dir)["dataset"]
    except ValueError as exc:  # the message names the file and the entry
        raise SnapshotError(f"{exc}; {hint}") from exc
    stats: dict[str, Any] = {"mean": list(dataset["mean"]), "std": list(dataset["std"])}
    for key, values in stats.items():
        if not all(math.isfinite(v) for v in values):
            raise SnapshotError(f"{path}: dataset.{key} must be a list of finite numbers, got {values!r}")
    shape = dataset.get("image_shape")
    if shape is not None:
        if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == len(stats["mean"])
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise SnapshotError(f"{path}: dataset.image_shape must be the [C, H, W] of the run's images, C the "
                                f"length of dataset.mean, got {shape!r}")
        stats["input_shape"] = shape
    return stats
