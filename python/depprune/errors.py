"""The exceptions depprune raises; every one says what was wrong and how to fix it.

>>> import depprune
>>> issubclass(depprune.InvalidEquationsError, ValueError)
True
"""

from __future__ import annotations

__all__ = [
    "DeppruneError",
    "InternalError",
    "InvalidEquationsError",
    "InvalidPlanError",
]


class DeppruneError(Exception):
    """Base class of every error depprune raises on purpose."""


class InvalidEquationsError(DeppruneError, ValueError):
    """The axis equations handed to the core are malformed (bad ids, sizes or offsets)."""


class InvalidPlanError(DeppruneError, ValueError):
    """A keep choice or group id does not fit the graph it is applied to."""


class InternalError(DeppruneError, RuntimeError):
    """A bug in depprune, never bad input: please report it with the message."""
