"""Snapshot ensemble with Keras 3 on scikit-learn's 8x8 digits, using the old project's one-line builder.

Trains one small network for ``--epochs`` epochs with ``--snapshots`` cosine cycles (learning rate set before every
batch), then evaluates on the test split: the best single model (chosen on validation accuracy), each snapshot,
the equal-weight snapshot ensemble, and the ensemble with weights fitted on the validation split.
The validation split is carved from the training data; the test split is touched only for the final table.

    KERAS_BACKEND=torch python examples/keras_digits.py            # about 10-20 s on a laptop CPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # must precede the first `import keras`

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from snapens import metrics  # noqa: E402
from snapens.integrations.keras import (  # noqa: E402
    SnapshotCallbackBuilder,
    fit_snapshot_weights,
    snapshot_member_probs,
)


def build_model(hidden: int) -> keras.Model:
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    # The learning rate here is a placeholder: the snapshot callbacks set it before every batch.
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="budget T in epochs")
    parser.add_argument("--snapshots", type=int, default=5, help="cycles / snapshots M")
    parser.add_argument("--lr", type=float, default=0.1, help="restart learning rate lr0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (torch backend); one is fastest for a model this small")
    parser.add_argument("--out", type=Path, default=None, help="folder for the weight files (default: a temp dir)")
    args = parser.parse_args()

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.threads)

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    x_trval, x_test, y_trval, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=args.seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_trval, y_trval, test_size=0.2, stratify=y_trval, random_state=args.seed
    )

    keras.utils.set_random_seed(args.seed)
    model = build_model(args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        builder = SnapshotCallbackBuilder(args.epochs, args.snapshots, args.lr, folder=folder)
        start = time.perf_counter()
        model.fit(
            x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
            validation_data=(x_val, y_val),  # validation, never the test set
            callbacks=builder.get_callbacks(model_prefix="Digits"),
        )
        seconds = time.perf_counter() - start
        files = builder.snapshot_files("Digits")
        best = snapshot_member_probs(model, [builder.best_file("Digits")], x_test)[0]
        members = snapshot_member_probs(model, files, x_test)
        weights = fit_snapshot_weights(model, files, x_val, y_val)

    print(f"keras {keras.__version__} ({keras.backend.backend()} backend); train {len(y_train)}, val {len(y_val)}, "
          f"test {len(y_test)}; {args.epochs} epochs, M={args.snapshots}, lr0={args.lr}; trained in {seconds:.1f} s")
    rows = [("single best (by val acc)", best)]
    rows += [(f"snapshot {k}", p) for k, p in enumerate(members, start=1)]
    rows += [
        (f"ensemble, equal weights (M={len(files)})", members.mean(axis=0)),
        ("ensemble, weights fitted on val", np.tensordot(weights, members, axes=1)),
    ]
    print(f"{'model':<36} {'test error %':>12} {'test NLL':>9} {'ECE':>7}")
    for name, probs in rows:
        scores = metrics.evaluate_probs(probs, y_test)
        print(f"{name:<36} {scores['error']:>12.2f} {scores['nll']:>9.4f} {scores['ece']:>7.4f}")
    print("fitted weights:", np.round(weights, 3).tolist())


if __name__ == "__main__":
    main()
