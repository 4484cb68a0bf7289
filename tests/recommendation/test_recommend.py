"""Recommend over real gRPC with identity, interactions and scoring (on its
rule fallback) running, and the decision log in PostgreSQL."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.recommendation.decisions.service import FixedPolicy
from converge.recommendation.policy.model import ActivePolicy, Policy
from converge.recommendation.policy.service import default_policy
from converge.runtime.values import money_to_decimal
from converge.v1 import common_pb2, predictions_pb2, recommendation_pb2, scoring_pb2
from tests.conftest import Platform, free_port
from tests.recommendation.conftest import (
    EMAIL,
    Recommendation,
    Scoring,
    StartRecommendation,
    make_customer,
    make_treated_customer,
    set_preferences,
)

pb = recommendation_pb2
WEB = common_pb2.CHANNEL_WEB


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


def reasons(suppressed: Any) -> list[str]:
    return [pb.SuppressionReason.Name(r) for r in suppressed.reasons]


def small_policy(
    version: str = "small-1",
    contact: dict[str, Any] | None = None,
    automated: bool = True,
    **arbitration: Any,
) -> FixedPolicy:
    """A cross-sell by email (automated, sales) over two products worth the
    same, a hand-over to a person and do_nothing; no caps, no quiet hours,
    no control groups: each test sees one rule at work."""
    return FixedPolicy(
        ActivePolicy(
            version,
            Policy.model_validate(
                {
                    "currency": "EUR",
                    "catalogue": {
                        "products": [
                            {"id": "beta", "value": 50, "cost": 0},
                            {"id": "alpha", "value": 50, "cost": 0},
                        ]
                    },
                    "actions": [
                        {
                            "name": "cross_sell",
                            "kind": "cross_sell_offer",
                            "prediction": "cross_sell",
                            "contact_channels": ["email"],
                            "automated": automated,
                            "team_kind": "sales",
                        },
                        {
                            "name": "hand_over",
                            "kind": "escalate_to_human",
                            "value": 50,
                            "cost": 10,
                            "team_kind": "support",
                        },
                        {"name": "do_nothing", "kind": "do_nothing"},
                    ],
                    "arbitration": arbitration,
                    "contact": contact or {"frequency_caps": []},
                }
            ),
        )
    )


async def recommend(
    service: Recommendation, customer: common_pb2.CustomerRef, **fields: Any
) -> pb.RecommendResponse:
    fields.setdefault("channel", WEB)
    answer: pb.RecommendResponse = await service.stub.Recommend(
        pb.RecommendRequest(customer=customer, **fields)
    )
    return answer


# --- ranking, reasons, the default policy --------------------------------------------


async def test_the_default_policy_ranks_a_support_call_with_its_reasons_and_withholds_the_offer(
    platform: Platform, recommendation: Recommendation
) -> None:
    customer = await make_treated_customer(
        platform, "risky", default_policy().policy, ["proactive_support_call"], at_risk=True
    )

    answer = await recommend(recommendation, customer.by_email, ticket_id=customer.ticket_id)

    assert answer.customer_id == customer.customer_id
    assert answer.policy_version == "default"
    assert answer.decision_id
    top = answer.actions[0]
    assert (top.rank, top.action_name) == (1, "proactive_support_call")
    assert top.kind == pb.ACTION_KIND_PROACTIVE_SUPPORT_CALL
    assert top.contact_channel == common_pb2.CONTACT_CHANNEL_PHONE
    assert top.ticket_id == customer.ticket_id
    assert top.prediction.kind == predictions_pb2.PREDICTION_KIND_ESCALATION
    # Expected value = propensity x value x weight - cost (80 and 15 in the default policy).
    expected = (Decimal(repr(top.prediction.probability)) * 80 - 15).quantize(
        Decimal("0.0001"), rounding=ROUND_HALF_EVEN
    )
    assert money_to_decimal(top.expected_value) == expected
    assert top.expected_value.currency_code == "EUR"
    codes = [r.code for r in top.reasons]
    assert codes[:2] == ["policy.threshold.escalation", "policy.expected_value"]
    # Then the prediction's own reasons, as scoring gave them.
    assert codes[2:] == [r.code for r in top.prediction.reasons] and len(codes) > 2
    # An offer while the ticket is open is withheld, and says why.
    withheld = {s.action_name: s for s in answer.suppressed}
    assert "SUPPRESSION_REASON_OPEN_TICKET" in reasons(withheld["retention_credit_10"])
    assert "open ticket" in withheld["retention_credit_10"].detail


async def test_nothing_worth_doing_answers_do_nothing(
    platform: Platform, recommendation: Recommendation
) -> None:
    customer = await make_customer(platform, "happy")

    answer = await recommend(recommendation, customer.ref)

    assert [(a.rank, a.kind, a.action_name) for a in answer.actions] == [
        (1, pb.ACTION_KIND_DO_NOTHING, "do_nothing")
    ]
    assert money_to_decimal(answer.actions[0].expected_value) == 0


async def test_ties_are_broken_by_product_id_and_one_action_of_a_kind_is_proposed(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(policy=small_policy())
    customer = await make_customer(platform, "ties")

    answer = await recommend(service, customer.ref)

    # Both products score alike (the rules do not depend on the product) and
    # are worth the same: "alpha" wins on its id, "beta" is withheld for it.
    assert [(a.action_name, a.product_id) for a in answer.actions] == [("cross_sell", "alpha")]
    assert answer.actions[0].contact_channel == EMAIL
    beta = next(s for s in answer.suppressed if s.product_id == "beta")
    assert reasons(beta) == ["SUPPRESSION_REASON_ARBITRATION"]
    assert "cross_sell (alpha) was chosen" in beta.detail


async def test_a_request_may_ask_for_fewer_actions_than_the_policy_never_more(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    # Not automated, so a customer who wants a human gets both the hand-over and the offer.
    two = await start_recommendation(policy=small_policy(automated=False))
    one = await start_recommendation(policy=small_policy(automated=False, max_actions=1))
    customer = await make_customer(platform, "counts", wants_human=True)

    both = await recommend(two, customer.ref)
    fewer = await recommend(two, customer.ref, max_actions=1, dry_run=True)
    capped = await recommend(one, customer.ref, max_actions=5, dry_run=True)

    assert [a.action_name for a in both.actions] == ["hand_over", "cross_sell"]
    assert [a.action_name for a in fewer.actions] == ["hand_over"]
    assert [a.action_name for a in capped.actions] == ["hand_over"]
    below = [
        s for s in capped.suppressed if s.action_name == "cross_sell" and s.product_id == "alpha"
    ]
    assert [reasons(s) for s in below] == [["SUPPRESSION_REASON_ARBITRATION"]]
    assert "ranked below the 1 action(s) asked for" in below[0].detail


# --- the arbitration across teams ----------------------------------------------------


async def test_no_sales_action_while_a_complaint_is_recent(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(policy=small_policy())
    calm = await make_customer(platform, "calm")
    upset = await make_customer(platform, "upset", at_risk=True)

    calm_answer = await recommend(service, calm.ref)
    upset_answer = await recommend(service, upset.ref)

    assert [a.action_name for a in calm_answer.actions] == ["cross_sell"]
    assert [a.kind for a in upset_answer.actions] == [pb.ACTION_KIND_DO_NOTHING]
    blocked = [s for s in upset_answer.suppressed if s.action_name == "cross_sell"]
    assert {s.product_id for s in blocked} == {"alpha", "beta"}
    for withheld in blocked:
        assert "SUPPRESSION_REASON_ESCALATION_OPEN" in reasons(withheld)
        assert "complaint" in withheld.detail


async def test_retention_comes_before_sales_when_churn_is_high(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    # Any churn risk counts as high here: sales are withheld for retention.
    service = await start_recommendation(policy=small_policy(retention_first_churn_probability=0.0))
    customer = await make_customer(platform, "leaving")

    answer = await recommend(service, customer.ref)

    assert [a.kind for a in answer.actions] == [pb.ACTION_KIND_DO_NOTHING]
    withheld = [s for s in answer.suppressed if s.action_name == "cross_sell"]
    assert withheld and all(reasons(s) == ["SUPPRESSION_REASON_ARBITRATION"] for s in withheld)
    assert all("retention first" in s.detail for s in withheld)


# --- promises to the customer --------------------------------------------------------


async def test_a_customer_who_wants_a_human_gets_the_hand_over_first_and_nothing_automated(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(policy=small_policy())
    human = await make_customer(platform, "human", wants_human=True)
    other = await make_customer(platform, "other")

    wants = await recommend(service, human.ref)
    does_not = await recommend(service, other.ref)

    assert [a.action_name for a in wants.actions] == ["hand_over"]
    assert wants.actions[0].kind == pb.ACTION_KIND_ESCALATE_TO_HUMAN
    assert wants.actions[0].reasons[0].code == "policy.wants_human"
    automated = [s for s in wants.suppressed if s.action_name == "cross_sell"]
    assert automated and all("SUPPRESSION_REASON_WANTS_HUMAN" in reasons(s) for s in automated)
    # Without the wish, no hand-over and the automated offer goes ahead.
    assert [a.action_name for a in does_not.actions] == ["cross_sell"]


async def test_a_consent_withdrawal_is_honoured_by_the_very_next_call(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(policy=small_policy())
    customer = await make_customer(platform, "withdraws")
    before = await recommend(service, customer.ref)
    assert [(a.action_name, a.contact_channel) for a in before.actions] == [("cross_sell", EMAIL)]

    await set_preferences(platform, customer.customer_id, consents={EMAIL: False})
    after = await recommend(service, customer.ref)

    assert [a.kind for a in after.actions] == [pb.ACTION_KIND_DO_NOTHING]
    withheld = [s for s in after.suppressed if s.action_name == "cross_sell"]
    assert withheld and all("SUPPRESSION_REASON_NO_CONSENT" in reasons(s) for s in withheld)


# --- the decision log ----------------------------------------------------------------


async def test_get_decision_replays_exactly_what_was_answered(
    platform: Platform, recommendation: Recommendation
) -> None:
    customer = await make_customer(platform, "replay", at_risk=True)
    answer = await recommend(
        recommendation,
        customer.by_email,
        ticket_id=customer.ticket_id,
        context={"intent": common_pb2.AttributeValue(string_value="cancel")},
        context_features={"ticket_last_sentiment": -0.8},
    )

    decision = (
        await recommendation.stub.GetDecision(pb.GetDecisionRequest(decision_id=answer.decision_id))
    ).decision

    assert decision.decision_id == answer.decision_id
    assert decision.trigger == pb.DECISION_TRIGGER_RECOMMEND
    assert list(decision.actions) == list(answer.actions)
    assert list(decision.suppressed) == list(answer.suppressed)
    assert (decision.policy_version, decision.decided_at) == (
        answer.policy_version,
        answer.decided_at,
    )
    assert decision.customer_id == customer.customer_id
    assert decision.ticket_id == customer.ticket_id
    assert decision.channel == WEB
    assert decision.context["intent"].string_value == "cancel"
    assert dict(decision.context_features) == {"ticket_last_sentiment": -0.8}
    kinds = [p.kind for p in decision.predictions]
    assert kinds[:2] == [
        predictions_pb2.PREDICTION_KIND_CHURN,
        predictions_pb2.PREDICTION_KIND_ESCALATION,
    ]
    assert {m.name for m in decision.models} >= {
        "converge-rules-churn",
        "converge-rules-escalation",
    }
    ticket_features = [f for f in decision.features if f.ticket_id == customer.ticket_id]
    assert ticket_features and ticket_features[0].values["ticket_last_sentiment"] == -0.8


async def test_decisions_are_listed_newest_first_a_page_at_a_time(
    platform: Platform, recommendation: Recommendation
) -> None:
    customer = await make_customer(platform, "lists")
    ids = []
    for _ in range(3):
        ids.append((await recommend(recommendation, customer.ref)).decision_id)
        recommendation.clock.advance(minutes=1)

    first = await recommendation.stub.ListDecisions(
        pb.ListDecisionsRequest(
            customer=customer.by_email, page=common_pb2.PageRequest(page_size=2)
        )
    )
    second = await recommendation.stub.ListDecisions(
        pb.ListDecisionsRequest(
            customer=customer.ref,
            page=common_pb2.PageRequest(page_size=2, page_token=first.page.next_page_token),
        )
    )
    middle = await recommendation.stub.ListDecisions(
        pb.ListDecisionsRequest(
            customer=customer.ref,
            decided=common_pb2.TimeRange(
                start=first.decisions[1].decided_at, end=first.decisions[0].decided_at
            ),
        )
    )
    alerts_only = await recommendation.stub.ListDecisions(
        pb.ListDecisionsRequest(customer=customer.ref, triggers=[pb.DECISION_TRIGGER_INTERACTION])
    )

    assert [d.decision_id for d in first.decisions] == [ids[2], ids[1]]
    assert [d.decision_id for d in second.decisions] == [ids[0]]
    assert second.page.next_page_token == ""
    assert [d.decision_id for d in middle.decisions] == [ids[1]]  # (start included, end not)
    assert list(alerts_only.decisions) == []


async def test_a_dry_run_logs_nothing(platform: Platform, recommendation: Recommendation) -> None:
    customer = await make_customer(platform, "dry")

    answer = await recommend(recommendation, customer.ref, dry_run=True)
    listed = await recommendation.stub.ListDecisions(pb.ListDecisionsRequest(customer=customer.ref))

    assert answer.decision_id == ""
    assert answer.actions and answer.customer_id == customer.customer_id
    assert list(listed.decisions) == []


async def test_a_dry_run_counts_no_contact_against_a_cap(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(
        policy=small_policy(
            contact={"frequency_caps": [{"channel": "email", "max_contacts": 1, "window": "P7D"}]}
        )
    )
    customer = await make_customer(platform, "capped")

    for _ in range(3):
        await recommend(service, customer.ref, dry_run=True)
    real = await recommend(service, customer.ref)
    next_one = await recommend(service, customer.ref)

    assert [a.action_name for a in real.actions] == ["cross_sell"]
    assert [a.kind for a in next_one.actions] == [pb.ACTION_KIND_DO_NOTHING]
    withheld = [s for s in next_one.suppressed if s.action_name == "cross_sell"]
    assert withheld and all("SUPPRESSION_REASON_FREQUENCY_CAP" in reasons(s) for s in withheld)


# --- idempotency ---------------------------------------------------------------------


async def test_the_same_idempotency_key_returns_the_first_decision(
    platform: Platform, recommendation: Recommendation
) -> None:
    customer = await make_customer(platform, "again")

    first = await recommend(recommendation, customer.ref, idempotency_key="k-1")
    recommendation.clock.advance(minutes=5)
    second = await recommend(recommendation, customer.ref, idempotency_key="k-1")
    other = await recommend(recommendation, customer.ref, idempotency_key="k-2")

    assert second == first
    assert other.decision_id != first.decision_id


async def test_concurrent_calls_with_one_key_make_one_decision(
    platform: Platform, recommendation: Recommendation
) -> None:
    import asyncio

    customer = await make_customer(platform, "racing")

    answers = await asyncio.gather(
        *(recommend(recommendation, customer.ref, idempotency_key="same") for _ in range(4))
    )
    listed = await recommendation.stub.ListDecisions(pb.ListDecisionsRequest(customer=customer.ref))

    assert len({a.decision_id for a in answers}) == 1
    assert [d.decision_id for d in listed.decisions] == [answers[0].decision_id]


async def test_a_key_bound_to_one_request_refuses_another(
    platform: Platform, recommendation: Recommendation
) -> None:
    customer = await make_customer(platform, "bound")
    await recommend(recommendation, customer.ref, idempotency_key="k-1")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommend(recommendation, customer.ref, idempotency_key="k-1", max_actions=1)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == ["idempotency_key"]


# --- errors --------------------------------------------------------------------------


async def test_an_unknown_customer_is_not_found_and_never_created(
    platform: Platform, recommendation: Recommendation
) -> None:
    unknown_email = common_pb2.CustomerRef(
        identifier=common_pb2.Identifier(
            type=common_pb2.IDENTIFIER_TYPE_EMAIL, value="nobody@recommendation.example"
        )
    )
    unknown_id = common_pb2.CustomerRef(customer_id="00000000-0000-4000-8000-000000000000")

    for ref in (unknown_email, unknown_id):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await recommend(recommendation, ref)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    from converge.v1 import identity_pb2

    listed = await platform.identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert list(listed.customers) == []


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"context": {"Bad-Key": common_pb2.AttributeValue(string_value="x")}}, "context[Bad-Key]"),
        ({"context": {"intent": common_pb2.AttributeValue()}}, "context[intent]"),
        ({"max_actions": 21}, "max_actions"),
        ({"max_actions": -1}, "max_actions"),
        ({"kinds": [99]}, "kinds[0]"),
        ({"kinds": [pb.ACTION_KIND_UNSPECIFIED]}, "kinds[0]"),
        ({"contact_channels": [0]}, "contact_channels[0]"),
        ({"channel": 77}, "channel"),
        ({"context_features": {"nps_last": float("nan")}}, "context_features[nps_last]"),
        ({"idempotency_key": "k" * 300}, "idempotency_key"),
        # (checked by scoring against the served features, named as scoring names it)
        ({"context_features": {"no_such_feature": 1.0}}, 'context_features["no_such_feature"]'),
    ],
)
async def test_bad_requests_are_refused_naming_the_field(
    platform: Platform, recommendation: Recommendation, fields: dict[str, Any], named: str
) -> None:
    customer = await make_customer(platform, "bad")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommend(recommendation, customer.ref, **fields)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == [named]


async def test_a_request_without_a_customer_names_the_field(
    recommendation: Recommendation,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommendation.stub.Recommend(pb.RecommendRequest(channel=WEB))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == ["customer"]


async def test_scoring_down_is_unavailable(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    customer = await make_customer(platform, "nodeps")
    service = await start_recommendation(
        scoring_address=f"127.0.0.1:{free_port()}", peer_timeout_s=1.0
    )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommend(service, customer.ref)

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "scoring" in str(raised.value.details())


async def test_the_fixtures_start_every_peer_and_scoring_answers_on_its_rules(
    platform: Platform, scoring: Scoring
) -> None:
    customer = await make_customer(platform, "fixtures", at_risk=True)
    answer = await scoring.stub.Score(
        scoring_pb2.ScoreRequest(
            customer=customer.by_email,
            ticket_id=customer.ticket_id,
            candidate_product_ids=["tv", "router"],
        )
    )
    kinds = [p.kind for p in answer.predictions]
    assert kinds[:2] == [
        predictions_pb2.PREDICTION_KIND_CHURN,
        predictions_pb2.PREDICTION_KIND_ESCALATION,
    ]
    assert all(p.fallback_used for p in answer.predictions)
    assert answer.customer_id == customer.customer_id


# --- converge recommend --------------------------------------------------------------


async def test_converge_recommend_prints_ranked_and_withheld_actions(
    platform: Platform,
    start_recommendation: StartRecommendation,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import json

    from converge import cli

    monkeypatch.setenv("COLUMNS", "240")  # (rich wraps to the terminal's width)
    service = await start_recommendation(policy=small_policy())
    customer = await make_customer(platform, "cli", wants_human=True)
    address = service.runtime.address
    base = ["recommend", f"email:{customer.email}", "--channel", "web"]
    capsys.readouterr()

    # (the command blocks on its own channel: off this test's event loop, which serves)
    as_json = await asyncio.to_thread(
        cli.main, [*base, "--recommendation", address, "--json", "--dry-run"]
    )
    printed = json.loads(capsys.readouterr().out)
    as_table = await asyncio.to_thread(cli.main, [*base, "--recommendation", address])
    table = capsys.readouterr().out
    unknown = await asyncio.to_thread(
        cli.main, ["recommend", "email:nobody@x.example", "--recommendation", address]
    )
    refused = await asyncio.to_thread(
        cli.main, [*base, "--recommendation", address, "--max-actions", "50"]
    )

    assert (as_json, as_table, unknown, refused) == (0, 0, 4, 2)
    assert printed["customerId"] == customer.customer_id
    assert "decisionId" not in printed  # (a dry run is not logged)
    assert [a["actionName"] for a in printed["actions"]] == ["hand_over"]
    assert {tuple(s["reasons"]) for s in printed["suppressed"]} == {
        ("SUPPRESSION_REASON_WANTS_HUMAN",)
    }
    assert "hand_over" in table and "Withheld" in table and "wants_human" in table


async def test_a_scoring_service_that_does_not_answer_in_time_is_unavailable(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    import asyncio

    # A stand-in for a stalled scoring replica (a real one cannot be made to
    # hang on demand): a gRPC server whose Score never answers.
    never = asyncio.Event()

    async def stalled(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return b""

    handler = grpc.method_handlers_generic_handler(
        "converge.v1.ScoringService", {"Score": grpc.unary_unary_rpc_method_handler(stalled)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        customer = await make_customer(platform, "stalled")
        service = await start_recommendation(
            scoring_address=f"127.0.0.1:{port}", peer_timeout_s=0.3
        )

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await recommend(service, customer.ref)

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "scoring" in str(raised.value.details())
    finally:
        never.set()
        await server.stop(None)
