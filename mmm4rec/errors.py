"""The one error policy of every entry point (``mmm4rec ...``, ``dist/train.py``, the
quickstart, ``python -m data_shards.cli``).

* A **user error** -- something the user can fix: a config value, an input file or
  record, the storage (endpoint, credentials, bucket), an output folder -- is a
  :class:`UserError` (``ConfigError``, ``DataError`` and its kinds, ``ExportError``
  derive from it) or a ``FileNotFoundError``. It prints one line naming the cause and
  the command exits with status **2**.
* Anything else is a bug or an environment failure: its traceback is kept and the
  command exits with status **1** (Python's own exit status for an uncaught exception).
* ``--traceback`` shows the traceback of a user error too (the status stays 2).

A light leaf module: it imports nothing of the project, so every package may use it.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback as _traceback
from collections.abc import Callable
from types import ModuleType

__all__ = ["EXIT_USER_ERROR", "OptionalDependencyError", "UserError", "add_traceback_flag", "import_optional",
           "is_user_error", "one_line", "report_user_error", "run_command"]

#: exit status of a user error (argparse's status for a bad command line, too)
EXIT_USER_ERROR = 2

TRACEBACK_HELP = "on a user error (config, data, storage: exit status 2), print the full traceback, not just one line"


class UserError(Exception):
    """An error the user can act on: its message names the file, field, record or URL and why."""


class OptionalDependencyError(UserError, ImportError):
    """An optional dependency (an extra of ``pyproject.toml``) is missing, or is installed
    but fails to import. An ``ImportError`` too, so that ``except ImportError`` callers that
    can do without the dependency keep working."""


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sentence_transformers"``), one of the ``[extra]`` dependencies
    needed for ``purpose`` (e.g. ``"encoding item text"``).

    * Not installed (a ``ModuleNotFoundError`` for ``module`` itself or a parent package):
      :class:`OptionalDependencyError` that names the extra to install.
    * Installed but failing to import (a dependency of it missing, a module of the user's
      shadowing one it imports, a binary mismatch, ...): :class:`OptionalDependencyError`
      naming the module and the real error, *not* the extra (installing it again would not help).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        if e.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise OptionalDependencyError(f"{purpose} needs the '{extra}' extra: pip install \"mmm4rec[{extra}]\" "
                                          f"({module} is not installed)") from e
        raise OptionalDependencyError(_broken(module, e)) from e
    except Exception as e:  # noqa: BLE001 -- any failure at import is a broken install, reported as what it is
        raise OptionalDependencyError(_broken(module, e)) from e


def _broken(module: str, error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{module} is installed but failed to import: {type(error).__name__}: {first}"


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, (UserError, FileNotFoundError))


def one_line(error: BaseException) -> str:
    """The message of a user-facing error on one line. An error raised in a DataLoader
    worker comes back as ``Caught X in DataLoader worker process N.\\nOriginal Traceback
    ...``: its last line (``pkg.X: message``) is the message."""
    text = str(error).strip()
    if "\n" in text and text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and " " not in head else last
    return text


def add_traceback_flag(parser: argparse.ArgumentParser, default: object = False) -> None:
    """``--traceback`` on ``parser`` and on each of its (nested) sub-commands that lacks it,
    so that it may stand before or after the command. Call it after the sub-commands are
    registered. Sub-commands get ``default=argparse.SUPPRESS``: a flag given before the
    command is not reset by the sub-parser."""
    if not any("--traceback" in a.option_strings for a in parser._actions):
        parser.add_argument("--traceback", action="store_true", default=default, help=TRACEBACK_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in dict.fromkeys(action.choices.values()):   # aliases share a parser
                add_traceback_flag(command, default=argparse.SUPPRESS)


def report_user_error(prog: str, error: BaseException, show_traceback: bool = False, prefix: str = "") -> None:
    """Print a user error as ``PROG: error: MESSAGE`` (one line), after its traceback when asked."""
    if show_traceback:
        _traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"{prog}: error: {prefix}{one_line(error)}", file=sys.stderr, flush=True)


def run_command(prog: str, func: Callable[[], int | None], show_traceback: bool = False) -> int:
    """Run an entry point's body under the policy above: its status (0 for None), 2 after
    one line for a user error, 130 on Ctrl-C; any other exception propagates (traceback,
    exit status 1)."""
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        report_user_error(prog, e, show_traceback)
        return EXIT_USER_ERROR
