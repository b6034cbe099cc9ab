"""Snapshot ensemble with the Hugging Face ``Trainer`` on scikit-learn's 8x8 digits: one callback, no other change.

Trains one small CNN for ``--epochs`` epochs with ``SnapshotCallback`` (``--snapshots`` cosine cycles, the rate set
before every optimizer step; the Trainer's own schedule is ``"constant"``), and, for comparison, the same CNN with
the same budget under the Trainer's ``"cosine"`` schedule (one cycle, no snapshots). Then evaluates on the test
split: the single cosine model, the last snapshot, and the snapshot ensemble with equal weights and with weights and
temperature fitted on the validation split (carved from the training data; the test split is touched only for the
final table).

    python examples/transformers_digits.py          # seconds on a laptop CPU
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from snapens import metrics, weighting
from snapens.ensemble import SnapshotEnsemble
from snapens.guidance import recommend
from snapens.integrations.transformers import SnapshotCallback


class DigitsCNN(nn.Module):
    """A plain ``nn.Module``: the Trainer needs only a forward that returns the loss when given ``labels``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.head(self.features(pixels))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Digits(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "labels": self.y[i]}


def _train(model: nn.Module, train: Digits, out: Path, args: argparse.Namespace, schedule: str,
           callbacks: list[transformers.TrainerCallback]) -> None:
    training_args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type=schedule, max_grad_norm=0.0, save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=args.seed,
    )
    # The paper's optimizer; its lr is the peak of every cycle. With optimizers=(opt, None) the Trainer still
    # builds its own scheduler from lr_scheduler_type.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=train, callbacks=callbacks,
                                   optimizers=(optimizer, None))
    trainer.remove_callback(transformers.PrinterCallback)  # keep the output to the final table
    trainer.train()


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model.eval()(x), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="budget in epochs")
    parser.add_argument("--snapshots", type=int, default=5, help="cycles / snapshots M")
    parser.add_argument("--lr", type=float, default=0.1, help="restart learning rate lr0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # fastest for a model this small
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*not a PreTrainedModel.*")

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_trval, idx_test = train_test_split(range(len(y)), test_size=0.25, stratify=y, random_state=args.seed)
    idx_train, idx_val = train_test_split(idx_trval, test_size=0.2, stratify=y[idx_trval], random_state=args.seed)
    x_val, y_val, x_test, y_test = x[idx_val], y[idx_val], x[idx_test], y[idx_test]
    train = Digits(x[idx_train], y[idx_train])

    with tempfile.TemporaryDirectory() as tmp:
        run = args.out or Path(tmp)
        transformers.set_seed(args.seed)
        start = time.perf_counter()
        _train(DigitsCNN(args.width), train, run / "trainer", args, "constant",
               [SnapshotCallback(args.snapshots, run / "snapshots")])
        seconds = time.perf_counter() - start
        # weights="equal": every member, to compare the combinations below (from_run's default is the
        # combination `snapens evaluate` stored; a run of your own loop has none, so it is equal weights anyway)
        ensemble = SnapshotEnsemble.from_run(run, lambda name, **kwargs: DigitsCNN(args.width),
                                              weights="equal", inputs="normalized")
        val_members = ensemble.member_probs(x_val)
        test_members = ensemble.member_probs(x_test)

        transformers.set_seed(args.seed)
        baseline = DigitsCNN(args.width)
        _train(baseline, train, run / "baseline", args, "cosine", [])

    weights = weighting.fit_ensemble_weights(val_members, y_val, method="nll")   # validation only
    temperature = weighting.fit_temperature(weighting.weighted_average(val_members, weights), y_val)
    fitted_test = weighting.apply_temperature(weighting.weighted_average(test_members, weights), temperature)
    # What snapens gives by default: the cheapest combination within noise of the best on validation, members of
    # weight 0 not run, with a temperature only where cross-validation inside validation supports one.
    rec = recommend(val_members, y_val)
    recommended_test = weighting.weighted_average(test_members, rec.weights)
    if rec.temperature_fitted:
        recommended_test = weighting.apply_temperature(recommended_test, rec.temperature)

    print(f"transformers {transformers.__version__}; train {len(train)}, val {len(y_val)}, test {len(y_test)}; "
          f"{args.epochs} epochs, M={args.snapshots}, lr0={args.lr}; snapshot run trained in {seconds:.1f} s")
    rows = [
        ("single model, Trainer cosine (same budget)", _probs(baseline, x_test)),
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
