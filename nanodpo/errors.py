"""User errors: mistakes in flags, configs or data, reported as one clear sentence instead of a traceback.

Code that validates user input raises `UserError("data.jsonl, row 12, field 'chosen': ...")`. The scripts run their
`main` through `exit_on_user_error`, which prints the message and exits with status 2. Anything else is a bug in
nanodpo (or the environment) and keeps its full traceback.
"""

import importlib.util
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix: bad flag, bad config, bad data row. The message names file, row, field or flag."""


def exit_on_user_error(main: Callable[..., object], *args) -> None:
    try:
        main(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


_said_once: set[str] = set()


def say_once(message: str) -> None:
    """Print a notice once per run, on the main process only (RANK is set by torchrun / accelerate launch)."""
    if message not in _said_once:
        _said_once.add(message)
        if os.environ.get("RANK", "0") == "0":
            print(f"[nanodpo] {message}")


def require_extra(module: str, extra: str, needed_by: str) -> None:
    """Refuse, naming the install command, what needs an optional package (pyproject.toml's extras) that is missing."""
    if importlib.util.find_spec(module) is None:
        raise missing_extra(module, extra, needed_by)


def missing_extra(module: str, extra: str, needed_by: str) -> UserError:
    return UserError(
        f'{needed_by} needs the {module} package, which is not installed: pip install -e ".[{extra}]" in the '
        f"nanodpo clone (or pip install {module})"
    )
