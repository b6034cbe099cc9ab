"""`snapens reproduce` with a tiny budget, and its table of the paper's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from snapens.cli import main
from snapens.cli.reproduce import format_reproduce
from snapens.workflows.reproduction import PAPER_TABLE1, _mean_std, paper_errors


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()  # --threads 1 sets torch's global thread count
    yield
    torch.set_num_threads(before)


def test_reproduce_tiny_budget_writes_all_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               restore_threads: None) -> None:
    out = tmp_path / "repro"
    argv = ["reproduce", "--epochs", "2", "--snapshots", "2", "--batch-size", "128", "--device", "cpu",
            "--threads", "1", "--precision", "fp32", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "reproduce.json").read_text())
    assert result["format_version"] == 1 and result["seeds"] == [0]
    assert result["config"]["model"] == "cnn-small" and result["config"]["dataset"] == "digits"
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"single", "nocycle", "single_fitted", "single_recommended", "single_average",
                         "snapshot_last", "se_equal", "se_fitted", "snapshot_recommended", "snapshot_average"}
    assert all(r["paper"] is None for r in rows.values())  # the paper has no digits numbers
    # Every row is the named entry of the named run's summary.
    summaries = {s: json.loads((out / f"{s}-seed0" / "summary.json").read_text()) for s in ("step", "cosine-cycles")}
    assert rows["single"]["errors"] == pytest.approx([summaries["step"]["last_snapshot"]["error"]])
    assert rows["nocycle"]["errors"] == pytest.approx([summaries["step"]["ensemble_equal"]["error"]])
    assert rows["se_equal"]["errors"] == pytest.approx([summaries["cosine-cycles"]["ensemble_equal"]["error"]])
    assert rows["se_fitted"]["errors"] == pytest.approx([summaries["cosine-cycles"]["ensemble_weighted"]["error"]])
    for schedule, method in (("step", "single"), ("cosine-cycles", "snapshot")):  # what the user gets (issue 21)
        recommended, row = summaries[schedule]["ensemble_recommended"], rows[f"{method}_recommended"]
        assert row["errors"] == pytest.approx([recommended["error"]])
        assert row["forward_passes_mean"] == recommended["forward_passes"] == sum(w > 0 for w in recommended["weights"])
    assert summaries["step"]["run"]["schedule"] == "step"
    assert summaries["step"]["run"]["precision"] == "fp32" == result["config"]["precision"]  # trained and evaluated
    assert summaries["cosine-cycles"]["run"]["schedule"] == "cosine-cycles"
    for r in rows.values():
        assert r["std"] == 0.0 and r["mean"] == pytest.approx(r["errors"][0])
        assert f"{r['mean']:.2f}" in printed
    assert "NoCycle snapshot ensemble" in printed and "no Table 1 numbers" in printed
    # A second reproduction into the same folder is refused instead of mixing runs.
    assert main(argv) == 2
    assert "already holds a reproduction" in capsys.readouterr().err


def test_paper_table_is_the_quoted_table() -> None:
    assert len(PAPER_TABLE1) == 14  # 3 models x 4 datasets + DenseNet-100 on 2
    assert paper_errors("wrn-32-4", "cifar100", 0.2) == {
        "single": 23.55, "nocycle": 22.81, "se_equal": 21.56, "se_fitted": None, "single_cycle": None}
    assert paper_errors("resnet-110", "svhn", 0.1)["se_equal"] == 1.63
    assert paper_errors("densenet-40-12", "cifar10-jpeg", 0.2)["single"] == 5.24  # CIFAR-10 as JPEGs
    assert paper_errors("densenet-100-24", "svhn", 0.2)["single"] is None  # not in the paper
    assert paper_errors("densenet-100-24", "cifar10", 0.05)["se_equal"] is None  # lr0 the paper did not run


def test_mean_std_over_seeds_and_table() -> None:
    mean, std = _mean_std([1.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2.0))  # sample std
    result = {
        "config": {"model": "wrn-32-4", "dataset": "cifar10", "epochs": 200, "snapshots": 5, "lr": 0.1},
        "seeds": [0, 1], "paper_has_setting": True, "paper_source": "Table 1",
        "rows": [{"name": "snapshot ensemble (equal weights)", "mean": mean, "std": std, "nll_mean": 0.2,
                  "paper": 4.41}],
    }
    text = format_reproduce(result)
    assert "2.00 +- 1.41" in text and "4.41" in text and "2 seeds" in text


def test_table_shows_a_diverged_run_as_nan() -> None:
    # reproduce.json stores a non-finite number (a diverged run) as null; the table must still render it.
    result = {
        "config": {"model": "cnn-small", "dataset": "digits", "epochs": 2, "snapshots": 2, "lr": 0.1},
        "seeds": [0, 1], "paper_has_setting": False, "paper_source": "Table 1",
        "rows": [{"name": "snapshot ensemble (equal weights)", "mean": None, "std": None, "nll_mean": None,
                  "paper": None, "ece_mean": None}],  # and no price (a reproduce.json from before the price)
    }
    line = format_reproduce(result).splitlines()[2]
    assert line.split()[-8:] == ["nan", "+-", "nan", "nan", "nan", "-", "-", "-"]


def test_reproduce_takes_the_download_flag_its_error_suggests(tmp_path: Path, cli_error,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "a" / "repro"
    data = tmp_path / "data"
    data.mkdir()
    message = cli_error("reproduce", "--dataset", "cifar10", "--data-dir", data, "--out", out, "--quiet")
    assert "pass --download" in message
    assert not (tmp_path / "a").exists()  # no empty folder left by the failure
    # The flag the message suggests is accepted and reaches the download (to a closed local port here).
    monkeypatch.setenv("SNAPENS_CIFAR_URL", "http://127.0.0.1:9/")
    message = cli_error("reproduce", "--dataset", "cifar10", "--data-dir", data, "--download", "--out", out,
                        "--quiet")
    assert message.startswith("could not download http://127.0.0.1:9/") and "unrecognized" not in message
    assert not (tmp_path / "a").exists()


def test_reproduce_failure_keeps_folders_that_were_there(tmp_path: Path, cli_error) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    cli_error("reproduce", "--model", "nonsense", "--out", out, "--quiet")
    assert out.is_dir() and not any(out.iterdir())


def test_every_method_gets_its_ensemble_average_student_and_price(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  restore_threads: None) -> None:
    out = tmp_path / "family"
    # Subsets of digits: the rows are checked against the files they come from, not against accuracies.
    argv = ["reproduce", "--methods", "fge,swa,single-cycle", "--distill", "cnn-small", "--epochs", "4",
            "--snapshots", "2", "--batch-size", "128", "--limit-train", "400", "--limit-test", "200", "--device",
            "cpu", "--threads", "1", "--precision", "fp32", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "reproduce.json").read_text())
    assert result["methods"] == ["fge", "swa", "single-cycle"] and result["distill"] == "cnn-small"
    rows = {r["key"]: r for r in result["rows"]}
    for method, schedule, prefix in (("fge", "fge", "fge"), ("swa", "swa", "swa"),
                                     ("single-cycle", "single-cycle", "single_cycle")):
        run = out / f"{schedule}-seed0"
        summary = json.loads((run / "summary.json").read_text())
        equal = rows["single_cycle" if method == "single-cycle" else f"{prefix}_equal"]
        # Every row is the named file's number, and its price is counted: M passes for the ensembles.
        assert rows[f"{prefix}_last"]["errors"] == pytest.approx([summary["last_snapshot"]["error"]])
        assert equal["errors"] == pytest.approx([summary["ensemble_equal"]["error"]])
        assert equal["forward_passes_mean"] == summary["num_members"] == len(summary["member_names"])
        assert rows[f"{prefix}_fitted"]["forward_passes_mean"] == summary["num_members"]
        average = json.loads((run / "average.json").read_text())
        assert rows[f"{prefix}_average"]["errors"] == pytest.approx([average["test"]["error"]])
        assert rows[f"{prefix}_average"]["forward_passes_mean"] == 1.0
        student = json.loads((run / "distill-cnn-small" / "distill.json").read_text())
        assert rows[f"{prefix}_distill"]["errors"] == pytest.approx([student["student"]["test"]["error"]])
        assert rows[f"{prefix}_distill"]["forward_passes_mean"] == 1.0
        assert all(r["images_per_second_mean"] > 0 for r in rows.values() if r["method"] == method)
    assert json.loads((out / "single-cycle-seed0" / "summary.json").read_text())["num_members"] == 2
    assert (out / "price.png").read_bytes()[:4] == b"\x89PNG"
    header = printed.splitlines()[1]
    assert all(h in header for h in ("test error %", "NLL", "ECE", "passes/img", "img/s", "paper"))
    assert "SWA: weight average" in printed and "FGE: distilled student" in printed


def test_unknown_method_and_distill_model_are_one_line_errors(tmp_path: Path, cli_error) -> None:
    out = tmp_path / "x"
    assert "unknown method(s) nope" in cli_error("reproduce", "--methods", "single,nope", "--out", out)
    assert "list-models" in cli_error("reproduce", "--distill", "no-such-net", "--out", out, "--quiet")
    assert not out.exists()


# ------------------------------------------------------------------------- issue 20 (round two), items 1 and 9

TINY = ["--epochs", "2", "--snapshots", "2", "--batch-size", "128", "--device", "cpu", "--threads", "1",
        "--precision", "fp32", "--quiet"]


def _hash(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_folder_in_use_is_refused_before_anything_is_trained(tmp_path: Path, cli_error) -> None:
    # Two `reproduce --out D` at once left a config.json of one call next to snapshots of the other.
    from snapens._lock import run_lock

    out = tmp_path / "repro"
    with run_lock(out, create=True):
        assert f"{out} is in use by another snapens process" in cli_error("reproduce", *TINY, "--out", out)
        assert [p.name for p in out.iterdir()] == [".lock"]


def test_every_method_is_checked_before_the_first_is_trained(tmp_path: Path, cli_error) -> None:
    # fge's cycle (2 epochs) does not fit the 1 epoch left after fge_start: found before snapshot trains.
    out = tmp_path / "repro"
    message = cli_error("reproduce", "--methods", "snapshot,fge", *TINY, "--out", out)
    assert "cycle_epochs=2" in message and "longer than" in message
    assert not out.exists()


def test_resume_skips_finished_methods_and_continues_an_interrupted_one(tmp_path: Path, cli_error) -> None:
    import os
    import signal
    import subprocess
    import sys

    from test_cli_train import DRIVER, snapshots

    from snapens import runs

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["reproduce", "--methods", "single,snapshot", *TINY]
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "snapens", *argv, "--out", str(reference)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # Killed in the snapshot run's second epoch (SnapshotLR: the step run before it finished).
    out = tmp_path / "repro"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    spe = -(-json.loads((reference / "step-seed0" / "config.json").read_text())["dataset"]["num_train"] // 128)
    killed = subprocess.run([sys.executable, str(driver), *argv, "--out", str(out)], capture_output=True, text=True,
                            env={**env, "SIGNAL": "KILL", "AT_STEP": str(spe + 3)}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert runs.load_training_state(out / "step-seed0" / "state.pt")["finished"]
    assert not runs.load_training_state(out / "cosine-cycles-seed0" / "state.pt")["finished"]
    assert not (out / "reproduce.json").exists()
    # Without --resume the folder is refused, naming the flag; with other settings too.
    assert "pass --resume to continue it" in cli_error(*argv, "--out", out)
    assert "do not change --lr" in cli_error(*argv, "--out", out, "--resume", "--lr", "0.05")
    step_run = _hash(out / "step-seed0" / "snapshots")
    done = subprocess.run([sys.executable, "-m", "snapens", *argv, "--out", str(out), "--resume"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _hash(out / "step-seed0" / "snapshots") == step_run  # not trained again
    for run in ("step-seed0", "cosine-cycles-seed0"):  # the interrupted run continued bit for bit
        ref, got = snapshots(reference / run), snapshots(out / run)
        assert len(ref) == len(got) == 2
        assert all(torch.equal(r[k], g[k]) for r, g in zip(ref, got) for k in r), run
    a, b = (json.loads((d / "reproduce.json").read_text()) for d in (reference, out))
    assert [r["errors"] for r in a["rows"]] == [r["errors"] for r in b["rows"]]
    assert "already holds a reproduction" in cli_error(*argv, "--out", out, "--resume")


def test_resume_without_an_existing_out_is_refused(tmp_path: Path, cli_error) -> None:
    # Review fix: `reproduce --resume` with no --out folder started a fresh reproduction; refused like
    # `train --resume`, nothing created.
    out = tmp_path / "nowhere" / "repro"
    message = cli_error("reproduce", "--methods", "single", *TINY, "--out", out, "--resume")
    assert message.startswith("cannot resume: ") and str(out) in message and "leave out --resume" in message
    assert not (tmp_path / "nowhere").exists()
