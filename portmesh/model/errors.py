"""Errors the model raises; each names the offending field so callers can report it."""

from __future__ import annotations


class ModelError(ValueError):
    """A request the model refuses; ``field`` names the offending input."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InvalidInput(ModelError):
    """Malformed input (HTTP 422)."""


class NotFound(ModelError):
    """A name that does not exist (HTTP 404)."""


class Conflict(ModelError):
    """Well-formed input that clashes with existing state (HTTP 409)."""
