"""The --config file of the jobs: a mapping of a settings model's fields in YAML, or in
JSON for a .json file. Every way it can be wrong is one SettingsFileError with a one-line
reason, which the jobs print and exit 2 on, as for a bad value of a field; and the one line
a job prints for either (settings_error_message)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import ValidationError


class SettingsFileError(ValueError):
    """The settings file is missing, unreadable, not YAML/JSON, or not a mapping."""


# What building a job's settings from its file and flags raises for the user's mistakes.
SETTINGS_ERRORS = (ValidationError, SettingsFileError)


def settings_error_message(error: Exception) -> str:
    """The one line a job prints (then exits 2) for one of SETTINGS_ERRORS."""
    if isinstance(error, ValidationError):
        return f"error: invalid settings: {validation_problems(error)}"
    return f"error: {error}"


def validation_problems(error: ValidationError, section: str = "") -> str:
    """pydantic's errors as `field.path: message (got value); ...` on one line. str(error)
    spends several lines and a documentation URL on each field, and its title names our
    model class, which a user never typed. section: where the validated model sits in the
    user's settings (its fields are named `section.field`)."""
    problems = []
    for e in error.errors(include_url=False):
        where = ".".join(map(str, [*filter(None, [section]), *e["loc"]]))
        message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        value = e.get("input")
        # The value, when it is one the user wrote and the message does not quote it already.
        if (e["type"] not in ("missing", "extra_forbidden") and isinstance(value, (str, int, float, type(None)))
                and not (isinstance(value, str) and repr(value) in message)):
            shown = repr(value)
            message += f" (got {shown[:40] + '...' if len(shown) > 43 else shown})"
        problems.append(f"{where}: {message}" if where else message)
    return re.sub(r"\s*\n\s*", " ", "; ".join(dict.fromkeys(problems)))  # one line, whatever a message holds


def update_section(data: dict, name: str, updates: dict) -> None:
    """Put flags' values (updates) into the nested section data[name] that the file gave (or
    not). A section that is not a mapping is left as it is, for the model to refuse by name
    rather than a merge to fail with a TypeError."""
    section = {} if data.get(name) is None else data[name]
    if updates and isinstance(section, dict):
        data[name] = {**section, **updates}


def read_settings_file(path: str | Path) -> dict:
    """The mapping in the file at path ({} for an empty file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsFileError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise SettingsFileError(f"--config {path}: is a folder, not a settings file") from None
    except UnicodeDecodeError:
        raise SettingsFileError(f"--config {path}: not UTF-8 text") from None
    except OSError as e:
        raise SettingsFileError(f"--config {path}: cannot read it: {e.strerror or e}") from None
    if str(path).lower().endswith(".json"):  # JSON proper: YAML refuses e.g. tab indentation
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise SettingsFileError(f"--config {path}: not valid JSON at line {e.lineno}, column {e.colno}: "
                                    f"{e.msg}") from None
        return _mapping(data, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise SettingsFileError(f"--config {path}: not valid YAML{where}: {problem}") from None
    return _mapping(data, path)


def _mapping(data, path) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsFileError(f"--config {path}: must hold a mapping of settings (field: value), "
                                f"not a {type(data).__name__}")
    return data
