"""snapens.pretrained: bundles of float16 snapshots pinned by sha256 (export, verify, load, extract).

The real resnet-20-cifar10 weights need the GPU study (issue 22); here a tiny digits run, trained through the
CLI, is bundled and loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snapens import pretrained
from snapens.checkpoint import SnapshotError, SnapshotStore
from snapens.ensemble import SnapshotEnsemble
from snapens.models import build_model

SRC = Path(__file__).resolve().parents[1] / "src"


def _snapens(*argv: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "snapens", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real digits run (cnn-small, 2 epochs, 2 snapshots), trained by the CLI in a subprocess."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    proc = _snapens("train", "--epochs", 2, "--snapshots", 2, "--threads", 1, "--run-dir", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="module")
def bundle(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundle") / "digits-cnn"
    entry = pretrained.export_pretrained(run_dir, out, name="digits-cnn", command="snapens train --epochs 2 ...")
    return out, entry


@pytest.fixture(scope="module")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    from snapens.data import load_dataset

    test = load_dataset("digits").test
    return test.images, torch.as_tensor(test.labels)


def _registry(tmp_path: Path, name: str, entry: dict) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"format_version": 1, "bundles": {name: entry}}))
    return path


def _registered(tmp_path: Path, bundle: tuple[Path, dict]) -> dict:
    """A copy of the bundle under tmp_path/root/<name>, and a registry pinning it: load()'s keyword arguments."""
    folder, entry = bundle
    root = tmp_path / "root"
    pretrained.extract(folder, root / "digits-cnn")
    return {"root": root, "registry_path": _registry(tmp_path, "digits-cnn", entry)}


