"""Tests for ``snapens train``: end to end, legacy flags, errors (one line, exit 2, nothing touched), signals."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from snapens import checkpoint, runs
from snapens.cli import build_parser, main
from snapens.cli.train import config_from_args
from snapens.config import AUTO_MIN_CYCLE_EPOCHS, PRESETS, TrainConfig

# Small and fast: 4 epochs of digits, M = 2, one thread (bit-identical across processes), no progress bars.
SMALL = ["--epochs", "4", "--snapshots", "2", "--threads", "1", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(autouse=True)
def _restore_torch_and_logging():
    threads = torch.get_num_threads()
    log = logging.getLogger("snapens")
    handlers, level = list(log.handlers), log.level
    yield
    torch.set_num_threads(threads)
    log.handlers[:] = handlers
    log.setLevel(level)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One small finished run, trained in this process; returns (run_dir, stdout)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    out = io.StringIO()  # capsys is function-scoped: capture stdout by hand
    log = logging.getLogger("snapens")
    handlers, level = list(log.handlers), log.level
    try:
        with contextlib.redirect_stdout(out):
            rc = main(["train", *SMALL, "--run-dir", str(run_dir), "--quiet"])
    finally:
        torch.set_num_threads(threads)
        log.handlers[:] = handlers
        log.setLevel(level)
    assert rc == 0
    return run_dir, out.getvalue()


def folder_hash(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshots(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    store = checkpoint.SnapshotStore(run_dir / "snapshots")
    return [store.load_state_dict(i.index) for i in store.list()]


# --------------------------------------------------------------------------------------------- end to end


def test_small_run_writes_the_run_folder(finished_run: tuple[Path, str]) -> None:
    run_dir, out = finished_run
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["format_version"] == 1
    expected = TrainConfig(epochs=4, snapshots=2, threads=1, device="cpu", precision="fp32")
    assert cfg["config"] == json.loads(json.dumps(expected.to_dict()))
    assert cfg["model"] == {"name": "cnn-small", "kwargs": {"num_classes": 10, "in_channels": 1}}
    ds = cfg["dataset"]
    assert ds["name"] == "digits" and ds["classes"] == [str(d) for d in range(10)]
    assert ds["num_train"] + ds["num_val"] + ds["num_test"] == 1797 and ds["num_val"] > 0
    assert set(cfg["environment"]) >= {"snapens", "torch", "python", "device", "precision", "threads", "platform"}
    assert cfg["environment"]["precision"] == "fp32" and cfg["environment"]["threads"] == 1

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps_per_epoch = -(-ds["num_train"] // 64)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in rows] == [steps_per_epoch * e for e in (1, 2, 3, 4)]
    infos = checkpoint.SnapshotStore(run_dir / "snapshots").list()
    assert [i.step for i in infos] == [2 * steps_per_epoch, 4 * steps_per_epoch]
    assert all(i.model_name == "cnn-small" and i.model_kwargs == cfg["model"]["kwargs"] for i in infos)
    _, meta = checkpoint.load_weights(run_dir / "best.safetensors")
    assert meta["val_acc"] == pytest.approx(max(float(r["val_acc"]) for r in rows), abs=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ensemble_equal"]["error"] < 10.0  # 4 epochs of digits: well past chance (90 %)

    assert "device cpu, precision fp32, threads 1" in out
    assert f"run dir: {run_dir}" in out
    assert "ensemble" in out and "error %" in out  # the evaluation table was printed


def test_one_epoch_run_says_each_thing_once_in_the_singular(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--snapshots", "1", "--threads", "1", "--device", "cpu", "--precision", "fp32",
            "--run-dir", str(run_dir)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert text.count("dataset digits:") == 1, text  # not again when the run is evaluated at the end
    assert "dataset digits: 1294 train, 144 val, 359 test images, 10 classes" in captured.err
    assert "snapens train: digits, cnn-small, 1 epoch, M=1 snapshot (cosine-cycles" in captured.out
    assert "1 member (choices made on 144 validation images)" in captured.out
    assert "epochs" not in captured.out.split("\n")[0] and "members" not in captured.out


def test_unknown_model_is_a_short_error_that_says_how_to_list_them(tmp_path: Path, cli_error) -> None:
    message = cli_error("train", "--model", "resnet-x", "--run-dir", tmp_path / "run")
    assert len(message) < 250, message
    assert message.startswith("unknown model name 'resnet-x'; expected wrn-D-K,")
    assert "e.g. wrn-16-4" in message and message.endswith("`snapens train --list-models` lists them all")
    assert not (tmp_path / "run").exists()


def test_list_models_names_every_form_and_example(capsys: pytest.CaptureFixture[str]) -> None:
    from snapens.models import build_model, list_models

    assert main(["train", "--list-models"]) == 0
    out = capsys.readouterr().out
    for form in ("wrn-D-K:", "densenet-D-K:", "densenet-bc-D-K:", "resnet-D:", "cnn-small:"):
        assert form in out
    examples = out.split("examples: ")[1].strip().split(", ")
    assert examples == list_models() and len(examples) > 5
    build_model(examples[0], num_classes=10)  # the names listed build


@pytest.mark.slow
def test_true_default_run(tmp_path: Path) -> None:
    """`snapens train` with no arguments at all: the embedded default, evaluated, in runs/<...>."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snapens", "train"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("digits-cnn-small-")
    assert f"run dir: runs/{runs[0].name}" in proc.stdout
    d = TrainConfig()
    assert len(snapshots(runs[0])) == d.snapshots
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["ensemble_equal"]["error"] < 3.5, summary["ensemble_equal"]  # ~97-99 % accuracy
    rows = ("snapshots", "single_best", "last_snapshot", "ensemble_equal", "ensemble_weighted",
            "ensemble_temperature", "ensemble_size_curve", "diversity")
    assert all(summary.get(row) is not None for row in rows), {row: summary.get(row) for row in rows}
    pngs = sorted((runs[0] / "plots").glob("*.png"))
    assert len(pngs) == 5 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    print(f"default snapens train took {seconds:.1f} s")


