"""Argument types the jobs share (not a job itself): numbers that must not be negative,
checked by argparse, so that a bad value is one usage line and exit 2 instead of a
traceback from the library it reaches (delta-rs takes a version as an unsigned number)."""
from __future__ import annotations

import argparse
import math

from schemas.records import ROUND_MAX


def _number(text: str, kind, words: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
    return value


# The largest whole number the libraries behind the jobs take (delta-rs: int64 versions and
# sizes; larger ones were OverflowError tracebacks).
INT64_MAX = 2**63 - 1
# The longest retention a vacuum takes: ~114 years (delta-rs panicked on a duration of 2**63 hours).
HOURS_MAX = 10**6


def _whole(text: str, low: int, high: int) -> int:
    least = ">= 0" if low == 0 else f"> {low - 1}"
    value = _number(text, int, f"a whole number {least}")
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {least}, got {value}")
    if value > high:
        raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
    return value


def count(text: str) -> int:
    """A whole number >= 0: a version, a number of images."""
    return _whole(text, 0, INT64_MAX)


def positive(text: str) -> int:
    """A whole number > 0: a size in bytes."""
    return _whole(text, 1, INT64_MAX)


def round_number(text: str) -> int:
    """A data-engine round: 0..2**31-1 (stored as int32)."""
    return _whole(text, 0, ROUND_MAX)


def hours(text: str) -> int:
    """A retention in whole hours, 0..HOURS_MAX."""
    return _whole(text, 0, HOURS_MAX)


def price(text: str) -> float:
    """A finite number >= 0: a price."""
    value = _number(text, float, "a number >= 0")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def amount(text: str) -> float:
    """A finite number > 0: a rate, a number of images, hours. float() takes "nan" and
    "inf" too, which would only fail later, converting a count of actors to an integer."""
    value = _number(text, float, "a number > 0")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def local_output(text: str) -> str:
    """A local path to write: a URI (s3://, file://, ...) is refused, where pathlib would
    quietly make a local folder named after its scheme."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"must be a local path; this output cannot be written to "
                                         f"{text.split('://', 1)[0]}:// (got {text!r})")
    return text


def add_version_pin(ap: argparse.ArgumentParser) -> None:
    """The options that pin which version of a dataset a job reads (at most one): --version,
    --run-id, --round; read back with version_pin."""
    pin = ap.add_mutually_exclusive_group()
    pin.add_argument("--version", type=count, help="Delta version of the annotations table")
    pin.add_argument("--run-id", help="the last version committed by this run")
    pin.add_argument("--round", type=round_number, help="the last version committed in this round")


def version_pin(args: argparse.Namespace) -> dict:
    """add_version_pin's options as the keyword arguments the dataset readers take."""
    return {"version": args.version, "run_id": args.run_id, "round": args.round}
