"""Scorers for generated answers: exact match by default, or a user's function.

``--scorer module:function`` names a plain function ``(expected: str, generated: str)`` that
returns a bool or a number in [0, 1]. It is imported by name (``importlib``), never evaluated
from a string. A module in the current directory is found too, as ``python -m`` would.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

from tunepilot.errors import UserError

Scorer = Callable[[str, str], float]


def exact(expected: str, generated: str) -> float:
    """1.0 when the answers are equal after stripping surrounding whitespace."""
    return float(expected.strip() == generated.strip())


def load_scorer(spec: str) -> Scorer:
    """Import ``module:function`` (dotted attributes allowed) and wrap it so that every call is
    checked: a scorer that raises or returns something odd is the user's to fix (exit 2)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--scorer {spec}: expected module:function, e.g. my_scorers:fuzzy_match")
    module = _import(module_name, spec)
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"--scorer {spec}: module {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"--scorer {spec}: {attr} is not a function")
    return _checked(target, spec)


def _import(module_name: str, spec: str) -> object:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0]:
            raise UserError(f"--scorer {spec}: importing {module_name} failed: {exc}") from None
    # console scripts do not put the working directory on sys.path; look there once
    cwd = str(Path.cwd())
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise UserError(
            f"--scorer {spec}: no module named {module_name} (looked on sys.path and in {cwd})"
        ) from None
    except Exception as exc:  # the user's module failed while importing
        raise UserError(f"--scorer {spec}: importing {module_name} failed: {exc}") from None
    finally:
        sys.path.remove(cwd)


def _checked(fn: Callable[[str, str], object], spec: str) -> Scorer:
    def score(expected: str, generated: str) -> float:
        try:
            value = fn(expected, generated)
        except Exception as exc:
            raise UserError(
                f"--scorer {spec} raised {type(exc).__name__}: {exc} "
                f"(expected={expected[:60]!r}, generated={generated[:60]!r})"
            ) from None
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1:
            return float(value)
        raise UserError(
            f"--scorer {spec} returned {value!r} ({type(value).__name__}); "
            "return a bool or a number between 0 and 1"
        )

    return score
