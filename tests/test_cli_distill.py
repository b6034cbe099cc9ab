"""`snapens distill`: a student of a 5-snapshot digits teacher, stop-and-resume, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from test_cli_train import folder_hash, snapshots

from snapens import runs
from snapens.cli import main

# One thread, fp32, CPU: bit-identical runs (the resume test compares bits).
FAST = ["--threads", "1", "--device", "cpu", "--precision", "fp32", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-snapshot cnn-small teacher on digits (10 epochs, two per cycle), evaluated."""
    before = torch.get_num_threads()
    run = tmp_path_factory.mktemp("distill") / "teacher"
    try:
        rc, _ = _main(["train", "--epochs", "10", "--snapshots", "5", "--run-dir", run, "--no-eval", *FAST])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return run


# Measured (this test's settings): student 0.56 % = teacher 0.56 % test error, 100 % agreement at 6 epochs;
# at 4 epochs 1.11 % vs 0.56 % and 99.44 %. The margin, 1.2 points (4 of 359 test images), covers the latter.
MARGIN = 1.2


def test_student_matches_the_teacher_and_writes_a_run_folder(teacher: Path) -> None:
    rc, printed = _main(["distill", teacher, "--model", "cnn-small", "--epochs", "6", *FAST])
    assert rc == 0
    out = teacher / "distill-cnn-small"
    result = json.loads((out / "distill.json").read_text())
    t, s = result["teacher"], result["student"]
    assert s["test"]["error"] <= t["test"]["error"] + MARGIN, (s["test"], t["test"])
    assert result["agreement"] >= 95.0
    assert (s["forward_passes"], t["forward_passes"]) == (1.0, 5.0)
    assert s["images_per_second"] > 0 and t["images_per_second"] > 0
    # The teacher is the ensemble of the 5 snapshots with weights and temperature fitted on validation: the
    # same as `snapens evaluate`'s "ensemble + temperature" row of the teacher run.
    assert t["members"] == [f"snapshot-0{k}" for k in range(1, 6)]
    rc, _ = _main(["evaluate", teacher, "--json", *[a for a in FAST if a != "--threads" and a != "1"]])
    summary = json.loads((teacher / "summary.json").read_text())
    assert t["weights"] == pytest.approx(summary["ensemble_weighted"]["weights"], abs=1e-6)
    assert t["calibration_temperature"] == pytest.approx(summary["ensemble_temperature"]["temperature"], rel=1e-5)
    assert t["test"]["nll"] == pytest.approx(summary["ensemble_temperature"]["nll"], rel=1e-4)
    # The student's folder is a run folder: config.json records the distillation, evaluate's summary is there.
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["snapshots"] == 1 and info["config"]["epochs"] == 6 and info["model"]["name"] == "cnn-small"
    assert info["distill"]["temperature"] == 4.0 and info["distill"]["alpha"] == 0.9
    assert json.loads((out / "summary.json").read_text())["last_snapshot"]["error"] == pytest.approx(s["test"]["error"])
    assert "top-1 agreement with the teacher" in printed and "passes/img" in printed
    print(f"distill: teacher {t['test']['error']:.2f} %, student {s['test']['error']:.2f} %, "
          f"agreement {result['agreement']:.2f} %")


def test_sigterm_then_resume_is_bit_exact(teacher: Path, tmp_path: Path, cli_error,
                                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Distill's own resume (fit's kill-and-resume is proven in test_engine, the CLI's in test_cli_train): the
    # stopped student continues with the distillation recorded in its folder, to the same bits. Every run in
    # this process (the same threads, the same kernels), one epoch each.
    from snapens.schedule import SnapshotLR

    reference = tmp_path / "reference"
    argv = ["distill", teacher, "--epochs", "1", *FAST]
    assert _main([*argv, "--run-dir", reference])[0] == 0
    before = folder_hash(reference)
    assert "do not change --temperature" in cli_error("distill", teacher, "--resume", "--run-dir", reference,
                                                      "--temperature", "2")
    assert folder_hash(reference) == before
    stopped = tmp_path / "stopped"
    real_step = SnapshotLR.step

    def step(self, *a, **k):
        real_step(self, *a, **k)
        if self.last_epoch == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by fit: the state is saved, the CLI says how to resume

    monkeypatch.setattr(SnapshotLR, "step", step)
    capsys.readouterr()
    assert _main([*argv, "--run-dir", stopped])[0] == 128 + signal.SIGTERM
    monkeypatch.setattr(SnapshotLR, "step", real_step)
    assert f"snapens distill {teacher} --resume --run-dir {stopped}" in capsys.readouterr().err
    state = runs.read_resume_state(stopped)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 5, 5)
    assert not (stopped / "distill.json").exists()
    assert _main(["distill", teacher, "--resume", "--run-dir", stopped, "--quiet"])[0] == 0
    ref, got = snapshots(reference), snapshots(stopped)
    assert len(ref) == len(got) == 1
    assert ref[0].keys() == got[0].keys() and all(torch.equal(ref[0][k], got[0][k]) for k in ref[0])
    a, b = (json.loads((d / "distill.json").read_text()) for d in (reference, stopped))
    assert a["student"]["test"] == b["student"]["test"] and a["agreement"] == b["agreement"]


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-2"], "--temperature must be > 0"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--model", "no-such-net"], "snapens train --list-models"),
    (["--resume", "--run-dir", "{tmp}/nothing"], "holds no distillation"),
])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(teacher: Path, tmp_path: Path, cli_error,
                                                          args: list[str], message: str) -> None:
    before = folder_hash(teacher)
    got = cli_error("distill", teacher, *[a.format(tmp=tmp_path) for a in args], *FAST)
    assert message in got
    assert folder_hash(teacher) == before and not (teacher / "distill-no-such-net").exists()
    assert not (tmp_path / "nothing").exists()


