"""`snapens plot` and `snapens export` on a real (tiny) training run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from snapens.cli import main
from snapens.workflows.exporting import load_exported
from snapens.workflows import plotting as plot_module
from snapens.workflows.evaluation import evaluate_run
from snapens.workflows.plotting import PLOT_FILES, correlation_labels, lr_curve, plot_run
from snapens.data import load_dataset
from snapens.ensemble import SnapshotEnsemble
from snapens.models import build_model
from snapens.schedule import cosine_snapshot_lr, cosine_snapshot_steps, step_decay_lr

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NO_RESULTS = shutil.ignore_patterns("summary.json", "ensemble_weights.json", "plots")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the run, plotted once by the CLI (which evaluates it first: it has no summary.json)."""
    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("plot") / "run", ignore=_NO_RESULTS))
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
    assert capsys.readouterr().out.count(".png") == 5


def test_lr_curve_recomputes_the_schedule() -> None:
    info = {"config": {"epochs": 4, "snapshots": 2, "lr": 0.2, "lr_min": 0.0, "schedule": "cosine-cycles",
                       "batch_size": 10}, "dataset": {"num_train": 25}}
    lrs, marks = lr_curve(info)  # ceil(25 / 10) = 3 steps per epoch, T = 12
    assert len(lrs) == 12 and marks == cosine_snapshot_steps(12, 2) == [5, 11]
    assert lrs == pytest.approx([cosine_snapshot_lr(s, 12, 2, 0.2) for s in range(12)])
    assert lrs[0] == pytest.approx(0.2) and lrs[6] == pytest.approx(0.2)
    info["config"]["schedule"] = "step"
    lrs, _ = lr_curve(info, steps_per_epoch=2)
    assert lrs == pytest.approx([step_decay_lr(s, 8, 0.2) for s in range(8)])
    assert lrs[3] == pytest.approx(0.2) and lrs[4] == pytest.approx(0.02) and lrs[7] == pytest.approx(0.002)


@pytest.mark.parametrize("options", [
    {"schedule": "fge", "fge_start": 0.5, "cycle_epochs": 2},
    {"schedule": "swa", "swa_start": 0.6, "swa_lr": 0.03},
    {"schedule": "cosine-cycles", "cycle_decay": 0.5, "cycle_mult": 2.0, "snapshots": 3},
])
def test_lr_curve_follows_the_new_schedules(options: dict) -> None:
    from snapens.schedule import make_scheduler
    from snapens.workflows.training import schedule_options
    from snapens.config import TrainConfig

    cfg = TrainConfig(epochs=10, lr=0.2, batch_size=10, **options)
    info = {"config": cfg.to_dict(), "dataset": {"num_train": 25}}  # 3 steps per epoch, T = 30
    lrs, marks = lr_curve(info)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.2)
    sched = make_scheduler(cfg.schedule, opt, total_steps=30, n_cycles=cfg.snapshots, steps_per_epoch=3,
                           **schedule_options(cfg))
    expected = []
    for _ in range(30):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == expected and marks == sched.snapshot_steps


def test_plot_without_matplotlib_says_how_to_install(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"plotting needs matplotlib: pip install matplotlib$"):
        plot_run(run_dir)


def test_matplotlib_is_a_core_dependency() -> None:
    # The default `snapens train` writes plots, so a plain `pip install -e .` must bring matplotlib.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("matplotlib") for dep in project["dependencies"])
    # ...and no hint names the package index's `snapshot-ensembles[...]`, which is not published there.
    src = Path(__file__).parents[1] / "src" / "snapens"
    hints = [p for p in src.rglob("*.py") if "pip install snapshot-ensembles" in p.read_text()]
    assert hints == []