def test_export_writes_a_run_like_bundle_of_half_precision_members(run_dir: Path, bundle) -> None:
    folder, entry = bundle
    assert sorted(entry["files"]) == ["card.json", "card.md", "config.json", "recommended.json",
                                      "snapshots/manifest.json", "snapshots/snapshot-01.safetensors",
                                      "snapshots/snapshot-02.safetensors"]
    store = SnapshotStore(folder / "snapshots")
    for info in store.list():
        state = store.load_state_dict(info.index)
        floats = [t for t in state.values() if t.is_floating_point()]
        assert floats and all(t.dtype == torch.float16 for t in floats)
        original = SnapshotStore(run_dir / "snapshots").load_state_dict(info.index)
        for key, value in state.items():
            assert torch.equal(value, original[key].to(value.dtype)), key
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["data_dir"] is None and config["dataset"]["mean"]
    card = json.loads((folder / "card.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card["members"] == 2 and card["command"].startswith("snapens train")
    assert card["metrics"]["rows"]["ensemble_equal"]["error"] == summary["ensemble_equal"]["error"]
    assert card["metrics"]["rows"]["snapshot-02"]["nll"] == summary["snapshots"][1]["nll"]
    assert set(card["files"]) == set(entry["files"]) - {"card.json", "card.md"}
    md = (folder / "card.md").read_text()
    assert entry["files"]["snapshots/snapshot-01.safetensors"] in md and "ensemble_equal" in md


def test_loaded_bundle_predicts_as_the_fp16_rounded_members(run_dir: Path, bundle, test_images, tmp_path) -> None:
    images, labels = test_images
    loaded = pretrained.load(bundle[0], precision="fp32", weights="equal")
    by_name = pretrained.load("digits-cnn", precision="fp32", weights="equal", **_registered(tmp_path, bundle))
    source = SnapshotEnsemble.from_run(run_dir, build_model, precision="fp32", weights="equal")  # as the bundle
    stats = json.loads((run_dir / "config.json").read_text())["dataset"]
    store = SnapshotStore(run_dir / "snapshots")
    # The members rounded to float16 and back: the same float32 numbers the bundle's members load as.
    rounded = [{k: v.half().float() if v.is_floating_point() else v for k, v in store.load_state_dict(i).items()}
               for i in (1, 2)]
    model_kwargs = store.get(1).model_kwargs
    reference = SnapshotEnsemble(lambda: build_model("cnn-small", **model_kwargs), rounded, mean=stats["mean"],
                                 std=stats["std"], precision="fp32")
    p_loaded, p_ref = loaded.predict_proba(images), reference.predict_proba(images)
    # Same fp32 arithmetic on the same numbers: equal up to summation-order noise.
    assert torch.allclose(p_loaded, p_ref, atol=1e-6, rtol=0)
    assert torch.equal(by_name.predict_proba(images), p_loaded)
    # Against the unrounded members: float16 keeps 11 significant bits (relative error <= 2**-11 per weight), so
    # the probabilities move by far less than 0.05 and almost no prediction flips.
    p_source = source.predict_proba(images)
    assert 0 < (p_loaded - p_source).abs().max() < 0.05
    assert (p_loaded.argmax(1) == p_source.argmax(1)).float().mean() >= 0.98
    assert loaded.n_members == 2 and (p_loaded.argmax(1) == labels).float().mean() > 0.5


def test_a_bundle_loads_with_its_runs_recommended_combination_and_equal_is_one_argument_away(
        run_dir: Path, bundle, test_images, tmp_path: Path) -> None:
    """Issue 21: the recommended combination wherever an ensemble is taken out of a run, a bundle included."""
    folder, entry = bundle
    images, _ = test_images
    assert json.loads((folder / "recommended.json").read_text()) == json.loads((run_dir / "recommended.json").read_text())
    card = json.loads((folder / "card.json").read_text())
    assert card["files"]["recommended.json"] == entry["files"]["recommended.json"]  # pinned like the members
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card["metrics"]["rows"]["ensemble_recommended"]["error"] == summary["ensemble_recommended"]["error"]
    assert "| ensemble_recommended |" in (folder / "card.md").read_text()
    loaded = pretrained.load(folder, precision="fp32")
    source = SnapshotEnsemble.from_run(run_dir, build_model, precision="fp32")  # recommended, unrounded members
    assert len(loaded) == len(source) and loaded.weights_.tolist() == source.weights_.tolist()
    assert loaded.temperature == source.temperature
    assert [Path(n).name for n in loaded.member_names] == [Path(n).name for n in source.member_names]
    p_loaded, p_source = loaded.predict_proba(images), source.predict_proba(images)
    assert (p_loaded - p_source).abs().max() < 0.05  # float16 rounding only (see the test above)
    equal = pretrained.load(folder, precision="fp32", weights="equal")
    assert len(equal) == 2 and equal.weights_.tolist() == [0.5, 0.5] and equal.temperature == 1.0
    # the recommendation is verified like every file: a changed one is refused, an unpinned one is not read
    copy = tmp_path / "copy"
    pretrained.extract(folder, copy)
    rec = json.loads((copy / "recommended.json").read_text())
    (copy / "recommended.json").write_text(json.dumps({**rec, "weights": [1.0, 0.0]}))
    with pytest.raises(SnapshotError, match=r"recommended\.json does not match"):
        pretrained.load(copy)
    one = pretrained.export_pretrained(run_dir, tmp_path / "one", name="x", command="c", last=1)
    assert "recommended.json" not in one["files"]  # the run was not evaluated with --last 1
    (tmp_path / "one" / "recommended.json").write_text(json.dumps({**rec, "members": ["snapshot-01"], "weights": [1.0],
                                                                    "temperature": 5.0, "temperature_fitted": True}))
    assert pretrained.load(tmp_path / "one").temperature == 1.0  # unpinned: not read; equal weights, noted


def test_a_changed_file_is_refused_by_name(bundle, tmp_path: Path) -> None:
    kwargs = _registered(tmp_path, bundle)
    member = kwargs["root"] / "digits-cnn" / "snapshots" / "snapshot-02.safetensors"
    data = bytearray(member.read_bytes())
    data[-3] ^= 0x01  # one bit of a weight: still a valid safetensors file, still finite
    member.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"snapshot-02\.safetensors does not match the registry entry"):
        pretrained.load("digits-cnn", **kwargs)
    # a folder bundle is checked against its own card
    folder = tmp_path / "copy"
    pretrained.extract(bundle[0], folder)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"seed": 0', '"seed": 1'))
    with pytest.raises(SnapshotError, match=r"config\.json does not match .*card\.json"):
        pretrained.load(folder)


def test_a_missing_or_stray_file_is_refused(bundle, tmp_path: Path) -> None:
    kwargs = _registered(tmp_path, bundle)
    folder = kwargs["root"] / "digits-cnn"
    stray = folder / "snapshots" / "snapshot-03.safetensors"
    stray.write_bytes((folder / "snapshots" / "snapshot-02.safetensors").read_bytes())
    with pytest.raises(SnapshotError, match=r"snapshot-03\.safetensors is not pinned"):
        pretrained.verify("digits-cnn", **kwargs)
    stray.unlink()
    (folder / "snapshots" / "manifest.json").unlink()
    with pytest.raises(pretrained.PretrainedNotAvailableError, match=r"manifest\.json is missing"):
        pretrained.load("digits-cnn", **kwargs)


def test_unknown_and_unshipped_names_are_refused(bundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown pre-trained ensemble 'resnet-21'.*known names are .*"
                                         r"resnet-20-cifar10"):
        pretrained.load("resnet-21")
    # The shipped registry: resnet-20-cifar10 is registered; until the GPU study has run, without files.
    entry = pretrained.registry()["resnet-20-cifar10"]
    if entry["files"] is None:
        with pytest.raises(pretrained.PretrainedNotAvailableError, match="not shipped yet"):
            pretrained.load("resnet-20-cifar10")
        assert "resnet-20-cifar10" not in pretrained.available()
    else:  # pragma: no cover - once the real weights are committed
        assert pretrained.load("resnet-20-cifar10").n_members == len(
            [f for f in entry["files"] if f.endswith(".safetensors")])
    unshipped = _registry(tmp_path, "later", {"files": None, "how": "run the GPU study first"})
    with pytest.raises(pretrained.PretrainedNotAvailableError, match="not shipped yet: run the GPU study first"):
        pretrained.load("later", registry_path=unshipped)
    bad = _registry(tmp_path, "bad", {"files": {"../x": "0" * 64}})
    with pytest.raises(SnapshotError, match="not a relative path inside the bundle"):
        pretrained.load("bad", registry_path=bad)


def test_extract_then_cli_evaluate_gives_the_loaded_ensembles_numbers(bundle, test_images, tmp_path) -> None:
    """What ``snapens evaluate --pretrained NAME`` is to do: extract to a folder, then evaluate it."""
    images, labels = test_images
    dest = pretrained.extract(bundle[0], tmp_path / "eval")
    with pytest.raises(ValueError, match="not an empty folder"):
        pretrained.extract(bundle[0], dest)
    proc = _snapens("evaluate", dest, "--json", "--quiet", "--precision", "fp32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    probs = pretrained.load(bundle[0], precision="fp32", weights="equal").predict_proba(images)
    error = 100.0 * float((probs.argmax(1) != labels).float().mean())
    assert summary["num_test"] == len(labels) and summary["ensemble_equal"]["error"] == pytest.approx(error)
    # The card can record the numbers of the float16 members themselves; the registry entry follows the card.
    entry = pretrained.write_card(dest, summary, measured_on="this bundle (float16 members)")
    card = json.loads((dest / "card.json").read_text())
    assert card["metrics"]["measured_on"] == "this bundle (float16 members)"
    assert card["metrics"]["rows"]["ensemble_equal"]["error"] == pytest.approx(error)
    assert entry["files"]["card.json"] != bundle[1]["files"]["card.json"]
    assert entry["files"]["snapshots/snapshot-01.safetensors"] == bundle[1]["files"]["snapshots/snapshot-01.safetensors"]


def test_export_refuses_what_it_cannot_ship(run_dir: Path, bundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an empty folder"):
        pretrained.export_pretrained(run_dir, bundle[0], name="x", command="c")
    with pytest.raises(ValueError, match="over the limit of 1000"):
        pretrained.export_pretrained(run_dir, tmp_path / "big", name="x", command="c", max_bytes=1000)
    one = pretrained.export_pretrained(run_dir, tmp_path / "one", name="x", command="c", last=1)
    assert [k for k in one["files"] if k.endswith(".safetensors")] == ["snapshots/snapshot-01.safetensors"]
    assert pretrained.load(tmp_path / "one").n_members == 1


def test_cli_evaluate_pretrained_copies_checks_and_evaluates(bundle, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``snapens evaluate --pretrained NAME_OR_DIR [DEST]``: verified, copied to DEST, evaluated there; the
    package's copy is never written to; a wrong --dataset or an unshipped name writes nothing."""
    from snapens.cli import main

    folder, _ = bundle
    before = sorted(p.name for p in folder.rglob("*"))
    dest = tmp_path / "eval"
    argv = ["evaluate", "--pretrained", str(folder), str(dest), "--precision", "fp32", "--device", "cpu", "--quiet"]
    assert main([*argv, "--dataset", "cifar10"]) == 2
    assert "trained on digits, not cifar10" in capsys.readouterr().err and not dest.exists()
    assert main([*argv, "--dataset", "digits", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (dest / "summary.json").is_file() and (dest / "recommended.json").is_file()
    assert summary["num_members"] == 2 and sorted(p.name for p in folder.rglob("*")) == before
    assert main(["evaluate", "--pretrained", "resnet-20-cifar10", str(tmp_path / "r20"), "--quiet"]) == 2
    assert "not shipped yet" in capsys.readouterr().err and not (tmp_path / "r20").exists()
    assert main(["evaluate", "--quiet"]) == 2 and "needs RUN_DIR" in capsys.readouterr().err
