"""`snapens plot` and `snapens export` on a real (tiny) training run."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from snapens.cli import CLIError, main
from snapens.cli.export import load_exported
from snapens.cli.plot import PLOT_FILES, lr_curve, plot_run
from snapens.config import resolve_config
from snapens.data import load_dataset
from snapens.ensemble import SnapshotEnsemble
from snapens.models import build_model
from snapens.schedule import cosine_snapshot_lr, cycle_bounds, step_decay_lr

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine this is several times faster for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real digits run (2 epochs, 2 snapshots) per test session, shared by the CLI test files: copy it."""
    from snapens.cli.train import train_run

    final = tmp_path_factory.getbasetemp() / "tiny-digits-run"
    if not final.is_dir():
        cfg = resolve_config(epochs=2, snapshots=2, batch_size=128, device="cpu", precision="fp32",
                             channels_last=False, threads=1)
        tmp = train_run(cfg, tmp_path_factory.mktemp("training") / "run", resume=False, progress=False)
        os.replace(tmp, final)  # complete runs only: a failed training leaves nothing to reuse
    return final


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the run, plotted once by the CLI (which evaluates it first: it has no summary.json)."""
    run = Path(shutil.copytree(shared_tiny_run(tmp_path_factory), tmp_path_factory.mktemp("plot") / "run",
                               ignore=shutil.ignore_patterns("summary.json", "ensemble_weights.json", "plots")))
    assert main(["plot", str(run), "--device", "cpu", "--quiet"]) == 0
    return run


def _check_pngs(folder: Path) -> None:
    for name in PLOT_FILES:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    assert not [p for p in folder.iterdir() if p.name not in PLOT_FILES]  # no temp files left behind


def test_plot_writes_four_pngs_after_evaluating(run_dir: Path) -> None:
    _check_pngs(run_dir / "plots")
    # The run had no summary.json: plot evaluated it (as `snapens evaluate` would) before drawing.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["member_names"] == ["snapshot-01", "snapshot-02"]
    assert (run_dir / "ensemble_weights.json").is_file()


def test_plot_again_prints_the_paths(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (run_dir / "summary.json").stat().st_mtime_ns
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == list(PLOT_FILES)
    _check_pngs(run_dir / "plots")
    assert (run_dir / "summary.json").stat().st_mtime_ns == before  # reused, not re-evaluated
    assert main(["plot", str(run_dir)]) == 0
    assert capsys.readouterr().out.count(".png") == 4


def test_lr_curve_recomputes_the_schedule() -> None:
    info = {"config": {"epochs": 4, "snapshots": 2, "lr": 0.2, "lr_min": 0.0, "schedule": "cosine-cycles",
                       "batch_size": 10}, "dataset": {"num_train": 25}}
    lrs, marks = lr_curve(info)  # ceil(25 / 10) = 3 steps per epoch, T = 12
    assert len(lrs) == 12 and marks == cycle_bounds(12, 2) == [5, 11]
    assert lrs == pytest.approx([cosine_snapshot_lr(s, 12, 2, 0.2) for s in range(12)])
    assert lrs[0] == pytest.approx(0.2) and lrs[6] == pytest.approx(0.2)
    info["config"]["schedule"] = "step"
    lrs, _ = lr_curve(info, steps_per_epoch=2)
    assert lrs == pytest.approx([step_decay_lr(s, 8, 0.2) for s in range(8)])
    assert lrs[3] == pytest.approx(0.2) and lrs[4] == pytest.approx(0.02) and lrs[7] == pytest.approx(0.002)


def test_plot_without_matplotlib_says_how_to_install(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CLIError, match=r"pip install snapshot-ensembles\[plot\]"):
        plot_run(run_dir)


def _reference(run_dir: Path, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """13 raw test images in [0, 1] and the ensemble's probabilities on them (as evaluate computes them)."""
    info = json.loads((run_dir / "config.json").read_text())
    cfg = info["config"]
    data = load_dataset(cfg["dataset"], val_size=cfg["val_size"], seed=cfg["seed"])
    raw = data.test.images[-13:].float() / 255.0  # another batch size than the export's example input
    mean = torch.tensor(info["dataset"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["dataset"]["std"]).view(1, -1, 1, 1)
    ens = SnapshotEnsemble.from_run(run_dir, build_model, weights=weights)
    return raw, ens.predict_proba((raw - mean) / std)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load is deprecated, still supported
def test_export_torchscript_round_trip(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens.pt"
    assert main(["export", str(run_dir), str(out), "--quiet"]) == 0
    module = torch.jit.load(str(out))
    raw, expected = _reference(run_dir)
    with torch.no_grad():
        got = module(raw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    _, meta = load_exported(out)
    assert meta["members"] == ["snapshot-01", "snapshot-02"] and meta["weights"] == pytest.approx([0.5, 0.5])


def test_export_program_with_fitted_weights_round_trip(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens.pt2"
    assert main(["export", str(run_dir), str(out), "--format", "export", "--weights", "fitted", "--quiet"]) == 0
    fitted = json.loads((run_dir / "ensemble_weights.json").read_text())["weights"]
    module = torch.export.load(str(out)).module()
    raw, expected = _reference(run_dir, weights=fitted)
    with torch.no_grad():
        got = module(raw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    _, meta = load_exported(out)
    assert meta["weights_source"] == "fitted" and meta["weights"] == pytest.approx(fitted, abs=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "export"], "writes a .pt2 file"),
        (["--weights", "fitted", "--last", "1"], "were fitted for members"),
    ],
)
def test_export_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args, message) -> None:
    assert main(["export", str(run_dir), str(tmp_path / "ens.pt"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snapens: error: ") and message in err
    assert not (tmp_path / "ens.pt").exists()
