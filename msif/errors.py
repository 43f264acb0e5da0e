"""The one base of every error msif raises on purpose.

Each concrete error keeps the built-in class callers already catch (``ValueError``, ``OSError``,
``RuntimeError``…) and adds :class:`MsifError`, so the CLI catches one class and prints one line
naming the problem and the fix (exit code 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MsifError(Exception):
    """An expected failure: bad input, unusable files, a mismatch between models, factors and data."""
