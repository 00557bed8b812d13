"""Command-line values checked where they are parsed: argparse ``type=`` validators, a parser whose
errors are one line, UTF-8 checks for text arguments and stdin.

    p = ArgumentParser(...)
    p.add_argument("--top-k", type=non_negative_int)
    p.add_argument("--min-p", type=unit_interval)
"""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import MM1Error


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: PROG: MESSAGE (see --help)``), exit status 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_range(lo: int | None = None, hi: int | None = None):
    """An integer in [lo, hi] (None = open)."""

    def parse(text: str) -> int:
        v = _number(int, text)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is not {_span(lo, hi)}")
        return v

    parse.__name__ = "integer"
    return parse


def int_list(lo: int | None = None, hi: int | None = None, distinct: bool = False):
    """Comma-separated integers, each in [lo, hi] ("0,2,4,8"); ``distinct``: no repeats."""
    one = int_range(lo, hi)

    def parse(text: str) -> list[int]:
        values = [one(part) for part in text.split(",")]
        if distinct and len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
        return values

    parse.__name__ = "list of integers"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """A finite number in [lo, hi] (``lo_open``: above lo)."""

    def parse(text: str) -> float:
        v = _number(float, text)
        low_bad = lo is not None and (v <= lo if lo_open else v < lo)
        if low_bad or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"{text} is not {'above ' + str(lo) if lo_open and hi is None else _span(lo, hi)}")
        return v

    parse.__name__ = "number"
    return parse


def _span(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f"at least {lo}" if lo is not None else f"at most {hi}"


positive_int = int_range(1)
non_negative_int = int_range(0)
seed = int_range(0, 2**32 - 1)
unit_interval = float_range(0.0, 1.0)  # probabilities: top-p, min-p
non_negative_float = float_range(0.0)  # temperature
positive_float = float_range(0.0, lo_open=True)  # repetition penalty


def utf8_text(text: str) -> str:
    """A text argument that must be valid UTF-8 (argv holds undecodable bytes as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 text (byte {e.start})") from None
    return text


def read_stdin_text() -> str:
    """All of stdin as UTF-8 text, or one MM1Error."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return utf8_text_or_error(data, "stdin")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MM1Error(f"stdin is not valid UTF-8 text (byte {e.start})") from None


def utf8_text_or_error(text: str, what: str) -> str:
    try:
        return utf8_text(text)
    except argparse.ArgumentTypeError as e:
        raise MM1Error(f"{what} {e}") from None
