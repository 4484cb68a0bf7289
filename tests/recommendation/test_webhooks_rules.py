"""The webhook rules without I/O: what an answer means (the Standard Webhooks
specification's status handling), the retry schedule, Retry-After, which
URLs may be registered, and the secrets the store accepts."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime

import pytest

from converge.recommendation.webhooks.dispatcher import retry_after_seconds
from converge.recommendation.webhooks.secrets import SecretStore, secret_problem
from converge.recommendation.webhooks.service import (
    SPEC_SCHEDULE_S,
    Answer,
    RetrySchedule,
    Verdict,
    judge,
    url_problem,
)

SCHEDULE = RetrySchedule((5, 300, 1800))


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_is_delivered(status: int) -> None:
    assert judge(Answer(status), 1, SCHEDULE) == (Verdict.DELIVERED, None)


def test_410_gone_disables_whatever_the_attempt() -> None:
    assert judge(Answer(410, "HTTP 410 Gone"), 1, SCHEDULE) == (Verdict.GONE, None)
    assert judge(Answer(410, "HTTP 410 Gone"), 4, SCHEDULE) == (Verdict.GONE, None)


@pytest.mark.parametrize("status", [0, 301, 302, 307, 400, 401, 404, 429, 500, 502, 503, 504])
def test_every_other_answer_is_retried_on_the_schedule_then_dead(status: int) -> None:
    answer = Answer(status, "failed")
    assert [judge(answer, attempt, SCHEDULE) for attempt in (1, 2, 3, 4)] == [
        (Verdict.RETRY, 5),
        (Verdict.RETRY, 300),
        (Verdict.RETRY, 1800),
        (Verdict.DEAD, None),
    ]


def test_the_default_schedule_is_the_specifications_example() -> None:
    hours = [d / 3600 for d in SPEC_SCHEDULE_S]
    assert hours[:2] == [5 / 3600, 5 / 60] and hours[2:] == [0.5, 2, 5, 10, 14, 20, 24]
    assert RetrySchedule().attempts == 10


def test_retry_after_pushes_later_never_earlier_and_at_most_the_longest_delay() -> None:
    assert judge(Answer(503, "", retry_after_s=60), 1, SCHEDULE) == (Verdict.RETRY, 60)
    assert judge(Answer(429, "", retry_after_s=1), 1, SCHEDULE) == (Verdict.RETRY, 5)
    assert judge(Answer(503, "", retry_after_s=10**6), 1, SCHEDULE) == (Verdict.RETRY, 1800)


def test_jitter_stays_within_its_fraction() -> None:
    schedule = RetrySchedule((100,), jitter=0.1)
    rng = random.Random(7)
    delays = [schedule.delay_after(1, None, rng) for _ in range(2000)]
    assert all(d is not None and 90 <= d <= 110 for d in delays)
    assert len({round(d or 0) for d in delays}) > 10, "spread, not one value"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds("Wed, 02 Dec 2026 10:01:30 GMT", now) == 90
    assert retry_after_seconds("Wed, 02 Dec 2026 09:00:00 GMT", now) == 0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


@pytest.mark.parametrize(
    ("url", "allow_http", "problem"),
    [
        ("https://hooks.example.com/converge", False, None),
        ("https://hooks.example.com:8443/in?team=support", False, None),
        ("http://hooks.example.com/in", False, "must be an https URL"),
        ("http://hooks.example.com/in", True, None),
        ("ftp://hooks.example.com/in", True, "must be an http or https URL"),
        ("https:///no-host", False, "has no host"),
        ("https://user:secret@hooks.example.com/", False, "must not carry credentials"),
        ("https://hooks.example.com:99999/", False, "not a URL"),
        ("https://hooks.example.com/#frag", False, "must not have a fragment"),
        ("https://hooks.example.com/" + "a" * 2100, False, "longer than 2048 characters"),
    ],
)
def test_which_urls_may_be_registered(url: str, allow_http: bool, problem: str | None) -> None:
    found = url_problem(url, allow_http)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_the_store_takes_only_whsec_secrets_of_24_to_64_bytes() -> None:
    def whsec(size: int) -> str:
        return "whsec_" + base64.b64encode(bytes(size)).decode()

    assert secret_problem(whsec(24)) is None and secret_problem(whsec(64)) is None
    assert secret_problem(whsec(32).rstrip("=")) is None, "unpadded, as the library reads it"
    assert "24 to 64" in (secret_problem(whsec(23)) or "")
    assert "24 to 64" in (secret_problem(whsec(65)) or "")
    assert "does not start with 'whsec_'" in (secret_problem("sk_live_abc") or "")
    assert "not valid base64" in (secret_problem("whsec_***") or "")
    with pytest.raises(ValueError, match="'crm' #2"):
        SecretStore({"crm": [whsec(32), "password"]})
    with pytest.raises(ValueError, match="'empty' has no value"):
        SecretStore({"empty": []})
    store = SecretStore({"crm": [whsec(32), whsec(40)]})
    assert "crm" in store and "other" not in store and len(store.signers("crm")) == 2