def test_list_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


# ------------------------------------------------------------------------------------------- legacy flags


def _cfg(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("old,new", [
    (["--M", "5", "--nb_epoch", "200", "--alpha_zero", "0.2", "--model", "wrn", "--wrn_N", "2", "--wrn_k", "4"],
     ["--snapshots", "5", "--epochs", "200", "--lr", "0.2", "--model", "wrn-16-4"]),
    (["--model", "wrn", "--wrn_N", "4", "--wrn_k", "10"], ["--model", "wrn-28-10"]),
    (["--model", "wrn"], ["--model", "wrn-16-4"]),
    (["--model", "dn", "--dn_depth", "100", "--dn_growth_rate", "24", "--M", "6"],
     ["--model", "densenet-100-24", "--snapshots", "6"]),
    (["--model", "dn"], ["--model", "densenet-40-12"]),
])
def test_legacy_flags_equal_new_flags(old: list[str], new: list[str]) -> None:
    assert _cfg(old) == _cfg(new)
    assert _cfg(old) != _cfg([])


def test_flags_override_preset_and_defaults_come_from_trainconfig() -> None:
    assert _cfg([]) == TrainConfig()
    cfg = _cfg(["--preset", "paper-wrn-32-4-cifar10", "--lr", "0.1", "--no-nesterov", "--no-augment"])
    assert (cfg.model, cfg.epochs, cfg.snapshots, cfg.lr, cfg.nesterov, cfg.augment) == (
        "wrn-32-4", 200, 5, 0.1, False, False)
    assert _cfg(["--val-size", "0.2"]).val_size == 0.2 and _cfg(["--val-size", "100"]).val_size == 100


# ------------------------------------------------------------------------------------------------ errors


def _error_case(argv: list[str], folder: Path, capsys: pytest.CaptureFixture[str], match: str) -> None:
    before = folder_hash(folder)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapens: error: "), err
    assert match in lines[0]
    assert "Traceback" not in err
    assert folder_hash(folder) == before


@pytest.mark.parametrize("extra,spec", [
    # 4 epochs: the step shape for 2, then cycles of 1 epoch with a snapshot at each middle
    (["--schedule", "fge", "--cycle-epochs", "1"], "fge"),
    # the SWA rate from the start of epoch 3: a snapshot at the end of epochs 3 and 4
    (["--schedule", "swa", "--swa-start", "0.5", "--swa-lr", "0.02"], "swa"),
    (["--cycle-decay", "0.5", "--cycle-mult", "2"], "shaped"),
])
def test_new_schedules_train_on_digits(tmp_path: Path, extra: list[str], spec: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from snapens.schedule import cosine_snapshot_steps, fge_snapshot_steps, swa_snapshot_steps

    run_dir = tmp_path / "run"
    small = SMALL if spec == "shaped" else [a for a in SMALL if a not in ("--snapshots", "2")]  # M: cosine only
    assert main(["train", *small, *extra, "--run-dir", str(run_dir), "--quiet", "--no-eval"]) == 0
    cfg = json.loads((run_dir / "config.json").read_text())
    spe = -(-cfg["dataset"]["num_train"] // 64)
    total = 4 * spe
    expected = {"fge": fge_snapshot_steps(total, spe, 0.5), "swa": swa_snapshot_steps(total, spe, 0.5),
                "shaped": cosine_snapshot_steps(total, 2, 2.0)}[spec]
    infos = checkpoint.SnapshotStore(run_dir / "snapshots").list()
    assert [i.step for i in infos] == [s + 1 for s in expected]
    if spec == "fge":
        assert len(infos) == 2 and cfg["config"]["cycle_epochs"] == 1
    if spec == "swa":
        assert [i.step for i in infos] == [3 * spe, 4 * spe] and cfg["config"]["swa_lr"] == 0.02
        assert [i.lr for i in infos] == pytest.approx([0.02] * 2)
    if spec == "shaped":
        assert cfg["config"]["cycle_decay"] == 0.5 and cfg["config"]["cycle_mult"] == 2.0
    out = capsys.readouterr().out
    assert f"{len(infos)} snapshots" in out if spec != "shaped" else "M=2 snapshots" in out


@pytest.mark.parametrize("extra,match", [
    (["--model", "nope-3"], "nope-3"),
    (["--dataset", "nope"], "nope"),
    (["--preset", "nope"], "nope"),
    (["--snapshots", "5", "--epochs", "3"], "must not exceed epochs"),
    (["--lr", "-0.1"], "lr must be > 0"),
    (["--batch-size", "0"], "batch size"),
    (["--dataset", "cifar10", "--data-dir", "NODATA"], "cifar"),
    (["--M", "5", "--snapshots", "4"], "disagree"),
    (["--wrn_N", "2"], "--model wrn"),
    (["--threads", "0"], "threads"),
    (["--precision", "fp16", "--device", "cpu"], "fp16"),
    (["--schedule", "step", "--lr-min", "0.01"], "lr_min"),
    (["--schedule", "fge", "--fge-start", "1.2"], "fge_start must be a fraction of the budget in (0, 1), got 1.2"),
    # found once the data is read (its INFO line goes to stderr unless --quiet): longer than the 2 epochs left
    (["--schedule", "fge", "--epochs", "4", "--cycle-epochs", "3", "--quiet"], "cycle_epochs=3 ("),
    (["--cycle-mult", "0.5"], "cycle_mult must be >= 1"),
    (["--cycle-mult", "30", "--quiet"], "every cycle needs at least one step"),
    (["--schedule", "swa", "--swa-start", "1.5"], "got 1.5"),
    (["--fge-start", "0.3"], "applies to the fge schedule"),
    (["--schedule", "swa", "--snapshots", "3"], "the swa schedule takes as many snapshots as its budget holds"),
    (["--snapshots", "auto", "--M", "5"], "--snapshots auto and --M 5 disagree"),
    (["--schedule", "fge", "--snapshots", "auto"], "--snapshots auto applies to cosine-cycles, step, single-cycle; "
                                                   "the fge schedule takes as many snapshots"),
    (["--dataset", "nope", "--snapshots", "auto"], "nope"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        extra: list[str], match: str) -> None:
    extra = [str(tmp_path / "nodata") if a == "NODATA" else a for a in extra]
    _error_case(["train", "--run-dir", str(tmp_path / "run"), *extra], tmp_path, capsys, match)
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    _error_case(["train", "--run-dir", str(afile), *SMALL], tmp_path, capsys, "is a file")


def test_config_records_absolute_data_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapens.workflows.training import _absolute_data_paths

    monkeypatch.chdir(tmp_path)
    cfg = _absolute_data_paths(TrainConfig(dataset="folder:imgs", epochs=2, snapshots=1))
    assert cfg.dataset == f"folder:{tmp_path.resolve() / 'imgs'}" and cfg.data_dir is None
    cfg = _absolute_data_paths(TrainConfig(dataset="cifar10", data_dir="d", epochs=2, snapshots=1))
    assert cfg.data_dir == str(tmp_path.resolve() / "d")
    assert _absolute_data_paths(TrainConfig(epochs=2, snapshots=1)) == TrainConfig(epochs=2, snapshots=1)


def test_resume_errors_leave_runs_untouched(finished_run: tuple[Path, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = finished_run
    _error_case(["train", "--resume", "--run-dir", str(run_dir)], run_dir, capsys, "already finished")
    _error_case(["train", "--run-dir", str(run_dir), *SMALL], run_dir, capsys, "already holds a run")
    _error_case(["train", "--resume", "--run-dir", str(run_dir), "--lr", "0.3"], run_dir, capsys,
                "do not change --lr")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    _error_case(["train", "--resume", "--run-dir", str(foreign)], foreign, capsys, "not a snapens run folder")
    _error_case(["train", "--resume"], tmp_path, capsys, "--resume needs --run-dir")


def test_snapshots_auto_run_records_the_picked_m_and_resume_accepts_auto_again(
        finished_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from snapens.cli.train import _resume_config

    run_dir = tmp_path / "auto"
    argv = ["train", "--epochs", "12", "--snapshots", "auto", "--limit-train", "128", "--threads", "1",
            "--device", "cpu", "--precision", "fp32", "--run-dir", str(run_dir), "--quiet", "--no-eval"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 epochs, M=2 snapshots (auto: 12 epochs // 6) (cosine-cycles" in out
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    assert (saved["snapshots"], saved["snapshots_auto"]) == (2, True)
    assert len(snapshots(run_dir)) == 2
    # The repeated command is accepted (up to the finished run's own refusal), and the stored M wins even once
    # the table has changed.
    _error_case([*argv, "--resume"], run_dir, capsys, "already finished")
    monkeypatch.setitem(AUTO_MIN_CYCLE_EPOCHS, "digits", 3)
    cfg = _resume_config(build_parser().parse_args([*argv, "--resume"]))
    assert (cfg.snapshots, cfg.snapshots_auto) == (2, True)
    assert _cfg(["--epochs", "12", "--snapshots", "auto"]).snapshots == 4  # new runs read the new table
    # a run with an explicit M is not an auto run
    _error_case(["train", "--resume", "--run-dir", str(finished_run[0]), "--snapshots", "auto"], finished_run[0],
                capsys, "do not change --snapshots")


@pytest.mark.parametrize("extra,match", [
    (["--snapshots", "x"], "train: argument --snapshots: expected an integer M or auto, got 'x'"),
    (["--snapshots", "2.5"], "expected an integer M or auto, got '2.5'"),
    (["--M", "auto"], "argument --M: invalid int value: 'auto'"),  # the legacy flag stays an integer
])
def test_bad_snapshots_value_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                extra: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--run-dir", str(tmp_path / "run"), *extra])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapens: error: ") and match in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_explicit_snapshots_are_never_replaced_by_auto() -> None:
    assert (_cfg(["--epochs", "12", "--snapshots", "5"]).snapshots, _cfg(["--epochs", "12"]).snapshots) == (5, 5)
    assert not _cfg(["--epochs", "12", "--M", "5"]).snapshots_auto
    assert _cfg(["--preset", "paper-densenet-40-12-cifar10"]).snapshots == 6
    cfg = _cfg(["--preset", "paper-densenet-40-12-cifar10", "--snapshots", "auto"])
    assert (cfg.snapshots, cfg.snapshots_auto) == (6, True)  # 300 epochs // 16, at most 6


# --------------------------------------------------------------------------------------- kill and resume

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from snapens.schedule import SnapshotLR
    from snapens.cli import main

    kill = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}[os.environ["SIGNAL"]]
    at = int(os.environ.get("AT_STEP", "-1"))
    kill_replace = os.environ.get("KILL_ON_REPLACE")
    real_step, real_replace = SnapshotLR.step, os.replace

    def step(self, *a, **k):
        real_step(self, *a, **k)
        if self.last_epoch == at:
            os.kill(os.getpid(), kill)

    def replace(src, dst, *a, **k):
        if kill_replace and Path(dst).name == kill_replace:
            os.kill(os.getpid(), kill)  # the temp file is complete, the rename never happens
        return real_replace(src, dst, *a, **k)

    SnapshotLR.step = step
    os.replace = replace
    sys.exit(main(sys.argv[1:]))
""")


def test_kills_and_a_sigterm_then_resume_match_uninterrupted_with_the_recorded_threads_and_no_eval(
        finished_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI's one end-to-end kill-and-resume (engine.fit's own is in test_engine): two SIGKILLs and a SIGTERM,
    # then the snapshots are the uninterrupted run's to the bit. Items 10, 2 and "--no-eval is kept": a default
    # thread count (no --threads; one thread via OMP here).
    reference, _ = finished_run
    run_dir = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    small = [a for a in SMALL if a not in ("--threads", "1")]
    argv = [sys.executable, str(driver), "train", *small, "--run-dir", str(run_dir), "--no-eval", "--quiet"]
    resume = [*argv[:2], "train", "--resume", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps_per_epoch = -(-json.loads((reference / "config.json").read_text())["dataset"]["num_train"] // 64)
    # (a) SIGKILL after config.json, while the first state.pt is being renamed into place.
    proc = subprocess.run(argv, env={**env, "SIGNAL": "KILL", "KILL_ON_REPLACE": "state.pt"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run_dir / "config.json").is_file() and not (run_dir / "state.pt").exists()
    info = json.loads((run_dir / "config.json").read_text())
    assert info["config"]["threads"] == 1 and info["evaluate"] is False  # the resolved count, not null
    # (b) Resuming with another thread count warns; SIGKILL at step 3, before the first epoch end, leaves the
    # state written before step 1: the run resumes from the start.
    proc = subprocess.run([*resume, "--threads", "2"], env={**env, "SIGNAL": "KILL", "AT_STEP": "3"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "will differ" in proc.stderr and "uninterrupted" in proc.stderr
    state = runs.read_resume_state(run_dir)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 0, 0)
    # (c) Resume (the run's 1 thread), SIGTERM in mid-epoch 3 (after snapshot 1): exit 143, a message, a mid-epoch
    # state.
    proc = subprocess.run(resume, env={**env, "SIGNAL": "TERM", "AT_STEP": str(2 * steps_per_epoch + 3)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM" in proc.stderr and "--resume" in proc.stderr
    state = runs.read_resume_state(run_dir)
    assert (state["epoch"], state["batch"]) == (2, 3)
    # (d) Finish here with torch at 2 threads and no --threads: the run's 1 thread is used, bits are the same.
    torch.set_num_threads(2)
    assert main(["train", "--resume", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "threads 1" in out
    assert not (run_dir / "summary.json").exists()  # --no-eval was kept
    ref, got = snapshots(reference), snapshots(run_dir)
    assert len(ref) == len(got) == 2
    for a, b in zip(ref, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 5  # header + 4 epochs, none twice
    assert not list(run_dir.rglob(".*.tmp"))


def _copy_run(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def test_resume_of_a_trained_but_unevaluated_run_evaluates_it(finished_run: tuple[Path, str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Item 11: killed during the final evaluation / plots: no summary.json, a stale temp file in plots/.
    run_dir = _copy_run(finished_run[0], tmp_path / "run")
    (run_dir / "summary.json").unlink()
    (run_dir / "plots").mkdir(exist_ok=True)
    stale = [run_dir / "plots" / ".lr.png.0123abcd.tmp.png", run_dir / ".summary.json.0123abcd.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    snaps = folder_hash(run_dir / "snapshots")
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "was not evaluated: evaluating it" in out and "ensemble" in out
    assert json.loads((run_dir / "summary.json").read_text())["ensemble_equal"]["error"] < 10.0
    assert not any(path.exists() for path in stale)
    assert folder_hash(run_dir / "snapshots") == snaps  # nothing was retrained
    # Evaluated now: a further --resume is refused as before.
    _error_case(["train", "--resume", "--run-dir", str(run_dir)], run_dir, capsys, "already finished")


def test_a_plot_failure_is_a_warning_and_exit_0(finished_run: tuple[Path, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Item 12: plots are optional output; the training (here: its final evaluation) stays a success.
    import snapens.workflows.plotting

    def unwritable(*a, **k):
        raise PermissionError(13, "Permission denied", "plots/lr.png")

    monkeypatch.setattr(snapens.workflows.plotting, "plot_run", unwritable)
    run_dir = _copy_run(finished_run[0], tmp_path / "run")
    (run_dir / "summary.json").unlink()
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "snapens: warning: plots not written" in captured.err and "Permission denied" in captured.err
    assert f"snapens plot {run_dir}" in captured.err and "Traceback" not in captured.err
    assert (run_dir / "summary.json").is_file()


def test_an_empty_test_split_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Item 13: found before step 1, not after the whole training.
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for k in range(6):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / cls / f"{k}.png")
    (root / "test").mkdir()
    run_dir = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{root}", "--model", "cnn-small", "--epochs", "1", "--snapshots", "1",
            "--val-size", "0", "--device", "cpu", "--run-dir", str(run_dir), "--quiet"]
    _error_case(argv, tmp_path / "none", capsys, "test split")
    assert not run_dir.exists()
    assert main([*argv, "--no-eval"]) == 0  # without the evaluation an empty test split is fine
    capsys.readouterr()


def test_disk_full_is_one_line_and_leaves_a_resumable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Item 14: the disk fills while the epoch-1 state is written (a raw file that takes 20 kB, then fails).
    import errno

    import builtins

    from snapens import _io

    state_writes = []

    class FullDisk(io.FileIO):
        room = 20_000  # more than the file buffer: torch.save itself sees the failed write

        def write(self, b):  # like a real file on a full disk: a short write, then ENOSPC
            n = min(len(b), FullDisk.room)
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            FullDisk.room -= n
            return super().write(bytes(b)[:n])

    def fake_open(file, mode="r", *a, **k):  # the atomic writer's temp file of the second state write
        if ".state.pt." in str(file) and "x" in mode:
            state_writes.append(file)
            if len(state_writes) == 2:
                return io.BufferedWriter(FullDisk(file, "xb"))
        return builtins.open(file, mode, *a, **k)

    monkeypatch.setattr(_io, "open", fake_open, raising=False)
    run_dir = tmp_path / "run"
    before = time.time()
    rc = main(["train", *SMALL, "--run-dir", str(run_dir), "--quiet", "--no-eval"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapens: error: ") and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and "state.pt" in lines[0]
    assert time.time() - before < 250
    assert runs.read_resume_state(run_dir)["step"] == 0  # the state before it is whole and resumable
    assert not list(run_dir.rglob(".*.tmp"))


def test_a_folder_in_use_is_refused_by_every_writing_command(finished_run: tuple[Path, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Item 1: another process owns the folder (the lock is exclusive across open files, also in one process).
    from snapens._lock import run_lock

    new = tmp_path / "new"
    run_dir = _copy_run(finished_run[0], tmp_path / "run")
    with run_lock(new, create=True), run_lock(run_dir):
        _error_case(["train", *SMALL, "--run-dir", str(new)], tmp_path, capsys, "in use by another snapens process")
        assert os.listdir(new) == [".lock"]  # no config.json: refused before anything is written
        for argv in (["train", "--resume", "--run-dir", str(run_dir)], ["evaluate", str(run_dir)],
                     ["plot", str(run_dir)], ["export", str(run_dir), str(run_dir / "ens.pt2")]):
            _error_case(argv, run_dir, capsys, f"{run_dir} is in use by another snapens process")


def test_two_trainers_on_one_folder_one_wins(tmp_path: Path) -> None:
    # Item 1, the reported race: both start at once; one trains, the other stops with one line, and
    # config.json is the winner's (before: both passed the "already holds a run" check).
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "snapens", "train", "--epochs", "2", "--snapshots", "1", "--threads", "1",
            "--device", "cpu", "--precision", "fp32", "--no-eval", "--quiet", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {seed: subprocess.Popen([*base, "--seed", str(seed), *(["--lr", "0.05"] if seed == 4 else [])],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (3, 4)}
    results = {seed: (p.wait(timeout=300), p.stderr.read() if p.stderr else "") for seed, p in procs.items()}
    for p in procs.values():
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
    assert sorted(rc for rc, _ in results.values()) == [0, 2], results
    winner = next(seed for seed, (rc, _) in results.items() if rc == 0)
    loser_err = next(err for rc, err in results.values() if rc == 2)
    lines = loser_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapens: error: "), loser_err
    assert "in use by another snapens process" in lines[0] or "already holds a run" in lines[0]
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert (cfg["seed"], cfg["lr"]) == (winner, 0.05 if winner == 4 else TrainConfig().lr)
    assert runs.load_training_state(run_dir / "state.pt")["finished"]


@pytest.mark.parametrize("options,rates", [
    # issue 20.15: fge and swa said "lr 0.1 -> 0"; the header states the rates their schedules run
    ({"schedule": "fge"}, "(fge, lr 0.1 step phase, then cycles 0.05 -> 0.0005)"),
    ({"schedule": "fge", "lr": 0.2, "fge_lr1": 0.25, "fge_lr2": 0.01},
     "(fge, lr 0.2 step phase, then cycles 0.05 -> 0.002)"),
    ({"schedule": "swa"}, "(swa, lr 0.1 -> swa_lr 0.05 constant from 75% of the budget)"),
    ({"schedule": "swa", "swa_lr": 0.02, "swa_start": 0.5},
     "(swa, lr 0.1 -> swa_lr 0.02 constant from 50% of the budget)"),
    ({"schedule": "step"}, "(step, lr 0.1, x0.1 at 50% and 75% of the budget)"),
    ({"schedule": "cosine-cycles", "lr": 0.2, "lr_min": 0.001}, "(cosine-cycles, lr 0.2 -> 0.001)"),
])
def test_header_states_the_schedules_rates(options: dict, rates: str) -> None:
    from snapens.workflows.training import run_header

    cfg = TrainConfig(dataset="digits", model="cnn-small", epochs=8, **options)
    header = run_header(cfg, Path("run"), torch.device("cpu"), "fp32", 1, n_snapshots=3)
    assert rates in header.splitlines()[0], header


def test_no_eval_quiet_prints_the_run_dir_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 20 item 18: the header's "run dir:" line was printed again at the end, right below it.
    run_dir = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--snapshots", "1", "--limit-train", "200", "--threads", "1",
                 "--device", "cpu", "--precision", "fp32", "--no-eval", "--quiet", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("run dir:") == 1 and out.rstrip().endswith(f"run dir: {run_dir}"), out


def test_resume_refuses_a_split_other_than_the_recorded_one(finished_run: tuple[Path, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Review fix: config.json's seed edited after a kill before the first step (config.json alone): the rebuilt
    # split is not the recorded one (dataset.split_sha256), so --resume refuses before training, nothing written.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = json.loads((finished_run[0] / "config.json").read_text())
    info["config"]["seed"] = 7
    (run_dir / "config.json").write_text(json.dumps(info))
    before = (run_dir / "config.json").read_bytes()
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapens: error: "), err
    assert "is not the one the run was trained on" in lines[0] and "seed 7" in lines[0]
    # only the (empty) lock file of the refused call beside config.json, unchanged
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == ["config.json"]
    assert (run_dir / "config.json").read_bytes() == before and not runs.run_exists(run_dir)
