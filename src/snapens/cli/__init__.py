"""The ``snapens`` command line: the only place that parses arguments, prints, or picks presets.

Each subcommand lives in its own module with ``register(subparsers) -> None``, which adds its parser and sets
``func=run`` where ``run(args: argparse.Namespace) -> int`` returns the exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import snapens

PROG = "snapens"


class CLIError(Exception):
    """A user error: printed as one line ``snapens: error: ...``, exit code 2."""


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    from snapens.cli import evaluate, export, plot, reproduce, train

    parser = argparse.ArgumentParser(prog=PROG, description=snapens.__doc__)
    parser.add_argument("--version", action="version", version=f"{PROG} {snapens.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, evaluate, plot, export, reproduce):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as exc:
        if os.environ.get("SNAPENS_DEBUG"):
            raise
        return fail(str(exc) or type(exc).__name__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
