"""GetFeatures latency: the live features scoring reads on every Score call,
for one customer and for 100 at once, and for one customer with one of its
tickets (`n1_ticket`: what an escalation score reads), over gRPC on loopback
from a single caller, against the interactions service run as a real process.

The customers have realistic histories: a few hundred interactions each over
six months, of every family the built-in features read (logins and feature
uses, conversations with sentiment, marketing, purchases and subscriptions
of a few products, surveys, tickets with their lifecycle, failed payments,
action outcomes) on several channels, so that each state carries day buckets
for most of the longest window, tickets, products and latest values, as an
active customer's does."""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psutil

from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests.benchmarks.harness import BenchEnv, closed_loop, percentile
from tests.service_process import stop_process

CUSTOMERS = 2_000
EVENTS_PER_CUSTOMER = (100, 400)  # uniform in this range: ~500,000 rows in all
HISTORY_DAYS = 180
ROWS_PER_MESSAGE = 500
N1_CALLS = 600
N100_CALLS = 100
WARM_UP_CALLS = 200
ROUNDS = 2  # turns of every service measured, one after the other

_CHANNELS = (
    common_pb2.CHANNEL_WEB,
    common_pb2.CHANNEL_MOBILE,
    common_pb2.CHANNEL_EMAIL,
    common_pb2.CHANNEL_CHAT,
    common_pb2.CHANNEL_PHONE,
    common_pb2.CHANNEL_PRODUCT,
)
_PRODUCTS = ("fibre", "tv", "mobile", "cloud", "security")
_PRIORITIES = ("low", "normal", "high", "urgent")
_CATEGORIES = ("billing", "technical", "network", "account")
# (weight, type): roughly what a product-led subscription business sees.
_MIX = (
    (30, "product.login"),
    (25, "product.usage"),
    (10, "marketing.sent"),
    (4, "marketing.opened"),
    (2, "marketing.clicked"),
    (4, "conversation.chat"),
    (3, "conversation.call"),
    (2, "conversation.email"),
    (3, "purchase"),
    (1, "subscription.renewed"),
    (1, "subscription.upgraded"),
    (1, "subscription.cancelled"),
    (1, "survey.nps"),
    (1, "survey.csat"),
    (6, "ticket"),  # a ticket's lifecycle: opened, updates, maybe escalated, resolved
    (1, "payment.failed"),
    (1, "action.outcome"),
    (1, "complaint"),
)
_TYPES = tuple(t for _, t in _MIX)
_WEIGHTS = tuple(w for w, _ in _MIX)


def _text(value: str) -> common_pb2.AttributeValue:
    return common_pb2.AttributeValue(string_value=value)


def customer_history(
    rng: random.Random, customer_id: str, now: datetime, count: int, tag: str
) -> list[interactions_pb2.IngestRow]:
    """About `count` interactions of one customer over `HISTORY_DAYS` days."""
    ref = common_pb2.CustomerRef(customer_id=customer_id)
    rows: list[interactions_pb2.IngestRow] = []
    tickets = 0

    def add(kind: str, at: datetime, **fields: object) -> None:
        attributes = fields.pop("attributes", {})
        rows.append(
            interactions_pb2.IngestRow(
                row_ref=str(len(rows)),
                idempotency_key=f"{tag}-{customer_id}-{len(rows)}",
                interaction=interactions_pb2.InteractionInput(
                    customer=ref,
                    occurred_at=timestamp(at),
                    channel=fields.pop("channel", rng.choice(_CHANNELS)),  # type: ignore[arg-type]
                    type=kind,
                    attributes=attributes,  # type: ignore[arg-type]
                    source="bench",
                    **fields,  # type: ignore[arg-type]
                ),
            )
        )

    while len(rows) < count:
        at = now - timedelta(seconds=rng.uniform(60, HISTORY_DAYS * 86_400))
        kind = rng.choices(_TYPES, _WEIGHTS)[0]
        if kind == "ticket":
            at = min(at, now - timedelta(days=1, minutes=1))  # (resolved a day later: not future)
            tickets += 1
            ticket_id = f"{customer_id[:8]}-T{tickets}"
            channel = rng.choice(_CHANNELS)
            add("ticket.opened", at, ticket_id=ticket_id, channel=channel,
                attributes={"priority": _text(rng.choice(_PRIORITIES)),
                            "category": _text(rng.choice(_CATEGORIES))})  # fmt: skip
            for step in range(rng.randrange(0, 4)):
                add("ticket.updated", at + timedelta(hours=step + 1), ticket_id=ticket_id)
            if rng.random() < 0.2:
                add("ticket.escalated", at + timedelta(hours=5), ticket_id=ticket_id)
            if rng.random() < 0.85:  # (most tickets get resolved)
                add("ticket.resolved", at + timedelta(days=1), ticket_id=ticket_id,
                    sentiment=rng.uniform(-1, 1))  # fmt: skip
        elif kind in ("purchase", "subscription.renewed", "subscription.upgraded"):
            add(kind, at, product_id=rng.choice(_PRODUCTS),
                amount=common_pb2.Money(currency_code="EUR", units=rng.randrange(5, 300)))  # fmt: skip
        elif kind == "subscription.cancelled":
            add(kind, at, product_id=rng.choice(_PRODUCTS))
        elif kind.startswith("conversation."):
            add(kind, at, sentiment=rng.uniform(-1, 1),
                attributes={"direction": _text(rng.choice(("inbound", "outbound")))})  # fmt: skip
        elif kind.startswith("survey."):
            high = 10 if kind == "survey.nps" else 5
            add(kind, at, attributes={"score": common_pb2.AttributeValue(
                number_value=rng.randrange(0 if high == 10 else 1, high + 1))})  # fmt: skip
        elif kind == "action.outcome":
            add(kind, at, attributes={
                "action_kind": _text("retention_offer"), "decision_id": _text("d1"),
                "outcome": _text(rng.choice(("accepted", "declined", "converted")))})  # fmt: skip
        elif kind.startswith("marketing."):
            add(kind, at, attributes={"campaign_id": _text(f"c{rng.randrange(12)}")})
        elif kind == "product.usage":
            add(kind, at, attributes={"feature": _text(rng.choice(("reports", "export", "api")))})
        elif kind == "complaint":
            add(kind, at, attributes={"category": _text(rng.choice(_CATEGORIES))})
        elif kind == "payment.failed":
            add(kind, at, amount=common_pb2.Money(currency_code="EUR", units=rng.randrange(10, 90)))
        else:
            add(kind, at)
    return rows


