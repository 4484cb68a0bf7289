"""The contact rules (contact/rules.py), by worked examples: each case states
the customer's preferences and history, the rules, the instant, and the one
answer the README's meaning of the rules gives."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from converge.recommendation.contact.rules import (
    Candidate,
    Consent,
    ContactPreferences,
    PastContact,
    Suppression,
    Verdict,
    assess,
    history_horizon,
    in_quiet_hours,
)
from converge.recommendation.policy.model import ContactRules, FrequencyCap, QuietHours

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)  # 11:00 in Paris: no quiet hours
DAY = timedelta(days=1)
ALL_GRANTED = ContactPreferences(
    consents={c: Consent.GRANTED for c in ("email", "sms", "phone", "push", "in_app")}
)

RETENTION = Candidate(
    "retention", "retention_discount_20", "retention_offer", ("email", "in_app"),
    cool_down=timedelta(days=30),
)  # fmt: skip
CALL = Candidate("call", "proactive_support_call", "proactive_support_call", ("phone",))
CROSS_SELL = Candidate(
    "cross_sell", "cross_sell_product", "cross_sell_offer", ("in_app", "email"), automated=True
)
HUMAN = Candidate("human", "escalate_to_human", "escalate_to_human")
SENIOR = Candidate("senior", "escalate_to_senior_agent", "escalate_to_senior_agent")
BOT_REPLY = Candidate("bot", "bot_answer", "proactive_support_call", automated=True)


def rules(**changes: object) -> ContactRules:
    base: dict[str, object] = {
        "frequency_caps": [
            FrequencyCap(channel="email", max_contacts=2, window=timedelta(days=7)),
            FrequencyCap(channel="phone", max_contacts=1, window=timedelta(days=7)),
            FrequencyCap(channel="any", max_contacts=4, window=timedelta(days=30)),
        ],
        "cool_down_after_rejection": timedelta(days=30),
        "quiet_hours": QuietHours(start=time(21), end=time(8)),
        "default_time_zone": "Europe/Paris",
    }
    base.update(changes)
    return ContactRules.model_validate(base)


def one(
    candidate: Candidate,
    preferences: ContactPreferences | None = ALL_GRANTED,
    history: list[PastContact] | None = None,
    contact_rules: ContactRules | None = None,
    *,
    time_zone: str | None = None,
    open_tickets: float | None = None,
    now: datetime = NOW,
) -> Verdict:
    [verdict] = assess(
        [candidate],
        preferences,
        history or [],
        contact_rules or rules(),
        time_zone=time_zone,
        open_tickets=open_tickets,
        now=now,
    )
    return verdict


def sent(action: str, channel: str | None, ago: timedelta, **extra: object) -> PastContact:
    return PastContact(action, channel, NOW - ago, **extra)  # type: ignore[arg-type]


# --- consent and do-not-contact ---------------------------------------------------


def test_the_first_consented_channel_in_the_actions_order_is_used() -> None:
    assert one(RETENTION).channel == "email"
    only_in_app = ContactPreferences(consents={"email": Consent.DENIED, "in_app": Consent.GRANTED})
    verdict = one(RETENTION, only_in_app)
    assert (verdict.allowed, verdict.channel) == (True, "in_app")


def test_the_customers_preferred_channel_goes_first_when_allowed() -> None:
    prefers_app = ContactPreferences(consents=ALL_GRANTED.consents, preferred_channel="in_app")
    assert one(RETENTION, prefers_app).channel == "in_app"
    # Preferred but not consented: the action's own order applies.
    no_app = ContactPreferences(
        consents={"email": Consent.GRANTED, "in_app": Consent.DENIED}, preferred_channel="in_app"
    )
    assert one(RETENTION, no_app).channel == "email"


def test_a_channel_without_granted_consent_is_withheld_whether_denied_or_never_asked() -> None:
    never_asked = ContactPreferences(consents={"in_app": Consent.UNSPECIFIED})
    verdict = one(RETENTION, never_asked)
    assert not verdict.allowed
    assert verdict.reasons == (Suppression.NO_CONSENT,)
    assert verdict.detail == "no consent for email; no consent for in_app"
    assert verdict.channel == "email"  # the one it would have used
    assert verdict.suppressed_until is None  # no clock lifts a missing consent


def test_do_not_contact_withholds_every_outbound_channel_but_not_the_conversation() -> None:
    dnc = ContactPreferences(consents=ALL_GRANTED.consents, do_not_contact=True)
    for candidate in (RETENTION, CALL, CROSS_SELL):
        verdict = one(candidate, dnc)
        assert not verdict.allowed
        assert verdict.reasons == (Suppression.DO_NOT_CONTACT,)
    assert one(HUMAN, dnc).allowed
    assert one(SENIOR, dnc).allowed


def test_unreadable_preferences_fail_closed() -> None:
    verdict = one(RETENTION, None)
    assert not verdict.allowed
    assert verdict.reasons == (Suppression.NO_CONSENT,)
    assert "could not be read" in verdict.detail
    # Automated actions are withheld as if the customer wanted a human...
    assert one(BOT_REPLY, None).reasons == (Suppression.WANTS_HUMAN,)
    # ...and the hand-over to a person stays, first.
    human = one(HUMAN, None)
    assert human.allowed and human.must_rank_first


# --- frequency caps -----------------------------------------------------------------


def test_a_cap_counts_contacts_in_the_rolling_window_ending_now() -> None:
    history = [
        sent("retention_credit_10", "email", 6 * DAY),
        sent("newsletter", "email", 1 * DAY),
    ]
    email_only = Candidate("credit", "retention_credit_10", "retention_offer", ("email",))
    verdict = one(email_only, history=history)
    assert verdict.reasons == (Suppression.FREQUENCY_CAP,)
    assert verdict.detail == "2 emails in 7 days, cap 2"
    # The oldest of the two leaves the window 7 days after it was sent.
    assert verdict.suppressed_until == NOW + DAY
    # At that instant it is out of the window (now - 7 days < t is the window).
    assert one(email_only, history=history, now=NOW + DAY).allowed
    assert not one(email_only, history=history, now=NOW + DAY - timedelta(seconds=1)).allowed


def test_a_capped_channel_falls_back_to_the_next_allowed_one() -> None:
    history = [sent("a", "email", 2 * DAY), sent("b", "email", 3 * DAY)]
    verdict = one(RETENTION, history=history)
    assert (verdict.allowed, verdict.channel) == (True, "in_app")


def test_the_any_cap_counts_every_channel_together() -> None:
    history = [
        sent("a", "email", 29 * DAY),
        sent("b", "sms", 20 * DAY),
        sent("c", "push", 10 * DAY),
        sent("d", "in_app", 2 * DAY),
        sent("talk", None, 1 * DAY),  # in the conversation: no contact
    ]
    verdict = one(RETENTION, history=history)
    assert verdict.reasons == (Suppression.FREQUENCY_CAP,)
    assert verdict.detail == "4 contacts in 30 days, cap 4"
    assert verdict.suppressed_until == NOW + DAY  # the 29-day-old email leaves first
    # The conversation is no outbound contact: caps do not apply.
    assert one(HUMAN, history=history).allowed


def test_contacts_not_delivered_do_not_count() -> None:
    history = [
        sent("a", "phone", 2 * DAY, not_delivered=True),
    ]
    assert one(CALL, history=history).allowed
    assert not one(CALL, history=[sent("a", "phone", 2 * DAY)]).allowed


def test_a_cap_of_zero_never_lifts() -> None:
    no_sms = rules(frequency_caps=[FrequencyCap(channel="sms", max_contacts=0, window=DAY)])
    sms = Candidate("sms", "reminder", "proactive_support_call", ("sms",))
    verdict = one(sms, contact_rules=no_sms)
    assert verdict.reasons == (Suppression.FREQUENCY_CAP,)
    assert verdict.suppressed_until is None


# --- cool-downs -----------------------------------------------------------------


def test_an_action_is_not_proposed_again_within_its_cool_down_on_any_channel() -> None:
    history = [sent("retention_discount_20", "in_app", 10 * DAY)]
    verdict = one(RETENTION, history=history)
    assert verdict.reasons == (Suppression.COOL_DOWN,)
    assert verdict.detail == "proposed 10 days ago, cool-down 30 days"
    assert verdict.suppressed_until == NOW + 20 * DAY
    assert one(RETENTION, history=history, now=NOW + 20 * DAY).allowed


def test_a_declined_action_waits_the_rejection_cool_down_from_the_decline() -> None:
    declined = sent("proactive_support_call", "phone", 40 * DAY, declined_at=NOW - 5 * DAY)
    verdict = one(CALL, history=[declined])
    assert verdict.reasons == (Suppression.COOL_DOWN,)
    assert verdict.detail == "declined 5 days ago, cool-down after a rejection 30 days"
    assert verdict.suppressed_until == NOW + 25 * DAY
    # In the conversation too: a declined hand-over offer is not pushed again.
    senior_declined = sent("escalate_to_senior_agent", None, DAY, declined_at=NOW - DAY)
    assert one(SENIOR, history=[senior_declined]).reasons == (Suppression.COOL_DOWN,)
    # Another action is not concerned.
    assert one(RETENTION, history=[declined]).allowed


def test_history_horizon_reaches_the_longest_window_or_cool_down() -> None:
    from converge.recommendation.policy.model import ActionSpec

    long_cool = ActionSpec(name="x", kind="retention_offer", cool_down=timedelta(days=90))
    assert history_horizon(rules(), []) == timedelta(days=30)
    assert history_horizon(rules(), [long_cool]) == timedelta(days=90)


# --- quiet hours ---------------------------------------------------------------------


def test_quiet_hours_hold_calls_at_night_in_the_default_time_zone() -> None:
    late = datetime(2026, 12, 2, 21, 30, tzinfo=UTC)  # 22:30 in Paris (UTC+1)
    verdict = one(CALL, now=late)
    assert verdict.reasons == (Suppression.QUIET_HOURS,)
    assert verdict.detail == "quiet hours 21:00-08:00 Europe/Paris for phone"
    assert verdict.suppressed_until == datetime(2026, 12, 3, 7, 0, tzinfo=UTC)  # 08:00 Paris
    # Email is not a quiet-hours channel of the rules.
    assert one(RETENTION, now=late).allowed
    # 08:00 local is out of the quiet hours; 07:59 is in.
    assert one(CALL, now=datetime(2026, 12, 3, 7, 0, tzinfo=UTC)).allowed
    assert not one(CALL, now=datetime(2026, 12, 3, 6, 59, tzinfo=UTC)).allowed


def test_quiet_hours_follow_the_customers_own_time_zone() -> None:
    at = datetime(2026, 12, 2, 23, 0, tzinfo=UTC)  # 00:00 Paris, 18:00 New York
    assert not one(CALL, now=at).allowed
    assert one(CALL, now=at, time_zone="America/New_York").allowed
    # An unknown zone name falls back to the policy's default.
    assert not one(CALL, now=at, time_zone="Mars/Olympus").allowed


def test_quiet_hours_follow_daylight_saving_time() -> None:
    # 08:00 in Paris is 07:00 UTC in winter, 06:00 UTC in summer.
    summer = datetime(2026, 7, 1, 5, 30, tzinfo=UTC)  # 07:30 CEST
    verdict = one(CALL, now=summer)
    assert verdict.suppressed_until == datetime(2026, 7, 1, 6, 0, tzinfo=UTC)
    assert one(CALL, now=datetime(2026, 7, 1, 6, 0, tzinfo=UTC)).allowed


def test_quiet_hours_ending_in_a_skipped_hour_end_after_the_gap() -> None:
    # On 2026-03-29 Paris jumps from 02:00 to 03:00: 02:30 does not exist.
    night = rules(quiet_hours=QuietHours(start=time(22), end=time(2, 30)))
    at = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # 01:30 CET
    verdict = one(CALL, contact_rules=night, now=at)
    assert verdict.reasons == (Suppression.QUIET_HOURS,)
    # Read with the offset before the change: 01:30 UTC, 03:30 CEST, never early.
    assert verdict.suppressed_until == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "end", "local", "quiet"),
    [
        (time(21), time(8), time(20, 59), False),
        (time(21), time(8), time(21), True),
        (time(21), time(8), time(0), True),
        (time(21), time(8), time(7, 59), True),
        (time(21), time(8), time(8), False),
        (time(12), time(14), time(13), True),
        (time(12), time(14), time(14), False),
        (time(12), time(12), time(12), False),  # start == end: no quiet hours
    ],
)
def test_in_quiet_hours_wraps_midnight(start: time, end: time, local: time, quiet: bool) -> None:
    assert in_quiet_hours(QuietHours(start=start, end=end), local) is quiet


# --- open tickets and wants a human ---------------------------------------------------


def test_no_offer_while_a_ticket_is_open_but_support_goes_on() -> None:
    verdict = one(RETENTION, open_tickets=1)
    assert verdict.reasons == (Suppression.OPEN_TICKET,)
    assert verdict.detail == "1 open ticket; no offers"
    assert one(CROSS_SELL, open_tickets=2).reasons == (Suppression.OPEN_TICKET,)
    assert one(CALL, open_tickets=1).allowed
    assert one(RETENTION, open_tickets=0).allowed
    assert one(RETENTION, open_tickets=None).allowed
    assert one(
        RETENTION, open_tickets=1, contact_rules=rules(suppress_offers_while_ticket_open=False)
    ).allowed


def test_wants_a_human_withholds_automated_actions_and_puts_the_hand_over_first() -> None:
    human_please = ContactPreferences(consents=ALL_GRANTED.consents, wants_human=True)
    verdicts = assess(
        [CROSS_SELL, BOT_REPLY, RETENTION, SENIOR, HUMAN],
        human_please,
        [],
        rules(),
        time_zone=None,
        open_tickets=None,
        now=NOW,
    )
    by_key = {v.candidate.key: v for v in verdicts}
    assert by_key["cross_sell"].reasons == (Suppression.WANTS_HUMAN,)
    assert by_key["bot"].reasons == (Suppression.WANTS_HUMAN,)
    assert by_key["retention"].allowed and not by_key["retention"].must_rank_first
    assert by_key["human"].must_rank_first and by_key["senior"].must_rank_first
    # Without the wish, nothing must rank first.
    assert not any(
        v.must_rank_first
        for v in assess(
            [HUMAN], ALL_GRANTED, [], rules(), time_zone=None, open_tickets=None, now=NOW
        )
    )


def test_every_reason_is_given_and_no_clock_lifts_a_permanent_one() -> None:
    late = datetime(2026, 12, 2, 21, 30, tzinfo=UTC)
    dnc = ContactPreferences(consents={"phone": Consent.DENIED}, do_not_contact=True)
    verdict = one(
        CALL,
        dnc,
        [
            sent(
                "x",
                "phone",
                DAY,
            )
        ],
        now=late,
    )
    assert verdict.reasons == (
        Suppression.NO_CONSENT,
        Suppression.DO_NOT_CONTACT,
        Suppression.FREQUENCY_CAP,
        Suppression.QUIET_HOURS,
    )
    assert "1 call in 7 days, cap 1" in verdict.detail
    assert verdict.suppressed_until is None


def test_suppressed_until_is_when_every_time_bound_reason_has_lifted() -> None:
    # Email is capped until its older contact leaves the 7 days (in 4 days);
    # in_app has no consent (never lifts); the action's cool-down lifts when
    # 30 days have passed since it was proposed.
    no_app = ContactPreferences(consents={"email": Consent.GRANTED})
    recent_emails = [sent("b", "email", 3 * DAY), sent("c", "email", 2 * DAY)]
    long_ago = [sent("retention_discount_20", "in_app", 25 * DAY), *recent_emails]
    verdict = one(RETENTION, no_app, long_ago)
    assert set(verdict.reasons) == {
        Suppression.NO_CONSENT,
        Suppression.FREQUENCY_CAP,
        Suppression.COOL_DOWN,
    }
    assert verdict.suppressed_until == NOW + 5 * DAY  # the cool-down, the later one
    lately = [sent("retention_discount_20", "in_app", 28 * DAY), *recent_emails]
    assert one(RETENTION, no_app, lately).suppressed_until == NOW + 4 * DAY  # the cap
    # And at that instant the action is allowed again, on email.
    verdict_then = one(RETENTION, no_app, lately, now=NOW + 4 * DAY)
    assert (verdict_then.allowed, verdict_then.channel) == (True, "email")


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        one(CALL, now=datetime(2026, 1, 1))
