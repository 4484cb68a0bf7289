"""Cursors of the resumable streams every service offers: a stored sequence
number, sent as decimal text, opaque to callers."""

from __future__ import annotations

import re

from converge.runtime.errors import Violations

# ASCII digits that fit a bigint; str.isdigit() would also take "²", which
# int() then refuses.
_CURSOR = re.compile(r"[0-9]{1,18}")


def parse_cursor(value: str, field: str, violations: Violations) -> int:
    """The sequence number after which a stream resumes; 0 for an empty cursor."""
    if not value:
        return 0
    if not _CURSOR.fullmatch(value):
        violations.add(field, "not a cursor this service issued")
        return 0
    return int(value)
