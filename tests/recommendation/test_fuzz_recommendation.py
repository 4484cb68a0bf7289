"""The recommendation service under fuzzed requests: every RPC of
RecommendationService and of its DataSubjectService gets valid requests
mutated in one to three fields (see tests/fuzzing.py), undecodable bytes, bad
page tokens and cursors, malformed YAML policies and idempotency keys reused
across different requests, over real gRPC against real PostgreSQL with
identity, interactions and scoring running (scoring on its rule fallback).

No call may end UNKNOWN or INTERNAL, and an INVALID_ARGUMENT names a field.
After every example the service still answers a valid Recommend, and the
active policy is a version this test stored from a valid text (never one a
fuzzed call slipped in) whose text the service still validates.

The world the requests point into is real: an alerting policy stored and
activated through the policy RPCs, an at-risk customer whose open ticket
raised an escalation alert, a webhook of that team to a closed loopback port
(so its delivery failed at once into a dead letter), a logged decision.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from converge.recommendation.policy.service import default_policy_text, load_policy_text
from converge.v1 import common_pb2, privacy_pb2
from converge.v1 import recommendation_pb2 as pb
from tests.conftest import Platform
from tests.fuzzing import _STRINGS, SERVICE_FUZZ_PHASES, assert_refused_properly, mutate
from tests.recommendation.conftest import (
    Recommendation,
    StartRecommendation,
    make_customer,
)
from tests.recommendation.test_alerts import caught_up
from tests.recommendation.test_webhooks import new_secret
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

SERVICE = "/converge.v1.RecommendationService/"
PRIVACY = "/converge.v1.DataSubjectService/"
ACTOR = common_pb2.Actor(name="fuzzer", reason="fuzzing")
TEAM = "support"


def _alerting_policy_text() -> str:
    """The shipped default with every open ticket's escalation over the
    threshold, so the at-risk customer raises a support alert at once."""
    default = default_policy_text()
    old = "    prediction: escalation\n    threshold: 0.6\n    auto_resolve_below: 0.4\n"
    assert default.count(old) == 1
    return default.replace(old, "    prediction: escalation\n    threshold: 0.0\n")


ALERTING = _alerting_policy_text()

# Texts a policy author might send by mistake or an attacker on purpose.
_MALFORMED_POLICIES = (
    "",
    "\x00",
    "actions: [",
    "{currency: EUR",
    "- a\n- list\n",
    "just a string",
    "42",
    "null",
    "actions: !!python/object/apply:os.system ['true']\n",
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
    "[" * 3000 + "]" * 3000,
    "{a: " * 2000 + "1" + "}" * 2000,
    "\ttabs: 1\n",
    "\ufeff" + ALERTING,
    ALERTING + "surprise: 1\n",
    ALERTING + ALERTING,
    ALERTING.replace("threshold: 0.0", "threshold: 1.5"),
    ALERTING.replace("threshold: 0.0", "threshold: .nan"),
    ALERTING.replace("threshold: 0.0", "threshold: 1e999"),
    ALERTING.replace("threshold: 0.0", "threshold: -.inf"),
    ALERTING.replace("ack_deadline: PT4H", "ack_deadline: P99999999999D"),
    ALERTING.replace("ack_deadline: PT4H", "ack_deadline: 4"),
    ALERTING.replace("Europe/Amsterdam", "Mars/Olympus_Mons"),
    ALERTING.replace("Europe/Amsterdam", "\x00"),
    ALERTING.replace("daily_capacity: 200", "daily_capacity: 99999999999999999999999"),
    ALERTING.replace("daily_capacity: 200", "daily_capacity: -1"),
    ALERTING.replace("default_team: support", "default_team: nobody"),
    ALERTING.replace("kind: escalation_risk", "kind: meteor_strike"),
    "x" * 2_000_000,
)


@st.composite
def policy_texts(draw: st.DrawFn) -> str:
    """A malformed text, or the valid one cut, spliced or with a line dropped."""
    choice = draw(st.sampled_from(["fixed", "cut", "drop_line", "splice"]))
    if choice == "fixed":
        return draw(st.sampled_from(_MALFORMED_POLICIES))
    if choice == "cut":
        return ALERTING[: draw(st.integers(0, len(ALERTING)))]
    lines = ALERTING.splitlines(keepends=True)
    at = draw(st.integers(0, len(lines) - 1))
    if choice == "drop_line":
        return "".join(lines[:at] + lines[at + 1 :])
    junk = draw(st.sampled_from(["\x00", ":", "- ", "  ", "&x ", "*x", "!!int ", "'", "{", "\t"]))
    return "".join([*lines[:at], junk + lines[at], *lines[at + 1 :]])


# Times a page token may carry: out of range once in UTC, naive, impossible.
_TOKEN_TIMES = (
    "9999-12-31T23:59:59.999999-14:00",
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T00:00:00",
    "2026-12-02T10:00:00",
    "2026-12-02T10:00:00+00:00",
    "2026-02-30T00:00:00+00:00",
)
_TOKEN_NUMBERS = ("0", "-1", "9" * 18, "9" * 19, "9" * 30, "1e5", " 1")


@st.composite
def issued_looking_tokens(draw: st.DrawFn) -> str:
    """Tokens in the shapes this service issues (base64 of a time and an id,
    of a number, with or without a version prefix) carrying hostile values."""
    at = draw(st.sampled_from(_TOKEN_TIMES))
    number = draw(st.sampled_from(_TOKEN_NUMBERS))
    some_id = draw(st.sampled_from([str(uuid.uuid4()), "00000000-0000-0000-0000-000000000000"]))
    text = draw(
        st.sampled_from(
            [
                f"{at}|{some_id}",
                f"d1:{at}|{some_id}",
                f"{at}/{some_id}",
                number,
                f"r1:{number}",
            ]
        )
    )
    return base64.urlsafe_b64encode(text.encode()).decode()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class World:
    """What the requests point into, and what the fuzzer was told."""

    rec: Recommendation
    raw: grpc.aio.Channel
    customer_id: str
    ticket_id: str
    decision_id: str
    action_id: str
    alert_id: str
    webhook_id: str
    dead_letter_id: str
    alerting_version: str
    # Versions this test stored from texts it knows are valid.
    valid_versions: set[str] = field(default_factory=set)
    # Versions any fuzzed CreatePolicyVersion was answered with.
    created_versions: list[str] = field(default_factory=list)


async def _setup(platform: Platform, rec: Recommendation) -> World:
    stub = rec.stub
    created = await stub.CreatePolicyVersion(
        pb.CreatePolicyVersionRequest(
            yaml=ALERTING, description="fuzz: alert on every ticket", actor=ACTOR
        )
    )
    version = created.policy.version
    await stub.ActivatePolicy(pb.ActivatePolicyRequest(version=version, actor=ACTOR))

    async def active() -> str:
        return (await stub.GetPolicy(pb.GetPolicyRequest())).policy.version

    await wait_until(active, lambda v: v == version, what="the alerting policy active")
    webhook = await stub.CreateWebhook(
        pb.CreateWebhookRequest(
            team=TEAM,
            url=f"http://127.0.0.1:{_closed_port()}/hook",
            secret_id="fuzz",
            actor=ACTOR,
        )
    )
    customer = await make_customer(platform, "fuzz-rec", at_risk=True)
    await caught_up(rec)

    async def alerts() -> list[pb.Alert]:
        return list((await stub.ListAlerts(pb.ListAlertsRequest(team=TEAM))).alerts)

    [alert, *_] = await wait_until(alerts, what="the customer's support alert")

    async def letters() -> list[pb.DeadLetter]:
        return list((await stub.ListDeadLetters(pb.ListDeadLettersRequest(team=TEAM))).dead_letters)

    [letter, *_] = await wait_until(letters, what="the undeliverable event's dead letter")
    decided = await stub.Recommend(
        pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
    )
    action = decided.actions[0] if decided.actions else decided.suppressed[0]
    return World(
        rec=rec,
        raw=grpc.aio.insecure_channel(rec.runtime.address),
        customer_id=customer.customer_id,
        ticket_id=customer.ticket_id,
        decision_id=decided.decision_id,
        action_id=action.action_id,
        alert_id=alert.alert_id,
        webhook_id=webhook.webhook.webhook_id,
        dead_letter_id=letter.dead_letter_id,
        alerting_version=version,
        valid_versions={version, "default"},
    )


@pytest.fixture
async def world(
    platform: Platform, start_recommendation: StartRecommendation
) -> AsyncIterator[World]:
    rec = await start_recommendation(
        webhook_secrets={"fuzz": [new_secret()]},
        webhook_allow_http=True,
        webhook_retry_schedule_s=[],  # (the first failed attempt is a dead letter)
        webhook_timeout_s=2.0,
    )
    made = await _setup(platform, rec)
    yield made
    await made.raw.close()


def _key() -> str:
    return uuid.uuid4().hex


def _page(size: int = 10) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=size)


def _base_requests(world: World) -> dict[str, Message]:
    """A valid request for every RPC (by method name)."""
    ref = common_pb2.CustomerRef(customer_id=world.customer_id)
    recommend = pb.RecommendRequest(
        customer=ref,
        channel=common_pb2.CHANNEL_WEB,
        context={"page": common_pb2.AttributeValue(string_value="billing")},
        context_features={"escalations_90d": 1.0},
        ticket_id=world.ticket_id,
        kinds=[pb.ACTION_KIND_PROACTIVE_SUPPORT_CALL, pb.ACTION_KIND_RETENTION_OFFER],
        contact_channels=[common_pb2.CONTACT_CHANNEL_EMAIL],
        max_actions=3,
        idempotency_key=_key(),
    )
    dry_run = pb.RecommendRequest()
    dry_run.CopyFrom(recommend)
    dry_run.dry_run = True
    dry_run.ClearField("idempotency_key")
    outcome = pb.RecordOutcomeRequest(
        decision_id=world.decision_id,
        action_id=world.action_id,
        outcome=pb.ACTION_OUTCOME_CONVERTED,
        channel=common_pb2.CHANNEL_WEB,
        value=common_pb2.Money(currency_code="EUR", units=10),
        attributes={"note": common_pb2.AttributeValue(string_value="shown")},
        idempotency_key=_key(),
        actor=ACTOR,
    )
    # (the service reads the test's clock, not the wall clock)
    outcome.occurred_at.FromDatetime(world.rec.clock())
    alert_outcome = pb.RecordOutcomeRequest()
    alert_outcome.CopyFrom(outcome)
    alert_outcome.alert_id = world.alert_id
    alert_outcome.action_id = ""
    alert_outcome.outcome = pb.ACTION_OUTCOME_ACCEPTED
    alert_outcome.ClearField("value")  # (a value is only for a CONVERTED outcome)
    decisions = pb.ListDecisionsRequest(
        customer=ref, triggers=[pb.DECISION_TRIGGER_RECOMMEND], page=_page()
    )
    decisions.decided.start.FromSeconds(1_700_000_000)
    decisions.decided.end.FromSeconds(2_000_000_000)
    alerts = pb.ListAlertsRequest(
        team=TEAM,
        statuses=[pb.ALERT_STATUS_OPEN],
        kinds=[pb.ALERT_KIND_ESCALATION_RISK],
        customer_id=world.customer_id,
        page=_page(),
    )
    alerts.created.start.FromSeconds(1_700_000_000)
    alert = world.alert_id
    return {
        "Recommend": recommend,
        "RecommendDryRun": dry_run,
        "RecordOutcome": outcome,
        "RecordOutcomeForAlert": alert_outcome,
        "GetDecision": pb.GetDecisionRequest(decision_id=world.decision_id),
        "ListDecisions": decisions,
        "GetPolicy": pb.GetPolicyRequest(version=world.alerting_version),
        "ListPolicyVersions": pb.ListPolicyVersionsRequest(page=_page(), omit_yaml=True),
        "ValidatePolicy": pb.ValidatePolicyRequest(yaml=ALERTING),
        "CreatePolicyVersion": pb.CreatePolicyVersionRequest(
            yaml=ALERTING, description="fuzz", idempotency_key=_key(), actor=ACTOR
        ),
        "ActivatePolicy": pb.ActivatePolicyRequest(
            version=(world.created_versions or [world.alerting_version])[-1],
            idempotency_key=_key(),
            actor=ACTOR,
        ),
        "SubscribeAlerts": pb.SubscribeAlertsRequest(
            team=TEAM, kinds=[pb.ALERT_KIND_ESCALATION_RISK]
        ),
        "ListAlerts": alerts,
        "GetAlert": pb.GetAlertRequest(alert_id=alert),
        "AcknowledgeAlert": pb.AcknowledgeAlertRequest(
            alert_id=alert, idempotency_key=_key(), actor=ACTOR
        ),
        "AssignAlert": pb.AssignAlertRequest(
            alert_id=alert, assignee="ana", idempotency_key=_key(), actor=ACTOR
        ),
        "ResolveAlert": pb.ResolveAlertRequest(
            alert_id=alert, note="called back", idempotency_key=_key(), actor=ACTOR
        ),
        "DismissAlert": pb.DismissAlertRequest(
            alert_id=alert,
            dismiss_reason=pb.ALERT_DISMISS_REASON_NOT_ACTIONABLE,
            note="handled elsewhere",
            idempotency_key=_key(),
            actor=ACTOR,
        ),
        "CreateWebhook": pb.CreateWebhookRequest(
            team=TEAM,
            url=f"http://127.0.0.1:{_closed_port()}/other",
            secret_id="fuzz",
            kinds=[pb.ALERT_KIND_ESCALATION_RISK],
            idempotency_key=_key(),
            actor=ACTOR,
        ),
        "ListWebhooks": pb.ListWebhooksRequest(team=TEAM, page=_page()),
        "DeleteWebhook": pb.DeleteWebhookRequest(
            webhook_id=world.webhook_id, idempotency_key=_key(), actor=ACTOR
        ),
        "ListDeadLetters": pb.ListDeadLettersRequest(
            team=TEAM, webhook_id=world.webhook_id, page=_page()
        ),
        "RedeliverDeadLetter": pb.RedeliverDeadLetterRequest(
            dead_letter_id=world.dead_letter_id, idempotency_key=_key(), actor=ACTOR
        ),
        "EraseCustomerData": privacy_pb2.EraseCustomerDataRequest(
            customer_ids=[str(uuid.uuid4())], erasure_id=str(uuid.uuid4())
        ),
        "ExportCustomerData": privacy_pb2.ExportCustomerDataRequest(
            customer_ids=[world.customer_id]
        ),
    }


# Every RPC (and variants of one: see _SAME_RPC), as named in _base_requests.
METHODS = (
    "ActivatePolicy",
    "AcknowledgeAlert",
    "AssignAlert",
    "CreatePolicyVersion",
    "CreateWebhook",
    "DeleteWebhook",
    "DismissAlert",
    "EraseCustomerData",
    "ExportCustomerData",
    "GetAlert",
    "GetDecision",
    "GetPolicy",
    "ListAlerts",
    "ListDeadLetters",
    "ListDecisions",
    "ListPolicyVersions",
    "ListWebhooks",
    "Recommend",
    "RecommendDryRun",
    "RecordOutcome",
    "RecordOutcomeForAlert",
    "RedeliverDeadLetter",
    "ResolveAlert",
    "SubscribeAlerts",
    "ValidatePolicy",
)
# Variants of one RPC's valid request, by the RPC they call.
_SAME_RPC = {"RecommendDryRun": "Recommend", "RecordOutcomeForAlert": "RecordOutcome"}
SHARED_KEYS = ("fuzz-shared-1", "fuzz-shared-2")


def _rpc(method: str) -> str:
    if method in ("EraseCustomerData", "ExportCustomerData"):
        return PRIVACY + method
    return SERVICE + _SAME_RPC.get(method, method)


async def _read_some(call: Any, most: int = 3) -> list[Any]:
    """A bounded read of a stream that follows forever: its headers (sent once
    the start is fixed, or the refusal), then at most `most` events, each
    waited for briefly; the stream is cancelled after."""
    try:
        await call.initial_metadata()
        events = []
        with contextlib.suppress(TimeoutError):
            while len(events) < most:
                event = await asyncio.wait_for(call.read(), timeout=0.3)
                if event is grpc.aio.EOF:
                    break
                events.append(event)  # (a refusal raises from read())
        return events
    finally:
        call.cancel()


async def _call_raw(world: World, method: str, payload: bytes) -> Any:
    """`payload` as the request's bytes, whatever they decode to."""
    path = _rpc(method)
    if method == "SubscribeAlerts":
        return await _read_some(world.raw.unary_stream(path)(payload, timeout=10))
    return await world.raw.unary_unary(path)(payload, timeout=30)


