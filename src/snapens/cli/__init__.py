"""The ``snapens`` command line: the only place that parses arguments, prints, or picks presets.

Each subcommand lives in its own module with ``register(subparsers) -> None``, which adds its parser and sets
``func=run`` where ``run(args: argparse.Namespace) -> int`` returns the exit code. ``run`` calls the library
layer (:mod:`snapens.workflows`) and prints; the library's errors (``ValueError``, ``OSError``) become the one
line ``snapens: error: ...`` here. Subcommand modules import no other one: only this package and
:mod:`snapens.cli._common` (the error and the printing helpers).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import snapens
from snapens.cli._common import PROG, CLIError, fail

__all__ = ["CLIError", "build_parser", "fail", "main", "plain_text"]


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """``text`` (a docstring) without its reST markup, for a terminal.

    Double-backtick literals lose their backticks; roles such as ``:class:`~snapens.config.TrainConfig``` become
    the bare name (its last component with ``~``, as Sphinx shows it).
    """
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return _LITERAL.sub(r"\1", text)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2), like every other user error, and
    whose help is plain text (the subcommands' descriptions are their module docstrings, written in reST).

    Abbreviated flags are refused (``--snapshot 3`` is not ``--snapshots 3``): a typo must not pass for another
    flag, and a flag added later must not change what an old command line means.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def format_help(self) -> str:
        return plain_text(super().format_help())

    def error(self, message: str) -> NoReturn:
        sub = self.prog.removeprefix(PROG).strip()
        fail(f"{sub}: {message}" if sub else message)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``snapens`` parser with every subcommand registered."""
    from snapens.cli import average, distill, evaluate, export, plot, reproduce, train

    parser = _Parser(prog=PROG, description=snapens.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {snapens.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (train, evaluate, average, distill, plot, export, reproduce):
        module.register(sub)
    return parser


def _unknown_arguments(parser: argparse.ArgumentParser, command: str | None, unknown: list[str]) -> str:
    """The one error line for arguments no parser took: naming the subcommand and the closest flags."""
    flags: list[str] = []
    where = parser
    for action in parser._actions:  # the subcommand's own parser knows its flags
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            where = action.choices[command]
    for action in where._actions:
        flags.extend(s for s in action.option_strings if s.startswith("--"))
    hints = []
    for arg in unknown:
        if arg.startswith("-"):
            typo = arg.split("=", 1)[0]
            # an abbreviation (argparse's allow_abbrev is off) first, then the most similar spelling
            close = [f for f in flags if f.startswith(typo)] or difflib.get_close_matches(typo, flags, n=1,
                                                                                           cutoff=0.75)
            if close:
                hints.append(f"{typo}: did you mean {' or '.join(close[:2])}?")
    sub = f"{command}: " if command else ""
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"{PROG}: error: {sub}unrecognized arguments: {' '.join(unknown)}{hint}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``snapens`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    User errors (``CLIError``, ``ValueError``, ``OSError``) become one line ``snapens: error: ...`` and exit code 2;
    set ``SNAPENS_DEBUG=1`` to see the traceback instead.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.exit(2, _unknown_arguments(parser, args.command, unknown))
    if args.command is None:
        parser.print_usage(sys.stderr)
        return fail("choose a command: train, evaluate, average, distill, plot, export or reproduce "
                    "(snapens COMMAND --help)")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, OSError) as exc:
        if os.environ.get("SNAPENS_DEBUG"):
            raise
        return fail(str(exc) or type(exc).__name__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
