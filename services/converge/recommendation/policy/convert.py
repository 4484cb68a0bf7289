"""Every protobuf conversion and request check of the policy area."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from converge.recommendation.policy.service import Actor, PolicyVersionView
from converge.recommendation.policy.validation import PolicyProblem, Severity
from converge.runtime.errors import Violations
from converge.runtime.values import timestamp
from converge.v1 import common_pb2
from converge.v1 import recommendation_pb2 as pb

DEFAULT_PAGE = 20
MAX_PAGE = 100
MAX_DESCRIPTION = 2000
MAX_KEY = 200
MAX_ACTOR_NAME = 200
MAX_REASON = 2000
MAX_VERSION = 40

_SEVERITY = {
    Severity.ERROR: pb.POLICY_PROBLEM_SEVERITY_ERROR,
    Severity.WARNING: pb.POLICY_PROBLEM_SEVERITY_WARNING,
}


@dataclass(frozen=True)
class VersionsQuery:
    before: int | None
    page_size: int
    omit_yaml: bool


@dataclass(frozen=True)
class CreateRequest:
    yaml: str
    description: str
    idempotency_key: str
    actor: Actor


@dataclass(frozen=True)
class ActivateRequest:
    version: str
    expected_active_version: str | None
    idempotency_key: str
    actor: Actor


def _actor(actor: common_pb2.Actor, v: Violations) -> Actor:
    v.check(len(actor.name) <= MAX_ACTOR_NAME, "actor.name", f"at most {MAX_ACTOR_NAME} characters")
    v.check(len(actor.reason) <= MAX_REASON, "actor.reason", f"at most {MAX_REASON} characters")
    return Actor(actor.name.strip(), actor.reason)


def _key(key: str, v: Violations) -> str:
    v.check(len(key) <= MAX_KEY, "idempotency_key", f"at most {MAX_KEY} characters")
    return key


def get_version(request: pb.GetPolicyRequest) -> str:
    v = Violations()
    v.check(len(request.version) <= MAX_VERSION, "version", f"at most {MAX_VERSION} characters")
    v.raise_if_any()
    return request.version.strip()


def versions_query(request: pb.ListPolicyVersionsRequest) -> VersionsQuery:
    v = Violations()
    page = request.page
    v.check(page.page_size >= 0, "page.page_size", "must not be negative")
    before: int | None = None
    if page.page_token:
        try:
            decoded = base64.urlsafe_b64decode(page.page_token.encode()).decode()
            before = int(decoded) if decoded.isascii() and decoded.isdigit() else None
        except (ValueError, binascii.Error, UnicodeDecodeError):
            before = None
        v.check(
            before is not None and 0 < before < 2**63,
            "page.page_token",
            "not a token this service issued",
        )
    v.raise_if_any()
    return VersionsQuery(before, min(page.page_size or DEFAULT_PAGE, MAX_PAGE), request.omit_yaml)


def page_token(next_before: int | None) -> str:
    return (
        "" if next_before is None else base64.urlsafe_b64encode(str(next_before).encode()).decode()
    )


def create_request(request: pb.CreatePolicyVersionRequest) -> CreateRequest:
    v = Violations()
    v.check(
        len(request.description) <= MAX_DESCRIPTION,
        "description",
        f"at most {MAX_DESCRIPTION} characters",
    )
    key = _key(request.idempotency_key, v)
    actor = _actor(request.actor, v)
    v.raise_if_any()
    return CreateRequest(request.yaml, request.description, key, actor)


def activate_request(request: pb.ActivatePolicyRequest) -> ActivateRequest:
    v = Violations()
    version = request.version.strip()
    v.check(bool(version), "version", "required: the version to activate")
    v.check(len(version) <= MAX_VERSION, "version", f"at most {MAX_VERSION} characters")
    expected = request.expected_active_version.strip()
    v.check(
        len(expected) <= MAX_VERSION,
        "expected_active_version",
        f"at most {MAX_VERSION} characters",
    )
    key = _key(request.idempotency_key, v)
    actor = _actor(request.actor, v)
    v.raise_if_any()
    return ActivateRequest(version, expected or None, key, actor)


def version_to_pb(view: PolicyVersionView) -> pb.PolicyVersion:
    message = pb.PolicyVersion(
        version=view.version,
        yaml=view.yaml or "",
        sha256=view.sha256,
        description=view.description,
        active=view.active,
        created_by=common_pb2.Actor(name=view.created_by, reason=view.created_reason),
    )
    if view.created_at is not None:
        message.created_at.CopyFrom(timestamp(view.created_at))
    if view.activated_at is not None:
        message.activated_at.CopyFrom(timestamp(view.activated_at))
    return message


def problem_to_pb(problem: PolicyProblem) -> pb.PolicyProblem:
    return pb.PolicyProblem(
        severity=_SEVERITY[problem.severity],
        path=problem.path,
        line=problem.line,
        column=problem.column,
        message=problem.message,
    )
