"""User errors: reported by `mixlora-lit` as one line, `mixlora-lit: error: ...`, with exit code 2.

`UserError` marks a mistake in what the user gave (a config value, a file, a path): every check of
user input raises it (or a subclass) with a message that names the key, file or value and what was
expected. Anything else that escapes a command is a bug and keeps its traceback. Operating-system
errors about a named path (missing file, no permission, read-only or full disk) are the user's
environment, not a bug, and are reported the same way. `--debug` (or MIXLORA_LIT_DEBUG=1) shows the
traceback of every error.

This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

DEBUG_ENV = "MIXLORA_LIT_DEBUG"
USER_ERROR_EXIT = 2
SIGTERM_EXIT = 128 + 15  # the shell's code for a process ended by SIGTERM (what schedulers expect)

_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EISDIR, errno.ENOTDIR,
                errno.EEXIST, errno.ENAMETOOLONG, errno.EDQUOT}


class UserError(ValueError):
    """A mistake in the user's input. A ValueError, so callers that catch ValueError keep working."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or a command needs) does not exist."""


class StoppedBySignal(SystemExit):
    """SIGTERM came when no training step was left to stop (the fit had ended): stop before the next stage."""

    def __init__(self, note: str) -> None:
        super().__init__(SIGTERM_EXIT)
        self.note = note


class TrainingDiverged(UserError, FloatingPointError):
    """A non-finite loss or weight: the step is named and the last checkpoint before it is kept."""


def one_line(message: str) -> str:
    """A multi-line message (YAML parser, jsonargparse) folded into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def user_message(err: BaseException) -> str | None:
    """The one-line message for a user error, or None for a bug (which keeps its traceback)."""
    if isinstance(err, UserError):
        return one_line(str(err))
    if isinstance(err, OSError) and err.errno in _PATH_ERRNOS and err.filename:
        where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        return f"{where}: {err.strerror or os.strerror(err.errno)}"
    if type(err).__name__ == "ArgumentError" and type(err).__module__.startswith(("jsonargparse", "argparse")):
        return one_line(str(err))
    return None


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(--debug given or MIXLORA_LIT_DEBUG set, argv without a leading --debug)."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if argv and argv[0] == "--debug":
        return True, argv[1:]
    return debug, argv


def run_reporting_user_errors(command: Callable[[], int], debug: bool = False) -> int:
    """Run `command`; user errors become one line on stderr and exit code 2 (tracebacks with debug)."""
    try:
        return command()
    except KeyboardInterrupt:
        print("mixlora-lit: interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:
        # Lightning's SIGTERMException is a SystemExit with code 0: a scheduler would read "success".
        if type(err).__name__ != "SIGTERMException" and not isinstance(err, StoppedBySignal):
            raise
        print(f"mixlora-lit: stopped by SIGTERM{_checkpoint_note(err)}", file=sys.stderr)
        return SIGTERM_EXIT
    except Exception as err:  # noqa: BLE001 - classified below; bugs are re-raised untouched
        message = user_message(err)
        if message is None or debug:
            raise
        print(f"mixlora-lit: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT


def _checkpoint_note(err: BaseException) -> str:
    if isinstance(err, StoppedBySignal):
        return f" {err.note}"
    saved = getattr(err, "mixlora_checkpoint", None)
    if not saved:
        return ""
    path, step = saved
    return f" at step {step}; checkpoint {path}: resume with the same command and --ckpt_path last"
