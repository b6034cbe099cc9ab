"""Snapshot ensembling in your own training loop: a scheduler, a snapshot store, an ensemble.

    python examples/custom_loop.py            # about 10 s on a laptop CPU

Trains a small MLP on scikit-learn's digits with M=4 cosine cycles, keeps a snapshot at the end of each cycle,
then compares the last snapshot with the equal-weight ensemble on held-out data.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from snapens import SnapshotEnsemble, SnapshotLR, SnapshotStore
from snapens.metrics import error_rate


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--snapshots", type=int, default=4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    x_train, y_train = torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)
    x_test, y_test = torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    batch_size = 64
    steps_per_epoch = -(-len(x_train) // batch_size)
    # Count the budget in optimizer steps; the scheduler sets the lr BEFORE each step.
    scheduler = SnapshotLR(optimizer, total_steps=args.epochs * steps_per_epoch, n_cycles=args.snapshots)

    with tempfile.TemporaryDirectory() as folder:
        store = SnapshotStore(folder)
        for epoch in range(args.epochs):
            order = torch.randperm(len(x_train))
            for start in range(0, len(x_train), batch_size):
                idx = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler.is_cycle_end():  # the step just taken ended a cycle: a learning-rate minimum
                    store.save(model, index=scheduler.cycle + 1, step=scheduler.steps_done,
                               epoch=scheduler.steps_done / steps_per_epoch, lr=optimizer.param_groups[0]["lr"],
                               model_name="mlp", model_kwargs={})
                scheduler.step()

        members = [store.load_state_dict(info.index) for info in store.list()]
        ensemble = SnapshotEnsemble(make_model, members)  # equal weights: the paper
        results = {
            "last snapshot": error_rate(ensemble.member_probs(x_test)[-1], y_test),
            f"ensemble of {len(members)}": error_rate(ensemble.predict_proba(x_test), y_test),
        }
    for name, err in results.items():
        print(f"{name:>16}: test error {err:.2f}%")
    return results


if __name__ == "__main__":
    main()
