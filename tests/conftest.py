"""Fixtures shared by the test files: one real tiny training run per session, and the CLI's one-line errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ERROR_PREFIX = "snapens: error: "


def _one_line_error(stderr: str) -> str:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, f"a traceback instead of a one-line error:\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), (
        f"expected exactly one stderr line starting with {ERROR_PREFIX!r}, got:\n{stderr}")
    return lines[0][len(ERROR_PREFIX):]


@pytest.fixture(scope="session", autouse=True)
def snapens_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``SNAPENS_CACHE_DIR`` in pytest's temp root for the whole session (issue 20, item 17).

    The suite must never write the user's ``~/.cache/snapens`` (the image-folder decode cache). Set in
    ``os.environ``, so the subprocesses the tests start (the CLI, torchrun) inherit it too.
    """
    cache = tmp_path_factory.mktemp("snapens-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("SNAPENS_CACHE_DIR", str(cache))
    yield cache
    patch.undo()


@pytest.fixture(autouse=True)
def _fresh_cli_log_handler() -> Iterator[None]:
    """Drop the stderr handler ``snapens.cli._common.configure_logging`` adds after each test.

    The handler keeps the ``sys.stderr`` of the test that created it; pytest closes that stream when the test
    ends, so later tests' log lines would be lost (or turn into logging errors) instead of being captured.
    """
    yield
    logger = logging.getLogger("snapens")
    for handler in [h for h in logger.handlers if getattr(h, "_snapens_cli", False)]:
        logger.removeHandler(handler)


@pytest.fixture()
def assert_one_line_error() -> Callable[[str], str]:
    """``check(stderr) -> message``: asserts that ``stderr`` is exactly one ``snapens: error: ...`` line without a
    traceback and returns the message after the prefix."""
    return _one_line_error


@pytest.fixture()
def cli_error(capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """``cli_error(*argv) -> message``: runs ``snapens ARGV`` in-process, asserts exit code 2 and a one-line error
    (see :func:`assert_one_line_error`) and returns the message."""
    from snapens.cli import main

    def run(*argv: str) -> str:
        capsys.readouterr()  # drop what earlier steps of the test printed
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2, f"exit code {code}, stderr:\n{err}"
        return _one_line_error(err)

    return run


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core machine this is several times faster for tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real digits run (cnn-small, 2 epochs, 2 snapshots, best.safetensors), trained once per session.

    Shared and read-only: a test that writes into a run (evaluate writes summary.json) copies it first
    (``shutil.copytree``).
    """
    from snapens.workflows.training import train_run
    from snapens.config import resolve_config

    before = torch.get_num_threads()
    cfg = resolve_config(epochs=2, snapshots=2, batch_size=128, device="cpu", precision="fp32",
                         channels_last=False, threads=1)
    try:
        return Path(train_run(cfg, tmp_path_factory.mktemp("tiny-run") / "run", resume=False, progress=False))
    finally:
        torch.set_num_threads(before)  # threads=1 sets torch's global thread count


def _call_without_blocking(call: Callable[[], object], fifo: Path, wait_s: float = 60.0) -> object:
    import os
    import threading

    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(wait_s)  # a promise, not a timing: a reader blocked on a FIFO never returns by itself
    if thread.is_alive():
        # Unblock the reader: opening the FIFO's write end lets its open() return; closing it gives EOF.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(wait_s)
        pytest.fail(f"{fifo} was opened for reading and blocked")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


@pytest.fixture()
def without_blocking_on() -> Callable[..., object]:
    """``without_blocking_on(fifo, call) -> call()``: fails the test (instead of hanging it) if ``call`` blocks
    reading the FIFO ``fifo``; exceptions of ``call`` propagate."""
    return lambda fifo, call: _call_without_blocking(call, fifo)