def test_missing_run_and_a_second_distillation_are_refused(teacher: Path, tmp_path: Path, cli_error) -> None:
    assert "is not a directory" in cli_error("distill", tmp_path / "missing", "--model", "cnn-small")
    assert not (tmp_path / "missing").exists()
    out = tmp_path / "student"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert "already holds a distillation" in cli_error("distill", teacher, "--run-dir", out, *FAST)
    assert (out / "config.json").read_text() == "{}"


# ------------------------------------------------------------------------- issue 20 (round two), items 7 and 8


def test_resume_after_the_students_training_writes_the_missing_distill_json(teacher: Path, tmp_path: Path,
                                                                              cli_error) -> None:
    # Killed after the student's last epoch, before distill.json: --resume said the run finished, a fresh start
    # that the folder holds a distillation. Deleting distill.json leaves exactly that folder.
    out = tmp_path / "student"
    rc, _ = _main(["distill", teacher, "--epochs", "1", "--run-dir", out, "--json", *FAST])
    assert rc == 0
    first = json.loads((out / "distill.json").read_text())
    (out / "distill.json").unlink()
    snapshot_bits = folder_hash(out / "snapshots")
    rc, printed = _main(["distill", teacher, "--resume", "--run-dir", out, "--json", *FAST])
    assert rc == 0
    again = json.loads((out / "distill.json").read_text())
    assert json.loads(printed)["student"]["test"] == again["student"]["test"] == first["student"]["test"]
    assert again["teacher"]["test"] == first["teacher"]["test"] and again["agreement"] == first["agreement"]
    assert folder_hash(out / "snapshots") == snapshot_bits  # evaluated, not trained again
    # now it is finished: a further --resume says so, naming distill.json
    assert "already finished (its results are in distill.json)" in cli_error(
        "distill", teacher, "--resume", "--run-dir", out, *FAST)


def test_an_unfinished_teacher_is_refused_and_a_changed_teacher_is_named_on_resume(
        teacher: Path, tmp_path: Path, cli_error) -> None:
    import shutil

    from test_runs import make_unfinished

    half = tmp_path / "teacher"
    shutil.copytree(teacher, half, ignore=shutil.ignore_patterns("distill-*"))
    make_unfinished(half, keep=2)
    out = tmp_path / "student"
    message = cli_error("distill", half, "--epochs", "1", "--run-dir", out, *FAST)
    assert f"{half} has not finished training (epoch 2 of 10, 2 of 5 snapshots)" in message
    assert not out.exists()
    # The user means it: the student learns from the 2 snapshots there are, and records them.
    rc, _ = _main(["distill", half, "--epochs", "1", "--run-dir", out, "--allow-unfinished", *FAST])
    assert rc == 0
    entry = json.loads((out / "config.json").read_text())["distill"]
    assert entry["teacher_members"] == ["snapshot-01", "snapshot-02"] and len(entry["teacher_sha256"]) == 2
    # The teacher finishes meanwhile; the student's --resume used to fail with "Expected 4 weights ... got (2,)".
    shutil.rmtree(half)
    shutil.copytree(teacher, half, ignore=shutil.ignore_patterns("distill-*"))
    (out / "distill.json").unlink()
    message = cli_error("distill", half, "--resume", "--run-dir", out, *FAST)
    assert f"the teacher {half} changed since the student in {out} started" in message
    assert "snapshot-05 but were snapshot-01, snapshot-02" in message
