"""benchmarks/gpu_check.py: its CPU dry run end to end (so the GPU check cannot rot), budgets and epoch sizing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(*argv: object, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.mark.slow
def test_dry_run_goes_through_every_stage(tmp_path: Path) -> None:
    from snapens import pretrained

    proc = _check("--dry-run", "--out", tmp_path / "out", "--work-dir", tmp_path / "work", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "out" / "gpu-cpu-dry-run.json").read_text())
    st = res["stages"]
    assert list(st) == ["env", "tests", "train", "throughput", "inference", "study", "export"]
    assert res["dry_run"] and st["env"]["torch"] and st["env"]["cuda_available"] in (False, True)
    if st["tests"]["status"] == "ok":  # without a GPU every gpu-marked test is skipped, none fails
        assert st["tests"]["counts"].get("skipped", 0) + st["tests"]["counts"].get("passed", 0) >= 5
        assert "failed" not in st["tests"]["counts"]
    else:
        assert st["tests"]["status"] == "unavailable"
    auto = st["train"]["variants"]["auto"]
    # one SIGTERM after the first epoch (exit 143, state saved), then --resume to the end
    assert auto["status"] == "ok" and auto["first_rc"] == 143 and auto["resume_rc"] == 0
    assert auto["epochs_done"] == 3 and auto["losses_finite"] and len(auto["train_losses"]) == 3
    assert st["train"]["variants"]["fp16"]["status"] == "skipped" == st["train"]["variants"]["compile"]["status"]
    (row,) = st["throughput"]["rows"]
    assert row["model"] == "cnn-small" and row["hand_img_s"] > 0 and row["ratio"] == pytest.approx(
        row["engine_img_s"] / row["hand_img_s"], rel=0.01)
    assert [r["M"] for r in st["inference"]["rows"]] == [1, 2]
    study = st["study"]
    assert study["status"] == "ok" and study["calibration"]["ok"] and study["calibration"]["processes"] == 2
    runs = {Path(r["run_dir"]).name: r for r in study["runs"]}
    assert sorted(runs) == ["cosine-M1-seed0", "cosine-M2-seed0", "step-seed0"]
    assert all(r["epochs_done"] == 2 and r["rc"] == 0 for r in runs.values())
    assert set(runs["cosine-M2-seed0"]["rows"]) == {"last", "equal", "fitted", "recommended"}
    assert set(runs["step-seed0"]["rows"]) == {"last"}
    export = st["export"]
    assert export["status"] == "ok" and export["source_run"] == "cosine-M2-seed0" and export["members"] == 2
    assert 1 <= export["members_run"] <= 2  # the recommended combination may run fewer members
    bundle = tmp_path / "out" / "pretrained" / "dry-run-digits"
    entry = json.loads((tmp_path / "out" / "pretrained" / "registry-entry.json").read_text())["dry-run-digits"]
    assert entry["files"] == pretrained.bundle_files(bundle)
    card = json.loads((bundle / "card.json").read_text())
    assert card["metrics"]["measured_on"] == "this bundle (float16 members)"
    assert card["metrics"]["rows"]["ensemble_equal"]["error"] == export["test_equal_fp16"]["error"]
    assert card["command"].startswith("python3 -m snapens train --dataset digits")
    md = (tmp_path / "out" / "gpu-cpu-dry-run.md").read_text()
    for stage in st:
        assert f"## {stage}: {st[stage]['status']}" in md
    assert "| cosine-M2-seed0 | 2 | equal |" in md


def test_a_spent_budget_cuts_the_stages_and_still_writes_the_results(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = _check("--dry-run", "--budget-s", "0.5", "--stages", "train,study", "--out", tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    st = json.loads((tmp_path / "gpu-cpu-dry-run.json").read_text())["stages"]
    assert list(st) == ["env", "train", "study"] and st["env"]["status"] == "ok"
    assert st["train"]["status"] == "cut" == st["study"]["status"]
    assert "spent before this stage" in st["study"]["note"]
    assert "## study: cut" in (tmp_path / "gpu-cpu-dry-run.md").read_text()
    assert time.perf_counter() - t0 < 60


def test_a_stage_running_long_is_cut(tmp_path: Path) -> None:
    gc = _module()
    t0 = time.perf_counter()
    res = gc._run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.5,
                  tmp_path / "sleep.log")
    assert res["cut"] and res["rc"] != 0 and time.perf_counter() - t0 < 30
    assert "started" in res["output_tail"]
    with pytest.raises(SystemExit, match="unknown stage 'trian'"):
        gc.Check(gc._parse(["--dry-run", "--stage-budget", "trian=3", "--out", str(tmp_path)]))


def _sized(gc, t1: float, tk: float, window: float, seeds: int = 2):
    args = Namespace(seeds=seeds, target_epochs=150, max_epochs=300, dry_run=False)
    check = Namespace(args=args)
    cal = {"epoch_s_alone": t1, "epoch_s_shared": tk, "processes": 10, "startup_s": 10.0}
    return gc._size_epochs(check, cal, window, 5)


def test_epochs_are_sized_to_finish_in_the_window() -> None:
    gc = _module()
    # Ten processes at 2 s per epoch each: 2 seeds reach 150 epochs in 400 s.
    seeds, epochs, t_epoch = _sized(gc, 1.0, 2.0, 400.0)
    assert (seeds, t_epoch) == (2, 2.0) and epochs >= 150 and epochs % 12 == 0
    assert 10 * 2 + (epochs + 3) * t_epoch * 1.15 <= 400.0
    # Too slow for two seeds: one seed, with the epoch time interpolated for five processes (1 + 4/9 * 3 s).
    seeds, epochs, t_epoch = _sized(gc, 1.0, 4.0, 400.0)
    assert seeds == 1 and t_epoch == pytest.approx(1.0 + 3.0 * 4 / 9) and epochs % 12 == 0
    assert 10 * 2 + (epochs + 3) * t_epoch * 1.15 <= 400.0 and epochs < 150
    # Never more than --max-epochs.
    assert _sized(gc, 0.1, 0.2, 1000.0)[1] == 300
