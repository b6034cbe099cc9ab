"""Snapshot Ensembles for Keras 3 (any backend): the old ``SnapshotCallbackBuilder``, done right.

Code written for the Keras 1 project keeps working unchanged::

    callbacks = SnapshotCallbackBuilder(T, M, alpha_zero).get_callbacks(model_prefix="Model_")
    model.fit(x, y, epochs=T, validation_data=(x_val, y_val), callbacks=callbacks)

but now gets the paper's method (Huang et al. 2017, Eq. 2): the learning rate is set before *every training
batch* to :func:`snapens.schedule.cosine_snapshot_lr` at the global step (``T`` counted in iterations, converted
from epochs once with the ``steps_per_epoch`` Keras reports), and snapshot ``k`` is saved after the last step of
cycle ``k``, which may fall in the middle of an epoch. ``per_epoch=True`` reproduces the old per-epoch schedule
(:func:`snapens.schedule.keras_epoch_lr`) and its snapshot timing exactly, for users who must match old results.

Files (Keras 3 requires the ``.weights.h5`` suffix), written to a temporary file and renamed into place:

- ``<folder>/<prefix>-<k>.weights.h5``, ``k = 1..M``: the snapshots;
- ``<folder>/<prefix>-Best.weights.h5``: the best single model on ``val_accuracy``, only when ``fit`` is given
  validation data. Give it a validation split carved from the training data, NEVER the test set: the old
  implementation selected its "best" model (and its ensemble weights) on the test set, which leaks test labels
  into model selection and inflates the reported accuracy.

Prediction averages the members' softmax probabilities (not logits, not weights):
:func:`snapshot_member_probs`, :func:`snapshot_predict_proba`, and :func:`fit_snapshot_weights` to fit ensemble
weights on validation data.

Importing :mod:`snapens` never imports Keras; importing this module does, so ``KERAS_BACKEND`` must be set to an
installed backend first (e.g. ``KERAS_BACKEND=torch``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapens.integrations._optional import import_optional

keras = import_optional("keras", extra="keras", needs="Keras 3", pip="keras h5py",
                        broken_hint="set KERAS_BACKEND to an installed backend (torch, jax or tensorflow) before "
                                    "importing it")

from snapens import metrics, weighting
from snapens._io import atomic_path
from snapens.schedule import cosine_snapshot_lr, cosine_snapshot_steps, keras_epoch_lr

__all__ = [
    "SnapshotCallbackBuilder",
    "SnapshotScheduleCallback",
    "BestWeightsCheckpoint",
    "snapshot_member_probs",
    "snapshot_predict_proba",
    "fit_snapshot_weights",
]

logger = logging.getLogger(__name__)

_SUFFIX = ".weights.h5"


def _check_builder_args(nb_epochs: int, nb_snapshots: int, init_lr: float, lr_min: float, per_epoch: bool) -> None:
    if isinstance(nb_snapshots, bool) or not isinstance(nb_snapshots, int) or nb_snapshots < 1:
        raise ValueError(f"Expected an integer nb_snapshots >= 1, but got {nb_snapshots!r}")
    if isinstance(nb_epochs, bool) or not isinstance(nb_epochs, int) or nb_epochs < nb_snapshots:
        raise ValueError(
            f"Expected an integer nb_epochs >= nb_snapshots ({nb_snapshots}), but got {nb_epochs!r}"
        )
    if not isinstance(init_lr, (int, float)) or not math.isfinite(init_lr) or init_lr <= 0:
        raise ValueError(f"Expected a finite init_lr > 0, but got {init_lr!r}")
    if not isinstance(lr_min, (int, float)) or not math.isfinite(lr_min) or not 0 <= lr_min < init_lr:
        raise ValueError(f"Expected 0 <= lr_min < init_lr ({init_lr!r}), but got {lr_min!r}")
    if per_epoch and lr_min != 0:
        raise ValueError(f"per_epoch=True reproduces the old schedule, which has no floor; got lr_min={lr_min!r}")


def _check_prefix(model_prefix: str) -> None:
    if not isinstance(model_prefix, str) or not model_prefix or os.sep in model_prefix or "/" in model_prefix:
        raise ValueError(f"Expected a non-empty file-name prefix without path separators, but got {model_prefix!r}")


def _save_weights_atomic(model: keras.Model, path: Path) -> None:
    """``model.save_weights(path)`` through a temporary ``.weights.h5`` file in the same folder and ``os.replace``.

    A crash mid-write leaves either the previous file or none, never a truncated one.
    """
    with atomic_path(path) as tmp:
        model.save_weights(tmp, overwrite=True)


def _lr_variable(optimizer: Any) -> Any:
    """The optimizer's learning-rate variable; ValueError if Keras computes the rate (a schedule or a callable)."""
    if optimizer is None:
        raise ValueError("The model has no optimizer: compile it before fit")
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer (mixed precision) wraps one
    raw = getattr(inner, "_learning_rate", None)
    if raw is not None and not isinstance(raw, keras.Variable):
        raise ValueError(
            f"The optimizer's learning rate is a {type(raw).__name__} object, which Keras cannot overwrite; the "
            "snapshot callbacks set the rate themselves: compile with a float learning_rate (the peak), "
            "e.g. keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)"
        )
    lr = optimizer.learning_rate
    if not hasattr(lr, "assign"):
        raise ValueError(f"The optimizer's learning rate is a {type(lr).__name__}, not a settable variable")
    return lr


