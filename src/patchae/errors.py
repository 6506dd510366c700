"""User-facing errors: one line that says what went wrong and what to do."""

from __future__ import annotations


class PatchAEError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    Entry points catch it and print ``error: <message>`` without a traceback.
    """


def finite_number(name: str, value: object) -> float:
    """``value`` as a finite float, or a :class:`PatchAEError` naming the setting (e.g. ``threshold=abc``)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or number != number or number in (float("inf"), float("-inf")):
        raise PatchAEError(f"{name}={value!r} must be a finite number")
    return number
