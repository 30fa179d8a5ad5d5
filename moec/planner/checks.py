"""The planner's input checks: one-line errors naming the bad field (PlanError) and the readers behind them."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from moec.errors import MoecError


class PlanError(MoecError, ValueError):
    """Bad planner input (stats, budget, plan file); the message is one line naming the bad field."""


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _width_key(key: str, where: str) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]*", key):
        raise PlanError(f"{where}: expected bit-width keys like \"2\", got {_show(key)}")
    return int(key)


def _statistic(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise PlanError(f"{where}: expected a finite number >= 0, got {_show(value)}")
    return float(value)


def _unit_fraction(value: Any, where: str, low_open: bool = False, high_open: bool = False) -> None:
    ok = type(value) in (int, float) and math.isfinite(value) and \
        (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise PlanError(f"{where}: expected a number in {interval}, got {_show(value)}")


def _validate_object(value: Any, keys: Sequence[str], where: str, optional: Sequence[str] = ()) -> None:
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected an object with {', '.join(keys)}, got {_show(value)}")
    for key in value:
        if key not in keys:
            raise PlanError(f"{where}: unknown key {_show(key)} (expected {', '.join(keys)})")
    for key in keys:
        if key not in value and key not in optional:
            raise PlanError(f"{where}: missing field {_show(key)}")


def _show(value: Any) -> str:
    """A value as JSON on one short line, for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _widths_text(widths: Sequence[int]) -> str:
    return "{" + ",".join(str(w) for w in widths) + "}"


def _positive_int(value: Any, where: str) -> int:
    if type(value) is not int or value <= 0:
        raise PlanError(f"{where}: expected a positive int, got {_show(value)}")
    return value


def _positive_number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{where}: expected a positive number, got {_show(value)}")
    return value


def _fraction(value: Any, where: str) -> Fraction:
    """An exact decimal reading of a float (2.3 -> 23/10), so budgets like 2.3 * 10 experts stay 23 bits."""
    return Fraction(repr(float(_positive_number(value, where))))