class SnapshotScheduleCallback(keras.callbacks.Callback):
    """Sets the cyclic cosine learning rate and saves the ``M`` snapshots.

    Per-iteration mode (default): before the training batch at global step ``s = epoch * S + batch`` (0-based,
    ``S`` = steps per epoch, read from Keras) the rate is
    ``lr(s) = lr_min + (lr0 - lr_min) / 2 * (1 + cos(pi * pos(s) / L))`` over a budget of ``T = nb_epochs * S``
    steps split into ``M`` cycles (:func:`snapens.schedule.cosine_snapshot_lr`); snapshot ``k`` is saved after
    the cycle's last step (:func:`snapens.schedule.cosine_snapshot_steps`). Counting from the epoch index keeps the step
    right when ``fit`` resumes with ``initial_epoch``.

    Per-epoch mode (``per_epoch=True``, the old implementation): at the start of each epoch
    ``lr = lr0 / 2 * (cos(pi * (epoch mod P) / P) + 1)`` with ``P = floor(T / M)`` epochs
    (:func:`snapens.schedule.keras_epoch_lr`), and snapshot ``k = (epoch + 1) / P`` is saved after every ``P``-th
    epoch, ``k <= M``.

    Args:
        nb_epochs: the budget ``T`` in epochs.
        nb_snapshots: the number of cycles and snapshots ``M``.
        init_lr: the peak rate ``lr0`` each cycle restarts at.
        folder: where the snapshot files go.
        model_prefix: file names are ``<model_prefix>-<k>.weights.h5``.
        per_epoch: use the old per-epoch schedule instead of the paper's per-iteration one.
        lr_min: the floor each cycle anneals to (per-iteration mode only).
    """

    def __init__(
        self,
        nb_epochs: int,
        nb_snapshots: int,
        init_lr: float = 0.1,
        *,
        folder: str | os.PathLike[str] = "weights",
        model_prefix: str = "Model",
        per_epoch: bool = False,
        lr_min: float = 0.0,
    ) -> None:
        super().__init__()
        _check_builder_args(nb_epochs, nb_snapshots, init_lr, lr_min, per_epoch)
        _check_prefix(model_prefix)
        self.nb_epochs = nb_epochs
        self.nb_snapshots = nb_snapshots
        self.init_lr = float(init_lr)
        self.folder = Path(folder)
        self.model_prefix = model_prefix
        self.per_epoch = per_epoch
        self.lr_min = float(lr_min)
        self.steps_per_epoch: int | None = None
        self.total_steps: int | None = None
        self._snapshot_steps: list[int] = []
        self._epoch = 0
        self._batch_begin = 0
        self._lr: Any = None

    def snapshot_path(self, k: int) -> Path:
        """Path of snapshot ``k`` (1-based)."""
        return self.folder / f"{self.model_prefix}-{k}{_SUFFIX}"

    def lr_at(self, step: int) -> float:
        """Per-iteration rate for the 0-based global ``step`` (needs ``steps_per_epoch``, known from train begin)."""
        if self.total_steps is None:
            raise ValueError("steps_per_epoch is unknown until training begins")
        return cosine_snapshot_lr(step, self.total_steps, self.nb_snapshots, self.init_lr, self.lr_min)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._lr = _lr_variable(self.model.optimizer)
        self.folder.mkdir(parents=True, exist_ok=True)
        epochs = self.params.get("epochs")
        if epochs is not None and epochs > self.nb_epochs:  # fewer is fine: a run split over several fit calls
            logger.warning(
                "fit runs to epoch %d but the snapshot budget is nb_epochs=%d: %s", epochs, self.nb_epochs,
                "the learning rate stays at the last cycle's minimum past the budget" if not self.per_epoch
                else "the old per-epoch schedule restarts past the budget and those epochs are never saved",
            )
        if self.per_epoch:
            return
        steps = self.params.get("steps")
        if not steps:
            raise ValueError(
                f"Keras does not know the number of steps per epoch (got {steps!r}), which the per-iteration "
                "schedule needs: pass steps_per_epoch to model.fit (e.g. for a generator or dataset without a "
                "length), or use per_epoch=True"
            )
        per_execution = getattr(self.model, "steps_per_execution", 1) or 1
        if per_execution > 1:
            logger.warning(
                "steps_per_execution=%d: Keras calls callbacks once per %d steps, so the learning rate is updated "
                "only that often and snapshots may be taken up to %d steps late",
                per_execution, per_execution, per_execution - 1,
            )
        self.steps_per_epoch = int(steps)
        self.total_steps = self.nb_epochs * self.steps_per_epoch
        self._snapshot_steps = cosine_snapshot_steps(self.total_steps, self.nb_snapshots)
        logger.info(
            "snapshot schedule: %d steps (%d epochs x %d), %d cycles ending after steps %s",
            self.total_steps, self.nb_epochs, self.steps_per_epoch, self.nb_snapshots, self._snapshot_steps,
        )

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        if self.per_epoch:
            self._lr.assign(keras_epoch_lr(epoch, self.nb_epochs, self.nb_snapshots, self.init_lr))

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.per_epoch:
            return
        self._batch_begin = batch
        self._lr.assign(self.lr_at(self._epoch * self.steps_per_epoch + batch))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.per_epoch:
            return
        base = self._epoch * self.steps_per_epoch
        first, last = base + self._batch_begin, base + batch
        # One Keras "batch" may span several steps (steps_per_execution); save each cycle that ended inside it.
        for k, bound in enumerate(self._snapshot_steps, start=1):
            if first <= bound <= last:
                self._save(k, step=bound)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self.per_epoch:
            return
        period = self.nb_epochs // self.nb_snapshots
        k = (epoch + 1) // period
        if (epoch + 1) % period == 0 and k <= self.nb_snapshots:
            self._save(k, step=None)

    def _save(self, k: int, step: int | None) -> None:
        path = self.snapshot_path(k)
        _save_weights_atomic(self.model, path)
        logger.info("snapshot %d/%d saved to %s (epoch %d%s)", k, self.nb_snapshots, path, self._epoch,
                    "" if step is None else f", step {step}")


