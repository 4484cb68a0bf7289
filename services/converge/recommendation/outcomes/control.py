"""Control groups: which customers are held out of an action so its lift can
be measured.

The assignment is a pure function of (salt, action, customer): a customer
stays in the same group across calls, replicas and restarts without any
stored state, and two actions draw independent groups. The hash is SHA-256
(standard, stable across Python versions and processes, unlike `hash()`,
which is salted per process); its first 64 bits, read as an unsigned integer
over 2**64, are a point spread uniformly over [0, 1), and the customer is in
the control group when that point falls below the action's share.
"""

from __future__ import annotations

import hashlib

_SEPARATOR = "|"
_SCALE = float(2**64)


def assignment_point(salt: str, customer_id: str, action_name: str) -> float:
    """Where the customer falls in [0, 1) for this action under this salt."""
    key = _SEPARATOR.join((salt, action_name, customer_id)).encode("utf-8")
    digest = hashlib.sha256(key).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def in_control_group(salt: str, customer_id: str, action_name: str, share: float) -> bool:
    """True when the customer is held out of `action_name` (suppressed with
    SUPPRESSION_REASON_CONTROL_GROUP). `share` is the fraction held out, in
    [0, 1]: 0 holds no one out, 1 everyone."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"control share must be in [0, 1], got {share}")
    if share == 0.0:
        return False
    return assignment_point(salt, customer_id, action_name) < share
