"""The run folder (snapens.runs): its file names, config.json, the resume state and the RNG capture."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from snapens import runs
from snapens.checkpoint import SnapshotError
from snapens.runs import capture_rng_state, load_training_state, restore_rng_state, save_training_state


def tiny_net() -> nn.Module:
    """Conv + BatchNorm + linear: parameters and BN buffers."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", [runs.STATE_FILE, runs.METRICS_FILE, runs.BEST_FILE, runs.SNAPSHOT_DIR])
def test_run_exists_sees_each_training_file(tmp_path, name) -> None:
    assert not runs.run_exists(tmp_path)
    (tmp_path / name).mkdir()
    assert runs.run_exists(tmp_path)


def test_variant_file_names() -> None:
    assert runs.summary_file() == runs.SUMMARY_FILE == "summary.json"
    assert runs.summary_file(3, True) == "summary-last3-best.json"
    assert runs.weights_file() == runs.WEIGHTS_FILE and runs.weights_file(2) == "ensemble_weights-last2.json"


def test_read_resume_state_checks_what_the_caller_expects(tmp_path) -> None:
    save_training_state(tmp_path / runs.STATE_FILE, {"format": runs.STATE_FORMAT,
                                                     "format_version": runs.STATE_VERSION, "epochs": 3})
    assert runs.read_resume_state(tmp_path, expect={"epochs": 3, "world_size": 1})["epochs"] == 3  # old: 1 rank
    with pytest.raises(ValueError, match="its epochs is 3 but this call has 4"):
        runs.read_resume_state(tmp_path, expect={"epochs": 4})
    with pytest.raises(ValueError, match="its world_size is 1 but this call has 2"):
        runs.read_resume_state(tmp_path, expect={"world_size": 2})


def test_read_run_info_names_the_missing_entry(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json is missing"):
        runs.read_run_info(tmp_path)
    (tmp_path / runs.CONFIG_FILE).write_text('{"config": {}, "model": {}, "dataset": {}}')
    with pytest.raises(ValueError, match=r"config\.dataset is missing"):
        runs.read_run_info(tmp_path)


def test_training_state_writer_failure_midway_keeps_old_state(tmp_path):
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 1})
    with pytest.raises(Exception):  # pickling a lambda fails part-way through torch.save
        save_training_state(path, {"step": 2, "fn": lambda: 0})
    assert load_training_state(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.pt"]


def test_training_state_round_trip_with_rng(tmp_path):
    torch.manual_seed(5)
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    opt.step()
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    path = tmp_path / "state.pt"
    save_training_state(
        path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "rng": capture_rng_state()}
    )
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state = load_training_state(path)
    assert state["step"] == 7
    restore_rng_state(state["rng"])
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    assert torch.equal(got[0], expected[0])
    assert got[1:3] == expected[1:3]
    np.testing.assert_array_equal(got[3], expected[3])
    assert got[4] == expected[4]

    model2 = tiny_net()
    model2.load_state_dict(state["model"])
    assert_state_equal(model2.state_dict(), model.state_dict())
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    opt2.load_state_dict(state["optimizer"])
    buf1 = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf1)
    assert opt2.param_groups[0]["lr"] == 0.1


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_training_state_refuses_corrupt_or_code_carrying_files(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(SnapshotError, match=r"state\.pt is missing"):
        load_training_state(path)
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(SnapshotError, match=r"state\.pt"):
        load_training_state(path)
    torch.save({"x": _Evil()}, path)  # a pickle that would run a command under weights_only=False
    with pytest.raises(SnapshotError, match=r"state\.pt.*unsafe"):
        load_training_state(path)
    with pytest.raises(ValueError, match="list"):
        save_training_state(path, [1, 2])


def test_restore_rng_state_requires_all_parts():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="numpy"):
        restore_rng_state(state)


# ------------------------------------------------------------------------- issue 20 (round two), item 2


def make_unfinished(run_dir, keep: int = 1) -> None:
    """Turn a finished run into one stopped mid-way (as a reader sees a run still training): its state says
    not finished, at epoch ``keep``, and its manifest and snapshots/ hold only the first ``keep`` snapshots."""
    import json

    state = load_training_state(run_dir / runs.STATE_FILE)
    state.update(finished=False, epoch=keep)
    save_training_state(run_dir / runs.STATE_FILE, state)
    manifest_path = run_dir / runs.SNAPSHOT_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["snapshots"][keep:]:
        (run_dir / runs.SNAPSHOT_DIR / entry["file"]).unlink()
    manifest["snapshots"] = manifest["snapshots"][:keep]
    manifest_path.write_text(json.dumps(manifest))


def test_require_finished_refuses_an_unfinished_run_unless_allowed(tiny_run, tmp_path, caplog) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    runs.require_finished(run_dir)  # finished: accepted
    make_unfinished(run_dir)
    with pytest.raises(ValueError) as info:
        runs.require_finished(run_dir)
    message = str(info.value)
    assert "\n" not in message and f"{run_dir} has not finished training (epoch 1 of 2, 1 of 2 snapshots)" in message
    assert f"snapens train --resume --run-dir {run_dir}" in message and "--allow-unfinished" in message
    with caplog.at_level("WARNING", logger="snapens"):
        runs.require_finished(run_dir, allow_unfinished=True)
    assert "has not finished training" in caplog.text


def test_require_finished_counts_the_snapshots_too(tiny_run, tmp_path) -> None:
    # A state that says finished but a manifest short of a snapshot: not the run the state describes.
    import json
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    manifest_path = run_dir / runs.SNAPSHOT_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (run_dir / runs.SNAPSHOT_DIR / manifest["snapshots"][-1]["file"]).unlink()
    manifest["snapshots"] = manifest["snapshots"][:-1]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{run_dir} is incomplete: it finished training with 2 snapshots, but "
                                         ".*manifest.json lists 1"):
        runs.require_finished(run_dir)
    (run_dir / runs.STATE_FILE).unlink()  # no state (a hand-made or copied folder): its manifest is the run
    runs.require_finished(run_dir)
