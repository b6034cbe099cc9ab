"""Tests for ``snapens average``: the averaged model's file and numbers, member choice, one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from snapens import checkpoint, metrics
from snapens.averaging import average_state_dicts
from snapens.cli import main
from snapens.cli.average import format_result
from snapens.runs import read_run_info
from snapens.workflows.evaluation import load_run_dataset, make_loader
from snapens.models import build_model


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run with the swa schedule: 4 epochs, the SWA rate from epoch 2, three snapshots."""
    from snapens.workflows.training import train_run
    from snapens.config import resolve_config

    before = torch.get_num_threads()
    cfg = resolve_config(epochs=4, schedule="swa", swa_start=0.25, batch_size=128, device="cpu", precision="fp32",
                         channels_last=False, threads=1)
    try:
        return Path(train_run(cfg, tmp_path_factory.mktemp("swa-run") / "run", resume=False, progress=False))
    finally:
        torch.set_num_threads(before)


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _hashes(folder: Path) -> dict[str, str]:
    # .lock, made by the first command that locks the folder, is empty: the lock is the kernel's, not the file's
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _snapshot_states(run: Path) -> list[dict[str, torch.Tensor]]:
    store = checkpoint.SnapshotStore(run / "snapshots")
    return [store.load_state_dict(i.index) for i in store.list()]


def test_average_writes_the_mean_model_evaluated_like_a_member(swa_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(swa_run, tmp_path)
    states = _snapshot_states(run)
    assert len(states) == 3
    assert main(["average", str(run), "--device", "cpu", "--bn-batches", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    state, meta = checkpoint.load_weights(run / "average.safetensors")
    info = read_run_info(run)
    assert meta["model"] == info["model"] and meta["kind"] == "average"
    assert meta["members"] == ["snapshot-01", "snapshot-02", "snapshot-03"] and meta["bn_batches"] == 4
    mean = average_state_dicts(states)
    for key, value in state.items():
        if "running_" in key or "num_batches_tracked" in key:
            continue  # recomputed below
        assert torch.equal(value, mean[key]), key
    bn_keys = [k for k in state if k.endswith("running_mean")]
    assert bn_keys and not all(torch.equal(state[k], mean[k]) for k in bn_keys)  # statistics recomputed
    assert all(int(state[k]) == 4 for k in state if k.endswith("num_batches_tracked"))

    # Evaluated like a member: the file, loaded into the architecture, gives the printed test numbers.
    model = build_model(info["model"]["name"], **info["model"]["kwargs"])
    model.load_state_dict(state)
    model.eval()
    data = load_run_dataset(info)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x), 1) for x, *_ in make_loader(data.test, info, "cpu")])
    test = metrics.evaluate_probs(probs, data.test.labels)
    result = json.loads((run / "average.json").read_text())
    assert result["test"]["error"] == pytest.approx(test["error"], abs=1e-9)
    assert result["test"]["nll"] == pytest.approx(test["nll"], rel=1e-5)
    assert f"average on test: error {test['error']:.2f} %" in out
    # compared with the best member on validation
    best = result["best_member"]
    assert best["name"] in meta["members"]
    assert result["worse_than_best_member_on_val"] == (
        (result["val"]["error"], result["val"]["nll"]) > (best["val"]["error"], best["val"]["nll"]))
    assert "on validation: average error" in out and f"best member {best['name']}" in out
    assert ("WORSE on validation" in out) == result["worse_than_best_member_on_val"]


def test_last_and_members_choose_the_snapshots(swa_run: Path, tmp_path: Path) -> None:
    run = _copy(swa_run, tmp_path)
    states = _snapshot_states(run)
    assert main(["average", str(run), "--device", "cpu", "--last", "1", "--quiet"]) == 0
    one, meta = checkpoint.load_weights(run / "average.safetensors")
    assert meta["members"] == ["snapshot-03"]
    for key in one:  # the mean of one snapshot is that snapshot (up to the recomputed statistics)
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(one[key], states[2][key]), key
    assert main(["average", str(run), "--device", "cpu", "--members", "1", "3", "--quiet"]) == 0
    two, meta = checkpoint.load_weights(run / "average.safetensors")
    assert meta["members"] == ["snapshot-01", "snapshot-03"]
    mean = average_state_dicts([states[0], states[2]])
    assert all(torch.equal(two[k], mean[k]) for k in two if "running_" not in k and "num_batches" not in k)


def test_the_note_when_the_average_is_worse() -> None:
    row = {"error": 10.0, "nll": 0.5, "ece": 0.05}
    result = {"members": ["snapshot-01", "snapshot-02"], "bn_batches": 50, "test": row,
              "val": {"error": 30.0, "nll": 1.2, "ece": 0.1},
              "best_member": {"name": "snapshot-02", "val": {"error": 8.0, "nll": 0.3}, "test": row},
              "worse_than_best_member_on_val": True}
    text = format_result(result, Path("RUN"))
    assert "WORSE on validation than the best member snapshot-02" in text
    assert "average error 30.00 %" in text and "snapshot-02 error 8.00 %" in text
    result["worse_than_best_member_on_val"] = False
    assert "WORSE" not in format_result(result, Path("RUN"))
    result["best_member"] = result["val"] = None
    assert "no validation split" in format_result(result, Path("RUN"))


