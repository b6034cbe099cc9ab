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
    (["evaluate"], "required: RUN_DIR"),
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
