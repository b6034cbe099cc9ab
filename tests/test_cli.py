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
    assert main([]) == 0 and "train" in capsys.readouterr().out


def test_console_entry_point_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "snapens", "evaluate", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("snapens: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
