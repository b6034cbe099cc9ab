"""Keras 3 integration: per-batch schedule, snapshot timing and files, per-epoch compatibility, prediction."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip(f"these tests run on the torch backend; KERAS_BACKEND is {keras.backend.backend()!r}",
                allow_module_level=True)

from snapens import weighting  # noqa: E402
from snapens.integrations.keras import (  # noqa: E402
    SnapshotCallbackBuilder,
    fit_snapshot_weights,
    snapshot_member_probs,
    snapshot_predict_proba,
)
from snapens.schedule import cosine_snapshot_lr, cosine_snapshot_steps, keras_epoch_lr  # noqa: E402

N, D, C, BATCH = 20, 4, 3, 4  # 5 steps per epoch
STEPS = N // BATCH
LR0 = 0.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one torch thread is faster than several (and fair to a shared CI machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0, softmax: bool = True, optimizer=None, compile: bool = True) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((D,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(C, activation="softmax" if softmax else None),
    ])
    if compile:
        model.compile(
            optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax),
            metrics=["accuracy"],
        )
    return model


def make_data(seed: int, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64")
    return x, y


class Recorder(keras.callbacks.Callback):
    """Placed after the builder's callbacks: sees the LR each batch runs at and the state after each step."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.folder = folder
        self.lrs: dict[int, float] = {}  # global step -> lr the step ran at
        self.step_weights: dict[int, list[np.ndarray]] = {}
        self.epoch_weights: dict[int, list[np.ndarray]] = {}
        self.epoch_logs: dict[int, dict] = {}
        self.epoch_files: dict[int, set[str]] = {}
        self.epoch = 0

    def _weights(self) -> list[np.ndarray]:
        return [np.array(w, copy=True) for w in self.model.get_weights()]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.lrs[self.epoch * STEPS + batch] = lr

    def on_train_batch_end(self, batch, logs=None):
        self.step_weights[self.epoch * STEPS + batch] = self._weights()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_weights[epoch] = self._weights()
        self.epoch_logs[epoch] = dict(logs or {})
        self.epoch_files[epoch] = set(os.listdir(self.folder)) if self.folder.exists() else set()


def loaded_weights(path) -> list[np.ndarray]:
    model = make_model(seed=123, compile=False)
    model.load_weights(path)
    return model.get_weights()


def assert_same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b))


# T = 4 epochs x 5 steps = 20 steps, M = 3 cycles of 7, 7, 6 steps: ends after steps 6 and 13 (mid-epoch) and 19.
EPOCHS, M = 4, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_run") / "weights"
    x, y = make_data(0)
    model = make_model()
    rec = Recorder(folder)
    callbacks = SnapshotCallbackBuilder(EPOCHS, M, LR0, folder=folder).get_callbacks(model_prefix="Model_")
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[*callbacks, rec])
    return folder, rec


def test_lr_before_every_batch_is_the_per_iteration_formula(trained):
    _, rec = trained
    total = EPOCHS * STEPS
    assert sorted(rec.lrs) == list(range(total))
    for step, lr in rec.lrs.items():
        assert lr == pytest.approx(cosine_snapshot_lr(step, total, M, LR0), rel=1e-6, abs=1e-9), step
    # The rate changes within an epoch (per iteration), and restarts at lr0 on the first step of each cycle.
    assert rec.lrs[1] < rec.lrs[0] == pytest.approx(LR0)
    assert rec.lrs[7] == pytest.approx(LR0) and rec.lrs[14] == pytest.approx(LR0)


def test_exactly_m_snapshots_taken_at_cycle_ends_even_mid_epoch(trained):
    folder, rec = trained
    assert sorted(os.listdir(folder)) == [f"Model_-{k}.weights.h5" for k in range(1, M + 1)]  # no Best, no temp
    bounds = cosine_snapshot_steps(EPOCHS * STEPS, M)
    assert bounds == [6, 13, 19]
    for k, bound in enumerate(bounds, start=1):
        assert_same_weights(loaded_weights(folder / f"Model_-{k}.weights.h5"), rec.step_weights[bound])
    # Snapshot 1 is the state after step 6 (epoch 1, batch 1), not the state at the end of that epoch.
    assert not same_weights(loaded_weights(folder / "Model_-1.weights.h5"), rec.epoch_weights[1])