@pytest.fixture()
def unevaluated(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run without summary.json: plotting it evaluates it first."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=_NO_RESULTS))


def _edit_config(run: Path, edit) -> None:
    info = json.loads((run / "config.json").read_text())
    edit(info)
    (run / "config.json").write_text(json.dumps(info))


@pytest.mark.parametrize(
    "mutate, args, message",
    [
        (lambda d: _edit_config(d, lambda i: i["dataset"].pop("mean")), [], "dataset.mean is missing"),
        (lambda d: (d / "config.json").unlink(), [], "not a snapens run folder"),
        (lambda d: (d / "metrics.csv").unlink(), [], "metrics.csv does not exist"),
        (lambda d: None, ["--device", "foo"], "unknown device 'foo'"),
    ],
)
def test_plot_errors_are_one_line_without_the_evaluation_note(unevaluated: Path, cli_error, mutate, args,
                                                              message: str) -> None:
    mutate(unevaluated)
    assert message in cli_error("plot", unevaluated, *args)  # one line: no "evaluating it first" before it
    assert not (unevaluated / "plots").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_plot_cuda_without_cuda_is_a_one_line_error(unevaluated: Path, cli_error) -> None:
    assert "CUDA is not available" in cli_error("plot", unevaluated, "--device", "cuda")


def test_plot_announces_the_evaluation_and_passes_data_dir(unevaluated: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import snapens.data

    real, seen = snapens.data.load_dataset, []

    def recording(spec, **kwargs):
        seen.append(kwargs["data_dir"])
        return real(spec, **kwargs)

    monkeypatch.setattr(snapens.data, "load_dataset", recording)
    assert main(["plot", str(unevaluated), "--device", "cpu", "--data-dir", "elsewhere"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == f"{unevaluated} has no summary.json: evaluating it first"
    assert captured.out.splitlines() == [str(unevaluated / "plots" / name) for name in PLOT_FILES]
    assert seen == ["elsewhere"]


def test_plots_label_members_by_name_and_count_snapshots_only(unevaluated: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # `plot` draws the run's summary.json only; a variant's summary (here with best) is drawn by the same helpers
    summary = evaluate_run(unevaluated, include_best=True, optimize=-1)
    assert correlation_labels(summary) == ["best", "snapshot-01", "snapshot-02"]
    drawn: dict[str, object] = {}
    real_save = plot_module._save

    def capture(fig, path: Path) -> None:
        drawn[path.name] = fig.axes[0]
        real_save(fig, path)

    monkeypatch.setattr(plot_module, "_save", capture)
    plt = plot_module._pyplot()
    plot_module._plot_correlation(plt, summary, tmp_path / "snapshot_correlation.png")
    plot_module._plot_size(plt, summary, tmp_path / "ensemble_size.png")
    heat = drawn["snapshot_correlation.png"]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["best", "snapshot-01", "snapshot-02"]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["best", "snapshot-01", "snapshot-02"]
    size = drawn["ensemble_size.png"]
    curve = size.get_lines()[0]
    assert list(curve.get_xdata()) == [1, 2]  # the two snapshots, not three members
    assert list(curve.get_ydata()) == pytest.approx(summary["ensemble_size_curve"]["error"])
    # issue 20.18: the single best model was chosen on validation, and the legend says so
    assert "single best (chosen on validation)" in [t.get_text() for t in size.get_legend().get_texts()]


def _reference(run_dir: Path, weights="recommended") -> tuple[torch.Tensor, torch.Tensor]:
    """13 raw test images in [0, 1] and the ensemble's probabilities on them (as evaluate computes them; by
    default the recommended combination, as export writes it)."""
    info = json.loads((run_dir / "config.json").read_text())
    cfg = info["config"]
    data = load_dataset(cfg["dataset"], val_size=cfg["val_size"], seed=cfg["seed"])
    raw = data.test.images[-13:].float() / 255.0  # another batch size than the export's example input
    ens = SnapshotEnsemble.from_run(run_dir, build_model, weights=weights, precision="fp32")
    return raw, ens.predict_proba(raw)  # from_run normalises with the run's mean/std, as evaluate does


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load is deprecated, still supported
def test_export_torchscript_round_trip(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens.pt"
    assert main(["export", str(run_dir), str(out), "--quiet", "--precision", "fp32", "--weights", "equal"]) == 0
    module = torch.jit.load(str(out))  # .pt: torchscript
    raw, expected = _reference(run_dir, weights="equal")
    with torch.no_grad():
        got = module(raw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    _, meta = load_exported(out)
    assert meta["members"] == ["snapshot-01", "snapshot-02"] and meta["weights"] == pytest.approx([0.5, 0.5])
    assert meta["format"] == "torchscript"


def test_export_program_with_fitted_weights_round_trip(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens.pt2"
    assert main(["export", str(run_dir), str(out), "--weights", "fitted", "--quiet", "--precision", "fp32"]) == 0
    fitted = json.loads((run_dir / "ensemble_weights.json").read_text())["weights"]
    module = torch.export.load(str(out)).module()
    raw, expected = _reference(run_dir, weights=fitted)
    with torch.no_grad():
        got = module(raw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    _, meta = load_exported(out)
    from snapens.weighting import prune_weights  # members below DROP_BELOW are left out of the module
    counted = [w for w in prune_weights(fitted).tolist() if w > 0]
    assert meta["weights_source"] == "fitted" and meta["weights"] == pytest.approx(counted, abs=1e-6)
    assert meta["format"] == "export" and meta["precision"] == "fp32"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load is deprecated, still supported
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_export_records_and_applies_its_precision(run_dir: Path, tmp_path: Path, suffix: str) -> None:
    from snapens._precision import cpu_supports_bf16

    out = tmp_path / f"ens{suffix}"
    assert main(["export", str(run_dir), str(out), "--quiet"]) == 0  # default: auto
    module, meta = load_exported(out)
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert meta["precision"] == expected
    raw, exact = _reference(run_dir)
    ens = SnapshotEnsemble.from_run(run_dir, build_model, precision=expected)
    with torch.no_grad():
        got = module(raw)
    torch.testing.assert_close(got, ens.predict_proba(raw), atol=1e-5, rtol=0)  # the same precision
    if expected == "bf16":
        assert 0 < float((got - exact).abs().max()) < 5e-2  # bf16 applied inside the file, close to fp32


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("ens.pt", ["--format", "export"], "--format export writes a .pt2 file"),
        ("ens.pt2", ["--format", "torchscript"], "--format torchscript writes a .pt file"),
        ("ens.bin", [], "the file must end in .pt2 (torch.export) or .pt (TorchScript)"),
        ("ens.onnx", ["--format", "export"], "the file must end in .pt2 (torch.export) or .pt (TorchScript)"),
        # weights fitted for a variant live in their own file (issue 9, item 8)
        ("ens.pt", ["--weights", "fitted", "--last", "1"],
         "ensemble_weights-last1.json does not exist; run `snapens evaluate --optimize 1 --last 1` first"),
        ("ens.pt", ["--last", "5"], "last must be an integer in [1, 2]"),
    ],
)
def test_export_errors(run_dir: Path, tmp_path: Path, cli_error, name: str, args, message: str) -> None:
    assert message in cli_error("export", run_dir, tmp_path / name, *args)
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name", ["state.pt", "config.json", "metrics.csv", "best.safetensors", "summary.json",
                                  "ensemble_weights.json", "snapshots/snapshot-01.safetensors",
                                  "snapshots/manifest.json", "plots/lr_schedule.png"])
def test_export_refuses_to_write_over_the_runs_own_files(run_dir: Path, tmp_path: Path, cli_error,
                                                          name: str) -> None:
    # issue 9, item 7: `export RUN RUN/state.pt` used to replace the resume state
    target = run_dir / name
    before = target.read_bytes()
    message = cli_error("export", run_dir, target, "--quiet")
    assert message.startswith(f"refusing to write the export over {target}: it belongs to the run {run_dir}")
    # through a symlink, with an explicit format, or spelled with ".." it is the same file
    link = tmp_path / "ens.pt"
    link.symlink_to(target)
    assert "refusing to write the export over" in cli_error("export", run_dir, link, "--format", "torchscript")
    assert "refusing" in cli_error("export", run_dir, run_dir / "snapshots" / ".." / name)
    assert target.read_bytes() == before


def test_export_by_default_runs_only_the_recommended_members(run_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21 (a): the recommendation of this run is the last snapshot alone: the module holds that one member,
    applies the recommended temperature and gives evaluate's recommended row (fp32)."""
    from snapens import metrics
    from snapens.workflows.evaluation import evaluate_run

    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    summary = evaluate_run(run, device="cpu", precision="fp32")
    row = summary["ensemble_recommended"]
    assert row["weights"] == [0.0, 1.0], "this run's validation recommends the last snapshot alone"
    assert row["forward_passes"] == 1 and summary["ensemble_equal"]["forward_passes"] == 2
    out = tmp_path / "ens.pt2"
    assert main(["export", str(run), str(out), "--precision", "fp32"]) == 0
    assert "1 member of 2, recommended weights" in capsys.readouterr().err
    module, meta = load_exported(out)
    assert meta["members"] == ["snapshot-02"] and meta["weights"] == [1.0] and meta["weights_source"] == "recommended"
    assert meta["temperature"] == (row["temperature"] if row["temperature_fitted"] else 1.0)
    assert meta["recommendation"]["source"] == str(run / "recommended.json")
    info = json.loads((run / "config.json").read_text())
    data = load_dataset(info["config"]["dataset"], val_size=info["config"]["val_size"], seed=info["config"]["seed"])
    with torch.no_grad():
        got = module(data.test.images.float() / 255.0)
    assert metrics.error_rate(got, data.test.labels) == pytest.approx(row["error"], abs=1e-9)
    assert metrics.nll(got, data.test.labels) == pytest.approx(row["nll"], rel=1e-5)
    # elementwise: the last snapshot's softmax, temperature-scaled as weighting.apply_temperature defines it
    from snapens import weighting
    last = SnapshotEnsemble.from_run(run, build_model, last=1, weights="equal", precision="fp32")
    expected = weighting.apply_temperature(last.predict_proba(data.test.images), meta["temperature"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the paper's equal weights stay one flag away; --no-temperature drops T
    paper = tmp_path / "paper.pt2"
    assert main(["export", str(run), str(paper), "--quiet", "--precision", "fp32", "--weights", "equal"]) == 0
    assert load_exported(paper)[1]["members"] == ["snapshot-01", "snapshot-02"]
    cold = tmp_path / "cold.pt2"
    assert main(["export", str(run), str(cold), "--quiet", "--precision", "fp32", "--no-temperature"]) == 0
    assert load_exported(cold)[1]["temperature"] == 1.0


def test_export_keeps_every_member_when_equal_weights_are_recommended(run_dir: Path, tmp_path: Path) -> None:
    """Issue 21 (b): a stored recommendation of equal weights keeps all members in the module."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (run / "recommended.json").write_text(json.dumps({
        "members": ["snapshot-01", "snapshot-02"], "weights": [0.5, 0.5], "temperature": 1.0,
        "temperature_fitted": False, "use": "equal", "reason": "equal weights win on validation"}))
    out = tmp_path / "ens.pt2"
    assert main(["export", str(run), str(out), "--quiet", "--precision", "fp32"]) == 0
    module, meta = load_exported(out)
    assert meta["members"] == ["snapshot-01", "snapshot-02"] and meta["weights"] == [0.5, 0.5]
    raw, expected = _reference(run)  # equal weights
    with torch.no_grad():
        torch.testing.assert_close(module(raw), expected, atol=1e-5, rtol=0)


def test_export_of_a_run_never_evaluated_chooses_as_evaluate_does(unevaluated: Path, tmp_path: Path) -> None:
    run = unevaluated  # a private copy
    out = tmp_path / "ens.pt2"
    assert main(["export", str(run), str(out), "--quiet", "--precision", "fp32"]) == 0
    meta = load_exported(out)[1]
    assert meta["recommendation"]["source"].startswith("chosen on validation at export")
    assert not (run / "recommended.json").exists()  # export writes nothing into the run
    from snapens.workflows.evaluation import evaluate_run

    row = evaluate_run(run, device="cpu", precision="fp32")["ensemble_recommended"]
    assert meta["members"] == [n for n, w in zip(["snapshot-01", "snapshot-02"], row["weights"]) if w > 0]
    assert meta["temperature"] == pytest.approx(row["temperature"], rel=1e-9)


def test_export_into_the_run_folder_under_its_own_name_works(run_dir: Path) -> None:
    out = run_dir / "ensemble.pt2"
    assert main(["export", str(run_dir), str(out), "--quiet"]) == 0
    assert out.is_file()
    out.unlink()


def test_plot_draws_the_whole_run_after_a_variant_evaluation(unevaluated: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 9, item 8: `evaluate --last 1` used to replace summary.json, and plot then drew one snapshot
    assert main(["evaluate", str(unevaluated), "--last", "1", "--include-best", "--quiet", "--device", "cpu"]) == 0
    assert main(["evaluate", str(unevaluated), "--last", "1", "--quiet", "--device", "cpu"]) == 0
    assert not (unevaluated / "summary.json").exists()
    drawn = []
    real = plot_module._plot_size
    monkeypatch.setattr(plot_module, "_plot_size", lambda plt, summary, out: (drawn.append(summary),
                                                                              real(plt, summary, out)))
    plot_run(unevaluated)
    (summary,) = drawn
    assert summary["member_names"] == ["snapshot-01", "snapshot-02"] and summary["run"]["last"] is None
    assert summary["ensemble_size_curve"]["m"] == [1, 2]
    assert json.loads((unevaluated / "summary.json").read_text())["ensemble_size_curve"]["m"] == [1, 2]
    assert json.loads((unevaluated / "summary-last1.json").read_text())["ensemble_size_curve"]["m"] == [1]


def _capture_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    drawn: dict[str, object] = {}
    monkeypatch.setattr(plot_module, "_save", lambda fig, path: drawn.__setitem__(path.name, fig))
    return drawn


def test_correlation_plot_shows_one_minus_correlation_when_members_are_near_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _capture_figures(monkeypatch)
    corr = [[1.0, 0.9965, 0.9990], [0.9965, 1.0, 0.9999], [0.9990, 0.9999, 1.0]]
    names = ["snapshot-01", "snapshot-02", "snapshot-03"]
    summary = {"member_names": names, "diversity": {"members": names, "correlation": corr}}
    plot_module._plot_correlation(plot_module._pyplot(), summary, tmp_path / "snapshot_correlation.png")
    fig = drawn["snapshot_correlation.png"]
    heat, bar = fig.axes
    image = heat.get_images()[0]
    expected = [1.0 - v for row in corr for v in row]
    assert [v for row in image.get_array().tolist() for v in row] == pytest.approx(expected, abs=1e-12)
    assert image.get_clim() == pytest.approx((0.0, 0.0035))  # the colours span the values shown
    cells = [t.get_text() for t in heat.texts]
    assert cells == ["0", "0.0035", "0.001", "0.0035", "0", "0.0001", "0.001", "0.0001", "0"]
    assert heat.get_title().startswith("1 - correlation")
    fig.canvas.draw()
    assert bar.yaxis.get_offset_text().get_text() == ""  # no offset label over the title


def test_training_curves_mark_the_cycle_ends(unevaluated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _capture_figures(monkeypatch)
    plot_run(unevaluated)
    info = json.loads((unevaluated / "config.json").read_text())
    assert (info["config"]["epochs"], info["config"]["snapshots"]) == (2, 2)
    assert plot_module.snapshot_epochs(info) == [1.0, 2.0]
    assert plot_module.snapshot_epochs({"config": {"epochs": 3, "snapshots": 2}}, steps_per_epoch=3) == [
        5 / 3, 3.0]  # 9 steps in cycles of 5 + 4: the first ends after step 5, in epoch 2
    for ax in drawn["training_curves.png"].axes:
        marks = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert [line.get_xdata()[0] for line in marks] == [1.0, 2.0]
        assert "cycle end (snapshot)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_price_plot_has_one_point_per_method_at_its_measured_cost(run_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    points = plot_module.price_points(summary)
    assert [p["label"] for p in points] == ["single best", "last snapshot", "ensemble (equal)",
                                            "ensemble (fitted weights)", "ensemble + temperature"]
    assert [p["forward_passes"] for p in points] == [1.0, 1.0, 2.0, 2.0, 2.0]
    drawn: dict[str, object] = {}
    monkeypatch.setattr(plot_module, "_save", lambda fig, path: drawn.update({path.name: fig.axes[0]}))
    plot_module.plot_price(points, tmp_path / "price.png")
    ax = drawn["price.png"]
    assert ax.get_xscale() == "log"
    xy = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert xy == [pytest.approx((1000.0 / p["images_per_second"], p["error"])) for p in points]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "1: single best (1 pass)" and legend[2] == "3: ensemble (equal) (2 passes)"
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3", "4", "5"]
    old = {k: v for k, v in summary.items() if k != "price"}  # a summary from before the price columns
    assert plot_module.price_points(old) == []


# The README's `snapens reproduce` table on digits (test error %, passes, img/s): 25 methods, several of equal
# cost and error, and one far outlier (the weight average of independently initialised models, 82.45 %).
_REPRODUCE_25 = [(1.39, 1, 6858), (1.67, 5, 1070), (1.39, 5, 1070), (1.95, 1, 6858), (1.39, 1, 6536),
                 (0.56, 1, 8890), (0.84, 5, 1336), (0.56, 5, 1336), (0.84, 1, 8890), (0.56, 1, 7405),
                 (0.84, 1, 7371), (1.11, 2, 3838), (0.84, 2, 3838), (1.11, 1, 7371), (0.84, 1, 4354),
                 (1.11, 1, 8884), (0.84, 3, 2931), (0.56, 3, 2931), (0.84, 1, 8884), (0.56, 1, 7274),
                 (3.90, 1, 6173), (2.51, 5, 1134), (2.51, 5, 1134), (82.45, 1, 6173), (2.79, 1, 6409)]


def test_price_plot_of_25_methods_clips_the_outlier_and_keeps_labels_apart(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    points = [{"label": f"method {k}", "error": e, "forward_passes": n, "images_per_second": s}
              for k, (e, n, s) in enumerate(_REPRODUCE_25, start=1)]
    seen: dict[str, object] = {}

    def capture(fig, path: Path) -> None:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        seen.update(ax=ax, ylim=ax.get_ylim(), ticks=[t.get_text() for t in ax.get_xticklabels()],
                    boxes={t.get_text(): t.get_window_extent(renderer) for t in ax.texts})

    monkeypatch.setattr(plot_module, "_save", capture)
    result = plot_module.plot_price(points, tmp_path / "price.png")
    assert result["off_scale"] == [24]
    bottom, top = seen["ylim"]
    assert (bottom, top) == pytest.approx(result["ylim"])
    assert top < 10.0  # the 82.45 % point does not set the scale: the other 24 use the height
    assert all(bottom < e < top for k, (e, _, _) in enumerate(_REPRODUCE_25, start=1) if k != 24)
    ax = seen["ax"]
    edge = [tuple(c.get_offsets()[0]) for c in ax.collections if c.get_offsets()[0][1] == pytest.approx(top)]
    assert edge == [pytest.approx((1000.0 / 6173, top))]  # the outlier sits on the top edge ...
    boxes = seen["boxes"]
    assert "24: 82.45 %" in boxes  # ... with its value written beside it
    numbers = [str(k) for k in range(1, 26) if k != 24]
    assert sorted(boxes) == sorted(numbers + ["24: 82.45 %"])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[23] == "24: method 24 (1 pass): 82.45 %, off the scale" and legend[1] == "2: method 2 (5 passes)"
    # Equal-cost methods (2 and 3, 22 and 23, 9 and 19, ...) get separate, non-overlapping numbers.
    overlaps = [(a, b) for i, a in enumerate(numbers) for b in numbers[i + 1:] if boxes[a].overlaps(boxes[b])]
    assert overlaps == []
    # Few log ticks with plain labels in ms (no 10^-1 mathtext, no minor-tick labels).
    assert 2 <= len(seen["ticks"]) <= 6 and not any("$" in t or "^" in t for t in seen["ticks"])
    assert all(t.get_text() == "" for t in ax.get_xminorticklabels())


def test_price_outliers_need_a_real_gap() -> None:
    assert plot_module.price_outliers([e for e, _, _ in _REPRODUCE_25]) == [23]
    assert plot_module.price_outliers([1.95, 0.56, 0.56, 0.56, 0.56]) == []  # the only spread there is
    assert plot_module.price_outliers([40.0, 42.0, 45.0, 41.0, 44.0, 43.0, 47.0, 46.0]) == []
    assert plot_module.price_outliers([1.0, 1.2, 1.1, 30.0, 0.9, 1.3, 1.0, 45.0]) == [7, 3]  # highest first
    assert plot_module.price_outliers([1.0, 50.0, 1.1]) == []  # at most a quarter of the points
    assert plot_module.price_outliers([float("nan"), 1.0, 1.1, 1.2, 99.0]) == [4]


# ------------------------------------------------------------------- one input contract (issue 20.3)


def _digits_test_images(run_dir: Path) -> torch.Tensor:
    info = json.loads((run_dir / "config.json").read_text())
    cfg = info["config"]
    return load_dataset(cfg["dataset"], val_size=cfg["val_size"], seed=cfg["seed"]).test.images[:13]


def _exported_with_reference(run_dir: Path, out: Path) -> tuple:
    """``snapens export RUN OUT`` in fp32, the loaded module and its description, 13 uint8 digits test images and
    the ensemble's probabilities on them (what the module must give)."""
    assert main(["export", str(run_dir), str(out), "--quiet", "--precision", "fp32"]) == 0
    module, meta = load_exported(out)
    u8 = _digits_test_images(run_dir)
    return module, meta, u8, SnapshotEnsemble.from_run(run_dir, build_model, precision="fp32").predict_proba(u8)

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load is deprecated, still supported
def test_exported_torchscript_keeps_the_ensembles_input_contract(run_dir: Path, tmp_path: Path) -> None:
    module, meta, u8, expected = _exported_with_reference(run_dir, tmp_path / "ens.pt")
    assert meta["input_dtypes"] == ["uint8", "float32"] and meta["input_shape"] == ["N", 1, 8, 8]
    with torch.no_grad():  # uint8 pixels give the ensemble's probabilities (before: 0..255 fed as floats)
        torch.testing.assert_close(module(u8), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(module(u8.float() / 255), expected, atol=1e-5, rtol=0)
    for bad, message in [(u8.long(), "got another dtype"), (u8.to(torch.int16), "got another dtype"),
                         (u8 > 128, "got another dtype"), (u8.float(), "got values in [0"),
                         (u8.float().expand(-1, 3, -1, -1) / 255, "expected images [N, 1, 8, 8]"),
                         (torch.rand(2, 1, 16, 16), "got a tensor of shape [2, 1, 16, 16]"),
                         (torch.rand(8, 64), "expected images [N, 1, 8, 8]")]:
        with pytest.raises(torch.jit.Error, match="snapens: expected") as info:
            module(bad)
        assert message in str(info.value)


def test_exported_program_refuses_what_it_can_and_says_what_it_cannot(run_dir: Path, tmp_path: Path) -> None:
    module, meta, u8, expected = _exported_with_reference(run_dir, tmp_path / "ens.pt2")
    with torch.no_grad():
        torch.testing.assert_close(module(u8.float() / 255), expected, atol=1e-5, rtol=0)
    # 0..255 floats, uint8 and int64 pixels are refused by the in-graph range check with the conversion to do
    for bad in (u8.float(), u8, u8.long()):
        with pytest.raises(RuntimeError, match=r"snapens: expected float32 images in \[0, 1\].*x.float\(\) / 255"):
            module(bad)
    for bad in (torch.rand(2, 3, 8, 8), torch.rand(2, 1, 16, 16)):  # other channels or sizes: torch.export's guard
        with pytest.raises(Exception, match="size"):
            module(bad)
    assert meta["input_dtypes"] == ["float32"] and "does NOT check the dtype" in meta["input_checks"]


def test_export_refuses_an_edited_image_shape_with_one_line(unevaluated: Path, tmp_path: Path, cli_error) -> None:
    # Review fix: config.json's dataset.image_shape hand-edited to [1, 16, 16] on an 8x8 run: load_run_dataset
    # (so export, evaluate, plot) refuses it with one line, before any file is written.
    _edit_config(unevaluated, lambda i: i["dataset"].update(image_shape=[1, 16, 16]))
    out = tmp_path / "ens.pt"
    message = cli_error("export", unevaluated, out, "--precision", "fp32", "--weights", "equal")
    assert "dataset.image_shape [1, 16, 16] is not the shape of the run's images [1, 8, 8]" in message
    assert not out.exists()
    assert "dataset.image_shape" in cli_error("evaluate", unevaluated, "--device", "cpu", "--quiet")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load is deprecated, still supported
def test_export_removes_a_module_that_refuses_the_runs_images(unevaluated: Path, tmp_path: Path, cli_error,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Review fix: should a written .pt refuse the run's own images (a torch.jit.Error from its input checks,
    # here with load_run_dataset's shape check bypassed), export says so in one line and removes the file.
    from snapens.workflows import exporting

    real = exporting.load_run_dataset

    def unchecked(info: dict, **kw):
        return real({**info, "dataset": {k: v for k, v in info["dataset"].items() if k != "image_shape"}}, **kw)

    monkeypatch.setattr(exporting, "load_run_dataset", unchecked)
    _edit_config(unevaluated, lambda i: i["dataset"].update(image_shape=[1, 16, 16]))
    out = tmp_path / "ens.pt"
    message = cli_error("export", unevaluated, out, "--precision", "fp32", "--weights", "equal")
    assert "refuses the run's test images" in message and "was removed" in message
    assert not out.exists() and not list(tmp_path.glob(".*.tmp*"))


def test_export_fitted_weights_drop_the_members_that_do_not_count(unevaluated: Path, tmp_path: Path) -> None:
    # Review fix: fitted weights [1.7e-16, 1.0] export the last snapshot alone (weighting.prune_weights), and the
    # description says which members were dropped and why; weights above the threshold keep every member.
    from snapens import weighting
    from snapens.cli import export as export_cli

    assert f"below {weighting.DROP_BELOW:g} are left out" in " ".join(export_cli.__doc__.split())
    run = unevaluated
    (run / "ensemble_weights.json").write_text(json.dumps({"members": ["snapshot-01", "snapshot-02"],
                                                           "weights": [1.7e-16, 1.0 - 1.7e-16]}))
    out = tmp_path / "ens.pt2"
    assert main(["export", str(run), str(out), "--weights", "fitted", "--quiet", "--precision", "fp32"]) == 0
    module, meta = load_exported(out)
    assert meta["members"] == ["snapshot-02"] and meta["weights"] == [1.0] and meta["weights_source"] == "fitted"
    assert meta["fitted"]["dropped"] == ["snapshot-01"] and meta["fitted"]["drop_below"] == weighting.DROP_BELOW
    raw, expected = _reference(run, weights=[0.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(module(raw), expected, atol=1e-5, rtol=0)
    (run / "ensemble_weights.json").write_text(json.dumps({"members": ["snapshot-01", "snapshot-02"],
                                                           "weights": [0.25, 0.75]}))
    both = tmp_path / "both.pt2"
    assert main(["export", str(run), str(both), "--weights", "fitted", "--quiet", "--precision", "fp32"]) == 0
    meta = load_exported(both)[1]
    assert meta["members"] == ["snapshot-01", "snapshot-02"] and meta["weights"] == pytest.approx([0.25, 0.75])
    assert meta["fitted"]["dropped"] == []
