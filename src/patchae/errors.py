"""User-facing errors: one line that says what went wrong and what to do."""

from __future__ import annotations


class PatchAEError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    Entry points catch it and print ``error: <message>`` without a traceback.
    """