async def _call(world: World, method: str, request: Message) -> Any:
    if method in ("EraseCustomerData", "ExportCustomerData"):
        return await getattr(world.rec.privacy, method)(request, timeout=30)
    if method == "SubscribeAlerts":
        return await _read_some(world.rec.stub.SubscribeAlerts(request, timeout=10))
    stub: Callable[..., Any] = getattr(world.rec.stub, _SAME_RPC.get(method, method))
    return await stub(request, timeout=30)


def _hostile(data: st.DataObject, world: World, method: str) -> Message:
    """The method's valid request changed the way the drawn attack says."""
    request = _base_requests(world)[method]
    attack = data.draw(
        st.sampled_from(
            ["mutate", "mutate", "mutate", "token", "token", "key_reuse", "policy_text"]
        ),
        label="attack",
    )
    if attack == "token":
        token = data.draw(
            st.one_of(issued_looking_tokens(), st.sampled_from(_STRINGS), st.text(max_size=40)),
            label="token",
        )
        if hasattr(request, "page"):
            request.page.page_token = token  # type: ignore[attr-defined]
        elif method == "SubscribeAlerts":
            request.from_cursor = token  # type: ignore[attr-defined]
        elif method == "ExportCustomerData":
            request.page_token = token  # type: ignore[attr-defined]
        else:
            attack = "mutate"
    if attack == "key_reuse":
        if "idempotency_key" in request.DESCRIPTOR.fields_by_name:
            request.idempotency_key = data.draw(st.sampled_from(SHARED_KEYS))  # type: ignore[attr-defined]
        attack = "mutate"
    if attack == "policy_text":
        if method in ("ValidatePolicy", "CreatePolicyVersion"):
            request.yaml = data.draw(policy_texts(), label="policy")  # type: ignore[attr-defined]
            return request
        attack = "mutate"
    if attack == "mutate":
        request = mutate(data, request)
    if method == "RecommendDryRun":
        request.dry_run = True  # type: ignore[attr-defined]
    return request


