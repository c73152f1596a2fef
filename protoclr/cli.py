"""How every command line (train.py, `python -m protoclr.eval`, `python -m protoclr.export`) ends on an error.

A user error ends as one line on stderr, `PROG: error: MESSAGE`, with exit code 2 (argparse's code for a bad
command line), and no traceback. User errors are ValueError (protoclr's one exception type for bad input: config
values, data folders, checkpoints, op arguments) and the OSErrors of a path the user named. `--debug` re-raises
them with their traceback (for a bug report); any other exception is a bug and always keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["USER_ERRORS", "add_debug_flag", "run"]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

T = TypeVar("T")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of a user error (bad setting, path or file) instead of its one-line message",
    )


def run(prog: str, fn: Callable[[], T], debug: bool = False) -> T:
    """`fn()`; a user error (USER_ERRORS) prints `prog: error: message` on stderr and exits with code 2."""
    try:
        return fn()
    except USER_ERRORS as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
