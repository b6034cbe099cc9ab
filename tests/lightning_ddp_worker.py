"""Helper for tests/test_integrations_lightning.py: ``strategy="ddp"`` on 2 CPU processes (gloo).

Run as a script (Lightning launches the second process by running this file again); writes
``<out>/rank-<r>.json`` with what that rank saw and ``<out>/snapshots`` from the callback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn

from snapens.integrations.lightning import SnapshotCallback

M, LR0 = 4, 0.2


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        # LightningModule hooks run after the callbacks' ones: the rate the step will use.
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR0, momentum=0.9)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = Module()
    callback = SnapshotCallback(M, out / "snapshots")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(module, loader)
    report = {
        "rank": trainer.global_rank, "saved": callback.saved, "M": M, "T": callback.plan.total_steps,
        "lrs": module.lrs, "final": {k: v.tolist() for k, v in module.state_dict().items()},
    }
    (out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