def test_resume_with_initial_epoch_keeps_the_global_step(tmp_path):
    folder = tmp_path / "w"
    x, y = make_data(0)
    model = make_model()
    callbacks = SnapshotCallbackBuilder(EPOCHS, M, LR0, folder=folder).get_callbacks(model_prefix="R")
    first, second = Recorder(folder), Recorder(folder)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[*callbacks, first])
    assert sorted(os.listdir(folder)) == ["R-1.weights.h5"]
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, initial_epoch=2, verbose=0, callbacks=[*callbacks, second])
    lrs = {**first.lrs, **second.lrs}
    total = EPOCHS * STEPS
    assert sorted(second.lrs) == list(range(2 * STEPS, total))
    assert [round(lrs[s], 6) for s in range(total)] == [round(cosine_snapshot_lr(s, total, M, LR0), 6)
                                                        for s in range(total)]
    assert sorted(os.listdir(folder)) == [f"R-{k}.weights.h5" for k in range(1, M + 1)]
    assert_same_weights(loaded_weights(folder / "R-2.weights.h5"), second.step_weights[13])


def test_per_epoch_mode_reproduces_the_old_schedule_and_timing_and_best_on_validation(tmp_path):
    folder = tmp_path / "w"
    x, y = make_data(0)
    val = make_data(1, n=12)
    epochs, m = 5, 2  # period floor(5/2) = 2 epochs: snapshots after epochs 1 and 3; epoch 4 restarts, unsaved
    builder = SnapshotCallbackBuilder(epochs, m, LR0, per_epoch=True, folder=folder)
    model = make_model()
    rec = Recorder(folder)
    model.fit(x, y, batch_size=BATCH, epochs=epochs, validation_data=val, verbose=0,
              callbacks=[*builder.get_callbacks(model_prefix="Old"), rec])
    for step, lr in rec.lrs.items():
        assert lr == pytest.approx(keras_epoch_lr(step // STEPS, epochs, m, LR0), rel=1e-6, abs=1e-9), step
    assert rec.lrs[4 * STEPS] == pytest.approx(LR0)  # the trailing epoch restarts
    snaps = [{f for f in files if "Best" not in f} for _, files in sorted(rec.epoch_files.items())]
    one, two = "Old-1.weights.h5", "Old-2.weights.h5"
    assert snaps == [set(), {one}, {one}, {one, two}, {one, two}]
    assert_same_weights(loaded_weights(folder / one), rec.epoch_weights[1])
    assert_same_weights(loaded_weights(folder / two), rec.epoch_weights[3])
    # Best checkpoint: the first epoch with the highest val_accuracy (Keras 3's key name).
    accs = [rec.epoch_logs[e]["val_accuracy"] for e in range(epochs)]
    best_epoch = int(np.argmax(accs))
    assert builder.best_file("Old") == folder / "Old-Best.weights.h5"
    assert_same_weights(loaded_weights(folder / "Old-Best.weights.h5"), rec.epoch_weights[best_epoch])


def test_ensemble_equals_averaging_the_loaded_models_by_hand(trained):
    folder, _ = trained
    files = [folder / f"Model_-{k}.weights.h5" for k in range(1, M + 1)]
    x, _ = make_data(5, n=9)
    by_hand = []
    for k, path in enumerate(files):
        model = make_model(seed=50 + k, compile=False)
        model.load_weights(path)
        by_hand.append(model.predict(x, verbose=0))
    by_hand = np.stack(by_hand).astype(np.float64)
    host = make_model(seed=7)
    host.fit(*make_data(2), batch_size=BATCH, epochs=1, verbose=0)  # builds its optimizer state (momentum)
    own = host.get_weights()
    own_optimizer = [np.array(keras.ops.convert_to_numpy(v)) for v in host.optimizer.variables]
    members = snapshot_member_probs(host, files, x, batch_size=4)
    assert members.shape == (M, 9, C)
    np.testing.assert_allclose(members, by_hand, atol=1e-6)
    np.testing.assert_allclose(snapshot_predict_proba(host, files, x), by_hand.mean(axis=0), atol=1e-6)
    w = [0.2, 0.3, 0.5]
    expected = 0.2 * by_hand[0] + 0.3 * by_hand[1] + 0.5 * by_hand[2]
    np.testing.assert_allclose(snapshot_predict_proba(host, files, x, weights=w), expected, atol=1e-6)
    # The host model's weights and optimizer state are left as they were.
    assert_same_weights(host.get_weights(), own)
    assert_same_weights([keras.ops.convert_to_numpy(v) for v in host.optimizer.variables], own_optimizer)
    with pytest.raises(ValueError, match="sum"):
        snapshot_predict_proba(host, files, x, weights=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="missing.weights.h5"):
        snapshot_member_probs(host, [folder / "missing.weights.h5"], x)


def test_from_logits_applies_softmax_and_logits_without_it_are_refused(tmp_path):
    x, _ = make_data(3, n=6)
    files, logits = [], []
    for k in range(2):
        model = make_model(seed=k, softmax=False)
        path = tmp_path / f"L-{k}.weights.h5"
        model.save_weights(path)
        files.append(path)
        logits.append(model.predict(x, verbose=0).astype(np.float64))
    softmax = [np.exp(z) / np.exp(z).sum(axis=1, keepdims=True) for z in logits]
    host = make_model(seed=9, softmax=False)
    probs = snapshot_predict_proba(host, files, x, from_logits=True)
    np.testing.assert_allclose(probs, (softmax[0] + softmax[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="from_logits=True"):
        snapshot_predict_proba(host, files, x)


def test_fit_snapshot_weights_matches_fit_ensemble_weights_on_validation(trained):
    folder, _ = trained
    files = [folder / f"Model_-{k}.weights.h5" for k in range(1, M + 1)]
    val_x, val_y = make_data(8, n=30)
    host = make_model(seed=3)
    w = fit_snapshot_weights(host, files, val_x, val_y)
    expected = weighting.fit_ensemble_weights(snapshot_member_probs(host, files, val_x), val_y).numpy()
    assert w.shape == (M,) and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w, expected, atol=1e-9)
    np.testing.assert_allclose(fit_snapshot_weights(host, files, val_x, val_y, method="equal"), np.full(M, 1 / M))


def test_learning_rate_schedule_optimizer_is_refused(tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.9)
    model = make_model(optimizer=keras.optimizers.SGD(learning_rate=schedule))
    x, y = make_data(0)
    callbacks = SnapshotCallbackBuilder(2, 2, 0.1, folder=tmp_path).get_callbacks()
    with pytest.raises(ValueError, match="ExponentialDecay"):
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=callbacks)


def test_unknown_steps_per_epoch_is_a_clear_error(tmp_path):
    x, y = make_data(0)

    def batches():
        while True:
            yield x[:BATCH], y[:BATCH]

    callbacks = SnapshotCallbackBuilder(2, 2, 0.1, folder=tmp_path).get_callbacks()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_model().fit(batches(), epochs=2, shuffle=False, verbose=0, callbacks=callbacks)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((10, 0), {}, "nb_snapshots >= 1, but got 0"),
        ((2, 3), {}, "nb_epochs >= nb_snapshots \\(3\\), but got 2"),
        ((10, 2, 0.0), {}, "init_lr > 0, but got 0.0"),
        ((10, 2, -0.1), {}, "init_lr > 0, but got -0.1"),
        ((10, 2, 0.1), {"lr_min": 0.2}, "lr_min < init_lr .*0.2"),
        ((10, 2, 0.1), {"per_epoch": True, "lr_min": 0.01}, "lr_min=0.01"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapshotCallbackBuilder(*args, **kwargs)


def test_bad_prefix():
    with pytest.raises(ValueError, match="'a/b'"):
        SnapshotCallbackBuilder(10, 2).get_callbacks(model_prefix="a/b")


def test_import_without_keras_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # makes `import keras` fail as if it were not installed
    monkeypatch.delitem(sys.modules, "snapens.integrations.keras")
    # a command that works from a clone: the package is not on the index
    with pytest.raises(ImportError, match=r"pip install keras h5py \(or pip install -e '\.\[keras\]' in a clone\)"):
        importlib.import_module("snapens.integrations.keras")


def test_importing_snapens_does_not_import_keras():
    code = "import sys, snapens, snapens.integrations; assert 'keras' not in sys.modules, 'keras imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