@pytest.mark.parametrize("args,match", [
    (["--last", "4"], "--last must be in [1, 3]"),
    (["--last", "0"], "--last must be in [1, 3]"),
    (["--members", "7"], "--members 7: the run has snapshots [1, 2, 3]"),
    (["--members", "1", "1"], "lists a snapshot twice"),
    (["--bn-batches", "0"], "--bn-batches must be a positive integer, got 0"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_input_is_one_line_and_touches_nothing(swa_run: Path, cli_error, args: list[str], match: str) -> None:
    before = _hashes(swa_run)
    assert match in cli_error("average", str(swa_run), "--quiet", *args)
    assert _hashes(swa_run) == before and not (swa_run / "average.safetensors").exists()


def test_last_and_members_together_is_a_usage_error(swa_run: Path, capsys: pytest.CaptureFixture[str],
                                                    assert_one_line_error) -> None:
    with pytest.raises(SystemExit) as info:
        main(["average", str(swa_run), "--last", "1", "--members", "1"])
    assert info.value.code == 2
    assert "--members: not allowed with argument --last" in assert_one_line_error(capsys.readouterr().err)


def test_not_a_run_folder(tmp_path: Path, cli_error) -> None:
    assert "is not a directory" in cli_error("average", str(tmp_path / "missing"))
    assert "not a snapens run folder" in cli_error("average", str(tmp_path))


def test_snapshots_of_another_architecture_are_refused(swa_run: Path, tmp_path: Path, cli_error) -> None:
    run = _copy(swa_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["kwargs"]["num_classes"] = 7  # config.json now names another architecture than the snapshots
    (run / "config.json").write_text(json.dumps(cfg))
    assert "snapshots of different architectures cannot be averaged" in cli_error("average", str(run), "--quiet")
    assert not (run / "average.safetensors").exists()


# ------------------------------------------------------------------------- issue 20 (round two), items 1 and 2


def test_readers_refuse_an_unfinished_run(tiny_run: Path, tmp_path: Path, cli_error, capsys) -> None:
    # `average L1` during `train --run-dir L1` averaged 1 of 4 snapshots and exited 0; distill built its teacher
    # from part of them, export exported part of them.
    from test_runs import make_unfinished

    run = _copy(tiny_run, tmp_path)
    make_unfinished(run)
    before = _hashes(run)
    for argv in (["average", run], ["evaluate", run, "--device", "cpu"],
                 ["distill", run, "--threads", "1", "--device", "cpu", "--quiet"],
                 ["export", run, tmp_path / "ens.pt2"]):
        message = cli_error(*argv)
        assert f"{run} has not finished training (epoch 1 of 2, 1 of 2 snapshots)" in message, argv
        assert "--allow-unfinished" in message
    assert _hashes(run) == before and not (tmp_path / "ens.pt2").exists()
    assert main(["average", str(run), "--allow-unfinished", "--device", "cpu", "--json"]) == 0  # the user means it
    captured = capsys.readouterr()
    assert json.loads(captured.out)["members"] == ["snapshot-01"]
    assert "has not finished training" in captured.err


def test_export_refuses_an_unfinished_run_in_the_library_too(tiny_run: Path, tmp_path: Path) -> None:
    from test_runs import make_unfinished

    from snapens.workflows.exporting import export

    run = _copy(tiny_run, tmp_path)
    make_unfinished(run)
    with pytest.raises(ValueError, match="has not finished training"):
        export(run, tmp_path / "ens.pt2")
    assert not (tmp_path / "ens.pt2").exists()


def test_average_holds_the_run_folders_lock(swa_run: Path, tmp_path: Path, cli_error) -> None:
    # Item 1: every command that writes into a run folder owns it meanwhile (average writes average.*).
    from snapens._lock import run_lock

    run = _copy(swa_run, tmp_path)
    before = _hashes(run)
    with run_lock(run):
        assert f"{run} is in use by another snapens process" in cli_error("average", run, "--device", "cpu")
    assert _hashes(run) == before


def test_export_cli_refuses_an_unfinished_run_unless_allowed(tiny_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from test_runs import make_unfinished

    from snapens.cli import main

    run = _copy(tiny_run, tmp_path)
    make_unfinished(run)
    out = tmp_path / "ens.pt"
    assert main(["export", str(run), str(out), "--weights", "equal", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has not finished training" in err and not out.exists()
    assert main(["export", str(run), str(out), "--weights", "equal", "--allow-unfinished", "--quiet"]) == 0
    assert out.is_file()
