import re
import subprocess
import sys

import pytest

import snapens
from snapens.cli import main


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--epochs", "x"], "invalid int value: 'x'"),
    (["train", "--schedule", "foo"], "invalid choice: 'foo'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_usage_errors_are_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("snapens: error: ") and fragment in err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"snapens {snapens.__version__}"


def test_no_command_is_usage_and_exit_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    usage, error = captured.err.splitlines()
    assert usage.startswith("usage: snapens") and "COMMAND" in usage
    assert error.startswith("snapens: error: choose a command: train, evaluate")


@pytest.mark.parametrize("command", ["train", "evaluate", "plot", "export", "reproduce"])
def test_help_is_plain_text_without_rest_markup(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"snapens {command}" in text
    for markup in ("``", ":class:", ":func:", ":data:", ":mod:", ":meth:"):
        assert markup not in text, f"{markup!r} in `snapens {command} --help`"


def test_plain_text_strips_literals_and_roles():
    from snapens.cli import plain_text

    assert plain_text("run ``snapens train``; see :class:`snapens.config.TrainConfig` and :func:`~a.b.fit`") == (
        "run snapens train; see snapens.config.TrainConfig and fit")


def test_console_entry_point_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "snapens", "evaluate", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("snapens: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_log_lines_do_not_collide_with_an_open_progress_bar(monkeypatch):
    import io
    import logging

    from tqdm import tqdm

    from snapens.cli._common import configure_logging

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(False)
    bar = tqdm(total=10, desc="epoch 1/2", file=stream, mininterval=0)
    bar.update(3)
    logging.getLogger("snapens.engine").info("*** snapshot 1/2 at step 3")
    bar.update(1)
    bar.close()
    text = stream.getvalue()
    at = text.index("*** snapshot 1/2 at step 3")
    assert "epoch 1/2" in text[:at]  # the bar was drawn before the line...
    assert re.search(r"it/s\]\r +\r$", text[:at])  # ...then erased (blanked), not written onto
    assert text[at:].startswith("*** snapshot 1/2 at step 3\n")
    assert "epoch 1/2" in text[at:]  # and drawn again below it


# ------------------------------------------------------------------ issue 20 (round two), items 10, 11 and 18


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("snapens: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,flag", [
    (["train", "--snapshot", "3"], "--snapshots"),      # once accepted as --snapshots 3
    (["train", "--epoch", "3"], "--epochs"),
    (["reproduce", "--method", "snapshot"], "--methods"),
    (["distill", "RUN", "--temp", "2"], "--temperature"),
    (["average", "RUN", "--bn-batch", "2"], "--bn-batches"),
    (["evaluate", "RUN", "--include-b"], "--include-best"),
])
def test_abbreviated_flags_are_refused_naming_the_command_and_the_closest_flag(argv, flag, capsys, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _usage_error(argv, capsys)
    typo = next(a for a in argv if a.startswith("--"))
    assert err.startswith(f"snapens: error: {argv[0]}: unrecognized arguments: {typo}")
    assert f"{typo}: did you mean {flag}?" in err
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--lr", "1e300"], "argument --lr: expected a learning rate of at most 10, got '1e300'"),
    (["train", "--lr", "nan"], "argument --lr: expected a finite number"),
    (["train", "--swa-lr", "1e300"], "argument --swa-lr: expected a learning rate of at most 10"),
    (["train", "--alpha_zero", "1e300"], "argument --alpha_zero: expected a learning rate of at most 10"),
    (["distill", "RUN", "--lr", "1e300"], "argument --lr: expected a learning rate of at most 10"),
    (["reproduce", "--lr", "inf"], "argument --lr: expected a finite number"),
    (["train", "--cycle-mult", "inf"], "argument --cycle-mult: expected a finite number"),
    (["train", "--momentum", "nan"], "argument --momentum: expected a finite number"),
    (["train", "--threads", "100000"], "argument --threads: threads 100000 is more than 4 per CPU core"),
    (["reproduce", "--threads", "100000"], "argument --threads: threads 100000 is more than 4 per CPU core"),
    (["distill", "RUN", "--threads", "100000"], "argument --threads: threads 100000 is more than 4 per CPU core"),
    (["train", "--threads", "two"], "argument --threads: expected an integer, got 'two'"),
])
def test_absurd_rates_and_thread_counts_are_refused_at_parse_time(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fragment in _usage_error(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_set_threads_refuses_more_than_four_per_core():
    import os

    import torch

    from snapens.workflows.common import max_threads, set_threads

    assert max_threads() == 4 * (os.cpu_count() or 1)
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="more than 4 per CPU core"):
        set_threads(max_threads() + 1)
    assert torch.get_num_threads() == before  # refused before torch (and OpenBLAS) saw it


def test_a_cycle_mult_that_overflows_is_one_line_and_writes_nothing(tmp_path, capsys):
    # refused at parse time (review fix: it was refused after the dataset loaded, with an OverflowError's tail);
    # the library refuses it too, and the schedule's own overflow check stays behind both
    from snapens.config import MAX_CYCLE_MULT, TrainConfig

    run = tmp_path / "run"
    message = _usage_error(["train", "--epochs", "2", "--snapshots", "2", "--cycle-mult", "1e308", "--run-dir",
                            str(run), "--device", "cpu", "--threads", "1", "--quiet", "--no-eval"], capsys)
    assert message == ("snapens: error: train: argument --cycle-mult: expected a cycle length multiplier of at most "
                       f"{MAX_CYCLE_MULT:g}, got '1e308'\n")
    assert "Numerical result" not in message and not run.exists()
    with pytest.raises(ValueError, match=f"cycle_mult must be >= 1 .* at most {MAX_CYCLE_MULT:g}, got 1e"):
        TrainConfig(cycle_mult=1e308)
    TrainConfig(cycle_mult=MAX_CYCLE_MULT)  # the bound itself is accepted


def test_an_image_folder_run_is_named_after_the_folder():
    import datetime as dt

    from snapens.workflows.common import default_run_dir

    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    assert default_run_dir("folder:../shared/data/cifar10-jpeg/", "cnn-small", now) == \
        __import__("pathlib").Path("runs/folder-cifar10-jpeg-cnn-small-20260102-030405")
    assert default_run_dir("cifar10", "wrn-16-4", now).name == "cifar10-wrn-16-4-20260102-030405"


def test_the_library_refuses_an_absurd_rate_before_writing(tmp_path):
    from snapens.config import TrainConfig
    from snapens.workflows.training import train_run

    for cfg in (TrainConfig(lr=1e300, device="cpu"), TrainConfig(schedule="swa", swa_lr=1e300, device="cpu")):
        with pytest.raises(ValueError, match=r"lr must be a finite learning rate in \(0, 10\], got 1e\+300"):
            train_run(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()
