"""The policy area's rules: reading a policy text, the shipped default, the
book of the active policy every replica follows, and storing and activating
versions. Plain types only (no gRPC, no SQL: those live in servicer.py and
store.py)."""

from __future__ import annotations

import functools
from importlib.resources import files

from converge.recommendation.policy.model import ActivePolicy, Policy
from converge.recommendation.policy.validation import (
    PolicyProblem,
    check_policy_text,
)
from converge.runtime.errors import FieldViolation, InvalidArgument

# The version name of the shipped default, in effect until a version is activated.
DEFAULT_VERSION = "default"


def violations(problems: tuple[PolicyProblem, ...] | list[PolicyProblem]) -> list[FieldViolation]:
    """Problems as field violations: the path into the policy as the field
    ("yaml" for the text as a whole), the line and column leading the description."""
    return [
        FieldViolation(p.path or "yaml", f"line {p.line}, column {p.column}: {p.message}")
        for p in problems
    ]


def load_policy_text(text: str) -> Policy:
    """The policy a YAML text describes; InvalidArgument naming the path and
    line of every error otherwise (warnings do not refuse it)."""
    checked = check_policy_text(text)
    if checked.policy is None:
        raise InvalidArgument(violations(checked.errors), message=_message(checked.errors))
    return checked.policy


def _message(errors: tuple[PolicyProblem, ...]) -> str:
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid policy: line {first.line}, {first.path or 'the text'}: {first.message}{more}"


def default_policy_text() -> str:
    """The shipped default policy's YAML (policy/default_policy.yaml)."""
    resource = files("converge.recommendation.policy") / "default_policy.yaml"
    return resource.read_text(encoding="utf-8")


@functools.cache
def default_policy() -> ActivePolicy:
    """The shipped default, version "default": what every replica applies
    while no version was ever activated."""
    return ActivePolicy(DEFAULT_VERSION, load_policy_text(default_policy_text()))
