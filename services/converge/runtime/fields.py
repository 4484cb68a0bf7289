"""Checks of request fields that every service makes the same way."""

from __future__ import annotations

import uuid

from converge.runtime.errors import Violations


def parse_uuid(value: str, field: str, violations: Violations) -> str | None:
    """A required id in canonical UUID form, or None with the violation noted."""
    if not value:
        violations.add(field, "required")
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        violations.add(field, "not an id this platform issued (a UUID)")
        return None
