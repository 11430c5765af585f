"""Argument types shared by the verbs: a bad flag value is a usage error (exit 2) with one line."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        return math.nan


def positive_int(text: str) -> int:
    value = _number(text, int)
    if not value >= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(value)


def nonnegative_ms(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of ms >= 0, got {text!r}")
    return value


def open_unit(text: str) -> float:
    value = _number(text, float)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value
