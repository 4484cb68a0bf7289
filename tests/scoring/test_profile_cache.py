"""The per-replica profile cache: its rules (plain Python, a controllable
clock) and, over the real identity and interactions services, scoring's
feature source serving profiles from it and dropping them when identity's
events say they changed or the customer is gone."""

from __future__ import annotations

from google.protobuf import field_mask_pb2

from converge.runtime.errors import NotFound
from converge.runtime.values import CustomerKey
from converge.scoring.features import FeatureSource
from converge.scoring.profiles import QUIET_S, ProfileCache
from converge.v1 import common_pb2, identity_pb2
from tests.conftest import Platform
from tests.scoring.conftest import make_customer
from tests.waiting import until, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _caught_up(capacity: int = 10) -> tuple[ProfileCache, Clock]:
    clock = Clock()
    cache = ProfileCache(capacity, clock)
    cache.following()
    clock.now += QUIET_S
    return cache, clock


def test_nothing_is_kept_until_the_stream_is_followed_up_to_now() -> None:
    clock = Clock()
    cache = ProfileCache(10, clock)
    cache.put("a", {"plan": "basic"}, cache.ticket())
    assert cache.get("a") == (False, None)  # (not following at all)

    cache.following()
    cache.event("old")  # the backlog, read back to back
    clock.now += QUIET_S / 2
    assert cache.ticket() is None and not cache.usable
    clock.now += QUIET_S  # quiet: read up to now
    ticket = cache.ticket()
    cache.put("a", {"plan": "basic"}, ticket)
    assert cache.get("a") == (True, {"plan": "basic"})


def test_an_event_that_happened_after_the_stream_opened_means_caught_up() -> None:
    cache = ProfileCache(10, Clock())
    cache.following()
    assert not cache.usable
    cache.event("b", recent=True)
    assert cache.usable


def test_an_event_naming_a_customer_drops_its_profile() -> None:
    cache, _ = _caught_up()
    cache.put("a", {"plan": "basic"}, cache.ticket())
    cache.put("b", {"plan": "pro"}, cache.ticket())
    cache.event("a", "")  # e.g. PROFILE_CHANGED of a (no other customer)
    assert cache.get("a") == (False, None)
    assert cache.get("b") == (True, {"plan": "pro"})
    cache.event("c", "b")  # a merge names both customers
    assert cache.get("b") == (False, None)


def test_a_read_overlapping_an_event_of_its_customer_is_not_kept() -> None:
    cache, _ = _caught_up()
    ticket = cache.ticket()  # the read begins
    cache.event("a")  # the profile changes meanwhile: the answer may predate it
    cache.put("a", {"plan": "basic"}, ticket)
    assert cache.get("a") == (False, None)
    cache.put("b", {"plan": "pro"}, ticket)  # (another customer's read is fine)
    assert cache.get("b") == (True, {"plan": "pro"})


def test_a_broken_stream_forgets_everything_and_voids_reads_under_way() -> None:
    cache, clock = _caught_up()
    cache.put("a", {"plan": "basic"}, cache.ticket())
    ticket = cache.ticket()
    cache.lost()
    assert cache.get("a") == (False, None) and len(cache) == 0
    cache.following()
    clock.now += QUIET_S
    cache.put("b", {"plan": "pro"}, ticket)  # begun before the break
    assert cache.get("b") == (False, None)


def test_the_least_recently_used_profile_goes_beyond_capacity() -> None:
    cache, _ = _caught_up(capacity=2)
    for name in ("a", "b"):
        cache.put(name, {"plan": name}, cache.ticket())
    assert cache.get("a")[0]  # a used last: b goes
    cache.put("c", {"plan": "c"}, cache.ticket())
    assert [cache.get(n)[0] for n in ("a", "b", "c")] == [True, False, True]


async def test_scoring_serves_kept_profiles_and_drops_them_on_identity_events(
    platform: Platform,
) -> None:
    customer = await make_customer(platform)
    source = FeatureSource(
        platform.interactions_address,
        platform.identity_address,
        timeout_s=10,
        max_batch=8,
        max_in_flight=2,
        profile_cache_size=100,
    )
    source.start()
    try:
        await until(lambda: source.profiles.usable, "the profile follower caught up")
        key = CustomerKey(customer_id=customer.customer_id)
        first = await source.read(key, "", 10)
        assert first.profile is not None and first.profile["plan"] == "basic"
        hits = source.profiles.hits
        again = await source.read(key, "", 10)
        assert again.profile == first.profile
        assert source.profiles.hits == hits + 1  # (from memory)

        await platform.identity.UpdateCustomer(
            identity_pb2.UpdateCustomerRequest(
                customer_id=customer.customer_id,
                profile=identity_pb2.Profile(plan="premium"),
                update_mask=field_mask_pb2.FieldMask(paths=["plan"]),
            )
        )

        async def plan() -> object:
            read = await source.read(key, "", 10)
            return read.profile["plan"] if read.profile else None

        await wait_until(plan, lambda p: p == "premium", what="the changed plan served")
        assert await plan() == "premium"  # (kept again once read after the change)

        await platform.identity.ForgetCustomer(
            identity_pb2.ForgetCustomerRequest(
                customer=common_pb2.CustomerRef(customer_id=customer.customer_id),
                actor=common_pb2.Actor(name="privacy-operator", reason="test: erasure"),
            )
        )

        async def gone() -> bool:
            try:
                await source.read(key, "", 10)
            except NotFound:
                return True
            return False

        await wait_until(gone, what="the erased customer refused")
        await until(
            lambda: not source.profiles.get(customer.customer_id)[0],
            "the erased customer's profile dropped",
        )
    finally:
        await source.close()