class BestWeightsCheckpoint(keras.callbacks.Callback):
    """Saves the weights of the epoch with the best ``monitor`` value (higher is better), atomically.

    Does nothing, apart from one log message, when ``fit`` has no validation data. Select on a validation split,
    never on the test set.

    Args:
        path: the ``.weights.h5`` file to write.
        monitor: the log key to maximise; Keras 3 names validation accuracy ``val_accuracy``.
    """

    def __init__(self, path: str | os.PathLike[str], monitor: str = "val_accuracy") -> None:
        super().__init__()
        if not str(path).endswith(_SUFFIX):
            raise ValueError(f"Keras 3 weight files must end in {_SUFFIX!r}, but got {str(path)!r}")
        self.path = Path(path)
        self.monitor = monitor
        self.best = -math.inf
        self.best_epoch: int | None = None
        self._warned = False

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._warned = False

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            if not self._warned:
                self._warned = True
                if any(key.startswith("val_") for key in logs):  # validation ran, but not with this metric
                    logger.warning("no %r in the epoch logs (available: %s); compile with metrics=['accuracy'] or "
                                   "pass monitor=...; %s is not written", self.monitor, sorted(logs), self.path)
                else:
                    logger.info("fit has no validation data; the best checkpoint %s is not written", self.path)
            return
        value = float(value)
        if value > self.best:
            self.best, self.best_epoch = value, epoch
            _save_weights_atomic(self.model, self.path)
            logger.info("best %s=%.4f at epoch %d, saved to %s", self.monitor, value, epoch, self.path)


