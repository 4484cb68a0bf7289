"""The bulk path's one-pass row reader (`_fast_draft`) against the full check
(`_draft`): for any row, it reads exactly what the full check reads, or hands
the row to the full check; it never lets through a row the full check refuses."""

from __future__ import annotations

import math
import uuid
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import event, given, settings
from hypothesis import strategies as st

from converge.interactions.convert import fast_draft as _fast_draft
from converge.interactions.convert import to_draft as _draft
from converge.runtime.errors import Violations
from converge.v1 import common_pb2, interactions_pb2

T = TypeVar("T")

_IDS = [str(uuid.UUID(int=n)) for n in range(1, 4)]


def mostly(valid: st.SearchStrategy[T], invalid: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """`valid` nine times in ten: rows are then often valid as a whole."""
    return st.integers(0, 9).flatmap(lambda n: invalid if n == 0 else valid)


customers = mostly(
    st.one_of(
        st.sampled_from(_IDS).map(lambda c: common_pb2.CustomerRef(customer_id=c)),
        st.builds(
            lambda t, v, s: common_pb2.CustomerRef(
                identifier=common_pb2.Identifier(type=t, value=v, source=s)
            ),
            st.sampled_from([1, 2, 3]),
            st.sampled_from(["ada@example.com", "+44 20 7946 0000", "x" * 256]),
            st.sampled_from(["", "crm"]),
        ),
    ),
    st.one_of(
        st.sampled_from(["", "nope", _IDS[0].upper(), _IDS[1].replace("-", "")]).map(
            lambda c: common_pb2.CustomerRef(customer_id=c)
        ),
        st.builds(
            lambda t, v: common_pb2.CustomerRef(identifier=common_pb2.Identifier(type=t, value=v)),
            st.sampled_from([0, 1, 99]),
            st.sampled_from(["", "  ", "x" * 257]),
        ),
        st.just(common_pb2.CustomerRef()),
    ),
)

attribute_values = mostly(
    st.one_of(
        st.text(max_size=8).map(lambda s: common_pb2.AttributeValue(string_value=s)),
        st.sampled_from(["é" * 2048, "a" * 4096]).map(
            lambda s: common_pb2.AttributeValue(string_value=s)
        ),
        st.floats(allow_nan=False, allow_infinity=False).map(
            lambda f: common_pb2.AttributeValue(number_value=f)
        ),
        st.booleans().map(lambda b: common_pb2.AttributeValue(bool_value=b)),
        st.integers(0, 2_000_000_000).map(
            lambda s: common_pb2.AttributeValue(timestamp_value=Timestamp(seconds=s))
        ),
    ),
    st.one_of(
        st.sampled_from(["é" * 2049, "a" * 4097]).map(
            lambda s: common_pb2.AttributeValue(string_value=s)
        ),
        st.sampled_from([math.nan, math.inf, -math.inf]).map(
            lambda f: common_pb2.AttributeValue(number_value=f)
        ),
        st.just(common_pb2.AttributeValue()),
    ),
)

attribute_names = mostly(
    st.sampled_from(["score", "feature", "a_1", "y" * 63]),
    st.sampled_from(["Bad", "1x", "", "x" * 64]),
)


@st.composite
def interactions(draw: st.DrawFn) -> interactions_pb2.InteractionInput:
    message = interactions_pb2.InteractionInput(
        customer=draw(customers),
        channel=common_pb2.Channel.ValueType(
            draw(mostly(st.sampled_from([1, 2, 9]), st.sampled_from([0, 99])))
        ),
        type=draw(mostly(st.sampled_from(["product.usage", "survey.nps"]), st.just("t" * 65))),
        source=draw(
            mostly(st.sampled_from(["shop", "zendesk.eu-1"]), st.sampled_from(["", "Bad Source"]))
        ),
        ticket_id=draw(mostly(st.sampled_from(["", "T-1"]), st.just("t" * 257))),
        product_id=draw(mostly(st.sampled_from(["", "P-1"]), st.just("p" * 257))),
        attributes=draw(st.dictionaries(attribute_names, attribute_values, max_size=3)),
    )
    if draw(mostly(st.just(True), st.just(False))):
        message.occurred_at.seconds = draw(
            st.sampled_from([0, 1_700_000_000, -62_135_596_800, 253_402_300_799])
        )
        message.occurred_at.nanos = draw(st.sampled_from([0, 999_999_999, 123_456_789]))
    if draw(st.booleans()):
        message.amount.units = draw(st.integers(-1000, 1000))
        message.amount.nanos = draw(st.sampled_from([0, 500_000_000]))
        message.amount.currency_code = draw(mostly(st.just("EUR"), st.sampled_from(["eur", ""])))
    if draw(st.booleans()):
        message.sentiment = draw(
            mostly(st.floats(-1, 1), st.floats(allow_nan=True, allow_infinity=True))
        )
    return message


@settings(max_examples=600, deadline=None)
@given(interactions(), mostly(st.just("k-1"), st.sampled_from(["", "k" * 257])), st.booleans())
def test_the_row_reader_reads_what_the_full_check_reads(
    message: interactions_pb2.InteractionInput, key: str, lookup_only: bool
) -> None:
    found = Violations()
    full = _draft(message, key, lookup_only, "7", "interaction", "idempotency_key", found)
    fast = _fast_draft(message, key, lookup_only, "7")
    event("read in one pass" if fast else "full check only" if full else "refused")
    if fast is not None:
        assert full is not None, found.found  # never lets through what the full check refuses
        # As text: a NaN sentiment (refused later, by the type check) is unequal to itself.
        assert repr(fast) == repr(full)
    if full is None:
        assert fast is None


def test_the_common_shape_takes_the_one_pass_path() -> None:
    message = interactions_pb2.InteractionInput(
        customer=common_pb2.CustomerRef(customer_id=_IDS[0]),
        channel=common_pb2.CHANNEL_WEB,
        type="survey.nps",
        source="shop",
        attributes={"score": common_pb2.AttributeValue(number_value=9)},
    )
    message.occurred_at.seconds = 1_700_000_000
    draft = _fast_draft(message, "k-1", False, "1")
    assert draft is not None
    assert draft.attributes == {"score": 9.0}
    assert draft.customer_id == uuid.UUID(_IDS[0])
    assert draft.occurred_at.timestamp() == 1_700_000_000
