"""What the state backend raises (apart from its interface, so compiled call handling can use it)."""

from __future__ import annotations


class StateUnavailable(Exception):
    """The backend cannot answer now (Redis down or too slow); each caller decides what that means."""
