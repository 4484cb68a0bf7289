"""The policy RPCs over real gRPC and PostgreSQL: the shipped default on day
one, validation naming path and line, storing, activating and rolling back
versions (back to the default too), idempotency, the expected active version, and two replicas that
both follow an activation without a restart. The policy RPCs need no peers:
the service runs without identity, interactions or scoring (and without its
alerts follower, which would follow interactions)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.recommendation.app import build_spec
from converge.recommendation.policy.service import (
    DEFAULT_VERSION,
    PolicyBook,
    default_policy_text,
)
from converge.recommendation.policy.store import PolicyStore, text_sha256
from converge.recommendation.settings import RecommendationSettings
from converge.runtime.server import ServiceRuntime
from converge.v1 import common_pb2, recommendation_pb2_grpc
from converge.v1 import recommendation_pb2 as pb
from tests.recommendation.conftest import ManualClock
from tests.waiting import until, wait_until

DEFAULT = default_policy_text()
ALICE = common_pb2.Actor(name="alice", reason="tighter email cap")
BOB = common_pb2.Actor(name="bob", reason="roll back")


def _edited(old: str, new: str) -> str:
    assert DEFAULT.count(old) == 1, old
    return DEFAULT.replace(old, new)


# Two valid versions that differ from the default and from each other.
TIGHTER = _edited("      max_contacts: 2\n", "      max_contacts: 1\n")
LOOSER = _edited("      max_contacts: 2\n", "      max_contacts: 3\n")


def _line_of(text: str, fragment: str) -> int:
    return text[: text.index(fragment)].count("\n") + 1


def _violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    found: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.update({v.field: v.description for v in bad.field_violations})
    return found


class Replica:
    def __init__(self, runtime: ServiceRuntime, channel: grpc.aio.Channel) -> None:
        self.runtime = runtime
        self.channel = channel
        self.stub = recommendation_pb2_grpc.RecommendationServiceStub(channel)

    async def active_version(self) -> str:
        """The version this replica applies now (GetPolicy answers its book's)."""
        return (await self.stub.GetPolicy(pb.GetPolicyRequest())).policy.version


StartReplica = Callable[..., Awaitable[Replica]]


def _settings(database: str, **overrides: Any) -> RecommendationSettings:
    fields: dict[str, Any] = {"database_url": database, "port": 0, "cpu_workers": 1}
    # No peers run here: the alerts follower (which follows interactions) stays off.
    if "alerts_follow" in RecommendationSettings.model_fields:
        fields["alerts_follow"] = False
    fields.update(overrides)
    return RecommendationSettings(**fields)


@pytest.fixture
async def start_replica(database: str, clock: ManualClock) -> AsyncIterator[StartReplica]:
    started: list[Replica] = []

    async def start(**overrides: Any) -> Replica:
        runtime = ServiceRuntime(build_spec(clock=clock), _settings(database, **overrides))
        await runtime.start()
        replica = Replica(runtime, grpc.aio.insecure_channel(runtime.address))
        started.append(replica)
        return replica

    yield start
    for replica in reversed(started):
        await replica.channel.close()
        await replica.runtime.stop(grace=1)


@pytest.fixture
async def replica(start_replica: StartReplica) -> Replica:
    return await start_replica()


async def _create(
    replica: Replica, text: str, key: str = "", actor: Any = ALICE
) -> pb.PolicyVersion:
    answer = await replica.stub.CreatePolicyVersion(
        pb.CreatePolicyVersionRequest(
            yaml=text, description="tighter caps", idempotency_key=key, actor=actor
        )
    )
    return answer.policy


async def _activate(
    replica: Replica, version: str, expected: str = "", key: str = "", actor: Any = ALICE
) -> pb.ActivatePolicyResponse:
    response: pb.ActivatePolicyResponse = await replica.stub.ActivatePolicy(
        pb.ActivatePolicyRequest(
            version=version, expected_active_version=expected, idempotency_key=key, actor=actor
        )
    )
    return response


async def _active_text(replica: Replica) -> str:
    return (await replica.stub.GetPolicy(pb.GetPolicyRequest())).policy.yaml


# --- the default -------------------------------------------------------------------


async def test_the_default_policy_serves_until_a_version_is_activated(replica: Replica) -> None:
    answer = await replica.stub.GetPolicy(pb.GetPolicyRequest())
    assert answer.policy.version == DEFAULT_VERSION
    assert answer.policy.active
    assert answer.policy.yaml == DEFAULT
    assert answer.policy.sha256 == text_sha256(DEFAULT)
    by_name = await replica.stub.GetPolicy(pb.GetPolicyRequest(version=DEFAULT_VERSION))
    assert by_name.policy == answer.policy
    listed = await replica.stub.ListPolicyVersions(pb.ListPolicyVersionsRequest())
    assert list(listed.policies) == []
    checked = await replica.stub.ValidatePolicy(pb.ValidatePolicyRequest(yaml=DEFAULT))
    assert checked.valid and list(checked.problems) == []


# --- validation ----------------------------------------------------------------------

# (text, path, the fragment on the reported line, a word of the message)
WORKED_CASES = [
    (
        _edited("min_probability: 0.5\n", "min_probability: 1.5\n"),
        "actions[0].min_probability",
        "min_probability: 1.5",
        "less than or equal to 1",
    ),
    (
        _edited("    cool_down: P2D\n", "    cooldown: P2D\n"),
        "actions[2].cooldown",
        "cooldown: P2D",
        "unknown key",
    ),
    (
        _edited("    lead_team: sales_leads\n", "    lead_team: sales_managers\n"),
        "teams[1].lead_team",
        "lead_team: sales_managers",
        "sales_managers",
    ),
    (
        _edited("    default_team: sales\n", "    default_team: marketing\n"),
        "alerts[2].default_team",
        "default_team: marketing",
        "marketing",
    ),
    (
        _edited("    action: proactive_support_call\n", "    action: call_them\n"),
        "alerts[1].action",
        "action: call_them",
        "call_them",
    ),
    (
        _edited(
            "    products: [premium_support, extra_storage, family_plan]",
            "    products: [premium_support, jetpack, family_plan]",
        ),
        "actions[5].products[1]",
        "jetpack",
        "jetpack",
    ),
    (
        _edited("  - name: retention_credit_10\n", "  - name: retention_discount_20\n"),
        "actions[1].name",
        "  - name: retention_discount_20\n    kind: retention_offer\n    prediction: churn\n    offer: credit_10",
        "already",
    ),
    (
        _edited(
            "    # Its working day's time zone.\n    time_zone: Europe/Amsterdam\n",
            "    # Its working day's time zone.\n    time_zone: Europe/Atlantis\n",
        ),
        "teams[0].time_zone",
        "Europe/Atlantis",
        "Europe/Atlantis",
    ),
    (
        _edited(
            "      - feature: open_tickets\n        gt: 0\n",
            "      - feature: open_tickets\n        profile: segment\n        gt: 0\n",
        ),
        "actions[2].eligibility[0]",
        "- feature: open_tickets\n        profile: segment",
        "exactly one",
    ),
    (
        _edited("    window: P30D\n", "    window: PT0S\n"),
        "contact.frequency_caps[2].window",
        "window: PT0S",
        "positive",
    ),
    (
        _edited("  - channel: phone\n", "  - channel: fax\n"),
        "contact.frequency_caps[1].channel",
        "channel: fax",
        "fax",
    ),
    (
        # A NUL written as a YAML escape: the request's field itself holds none.
        _edited(
            "display_text: Nothing to do for this customer now.",
            'display_text: "Nothing to do\\0"',
        ),
        "actions[6].display_text",
        'display_text: "Nothing to do',
        "U+0000",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragment", "word"), WORKED_CASES)
async def test_validation_names_the_path_and_line(
    replica: Replica, text: str, path: str, fragment: str, word: str
) -> None:
    checked = await replica.stub.ValidatePolicy(pb.ValidatePolicyRequest(yaml=text))
    assert not checked.valid
    errors = [p for p in checked.problems if p.severity == pb.POLICY_PROBLEM_SEVERITY_ERROR]
    assert [p.path for p in errors] == [path]
    (error,) = errors
    assert error.line == _line_of(text, fragment)
    assert error.column > 0
    assert word in error.message

    # The same text is refused by CreatePolicyVersion, naming the path and the line.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create(replica, text)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _violations(refused.value)
    assert list(violations) == [path]
    assert violations[path].startswith(f"line {error.line}, column {error.column}: ")


async def test_every_problem_is_reported_in_text_order_with_warnings(replica: Replica) -> None:
    # (Names are checked once the shape is right: a shape error hides them.)
    text = _edited("offer: credit_10\n", "offer: credit_99\n").replace(
        "    lead_team: sales_leads\n", "    lead_team: sales_managers\n"
    )
    checked = await replica.stub.ValidatePolicy(pb.ValidatePolicyRequest(yaml=text))
    assert not checked.valid
    assert [(p.path, p.severity) for p in checked.problems] == [
        ("catalogue.offers[1].id", pb.POLICY_PROBLEM_SEVERITY_WARNING),
        ("actions[1].offer", pb.POLICY_PROBLEM_SEVERITY_ERROR),
        ("teams[1].lead_team", pb.POLICY_PROBLEM_SEVERITY_ERROR),
        # sales_leads: no team escalates to it any more.
        ("teams[4].name", pb.POLICY_PROBLEM_SEVERITY_WARNING),
    ]
    lines = [p.line for p in checked.problems]
    assert lines == sorted(lines)


async def test_a_policy_with_warnings_only_is_stored_with_them(replica: Replica) -> None:
    text = DEFAULT.replace("control_share: 0.1", "control_share: 0").replace(
        "control_share: 0.05", "control_share: 0"
    )
    created = await replica.stub.CreatePolicyVersion(
        pb.CreatePolicyVersionRequest(yaml=text, actor=ALICE)
    )
    assert created.policy.version == "1"
    assert [w.path for w in created.warnings] == ["actions"]
    assert "control" in created.warnings[0].message


async def test_text_over_one_mebibyte_is_refused(replica: Replica) -> None:
    text = DEFAULT + "#" * (1 << 20)
    checked = await replica.stub.ValidatePolicy(pb.ValidatePolicyRequest(yaml=text))
    assert not checked.valid and "1 MiB" in checked.problems[0].message
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create(replica, text)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(_violations(refused.value)) == ["yaml"]


# --- versions -----------------------------------------------------------------------


async def test_create_activate_and_roll_back(replica: Replica, clock: ManualClock) -> None:
    first = await _create(replica, TIGHTER)
    assert (first.version, first.active, first.yaml) == ("1", False, TIGHTER)
    assert first.sha256 == text_sha256(TIGHTER)
    assert (first.created_by.name, first.created_by.reason) == ("alice", "tighter email cap")
    assert first.created_at.ToDatetime().replace(tzinfo=clock().tzinfo) == clock()
    assert not first.HasField("activated_at")
    second = await _create(replica, LOOSER)
    assert second.version == "2"
    # Stored is not active.
    assert await replica.active_version() == DEFAULT_VERSION

    activated = await _activate(replica, "1")
    assert (activated.policy.version, activated.policy.active) == ("1", True)
    assert activated.previous_version == ""
    assert await _active_text(replica) == TIGHTER

    clock.advance(hours=1)
    moved = await _activate(replica, "2", expected="1")
    assert (moved.policy.version, moved.previous_version) == ("2", "1")
    assert await _active_text(replica) == LOOSER

    clock.advance(hours=1)
    rolled_back = await _activate(replica, "1", expected="2", actor=BOB)
    assert (rolled_back.policy.version, rolled_back.previous_version) == ("1", "2")
    assert rolled_back.policy.activated_at.ToDatetime().replace(tzinfo=clock().tzinfo) == clock()
    assert await _active_text(replica) == TIGHTER

    listed = await replica.stub.ListPolicyVersions(pb.ListPolicyVersionsRequest())
    assert [(p.version, p.active) for p in listed.policies] == [("2", False), ("1", True)]
    default = await replica.stub.GetPolicy(pb.GetPolicyRequest(version=DEFAULT_VERSION))
    assert not default.policy.active

    # The audit: who switched from what to what, and when.
    log = await PolicyStore(replica.runtime.pool).activations()
    assert [(e.version, e.previous_version, e.activated_by, e.reason) for e in log] == [
        (1, None, "alice", "tighter email cap"),
        (2, 1, "alice", "tighter email cap"),
        (1, 2, "bob", "roll back"),
    ]
    assert [e.activated_at for e in log] == sorted(e.activated_at for e in log)


async def test_activating_the_active_version_changes_nothing(replica: Replica) -> None:
    await _create(replica, TIGHTER)
    await _activate(replica, "1")
    again = await _activate(replica, "1", expected="1")
    assert (again.policy.version, again.policy.active) == ("1", True)
    assert len(await PolicyStore(replica.runtime.pool).activations()) == 1


async def test_activating_the_default_goes_back_to_it(replica: Replica, clock: ManualClock) -> None:
    await _create(replica, TIGHTER)
    await _activate(replica, "1", expected=DEFAULT_VERSION)
    assert await _active_text(replica) == TIGHTER

    clock.advance(hours=1)
    back = await _activate(replica, DEFAULT_VERSION, expected="1", actor=BOB)
    assert (back.policy.version, back.policy.active, back.previous_version) == (
        DEFAULT_VERSION,
        True,
        "1",
    )
    assert back.policy.yaml == DEFAULT
    assert back.policy.activated_at.ToDatetime().replace(tzinfo=clock().tzinfo) == clock()
    # This replica applies the default before it answers.
    active = (await replica.stub.GetPolicy(pb.GetPolicyRequest())).policy
    assert active == back.policy
    listed = await replica.stub.ListPolicyVersions(pb.ListPolicyVersionsRequest())
    assert [(p.version, p.active) for p in listed.policies] == [("1", False)]

    # Again: nothing changes, nothing is logged.
    clock.advance(hours=1)
    again = await _activate(replica, DEFAULT_VERSION, expected=DEFAULT_VERSION)
    assert (again.policy.version, again.previous_version) == (DEFAULT_VERSION, "")
    assert again.policy.activated_at == back.policy.activated_at

    # And forward again from the default.
    forward = await _activate(replica, "1", expected=DEFAULT_VERSION)
    assert (forward.policy.version, forward.previous_version) == ("1", "")
    assert await _active_text(replica) == TIGHTER
    left = await replica.stub.GetPolicy(pb.GetPolicyRequest(version=DEFAULT_VERSION))
    assert not left.policy.active
    assert left.policy.activated_at == back.policy.activated_at

    log = await PolicyStore(replica.runtime.pool).activations()
    assert [(e.version, e.previous_version, e.activated_by, e.reason) for e in log] == [
        (1, None, "alice", "tighter email cap"),
        (None, 1, "bob", "roll back"),
        (1, None, "alice", "tighter email cap"),
    ]


async def test_expected_active_version_guards_going_back_to_the_default(
    replica: Replica,
) -> None:
    await _create(replica, TIGHTER)
    await _create(replica, LOOSER)
    await _activate(replica, "1")
    for stale_expectation in ("2", DEFAULT_VERSION, "abc"):
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await _activate(replica, DEFAULT_VERSION, expected=stale_expectation)
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION, stale_expectation
        assert "the active policy version is 1" in (stale.value.details() or "")
    assert await replica.active_version() == "1"
    assert len(await PolicyStore(replica.runtime.pool).activations()) == 1


async def test_expected_active_version_guards_against_a_concurrent_change(
    replica: Replica,
) -> None:
    await _create(replica, TIGHTER)
    await _create(replica, LOOSER)
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await _activate(replica, "2", expected="1")
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "default" in (stale.value.details() or "")
    # "default" is the expected version while none was activated.
    await _activate(replica, "1", expected=DEFAULT_VERSION)
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await _activate(replica, "2", expected=DEFAULT_VERSION)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await replica.active_version() == "1"


async def test_unknown_versions_are_not_found_and_a_missing_one_is_invalid(
    replica: Replica,
) -> None:
    for version in ("7", "abc", "0", "99999999999999999999"):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await _activate(replica, version)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND, version
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await replica.stub.GetPolicy(pb.GetPolicyRequest(version=version))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND, version
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _activate(replica, "")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(_violations(refused.value)) == ["version"]


async def test_a_bad_policy_is_refused_while_the_active_one_keeps_serving(
    replica: Replica,
) -> None:
    await _create(replica, TIGHTER)
    await _activate(replica, "1")
    bad = _edited("offer: credit_10\n", "offer: credit_99\n")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create(replica, bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing stored, so nothing to activate; the active version is unchanged.
    listed = await replica.stub.ListPolicyVersions(pb.ListPolicyVersionsRequest())
    assert [p.version for p in listed.policies] == ["1"]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await _activate(replica, "2")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert await replica.active_version() == "1"


async def test_a_stored_version_this_build_cannot_read_is_not_activated(
    replica: Replica,
) -> None:
    # A version stored by another build whose schema this one does not
    # share (written straight into the table: this build never stores one).
    await _create(replica, TIGHTER)
    await _activate(replica, "1")
    async with replica.runtime.pool.acquire() as connection:
        await connection.execute(
            "INSERT INTO policy_versions (version, yaml, sha256, created_at)"
            " VALUES (2, 'actions: []\nfuture_key: 1\n', '', now())"
        )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _activate(replica, "2")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "future_key" in (refused.value.details() or "")
    assert await replica.active_version() == "1"


async def test_listing_pages_newest_first_and_can_omit_the_text(replica: Replica) -> None:
    for count in range(1, 6):
        await _create(replica, _edited("max_actions: 3\n", f"max_actions: {count}\n"))
    seen: list[str] = []
    token = ""
    while True:
        page = await replica.stub.ListPolicyVersions(
            pb.ListPolicyVersionsRequest(
                page=common_pb2.PageRequest(page_size=2, page_token=token), omit_yaml=True
            )
        )
        assert len(page.policies) <= 2
        assert all(p.yaml == "" and p.sha256 for p in page.policies)
        seen += [p.version for p in page.policies]
        token = page.page.next_page_token
        if not token:
            break
    assert seen == ["5", "4", "3", "2", "1"]
    full = await replica.stub.ListPolicyVersions(pb.ListPolicyVersionsRequest())
    assert full.policies[0].yaml.endswith("\n") and "max_actions: 5" in full.policies[0].yaml
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.stub.ListPolicyVersions(
            pb.ListPolicyVersionsRequest(page=common_pb2.PageRequest(page_token="%%%"))
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(_violations(refused.value)) == ["page.page_token"]


# --- idempotency ------------------------------------------------------------------------


async def test_a_repeated_create_returns_the_first_version(replica: Replica) -> None:
    first = await _create(replica, TIGHTER, key="create-1")
    again = await _create(replica, TIGHTER, key="create-1")
    assert again.version == first.version == "1"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create(replica, LOOSER, key="create-1")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(_violations(refused.value)) == ["idempotency_key"]
    listed = await replica.stub.ListPolicyVersions(pb.ListPolicyVersionsRequest())
    assert [p.version for p in listed.policies] == ["1"]


async def test_a_repeated_activation_has_no_second_effect(replica: Replica) -> None:
    await _create(replica, TIGHTER)
    await _create(replica, LOOSER)
    first = await _activate(replica, "1", key="activate-1")
    await _activate(replica, "2")
    # The retry of the first request answers its result and does not undo the second.
    again = await _activate(replica, "1", key="activate-1")
    assert again.previous_version == first.previous_version == ""
    assert await replica.active_version() == "2"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _activate(replica, "2", key="activate-1")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(_violations(refused.value)) == ["idempotency_key"]
    assert len(await PolicyStore(replica.runtime.pool).activations()) == 2


async def test_a_key_that_went_back_to_the_default_is_bound_to_the_default(
    replica: Replica,
) -> None:
    await _create(replica, TIGHTER)
    await _create(replica, LOOSER)
    await _activate(replica, "1", key="to-1")
    back = await _activate(replica, DEFAULT_VERSION, key="to-default")
    assert back.previous_version == "1"
    await _activate(replica, "2")
    # The retry answers the first result and does not undo the later change.
    again = await _activate(replica, DEFAULT_VERSION, key="to-default")
    assert (again.policy.version, again.previous_version) == (DEFAULT_VERSION, "1")
    assert not again.policy.active
    assert await replica.active_version() == "2"
    # The key of the default refuses a version, the key of a version the default.
    for version, key in (("1", "to-default"), ("2", "to-default"), (DEFAULT_VERSION, "to-1")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _activate(replica, version, key=key)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (version, key)
        assert list(_violations(refused.value)) == ["idempotency_key"]
    assert await replica.active_version() == "2"
    assert len(await PolicyStore(replica.runtime.pool).activations()) == 3


# --- replicas ---------------------------------------------------------------------------


async def test_two_replicas_follow_activations_without_restart(
    start_replica: StartReplica,
) -> None:
    # Polls far apart: only the notification can switch them within the test.
    first = await start_replica(policy_poll_interval_s=3600)
    second = await start_replica(policy_poll_interval_s=3600)
    assert await second.active_version() == DEFAULT_VERSION
    await _create(first, TIGHTER)
    await _create(second, LOOSER)

    await _activate(first, "1")
    assert await first.active_version() == "1"  # (the activating replica at once)
    await wait_until(second.active_version, lambda v: v == "1", what="second replica on 1")

    await _activate(second, "2", expected="1")
    await wait_until(first.active_version, lambda v: v == "2", what="first replica on 2")

    # A replica started now reads the active version before it serves.
    third = await start_replica()
    assert await third.active_version() == "2"

    # Back to the default: announced like any activation.
    await _activate(third, DEFAULT_VERSION, expected="2")
    for replica in (first, second):
        await wait_until(
            replica.active_version, lambda v: v == DEFAULT_VERSION, what="replicas on the default"
        )
    assert await _active_text(first) == DEFAULT


async def test_the_poll_catches_an_activation_whose_notification_was_lost(
    replica: Replica,
) -> None:
    await _create(replica, TIGHTER)
    book = PolicyBook(PolicyStore(replica.runtime.pool), poll_interval_s=0.05)
    await book.start()
    try:
        assert book.active().version == DEFAULT_VERSION
        # Activated behind the service's back: no NOTIFY, only the poll sees it.
        async with replica.runtime.pool.acquire() as connection:
            await connection.execute(
                "INSERT INTO policy_active (version, activated_at) VALUES (1, now())"
            )
        await until(lambda: book.active().version == "1", what="the poll reading version 1")
        assert book.active().policy.contact.frequency_caps[0].max_contacts == 1
        # Back to the default behind its back: the poll switches to it as well.
        async with replica.runtime.pool.acquire() as connection:
            await connection.execute("DELETE FROM policy_active")
        await until(
            lambda: book.active().version == DEFAULT_VERSION, what="the poll reading the default"
        )
        assert book.active().policy.contact.frequency_caps[0].max_contacts == 2
    finally:
        await book.stop()
