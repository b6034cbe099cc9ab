"""Snapshot ensemble with Lightning on scikit-learn's 8x8 digits: one callback in the user's own Trainer.

Trains one small MLP for ``--epochs`` epochs with ``SnapshotCallback`` (``--snapshots`` cosine cycles, the rate set
before every optimizer step), and, for comparison, the same MLP with the same budget under the paper's step-decay
schedule (x0.1 at 50% and 75%). Then evaluates on the test split: the single step-decay model, the last snapshot,
and the snapshot ensemble with equal weights and with weights and temperature fitted on the validation split (carved
from the training data; the test split is touched only for the final table).

    python examples/lightning_digits.py            # seconds on a laptop CPU
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from snapens import metrics, weighting
from snapens.ensemble import SnapshotEnsemble
from snapens.guidance import recommend
from snapens.integrations.lightning import SnapshotCallback
from snapens.schedule import StepDecayLR


class DigitsMLP(L.LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 0.1, step_decay_steps: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))
        self.lr = lr
        self.step_decay_steps = step_decay_steps  # None: the snapshot callback owns the rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        # The lr is the peak of every cycle; SnapshotCallback sets the rate before each step.
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
        if self.step_decay_steps is None:
            return optimizer
        scheduler = StepDecayLR(optimizer, total_steps=self.step_decay_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def _trainer(epochs: int, callbacks: list[L.Callback], root: Path) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=root)


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model.eval()(x), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="budget in epochs (T = epochs x steps per epoch)")
    parser.add_argument("--snapshots", type=int, default=5, help="cycles / snapshots M")
    parser.add_argument("--lr", type=float, default=0.1, help="restart learning rate lr0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # fastest for a model this small
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_trval, idx_test = train_test_split(range(len(y)), test_size=0.25, stratify=y, random_state=args.seed)
    idx_train, idx_val = train_test_split(idx_trval, test_size=0.2, stratify=y[idx_trval], random_state=args.seed)
    x_train, y_train, x_val, y_val = x[idx_train], y[idx_train], x[idx_val], y[idx_val]
    x_test, y_test = x[idx_test], y[idx_test]
    train = _loader(x_train, y_train, args.batch_size, shuffle=True)

    with tempfile.TemporaryDirectory() as tmp:
        run = args.out or Path(tmp)
        L.seed_everything(args.seed, verbose=False)
        snap_model = DigitsMLP(args.hidden, args.lr)
        start = time.perf_counter()
        _trainer(args.epochs, [SnapshotCallback(args.snapshots, run / "snapshots")], run).fit(snap_model, train)
        seconds = time.perf_counter() - start

        # Built from the manifest; the factory ignores the recorded name ("DigitsMLP") and builds the module.
        # weights="equal": every member, to compare the combinations below (from_run's default is the
        # combination `snapens evaluate` stored; a run of your own loop has none, so it is equal weights anyway)
        ensemble = SnapshotEnsemble.from_run(run, lambda name, **kwargs: DigitsMLP(args.hidden),
                                              weights="equal", inputs="normalized")
        val_members = ensemble.member_probs(x_val)
        test_members = ensemble.member_probs(x_test)

        L.seed_everything(args.seed, verbose=False)
        total_steps = args.epochs * len(train)
        baseline = DigitsMLP(args.hidden, args.lr, step_decay_steps=total_steps)
        _trainer(args.epochs, [], run).fit(baseline, train)

    weights = weighting.fit_ensemble_weights(val_members, y_val, method="nll")   # validation only
    fitted_val = weighting.weighted_average(val_members, weights)
    temperature = weighting.fit_temperature(fitted_val, y_val)                   # validation only
    fitted_test = weighting.apply_temperature(weighting.weighted_average(test_members, weights), temperature)
    # What snapens gives by default: the cheapest combination within noise of the best on validation, members of
    # weight 0 not run, with a temperature only where cross-validation inside validation supports one.
    rec = recommend(val_members, y_val)
    recommended_test = weighting.weighted_average(test_members, rec.weights)
    if rec.temperature_fitted:
        recommended_test = weighting.apply_temperature(recommended_test, rec.temperature)

    print(f"lightning {L.__version__}; train {len(y_train)}, val {len(y_val)}, test {len(y_test)}; "
          f"{args.epochs} epochs = {total_steps} steps, M={args.snapshots}, lr0={args.lr}; "
          f"snapshot run trained in {seconds:.1f} s")
    rows = [
        ("single model, step decay (same budget)", _probs(baseline, x_test)),
        (f"last snapshot ({args.snapshots})", test_members[-1]),
        (f"snapshot ensemble, equal weights (M={args.snapshots})", test_members.mean(dim=0)),
        ("snapshot ensemble, weights+T fitted on val", fitted_test),
        (f"recommended on val ({rec.forward_passes} of {args.snapshots} members)", recommended_test),
    ]
    print(f"{'model':<44} {'test error %':>12} {'test NLL':>9} {'ECE':>7}")
    for name, probs in rows:
        scores = metrics.evaluate_probs(probs, y_test)
        print(f"{name:<44} {scores['error']:>12.2f} {scores['nll']:>9.4f} {scores['ece']:>7.4f}")
    print("fitted weights:", [round(float(w), 3) for w in weights], f"temperature {temperature:.3f}")


if __name__ == "__main__":
    main()