def history_messages(
    customers: list[str], seed: int, tag: str
) -> list[interactions_pb2.IngestInteractionsRequest]:
    """Every customer's history, shuffled across customers (as a live stream
    interleaves them), `ROWS_PER_MESSAGE` rows a message."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    rows = [
        row
        for customer in customers
        for row in customer_history(rng, customer, now, rng.randrange(*EVENTS_PER_CUSTOMER), tag)
    ]
    rng.shuffle(rows)
    return [
        interactions_pb2.IngestInteractionsRequest(rows=rows[i : i + ROWS_PER_MESSAGE])
        for i in range(0, len(rows), ROWS_PER_MESSAGE)
    ]


@dataclass
class Measured:
    """One service's GetFeatures latencies (ms) for one customer and for
    100, and the CPU time its process spent on them (s)."""

    n1: list[float] = field(default_factory=list)
    n100: list[float] = field(default_factory=list)
    n1_ticket: list[float] = field(default_factory=list)
    n1_cpu_s: float = 0.0
    n100_cpu_s: float = 0.0
    n1_ticket_cpu_s: float = 0.0


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def measure(
    stub: interactions_pb2_grpc.InteractionsServiceStub,
    customers: list[str],
    into: Measured,
    pid: int,
    seed: int = 3,
    tickets: dict[str, str] | None = None,
) -> None:
    """GetFeatures for one customer and for 100, and for one customer and
    one of its tickets (as scoring asks for an escalation), one caller,
    after a warm-up: latencies, and the CPU time of the service's process
    (on a machine shared with other work, latency is mostly waiting for a
    core; the CPU a call costs is what this change can reduce)."""
    rng = random.Random(seed)
    one = [
        interactions_pb2.GetFeaturesRequest(
            customers=[common_pb2.CustomerRef(customer_id=rng.choice(customers))]
        )
        for _ in range(N1_CALLS + WARM_UP_CALLS)
    ]
    hundred = [
        interactions_pb2.GetFeaturesRequest(
            customers=[common_pb2.CustomerRef(customer_id=c) for c in rng.sample(customers, 100)]
        )
        for _ in range(N100_CALLS + WARM_UP_CALLS // 10)
    ]
    await closed_loop(lambda i: stub.GetFeatures(one[i]), concurrency=1, total=WARM_UP_CALLS)
    await closed_loop(
        lambda i: stub.GetFeatures(hundred[i]), concurrency=1, total=WARM_UP_CALLS // 10
    )
    cpu = _cpu_s(pid)
    _, n1 = await closed_loop(
        lambda i: stub.GetFeatures(one[WARM_UP_CALLS + i]), concurrency=1, total=N1_CALLS
    )
    into.n1_cpu_s += _cpu_s(pid) - cpu
    cpu = _cpu_s(pid)
    _, n100 = await closed_loop(
        lambda i: stub.GetFeatures(hundred[WARM_UP_CALLS // 10 + i]),
        concurrency=1,
        total=N100_CALLS,
    )
    into.n100_cpu_s += _cpu_s(pid) - cpu
    into.n1.extend(n1)
    into.n100.extend(n100)
    if tickets:
        ticketed = sorted(tickets)
        with_ticket = [
            interactions_pb2.GetFeaturesRequest(
                customers=[common_pb2.CustomerRef(customer_id=customer)],
                ticket_ids=[tickets[customer]],
            )
            for customer in (rng.choice(ticketed) for _ in range(N1_CALLS + WARM_UP_CALLS))
        ]
        await closed_loop(
            lambda i: stub.GetFeatures(with_ticket[i]), concurrency=1, total=WARM_UP_CALLS
        )
        cpu = _cpu_s(pid)
        _, n1_ticket = await closed_loop(
            lambda i: stub.GetFeatures(with_ticket[WARM_UP_CALLS + i]),
            concurrency=1,
            total=N1_CALLS,
        )
        into.n1_ticket_cpu_s += _cpu_s(pid) - cpu
        into.n1_ticket.extend(n1_ticket)


def _prefix(label: str) -> str:
    return "interactions.get_features." + (f"{label}." if label else "")


async def run(env: BenchEnv) -> dict[str, float]:
    """Measured side by side on one database, by turns (this machine's
    speed drifts within minutes): the service as deployed, whose figures
    are for customers read for the first time today or written since
    (`feature_cache_size=0`: every state sent and read); the same service
    answering customers read before and unchanged since (`cached`); and,
    when `CONVERGE_BENCH_REFERENCE_TREE` names a checkout of another commit
    (its `services`, `protos` and `models`), that commit's service
    (`reference`)."""
    customers = [str(uuid.uuid4()) for _ in range(CUSTOMERS)]
    messages = history_messages(customers, seed=11, tag="features")
    # Each customer's first ticket (most have several), for the calls with a ticket.
    tickets: dict[str, str] = {}
    for message in messages:
        for row in message.rows:
            if row.interaction.ticket_id:
                tickets.setdefault(row.interaction.customer.customer_id, row.interaction.ticket_id)
    database = await env.new_database()
    ingest = await env.start("interactions", database, log_level="WARNING", identity_address="")
    async with grpc.aio.insecure_channel(ingest.address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        summary = await stub.IngestInteractions(iter(messages))
        assert summary.stored == sum(len(m.rows) for m in messages), summary
    stop_process(ingest)
    services = {
        "": await env.start(
            "interactions", database, log_level="WARNING", identity_address="",
            feature_cache_size="0",
        ),
        "cached": await env.start(
            "interactions", database, log_level="WARNING", identity_address=""
        ),
    }  # fmt: skip
    reference = os.environ.get("CONVERGE_BENCH_REFERENCE_TREE")
    if reference:
        tree = Path(reference)
        path = os.pathsep.join(str(tree / part) for part in ("services", "protos", "models"))
        previous = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = path
        try:
            services["reference"] = await env.start(
                "interactions", database, log_level="WARNING", identity_address=""
            )
        finally:
            if previous is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = previous
    samples = {label: Measured() for label in services}
    channels = {label: grpc.aio.insecure_channel(p.address) for label, p in services.items()}
    try:
        stubs = {
            label: interactions_pb2_grpc.InteractionsServiceStub(c) for label, c in channels.items()
        }
        # Every customer read once: the cached service then holds them all.
        for start in range(0, len(customers), 100):
            await stubs["cached"].GetFeatures(
                interactions_pb2.GetFeaturesRequest(
                    customers=[
                        common_pb2.CustomerRef(customer_id=c)
                        for c in customers[start : start + 100]
                    ]
                )
            )
        for turn in range(ROUNDS):
            for label, stub in stubs.items():
                pid = services[label].process.pid
                await measure(stub, customers, samples[label], pid, 3 + turn, tickets)
    finally:
        for c in channels.values():
            await c.close()
        for process in services.values():
            stop_process(process)
    figures: dict[str, float] = {}
    calls = ROUNDS * N1_CALLS, ROUNDS * N100_CALLS
    for label, m in samples.items():
        prefix = _prefix(label)
        figures[prefix + "n1.p50_ms"] = percentile(m.n1, 50)
        figures[prefix + "n1.p99_ms"] = percentile(m.n1, 99)
        figures[prefix + "n100.p50_ms"] = percentile(m.n100, 50)
        figures[prefix + "n100.p99_ms"] = percentile(m.n100, 99)
        # The service process's CPU per call (its share of the latency).
        figures[prefix + "n1.service_cpu_ms"] = m.n1_cpu_s / calls[0] * 1000
        figures[prefix + "n100.service_cpu_ms"] = m.n100_cpu_s / calls[1] * 1000
        figures[prefix + "n1_ticket.p50_ms"] = percentile(m.n1_ticket, 50)
        figures[prefix + "n1_ticket.p99_ms"] = percentile(m.n1_ticket, 99)
        figures[prefix + "n1_ticket.service_cpu_ms"] = m.n1_ticket_cpu_s / calls[0] * 1000
    if "reference" in samples:
        # How many times less than the reference (same run, by turns).
        for figure in ("p50_ms", "p99_ms", "service_cpu_ms"):
            for size in ("n1", "n100", "n1_ticket"):
                figures[f"{_prefix('')}{size}.{figure.removesuffix('_ms')}_vs_reference"] = (
                    figures[f"{_prefix('reference')}{size}.{figure}"]
                    / figures[f"{_prefix('')}{size}.{figure}"]
                )
    return figures
