"""Cursors of the resumable streams every service offers, opaque to callers:
a stored sequence number as decimal text, or, for a stream whose writers
commit concurrently, the writing transaction's id and the sequence number
("xid.seq")."""

from __future__ import annotations

import re

from converge.runtime.errors import Violations

# ASCII digits that fit a bigint; str.isdigit() would also take "²", which
# int() then refuses.
_CURSOR = re.compile(r"[0-9]{1,18}")
_COMMIT_CURSOR = re.compile(r"(?:([0-9]{1,18})\.)?([0-9]{1,18})")


def parse_cursor(value: str, field: str, violations: Violations) -> int:
    """The sequence number after which a stream resumes; 0 for an empty cursor."""
    if not value:
        return 0
    if not _CURSOR.fullmatch(value):
        violations.add(field, "not a cursor this service issued")
        return 0
    return int(value)


def parse_commit_cursor(value: str, field: str, violations: Violations) -> tuple[int, int]:
    """The (transaction id, sequence number) after which a stream resumes;
    (0, 0) for an empty cursor. A bare sequence number (a cursor issued before
    the stream was ordered by transaction) is (0, seq)."""
    if not value:
        return 0, 0
    found = _COMMIT_CURSOR.fullmatch(value)
    if found is None:
        violations.add(field, "not a cursor this service issued")
        return 0, 0
    return int(found[1] or 0), int(found[2])


def commit_cursor(xid: int, seq: int) -> str:
    return f"{xid}.{seq}"
