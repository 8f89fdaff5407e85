"""Argument types the jobs share (not a job itself): numbers that must not be negative,
checked by argparse, so that a bad value is one usage line and exit 2 instead of a
traceback from the library it reaches (delta-rs takes a version as an unsigned number)."""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind, words: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
    return value


def count(text: str) -> int:
    """A whole number >= 0: a version, a round, a number of images."""
    value = _number(text, int, "a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
    """A whole number > 0: a size in bytes."""
    value = _number(text, int, "a whole number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def price(text: str) -> float:
    """A finite number >= 0: a price."""
    value = _number(text, float, "a number >= 0")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value
