"""The command line's contract: ``key=value`` arguments and the one-line errors.

Scripts call ``cli.run(main)``; ``main`` raises ``UserError`` (exit 1) or ``UsageError``
(exit 2) for anything a user can get wrong, and ``run`` turns it into a single
``error: ...`` line on stderr, without a traceback.
"""

import contextlib
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""

    exit_code = 1


class UsageError(UserError):
    """A bad command-line argument: printed as one line, exit status 2."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C or SIGTERM stopped the work: one line saying what was finished, exit status 130."""

    exit_code = 130


class HelpRequested(Exception):
    """Raised by the parser after printing the help text (exit status 0)."""


@contextlib.contextmanager
def signals_as_interrupts():
    """In the block, SIGTERM raises KeyboardInterrupt("SIGTERM") as Ctrl-C does ("SIGINT"), so
    that the work can say what it finished; outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def signals_deferred():
    """In the block, Ctrl-C and SIGTERM wait: a few renames that must not stop half-way finish,
    then the first signal caught takes effect as it would have (the handlers outside the block);
    outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {number: signal.signal(number, lambda signum, frame: caught.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
        if caught:
            signal.raise_signal(caught[0])


def run(main: Callable[[list], Any], argv=None) -> int:
    """Run a script's ``main(argv)`` and map user errors to one line and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except HelpRequested:
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... help | head`): stop quietly, as command-line tools do;
        # stdout is pointed at /dev/null so that Python's exit-time flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        # the file system refused (a full disk, no permission...): the writers have removed
        # their temporary files, so one line says what and where
        if err.errno is None:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------
# key=value arguments

_INTEGER = re.compile(r"-?[0-9]+")   # ASCII digits only: not "+1", "1_0" or other scripts' digits
_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
SHOWN_CHARACTERS = 60  # of a value echoed in an error


def shown(text: str) -> str:
    """A value as an error line shows it: control characters escaped, cut to SHOWN_CHARACTERS."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return escaped if len(escaped) <= SHOWN_CHARACTERS else f"{escaped[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


def _parse_int(text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise ValueError("expected an integer")
    return int(text)


def _parse_float(text: str) -> float:
    if not _NUMBER.fullmatch(text) or not math.isfinite(float(text)):
        raise ValueError("expected a finite number")
    return float(text)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError("expected true or false")


def _parse_optional_int(text: str):
    return None if text.lower() == "none" else _parse_int(text)


def _parse_optional_float(text: str):
    return None if text.lower() == "none" else _parse_float(text)


INT = _parse_int
FLOAT = _parse_float
BOOL = _parse_bool
OPTIONAL_INT = _parse_optional_int
OPTIONAL_FLOAT = _parse_optional_float
_TYPE_NAMES = {INT: "an integer", FLOAT: "a number", str: "a string", BOOL: "true or false",
               OPTIONAL_INT: "an integer or none", OPTIONAL_FLOAT: "a number or none"}
# ``int`` and ``float`` in a spec mean the strict parsers: Python's own accept "+1", "1_0",
# non-ASCII digits, "inf" and "nan"
_STRICT = {int: INT, float: FLOAT}


@dataclass
class Arg:
    """One ``key=value`` argument.

    ``default`` may be a callable of the already parsed values (per-level defaults);
    ``check`` returns an error text for a parsed value that is out of range, or None.
    """

    name: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: tuple = ()
    check: Callable[[Any], Any] = None

    def __post_init__(self):
        self.type = _STRICT.get(self.type, self.type)

    def describe_default(self) -> str:
        if callable(self.default):
            return " ".join((getattr(self.default, "__doc__", None) or "depends on other arguments").split())
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    def convert(self, text: str):
        try:
            value = self.type(text)
        except ValueError:
            raise UsageError(f"{self.name}={shown(text)}: expected "
                             f"{_TYPE_NAMES.get(self.type, 'a valid value')}") from None
        if self.choices and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise UsageError(f"{self.name}={shown(text)}: expected one of {allowed}")
        if self.check is not None and value is not None:
            problem = self.check(value)
            if problem:
                raise UsageError(f"{self.name}={shown(text)}: expected {problem}")
        return value


def positive(value):
    return None if value > 0 else "a value greater than 0"


def non_negative(value):
    return None if value >= 0 else "a value of 0 or more"


def patch_size_check(value):
    """A side of packed crops the network takes: its four poolings need multiples of 16, and a
    ZRR patch packs to 224."""
    return None if 16 <= value <= 224 and value % 16 == 0 else "a multiple of 16 from 16 to 224"


def format_help(prog: str, description: str, spec) -> str:
    width = max(len(a.name) for a in spec) + 2
    lines = [f"usage: python {prog} [key=value ...]", "", description, "", "arguments (default in brackets):"]
    for a in spec:
        stop = "" if not a.help or a.help.endswith(".") else "."
        choices = f"{stop} One of: {', '.join(str(c) for c in a.choices)}." if a.choices else ""
        lines.append(f"  {a.name:<{width}}{a.help}{choices} [{a.describe_default()}]")
    return "\n".join(lines)


def parse_args(argv, spec, prog: str, description: str = "", positional: str = None) -> dict:
    """Parse ``key=value`` tokens against ``spec`` (a list of ``Arg``).

    Tokens without ``=`` are collected under the key named by ``positional``
    (for example the DNG files of dng_to_png.py); without it they are an error.
    ``help``, ``-h`` and ``--help`` print the arguments and raise ``HelpRequested``.
    """
    by_name = {a.name: a for a in spec}
    values, given = {}, set()
    loose = []
    for token in argv:
        if token in ("help", "-h", "--help"):
            print(format_help(prog, description, spec))
            raise HelpRequested()
        key, sep, text = token.partition("=")
        if not sep:
            if positional is None:
                raise UsageError(f"{shown(token)}: expected key=value (see: python {prog} help)")
            loose.append(token)
            continue
        if key not in by_name:
            raise UsageError(f"unknown argument '{shown(key)}' (see: python {prog} help)")
        if key in given:
            raise UsageError(f"{key} given twice")
        values[key] = by_name[key].convert(text)
        given.add(key)
    for a in spec:  # plain defaults first, so callable defaults can look at them
        if a.name not in values and not callable(a.default):
            values[a.name] = a.default
    for a in spec:
        if a.name not in values:
            values[a.name] = a.default(values)
    if positional is not None:
        values[positional] = loose
    return values


def parse_size(text: str, multiple: int = 1):
    """(height, width) of a ``HEIGHTxWIDTH`` text, both positive multiples of ``multiple``, or
    None: callers word the error for their own argument."""
    try:
        height, width = (_parse_int(part) for part in text.lower().split("x"))
    except ValueError:
        return None
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        return None
    return height, width


def print_args(values: dict, stream=None) -> None:
    stream = stream or sys.stdout
    for key, value in values.items():
        print(f"  {key}: {value}", file=stream)