class SnapshotCallbackBuilder:
    """Drop-in replacement for the Keras 1 project's builder, with the paper's per-iteration schedule.

    ``SnapshotCallbackBuilder(T, M, alpha_zero).get_callbacks(model_prefix="Model_")`` returns a flat list for
    ``model.fit(..., epochs=T, callbacks=...)``: a :class:`SnapshotScheduleCallback` (learning rate before every
    batch, snapshot ``<folder>/<prefix>-<k>.weights.h5`` at every cycle end) and a :class:`BestWeightsCheckpoint`
    (``<folder>/<prefix>-Best.weights.h5`` on ``val_accuracy``, written only when ``fit`` gets validation data:
    carve it from the training data, never use the test set).

    Compile the model with a float learning rate (e.g. SGD with Nesterov momentum 0.9 as in the paper); the
    callbacks overwrite it, so its value does not matter, but a ``LearningRateSchedule`` is refused.

    Args:
        nb_epochs: the budget ``T`` in epochs (pass the same number to ``fit``).
        nb_snapshots: the number of cycles and snapshots ``M`` (the paper recommends 4 to 8).
        init_lr: the restart rate ``lr0`` (paper: 0.1 or 0.2).
        per_epoch: reproduce the old implementation's per-epoch rate and snapshot timing exactly.
        folder: where the weight files go.
        lr_min: the floor each cycle anneals to.
        monitor: the metric the best checkpoint maximises.

    Example:
        >>> callbacks = SnapshotCallbackBuilder(30, 5, 0.1).get_callbacks(model_prefix="Model")  # doctest: +SKIP
        >>> model.fit(x, y, epochs=30, validation_split=0.1, callbacks=callbacks)  # doctest: +SKIP
    """

    def __init__(
        self,
        nb_epochs: int,
        nb_snapshots: int,
        init_lr: float = 0.1,
        *,
        per_epoch: bool = False,
        folder: str | os.PathLike[str] = "weights",
        lr_min: float = 0.0,
        monitor: str = "val_accuracy",
    ) -> None:
        _check_builder_args(nb_epochs, nb_snapshots, init_lr, lr_min, per_epoch)
        self.T = nb_epochs
        self.M = nb_snapshots
        self.alpha_zero = float(init_lr)
        self.per_epoch = per_epoch
        self.folder = Path(folder)
        self.lr_min = float(lr_min)
        self.monitor = monitor

    def snapshot_files(self, model_prefix: str = "Model") -> list[Path]:
        """The ``M`` snapshot paths the callbacks write, in cycle order (for :func:`snapshot_predict_proba`)."""
        _check_prefix(model_prefix)
        return [self.folder / f"{model_prefix}-{k}{_SUFFIX}" for k in range(1, self.M + 1)]

    def best_file(self, model_prefix: str = "Model") -> Path:
        """The best-checkpoint path."""
        _check_prefix(model_prefix)
        return self.folder / f"{model_prefix}-Best{_SUFFIX}"

    def get_callbacks(self, model_prefix: str = "Model") -> list[keras.callbacks.Callback]:
        """The callbacks for ``model.fit``: ``[schedule-and-snapshots, best checkpoint]``."""
        _check_prefix(model_prefix)
        return [
            SnapshotScheduleCallback(
                self.T, self.M, self.alpha_zero, folder=self.folder, model_prefix=model_prefix,
                per_epoch=self.per_epoch, lr_min=self.lr_min,
            ),
            BestWeightsCheckpoint(self.best_file(model_prefix), monitor=self.monitor),
        ]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)  # exp never overflows
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _load_model_weights(model: keras.Model, path: Path) -> None:
    """Load a ``.weights.h5`` file's layer weights, leaving the model's optimizer state alone.

    Keras 3 weight files also hold the optimizer's variables (momentum buffers); loading them into a model being
    used for prediction would overwrite its optimizer state, or warn when that optimizer is not built yet.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        model.load_weights(path)
        return
    try:
        model.load_weights(path, objects_to_skip=[optimizer])
    except ValueError as exc:  # Keras releases before objects_to_skip: load all, the caller restores the state
        if "Invalid keyword arguments" not in str(exc):
            raise
        model.load_weights(path)


def snapshot_member_probs(
    model: keras.Model,
    weight_files: Sequence[str | os.PathLike[str]],
    x: Any,
    *,
    batch_size: int = 256,
    from_logits: bool = False,
) -> np.ndarray:
    """Class probabilities of each snapshot: loads each file into ``model`` in turn and predicts ``x``.

    The model's own weights and optimizer state are restored afterwards.

    Args:
        model: a built model with the snapshots' architecture.
        weight_files: the ``M`` ``.weights.h5`` files.
        x: inputs ``model.predict`` accepts.
        batch_size: prediction batch size.
        from_logits: the model outputs logits; apply a softmax. Otherwise its outputs must be probabilities.

    Returns:
        float64 array ``[M, N, C]``.
    """
    files = [Path(f) for f in weight_files]
    if not files:
        raise ValueError("Expected at least one weight file, but got none")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"Weight files not found: {missing}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected a positive integer batch_size, but got {batch_size!r}")
    original = model.get_weights()
    optimizer_vars = list(getattr(getattr(model, "optimizer", None), "variables", None) or [])
    optimizer_state = [keras.ops.convert_to_numpy(v).copy() for v in optimizer_vars]
    members = []
    try:
        for path in files:
            _load_model_weights(model, path)
            out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
            if out.ndim != 2:
                raise ValueError(f"Expected model outputs of shape [N, C], but got {out.shape} for {path}")
            if from_logits:
                out = _softmax(out)
            elif out.min() < 0 or not np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
                raise ValueError(
                    f"The outputs for {path} are not probabilities (min {out.min():.3g}, row sums in "
                    f"[{out.sum(axis=1).min():.3g}, {out.sum(axis=1).max():.3g}]); pass from_logits=True if the "
                    "model outputs logits"
                )
            members.append(out)
    finally:
        model.set_weights(original)
        for variable, value in zip(optimizer_vars, optimizer_state):
            variable.assign(value)
    return np.stack(members)


def snapshot_predict_proba(
    model: keras.Model,
    weight_files: Sequence[str | os.PathLike[str]],
    x: Any,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    batch_size: int = 256,
    from_logits: bool = False,
) -> np.ndarray:
    """Snapshot-ensemble probabilities ``p(x) = sum_m w_m softmax(f_m(x))`` (equal ``w_m = 1/M`` by default).

    Args:
        model: a built model with the snapshots' architecture (its weights are restored afterwards).
        weight_files: the ``M`` ``.weights.h5`` files.
        x: inputs ``model.predict`` accepts.
        weights: ``M`` non-negative weights summing to 1, e.g. from :func:`fit_snapshot_weights`.
        batch_size: prediction batch size.
        from_logits: the model outputs logits rather than probabilities.

    Returns:
        float64 array ``[N, C]``.
    """
    members = snapshot_member_probs(model, weight_files, x, batch_size=batch_size, from_logits=from_logits)
    n_members = members.shape[0]
    if weights is None:
        return members.mean(axis=0)
    w = weighting.check_simplex_weights(weights, n_members).numpy()
    return np.tensordot(w, members, axes=1)


def fit_snapshot_weights(
    model: keras.Model,
    weight_files: Sequence[str | os.PathLike[str]],
    val_x: Any,
    val_y: Any,
    *,
    method: str = "nll",
    batch_size: int = 256,
    from_logits: bool = False,
) -> np.ndarray:
    """Fit ensemble weights on VALIDATION data (never the test set) with :func:`snapens.weighting.fit_ensemble_weights`.

    ``method="nll"`` minimises the validation log loss of ``sum_m w_m p_m`` over the simplex (convex, so one
    solve suffices; the old implementation's random restarts added nothing).

    Args:
        model: a built model with the snapshots' architecture (its weights are restored afterwards).
        weight_files: the ``M`` ``.weights.h5`` files.
        val_x: validation inputs.
        val_y: integer validation labels ``[N]``.
        method: ``"nll"``, ``"equal"`` or ``"greedy"``.
        batch_size: prediction batch size.
        from_logits: the model outputs logits rather than probabilities.

    Returns:
        float64 array ``[M]``, non-negative, summing to 1.
    """
    labels = torch.as_tensor(np.asarray(val_y).reshape(-1))
    members = torch.from_numpy(
        snapshot_member_probs(model, weight_files, val_x, batch_size=batch_size, from_logits=from_logits)
    )
    w = weighting.fit_ensemble_weights(members, labels, method=method)
    if logger.isEnabledFor(logging.INFO):
        equal, fitted = members.mean(dim=0), weighting.weighted_average(members, w)
        logger.info(
            "validation (N=%d): equal weights nll %.4f error %.2f%%; %s weights %s: nll %.4f error %.2f%%",
            labels.shape[0], metrics.nll(equal, labels), metrics.error_rate(equal, labels), method,
            np.round(w.numpy(), 4).tolist(), metrics.nll(fitted, labels), metrics.error_rate(fitted, labels),
        )
    return w.numpy()
