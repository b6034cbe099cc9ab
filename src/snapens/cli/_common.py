"""Helpers shared by the ``snapens`` subcommands: logging, progress, threads, environment, tables, loaders.

The torchrun launch, devices and the process group live in :mod:`snapens.distributed`."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import snapens

__all__ = [
    "configure_logging",
    "progress_enabled",
    "set_threads",
    "environment_info",
    "format_table",
    "method_table",
    "plural",
    "default_run_dir",
    "build_loaders",
]


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


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (``None`` keeps the default); returns the number in use.

    Raises:
        ValueError: ``threads`` < 1.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def environment_info(device: torch.device, precision: str, world_size: int = 1) -> dict[str, Any]:
    """Versions and hardware for ``config.json``: what a reader needs to reproduce a number.

    ``device`` is rank 0's; ``world_size`` the number of training processes (torchrun).
    """
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        name = f"{device} ({platform.processor() or platform.machine()})"
    return {
        "snapens": snapens.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": name,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


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


def plural(count: int, noun: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``: a count with its noun, in the singular for one."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def default_run_dir(dataset: str, model: str, now: _dt.datetime | None = None, root: str = "runs") -> Path:
    """``runs/<dataset>-<model>-<YYYYmmdd-HHMMSS>``, with characters unsafe in file names replaced by ``_``."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{model}").strip("_")
    return Path(root) / f"{safe}-{stamp}"


def build_loaders(
    cfg: Any, splits: Any, device: torch.device | str, *, rank: int = 0, world_size: int = 1
) -> tuple[Any, Any | None]:
    """Training and validation :class:`~snapens.data.BatchLoader` for a :class:`~snapens.config.TrainConfig`.

    The training loader shuffles and augments as a function of ``(cfg.seed, epoch)``; ``cfg.augment`` None
    keeps the dataset's default augmentation and False turns it off. With ``world_size`` > 1 it yields rank
    ``rank``'s block of ``cfg.batch_size`` images from every global batch of ``cfg.batch_size * world_size``.
    The validation loader (None when the validation split is empty) keeps order, never augments and is not
    sharded (rank 0 validates alone).
    """
    from snapens.data import AugmentSpec, BatchLoader

    augment = AugmentSpec() if cfg.augment is False else splits.augment
    train = BatchLoader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment,
                        mean=splits.mean, std=splits.std, device=device, channels_last=cfg.channels_last,
                        rank=rank, world_size=world_size)
    val = None
    if len(splits.val) > 0:
        val = BatchLoader(splits.val, max(cfg.batch_size, 256), shuffle=False, augment=None, mean=splits.mean,
                          std=splits.std, device=device, channels_last=cfg.channels_last)
    return train, val

