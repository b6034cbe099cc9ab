"""Printing helpers shared by the ``snapens`` subcommands: the one-line error, logging to stderr, progress bars,
tables.

What is not printing lives in the library layer: threads, loaders, the environment record and the default run
folder in :mod:`snapens.workflows.common`; the torchrun launch, devices and the process group in
:mod:`snapens.distributed`."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "PROG",
    "CLIError",
    "fail",
    "configure_logging",
    "progress_enabled",
    "format_table",
    "METHOD_COLUMNS",
    "method_table",
    "finite_float",
    "learning_rate",
    "cycle_multiplier",
    "thread_count",
]


PROG = "snapens"


class CLIError(Exception):
    """A user error: printed as one line ``snapens: error: ...``, exit code 2."""


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite number (``inf`` and ``nan`` are refused at parse time)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def learning_rate(text: str) -> float:
    """An argparse ``type``: a finite learning rate of at most :data:`snapens.workflows.common.MAX_LR` (one that
    is not positive is refused by the config, with the setting's name)."""
    from snapens.workflows.common import MAX_LR

    value = finite_float(text)
    if value > MAX_LR:
        raise argparse.ArgumentTypeError(f"expected a learning rate of at most {MAX_LR:g}, got {text!r}")
    return value


def cycle_multiplier(text: str) -> float:
    """An argparse ``type``: a finite cycle length multiplier of at most :data:`snapens.config.MAX_CYCLE_MULT`
    (one below 1 is refused by the config, with the setting's name)."""
    from snapens.config import MAX_CYCLE_MULT

    value = finite_float(text)
    if value > MAX_CYCLE_MULT:
        raise argparse.ArgumentTypeError(f"expected a cycle length multiplier of at most {MAX_CYCLE_MULT:g}, "
                                         f"got {text!r}")
    return value


def thread_count(text: str) -> int:
    """An argparse ``type``: an integer thread count of at most 4 per CPU core
    (:func:`snapens.workflows.common.max_threads`; one below 1 is refused by the config, with the setting's name)."""
    from snapens.workflows.common import check_threads

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value >= 1:
        try:
            check_threads(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def fail(message: str) -> int:
    """Print ``snapens: error: <message>`` as one line on stderr and return the exit code 2."""
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"{PROG}: error: {first_line}", file=sys.stderr)
    return 2


class _ProgressAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line through ``tqdm.write``: a progress bar open on the same stream is cleared first and
    redrawn below the line, instead of the line being glued to the end of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging's contract: a failing handler reports itself, never raises
            self.handleError(record)


def configure_logging(quiet: bool = False, *, debug: bool | None = None, rank: int = 0) -> None:
    """Send snapens' log lines to stderr: INFO normally, WARNING with ``--quiet``, DEBUG with SNAPENS_DEBUG.

    Under torchrun, ranks other than 0 log at WARNING (or DEBUG), their lines prefixed with ``[rank N]``.
    Lines are written around any open progress bar, never onto it.
    """
    if debug is None:
        debug = bool(os.environ.get("SNAPENS_DEBUG"))
    level = logging.DEBUG if debug else logging.WARNING if quiet or rank != 0 else logging.INFO
    logger = logging.getLogger("snapens")
    logger.setLevel(level)
    if not any(getattr(h, "_snapens_cli", False) for h in logger.handlers):
        handler = _ProgressAwareHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
        handler._snapens_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def progress_enabled(quiet: bool) -> bool:
    """Progress bars only for an interactive stderr and without ``--quiet`` (no bar noise in logs and CI)."""
    return not quiet and sys.stderr.isatty()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned.

    Example:
        >>> print(format_table(["name", "err"], [["a", 1.5], ["bb", 10.25]]))
        name    err
        a       1.5
        bb    10.25
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) and bool(rows) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


#: The columns of :func:`method_table`: (row key, header, format).
METHOD_COLUMNS = (("error", "error %", ".2f"), ("nll", "NLL", ".4f"), ("ece", "ECE", ".4f"),
                  ("forward_passes", "passes/img", "g"), ("images_per_second", "img/s", ".0f"))


def method_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[tuple[str, str, str]] = METHOD_COLUMNS) -> str:
    """The table of methods that ``distill`` and ``reproduce`` print: one row per method, its ``"name"`` then
    ``columns`` ``(key, header, format)`` (:data:`METHOD_COLUMNS`). A number that is not finite (stored as None)
    shows as ``nan``, a missing entry (e.g. no price) as ``-``, a string as it is."""
    def cell(row: Mapping[str, Any], key: str, spec: str) -> str:
        if key not in row:
            return "-"
        value = row[key]
        return value if isinstance(value, str) else format(float("nan") if value is None else float(value), spec)

    cells = [["", *(h for _, h, _ in columns)],
             *([str(r["name"])] + [cell(r, key, spec) for key, _, spec in columns] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()
                     for r in cells)


