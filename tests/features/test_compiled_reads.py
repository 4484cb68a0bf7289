"""The compiled feature reads (one plan per feature set, windows summed in
bands, stored states read as parsed) equal the reads they replaced
(`tests/features/reference_reads.py`) for random histories, read at random
moments, for the built-in set and a configured one; and a stored state
read as parsed gives what the state it describes gives."""

from __future__ import annotations

from datetime import datetime, timedelta

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.features.definitions import Event
from converge.features.engine import BUILTIN, CustomerState, FeatureSet
from tests.features import test_configured_sets as configured
from tests.features.reference_reads import reference_customer_features, reference_ticket_features
from tests.interactions import test_features as builtin

PROPERTY = settings(max_examples=150, deadline=None)
# Read before, inside and well after the histories' span (windows partly or
# entirely past), and on the days a window's band changes.
as_of_offsets = st.one_of(
    st.integers(-5 * 86_400, 200 * 86_400).map(lambda s: timedelta(seconds=s)),
    st.sampled_from([6, 7, 29, 30, 59, 60, 89, 90, 91]).map(lambda d: timedelta(days=d)),
)


def _compare(
    features: FeatureSet,
    state: CustomerState,
    as_of: datetime,
    tickets: list[str],
) -> None:
    stored = features.stored_state(orjson.loads(orjson.dumps(state.to_json())))
    expected = reference_customer_features(features, state, as_of)
    assert features.customer_features(state, as_of) == expected
    assert features.customer_features(stored, as_of) == expected
    for ticket_id in tickets:
        expected_ticket = reference_ticket_features(features, state, ticket_id, as_of)
        assert features.ticket_features(state, ticket_id, as_of) == expected_ticket
        assert features.ticket_features(stored, ticket_id, as_of) == expected_ticket
    assert stored.open_ticket_ids() == state.open_ticket_ids()
    assert stored.open_ticket_count() == len(state.open_ticket_ids())


@PROPERTY
@given(builtin.event_lists, builtin.times, as_of_offsets)
def test_compiled_reads_equal_the_reference_for_the_builtin_set(
    evs: list[Event], start: datetime, offset: timedelta
) -> None:
    _compare(BUILTIN, BUILTIN.build_state(evs), start + offset, ["t1", "t2", "absent"])


@PROPERTY
@given(configured.event_lists, configured.times, as_of_offsets)
def test_compiled_reads_equal_the_reference_for_a_configured_set(
    evs: list[Event], start: datetime, offset: timedelta
) -> None:
    features = configured.SET
    _compare(features, features.build_state(evs), start + offset, ["t1", "t2"])


@PROPERTY
@given(builtin.event_lists, builtin.times)
def test_pruned_live_states_read_as_the_reference(evs: list[Event], now: datetime) -> None:
    """As live serving keeps them: pruned at a moment, read then."""
    state = BUILTIN.build_state(evs)
    state.prune(now)
    _compare(BUILTIN, state, now, ["t1", "t2"])


@PROPERTY
@given(builtin.event_lists, builtin.times, st.integers(0, 86_400 * 1_000_000 - 1), st.data())
def test_a_day_reading_gives_the_features_at_any_moment_of_its_day(
    evs: list[Event], start: datetime, first_us: int, data: st.DataObject
) -> None:
    state = BUILTIN.build_state(evs)
    midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
    read_at = midnight + timedelta(microseconds=first_us)
    later = midnight + timedelta(microseconds=data.draw(st.integers(0, 86_400 * 1_000_000 - 1)))
    reading = BUILTIN.day_reading(state, read_at)
    assert reading.values == BUILTIN.customer_features(state, read_at)
    assert reading.at(later) == BUILTIN.customer_features(state, later)
    assert reading.covers(later) and not reading.covers(midnight + timedelta(days=1))
    assert reading.at(midnight + timedelta(days=1)) is None
    assert reading.at(midnight - timedelta(microseconds=1)) is None


@PROPERTY
@given(builtin.event_lists, builtin.times, as_of_offsets, as_of_offsets)
def test_a_ticket_reading_gives_the_tickets_features_at_any_later_moment(
    evs: list[Event], start: datetime, read: timedelta, later: timedelta
) -> None:
    """Stored or built, any day: a ticket's features have no window."""
    state = BUILTIN.build_state(evs)
    stored = BUILTIN.stored_state(orjson.loads(orjson.dumps(state.to_json())))
    for ticket_id in ("t1", "t2", "absent"):
        reading = BUILTIN.ticket_reading(stored, ticket_id, start + read)
        assert reading.at(start + read) == BUILTIN.ticket_features(state, ticket_id, start + read)
        assert reading.at(start + later) == BUILTIN.ticket_features(state, ticket_id, start + later)


@PROPERTY
@given(configured.event_lists, configured.times, as_of_offsets, as_of_offsets)
def test_a_ticket_reading_gives_a_configured_sets_ticket_features(
    evs: list[Event], start: datetime, read: timedelta, later: timedelta
) -> None:
    features = configured.SET
    state = features.build_state(evs)
    for ticket_id in ("t1", "t2"):
        reading = features.ticket_reading(state, ticket_id, start + read)
        assert reading.at(start + later) == features.ticket_features(
            state, ticket_id, start + later
        )