async def _assert_still_serving(world: World) -> None:
    stub = world.rec.stub
    active = (await stub.GetPolicy(pb.GetPolicyRequest())).policy
    assert active.version in world.valid_versions, (
        f"active policy {active.version!r} was not stored from a valid text"
    )
    load_policy_text(active.yaml)  # (raises on an invalid text)
    checked = await stub.ValidatePolicy(pb.ValidatePolicyRequest(yaml=active.yaml))
    assert checked.valid, list(checked.problems)
    answer = await stub.Recommend(
        pb.RecommendRequest(
            customer=common_pb2.CustomerRef(customer_id=world.customer_id),
            channel=common_pb2.CHANNEL_WEB,
            dry_run=True,
        ),
        timeout=30,
    )
    assert answer.customer_id == world.customer_id
    assert answer.policy_version == active.version
    assert answer.actions or answer.suppressed


@settings(
    max_examples=200,
    phases=SERVICE_FUZZ_PHASES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(method=st.sampled_from(METHODS), raw=st.booleans() | st.none(), data=st.data())
async def test_fuzzed_requests_are_answered_or_refused_and_the_service_keeps_serving(
    world: World, method: str, raw: bool | None, data: st.DataObject
) -> None:
    try:
        if raw:  # (about a third of the examples: bytes that may decode to nothing)
            payload = data.draw(st.binary(max_size=256), label="bytes")
            await _call_raw(world, method, payload)
        else:
            request = _hostile(data, world, method)
            reply = await _call(world, method, request)
            if method == "CreatePolicyVersion":
                version = reply.policy.version
                world.created_versions.append(version)
                # Stored means valid: the stored text must load as a policy.
                load_policy_text(reply.policy.yaml)
                world.valid_versions.add(version)
    except grpc.aio.AioRpcError as error:
        event(f"{method}: {error.code().name}")
        assert_refused_properly(error)
    else:
        event(f"{method}: OK")
    await _assert_still_serving(world)


# The state changes last: a dismissed alert refuses the other changes, a deleted
# webhook lists no dead letters.
_LAST = ("ResolveAlert", "DismissAlert", "DeleteWebhook")


async def test_every_request_the_fuzzer_starts_from_is_accepted(world: World) -> None:
    """The fuzzer mutates valid requests of every RPC: each one, unchanged, is
    answered OK."""
    services = (
        pb.DESCRIPTOR.services_by_name["RecommendationService"],
        privacy_pb2.DESCRIPTOR.services_by_name["DataSubjectService"],
    )
    every_rpc = {method.name for service in services for method in service.methods}
    assert {_SAME_RPC.get(m, m) for m in METHODS} == every_rpc
    assert set(_base_requests(world)) == set(METHODS)
    refused = {}
    for method in sorted(METHODS, key=lambda m: (m in _LAST, _LAST.index(m) if m in _LAST else 0)):
        if method == "DismissAlert":
            continue  # (the alert was resolved just before: a final alert refuses it)
        try:
            await _call(world, method, _base_requests(world)[method])
        except grpc.aio.AioRpcError as error:
            refused[method] = f"{error.code().name}: {error.details()}"
    assert refused == {}


async def test_page_tokens_shaped_like_issued_ones_but_out_of_range_are_invalid_argument(
    world: World,
) -> None:
    """Regression: a page token in the shape ListAlerts, ListDecisions and
    ListWebhooks issue whose time is out of range once in UTC (year 1 at
    +14:00, 9999-12-31 at -14:00) failed INTERNAL in the driver."""
    stub = world.rec.stub
    customer = common_pb2.CustomerRef(customer_id=world.customer_id)
    some_id = str(uuid.uuid4())
    for at in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.999999-14:00"):
        shaped = {
            "ListAlerts": f"{at}|{some_id}",
            "ListDecisions": f"d1:{at}|{some_id}",
            "ListWebhooks": f"{at}/{some_id}",
        }
        page = {
            m: common_pb2.PageRequest(page_token=base64.urlsafe_b64encode(t.encode()).decode())
            for m, t in shaped.items()
        }
        calls = {
            "ListAlerts": stub.ListAlerts(pb.ListAlertsRequest(team=TEAM, page=page["ListAlerts"])),
            "ListDecisions": stub.ListDecisions(
                pb.ListDecisionsRequest(customer=customer, page=page["ListDecisions"])
            ),
            "ListWebhooks": stub.ListWebhooks(
                pb.ListWebhooksRequest(team=TEAM, page=page["ListWebhooks"])
            ),
        }
        for method, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, at)
            assert_refused_properly(refused.value)
            assert "page.page_token" in refused.value.details(), (method, at)


_OTHER_ID = "00000000-0000-4000-8000-000000000001"
# One RPC's valid request changed into a different request.
_DIFFERENT: dict[str, Callable[[Any], None]] = {
    "CreateWebhook": lambda r: setattr(r, "url", "http://127.0.0.1:9/elsewhere"),
    "DeleteWebhook": lambda r: setattr(r, "webhook_id", _OTHER_ID),
    "RedeliverDeadLetter": lambda r: setattr(r, "dead_letter_id", _OTHER_ID),
    "AssignAlert": lambda r: setattr(r, "assignee", "bob"),
}


@pytest.mark.parametrize("method", sorted(_DIFFERENT))
async def test_a_key_reused_for_a_different_request_is_refused(world: World, method: str) -> None:
    first = _base_requests(world)[method]
    first.idempotency_key = f"reused-{method}"  # type: ignore[attr-defined]
    await _call(world, method, first)
    different = _base_requests(world)[method]
    different.idempotency_key = f"reused-{method}"  # type: ignore[attr-defined]
    _DIFFERENT[method](different)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(world, method, different)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in refused.value.details()
