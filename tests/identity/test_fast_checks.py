"""The cheap checks of a bulk row against the thorough ones they stand in for.

A bulk import checks millions of profiles, so a valid profile, actor and
update mask take a fast path (`_valid_profile`, `_valid_actor`,
`_unknown_mask_paths`) and anything else the thorough field-by-field check.
These properties hold the two equal on random messages, valid and not: the
same fields and values, and the same violations in the same order. Pure
logic, no fakes.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.identity import convert
from converge.runtime.errors import Violations
from converge.runtime.fields import EARLIEST_SECONDS, LATEST_SECONDS
from converge.v1 import common_pb2, identity_pb2

_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "x" * 256, "x" * 257, "a\x00b", "é" * 300, "consumer"]),
)
_SECONDS = st.one_of(
    st.integers(EARLIEST_SECONDS - 2, EARLIEST_SECONDS + 2),
    st.integers(LATEST_SECONDS - 2, LATEST_SECONDS + 2),
    st.integers(-(2**40), 2**40),
)
_TIMESTAMPS = st.builds(
    timestamp_pb2.Timestamp,
    seconds=_SECONDS,
    nanos=st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 1_000_000_000])),
)
_MONEY = st.builds(
    common_pb2.Money,
    currency_code=st.sampled_from(["EUR", "USD", "usd", "EUR\n", "EU", "", "EURO"]),
    units=st.one_of(
        st.integers(-3, 3),
        st.sampled_from([10**9, 10**9 + 1, -(10**9), -(10**9) - 1, 2**62]),
    ),
    nanos=st.one_of(
        st.integers(-3, 3),
        st.sampled_from([999_999_999, -999_999_999, 10**9, -(10**9), 850_000_000]),
    ),
)
_ATTRIBUTE_NAMES = st.one_of(
    st.sampled_from(["a", "tenure_months", "Bad", "1x", "x" * 63, "y" * 64, "", "a-b", "z\x00"]),
    st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True),
)


@st.composite
def _attribute_values(draw: Any) -> common_pb2.AttributeValue:
    which = draw(st.sampled_from(["string", "number", "bool", "timestamp", "unset"]))
    value = common_pb2.AttributeValue()
    if which == "string":
        value.string_value = draw(st.one_of(_TEXT, st.just("s" * 2049), st.just("s" * 2048)))
    elif which == "number":
        value.number_value = draw(st.one_of(st.floats(), st.sampled_from([math.nan, math.inf])))
    elif which == "bool":
        value.bool_value = draw(st.booleans())
    elif which == "timestamp":
        value.timestamp_value.CopyFrom(draw(_TIMESTAMPS))
    return value


@st.composite
def _profiles(draw: Any) -> identity_pb2.Profile:
    profile = identity_pb2.Profile()
    for name in ("display_name", "segment", "plan", "region", "owner_team"):
        if draw(st.booleans()):
            setattr(profile, name, draw(_TEXT))
    if draw(st.booleans()):
        profile.signup_date.CopyFrom(draw(_TIMESTAMPS))
    if draw(st.booleans()):
        profile.lifetime_value.CopyFrom(draw(_MONEY))
    for name, value in draw(
        st.dictionaries(_ATTRIBUTE_NAMES, _attribute_values(), max_size=6)
    ).items():
        profile.attributes[name].CopyFrom(value)
    if draw(st.integers(0, 9)) == 0:  # past the count allowed, all else valid
        for i in range(convert.MAX_ATTRIBUTES + 1 - len(profile.attributes)):
            profile.attributes[f"many_{i}"].bool_value = True
    return profile


@settings(max_examples=400, deadline=None)
@given(_profiles())
def test_parse_profile_equals_the_thorough_check(profile: identity_pb2.Profile) -> None:
    fast, thorough = Violations(), Violations()
    fields = convert.parse_profile(profile, "resolve.profile", fast)
    expected = convert._parse_profile_checked(profile, "resolve.profile", thorough)
    assert fast.found == thorough.found
    if not thorough.found:
        # Equal values in the same order (history rows are written in it).
        assert list(fields.items()) == list(expected.items())
    # The fast path takes exactly the profiles the thorough check accepts.
    assert (convert._valid_profile(profile) is not None) == (not thorough.found)


def test_a_telco_shaped_profile_takes_the_fast_path() -> None:
    profile = identity_pb2.Profile(
        segment="consumer",
        plan="dsl",
        lifetime_value=common_pb2.Money(currency_code="USD", units=29, nanos=850_000_000),
        signup_date=timestamp_pb2.Timestamp(seconds=1_600_000_000, nanos=5000),
        owner_team="retention",
    )
    profile.attributes["tenure_months"].number_value = 1
    profile.attributes["contract"].string_value = "month_to_month"
    profile.attributes["churned"].bool_value = False
    profile.attributes["last_seen"].timestamp_value.seconds = 1_700_000_000
    assert convert._valid_profile(profile) == {
        "segment": {"s": "consumer"},
        "plan": {"s": "dsl"},
        "owner_team": {"s": "retention"},
        "signup_date": {"t": "2020-09-13T12:26:40.000005+00:00"},
        "lifetime_value": {"m": {"c": "USD", "u": 29, "n": 850_000_000}},
        "attributes.tenure_months": {"n": 1.0},
        "attributes.contract": {"s": "month_to_month"},
        "attributes.churned": {"b": False},
        "attributes.last_seen": {"t": "2023-11-14T22:13:20+00:00"},
    }


def _old_masked_fields(
    profile: dict[str, Any], paths: list[str], mask_path: str, violations: Violations
) -> dict[str, Any]:
    """`_masked_fields` as it was before its check was cached per mask."""
    for i, name in enumerate(paths):
        if not convert._is_profile_path(name):
            violations.add(f"{mask_path}.paths[{i}]", f"unknown profile field {name[:80]!r}")
    return {name: profile[name] for name in paths if name in profile}


_MASK_NAMES = st.one_of(
    st.sampled_from(
        ["segment", "plan", "signup_date", "lifetime_value", "attributes.a", "attributes.Bad"]
    ),
    st.sampled_from(["attributes.", "attributes", "nope", "x" * 100, "attributes.tenure_months"]),
)


@settings(max_examples=200, deadline=None)
@given(_profiles(), st.lists(_MASK_NAMES, max_size=8))
def test_masked_fields_equal_the_uncached_check(
    profile: identity_pb2.Profile, paths: list[str]
) -> None:
    fields = convert._parse_profile_checked(profile, "p", Violations())
    cached, uncached = Violations(), Violations()
    for _ in range(2):  # the second time from the cache
        cached.found.clear()
        got = convert._masked_fields(fields, paths, "update_mask", cached)
    assert got == _old_masked_fields(fields, paths, "update_mask", uncached)
    assert cached.found == uncached.found


@settings(max_examples=100, deadline=None)
@given(_TEXT, st.one_of(_TEXT, st.just("r" * 2049)))
def test_parse_actor_names_the_same_violations_twice(name: str, reason: str) -> None:
    actor = common_pb2.Actor(name=name, reason=reason)
    expected = []
    if len(name) > convert.MAX_TEXT:
        expected.append(("actor.name", f"longer than {convert.MAX_TEXT}"))
    if len(reason) > convert.MAX_ATTRIBUTE_TEXT:
        expected.append(("actor.reason", "too long"))
    if "\x00" in name:
        expected.append(("actor.name", "must not contain NUL characters"))
    if "\x00" in reason:
        expected.append(("actor.reason", "must not contain NUL characters"))
    for _ in range(2):  # the second time from the cache
        v = Violations()
        parsed = convert.parse_actor(actor, "actor", v)
        assert [(f.field, f.description) for f in v.found] == expected
        assert (parsed.name, parsed.reason) == (name, reason)
