"""The shipped mappings map the three real datasets, checked against counts
taken from the files themselves; mapping errors name the bad key; bad rows
are rejected with a reason. Pure mapping: no service is called (the
`--dry-run` path of `converge import`)."""

from __future__ import annotations

import csv
import re
import textwrap
from collections import Counter, defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from converge.connectors.mapping import (
    Mapping,
    MappingError,
    load_mapping,
    parse_mapping,
    shipped_mappings,
)
from converge.connectors.transform import MappedRow, MapResult, RejectedRow, map_file
from converge.interactions.types import SERVICE_DESK_ATTRIBUTES
from converge.v1 import common_pb2
from tests.conftest import shared_dataset

TELCO = "telco_churn/Telco-Customer-Churn.csv"
ITSM = "itsm_incidents_sample/incident_events_first3000.csv"
CDNOW = "cdnow/CDNOW_master.txt"
DATASETS = {"telco_customers": TELCO, "itsm_incidents": ITSM, "cdnow_purchases": CDNOW}


_RESULTS: dict[str, list[MapResult]] = {}


def mapped(name: str) -> list[MapResult]:
    """Every row of the dataset mapped with its shipped mapping (once per session)."""
    path = shared_dataset(DATASETS[name])
    if name not in _RESULTS:
        _RESULTS[name] = list(map_file(path, load_mapping(name), origin=name))
    return _RESULTS[name]


def rows_of(results: list[MapResult]) -> list[MappedRow]:
    return [r for r in results if isinstance(r, MappedRow)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def money(m: common_pb2.Money) -> Decimal:
    return Decimal(m.units) + Decimal(m.nanos) / Decimal(1_000_000_000)


# --- the shipped files ------------------------------------------------------------
def test_the_three_shipped_mappings_are_package_data_and_parse() -> None:
    shipped = shipped_mappings()
    assert set(shipped) == set(DATASETS)
    for name in shipped:
        mapping = load_mapping(name)
        assert mapping.version == 1
        assert mapping.description
    assert load_mapping("telco_customers").interaction is None  # profiles only: no event times
    assert load_mapping("itsm_incidents").profile is None


def test_every_key_of_a_shipped_mapping_is_explained_by_a_comment() -> None:
    """Mappings are meant to be copied and edited: no key without a comment near it."""
    for name, entry in shipped_mappings().items():
        lines = entry.read_text(encoding="utf-8").splitlines()
        # Top-level keys and the keys of each section (two-space indent).
        keys = [i for i, line in enumerate(lines) if re.match(r"^(  )?[a-z_]+:", line)]
        assert len(keys) > 10
        for i in keys:
            assert lines[i - 1].lstrip().startswith("#"), f"{name}: no comment above {lines[i]!r}"


# --- Telco: a CRM customer table -> profiles ----------------------------------------
def test_telco_maps_every_customer_once_with_profile_upserts() -> None:
    table = read_csv(shared_dataset(TELCO))
    results = mapped("telco_customers")
    rows = rows_of(results)

    assert len(table) == 7043
    assert len(results) == len(rows) == 7043
    ids = [r.identifier.value for r in rows]
    assert len(set(ids)) == 7043
    assert ids == [t["customerID"] for t in table]
    assert {r.identifier.type for r in rows} == {common_pb2.IDENTIFIER_TYPE_CRM_ID}
    assert all(r.ingest is None and r.resolve is not None for r in rows)

    churned = sum(
        r.resolve.resolve.profile.attributes["churned"].bool_value for r in rows if r.resolve
    )
    assert churned == sum(t["Churn"] == "Yes" for t in table) == 1869
    # Blank TotalCharges (new customers): left out of the upsert, not zero.
    blank = [t["customerID"] for t in table if not t["TotalCharges"].strip()]
    assert len(blank) == 11
    without_value = [
        r.identifier.value
        for r in rows
        if r.resolve and "lifetime_value" not in r.resolve.update_mask.paths
    ]
    assert without_value == blank

    first = rows[0].resolve
    assert first is not None
    profile = first.resolve.profile
    assert (profile.segment, profile.plan) == ("consumer", "dsl")
    assert money(profile.lifetime_value) == Decimal("29.85")
    assert profile.attributes["contract"].string_value == "month_to_month"
    assert profile.attributes["tenure_months"].number_value == 1
    assert profile.attributes["monthly_charges"].number_value == 29.85
    assert profile.attributes["internet_service"].string_value == "dsl"
    assert profile.attributes["payment_method"].string_value == "electronic_check"
    assert profile.attributes["partner"].bool_value is True
    assert set(first.update_mask.paths) == {
        "segment",
        "plan",
        "lifetime_value",
        *(f"attributes.{a}" for a in profile.attributes),
    }


# --- ITSM: a service-desk event log -> ticket interactions ---------------------------
def test_itsm_maps_every_update_to_a_ticket_interaction() -> None:
    table = read_csv(shared_dataset(ITSM))
    unknown_callers = sum(t["caller_id"] == "?" for t in table)
    results = mapped("itsm_incidents")
    rows = rows_of(results)
    rejected = [r for r in results if isinstance(r, RejectedRow)]

    assert len(table) == 21453
    assert len(results) == 21453
    assert len(rows) == 21453 - unknown_callers
    assert len(rejected) == unknown_callers
    assert all(r.reason.startswith("no caller") for r in rejected)

    by_ticket: dict[str, list[MappedRow]] = defaultdict(list)
    for row in rows:
        assert row.ingest is not None
        interaction = row.ingest.interaction
        assert interaction.type.startswith("ticket.")
        assert (
            interaction.customer.identifier.type == common_pb2.IDENTIFIER_TYPE_SERVICE_DESK_USER_ID
        )
        by_ticket[interaction.ticket_id].append(row)
    assert len(by_ticket) == len({t["number"] for t in table}) == 3000
    for ticket_rows in by_ticket.values():
        types = [r.ingest.interaction.type for r in ticket_rows if r.ingest]
        assert types.count("ticket.opened") == 1
        assert types[0] == "ticket.opened"


DESK_FIELDS = {name for name, _ in SERVICE_DESK_ATTRIBUTES}


def test_itsm_types_follow_the_changes_between_an_incidents_rows() -> None:
    table = read_csv(shared_dataset(ITSM))
    rows = {r.line: r for r in rows_of(mapped("itsm_incidents"))}
    previous: dict[str, dict[str, str]] = {}
    reopens = 0
    for line, t in enumerate(table, start=2):
        before = previous.get(t["number"])
        previous[t["number"]] = t
        ingest = rows[line].ingest
        assert ingest is not None
        interaction = ingest.interaction
        # Each row at its update time, D/M/YYYY HH:MM in UTC.
        at = datetime.strptime(t["sys_updated_at"], "%d/%m/%Y %H:%M").replace(tzinfo=UTC)
        assert interaction.occurred_at.ToDatetime(tzinfo=UTC) == at
        assert interaction.channel == {
            "Phone": common_pb2.CHANNEL_PHONE,
            "Email": common_pb2.CHANNEL_EMAIL,
        }.get(t["contact_type"], common_pb2.CHANNEL_SERVICE_DESK)
        attributes = interaction.attributes
        if before is None:
            assert interaction.type == "ticket.opened"
            assert (
                attributes["priority"].string_value
                == {
                    "1 - Critical": "urgent",
                    "2 - High": "high",
                    "3 - Moderate": "normal",
                    "4 - Low": "low",
                }[t["priority"]]
            )
            assert ("category" in attributes) == (t["category"] != "?")
            continue
        if int(t["reopen_count"]) > int(before["reopen_count"]):
            reopens += 1
            assert interaction.type == "ticket.reopened"
        if interaction.type == "ticket.reassigned":
            assert int(t["reassignment_count"]) > int(before["reassignment_count"])
            assert (
                set(attributes) - DESK_FIELDS <= {"team", "previous_team"} and "team" in attributes
            )
        if interaction.type == "ticket.priority_changed":
            assert t["priority"] != before["priority"]
            assert (
                attributes["priority"].string_value != attributes["previous_priority"].string_value
            )
        if interaction.type == "ticket.resolved":
            assert t["incident_state"] in ("Resolved", "Closed")
            assert before["incident_state"] not in ("Resolved", "Closed")
        if interaction.type in ("ticket.updated", "ticket.resolved", "ticket.reopened"):
            # Only the service-desk fields every ticket type declares (the
            # service rejects attributes a type does not declare).
            assert set(attributes) <= DESK_FIELDS
        # Every row says what the incident looks like at that moment.
        for field, column in (("subcategory", "subcategory"), ("symptom", "u_symptom")):
            shown = attributes[field].string_value if field in attributes else "?"
            assert shown == t[column]
    assert reopens == 56


# --- CDNOW: a purchase log -> purchases ------------------------------------------------
def test_cdnow_maps_every_purchase_with_its_amount() -> None:
    path = shared_dataset(CDNOW)
    lines = [
        line.split() for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()
    ]
    rows = rows_of(mapped("cdnow_purchases"))

    assert len(lines) == len(rows) == 69659
    customers = {r.identifier.value for r in rows}
    assert len(customers) == len({fields[0] for fields in lines}) == 23570
    assert {(r.identifier.type, r.identifier.source) for r in rows} == {
        (common_pb2.IDENTIFIER_TYPE_EXTERNAL_ID, "cdnow")
    }
    interactions = [r.ingest.interaction for r in rows if r.ingest]
    assert {(i.type, i.product_id, i.channel) for i in interactions} == {
        ("purchase", "cd", common_pb2.CHANNEL_WEB)
    }
    assert {i.amount.currency_code for i in interactions} == {"USD"}
    total = sum((money(i.amount) for i in interactions), Decimal(0))
    assert total == sum(Decimal(fields[3]) for fields in lines) == Decimal("2500315.63")
    quantity = sum(i.attributes["quantity"].number_value for i in interactions)
    assert quantity == sum(int(fields[2]) for fields in lines)
    first = interactions[0]
    assert first.occurred_at.ToDatetime(tzinfo=UTC) == datetime(1997, 1, 1, tzinfo=UTC)
    assert first.customer.identifier.value == "00001"


# --- idempotency keys ------------------------------------------------------------------
def keys(results: list[MapResult]) -> list[str]:
    out = []
    for row in rows_of(results):
        if row.ingest is not None:
            out.append(row.ingest.idempotency_key)
        else:
            assert row.resolve is not None
            out.append(row.resolve.resolve.idempotency_key)
    return out


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_idempotency_keys_are_unique_in_a_file_and_the_same_on_every_run(name: str) -> None:
    first = keys(mapped(name))
    again = keys(list(map_file(shared_dataset(DATASETS[name]), load_mapping(name))))
    assert len(first) > 1000
    assert len(set(first)) == len(first)
    assert again == first
    assert all(0 < len(k) <= 128 for k in first)


def test_a_key_template_that_repeats_rejects_the_later_row(tmp_path: Path) -> None:
    text = shipped_mappings()["cdnow_purchases"].read_text(encoding="utf-8")
    mapping = parse_mapping(text.replace('"{customer_id}:{date}:{_seq}"', '"{customer_id}:{date}"'))
    path = tmp_path / "log.txt"
    path.write_text(
        "customer_id date number_of_cds dollar_value\n1 19970101 1 1.00\n1 19970101 2 2.00\n"
    )
    results = list(map_file(path, mapping))
    assert isinstance(results[0], MappedRow)
    assert isinstance(results[1], RejectedRow)
    assert "line 2" in results[1].detail and results[1].field == "interaction.idempotency_key"


# --- errors naming the bad key -----------------------------------------------------------
MINIMAL = textwrap.dedent(
    """
    version: 1
    source: shop
    file: {format: csv}
    customer: {identifier: {type: EMAIL, column: email}}
    interaction:
      type: {value: purchase}
      occurred_at: {column: at, format: "%Y-%m-%d"}
      channel: {value: WEB}
      product_id: {column: sku}
      amount: {column: price, currency: EUR}
      idempotency_key: "{order}"
    """
)


def test_the_minimal_mapping_used_below_is_valid() -> None:
    assert isinstance(parse_mapping(MINIMAL), Mapping)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "format: csv",
            "format: xls",
            "file.format: Input should be 'csv', 'whitespace' or 'jsonl'",
        ),
        (
            "  type: {value: purchase}",
            "  type: {value: purchase}\n  atributes: {}",
            "interaction.atributes: unknown key",
        ),
        (
            "channel: {value: WEB}",
            "channel: {value: WBE}",
            "interaction.channel.value: unknown channel 'WBE'",
        ),
        (
            "channel: {value: WEB}",
            "channel: {column: c, map: {Phone: FAX}}",
            "interaction.channel.map['Phone']: unknown channel 'FAX'",
        ),
        ("type: EMAIL", "type: MAIL", "customer.identifier.type: unknown identifier type 'MAIL'"),
        ('"{order}"', '"{order"', "interaction.idempotency_key: bad placeholder"),
        ('"{order}"', '"fixed"', "interaction.idempotency_key: must name columns"),
        (
            'format: "%Y-%m-%d"}',
            'format: "%Y-%m-%d", timezone: Mars/Base}',
            "interaction.occurred_at.timezone: unknown time zone",
        ),
        (
            'format: "%Y-%m-%d"}',
            "type: number}",
            "interaction.occurred_at.type: must be timestamp here",
        ),
        (
            "currency: EUR",
            "currency: euro",
            "interaction.amount.currency: 'euro' is not an ISO 4217 code",
        ),
        ("source: shop", "source: My Shop", "source: 'My Shop'"),
        (
            "type: {value: purchase}",
            "type: {value: purchase, column: kind}",
            "interaction.type: give only one of column, previous, value, template",
        ),
        (
            "type: {value: purchase}",
            "type: {cases: [{when: {first_in_group: true}, value: ticket.opened}], default: ticket.updated}",
            "interaction.type.cases[0].when: compares rows of a group: set group_by",
        ),
        (
            "  type: {value: purchase}",
            "  type: {value: purchase}\n  attributes: {n: {column: x, type: integer}}",
            "interaction.attributes.n.type: Input should be 'string', 'number', 'bool' or 'timestamp'",
        ),
        (
            "version: 1",
            "version: 1\nskip: [{column: a, equals: 1, like: 2}]",
            "skip[0].like: unknown key",
        ),
        (
            "version: 1",
            "version: 1\nreject: [{when: {equals: x}, reason: r}]",
            "reject[0].when.column: required by equals",
        ),
        ("source: shop", "source: shop\nsource: again", "duplicate key 'source'"),
        (
            "  idempotency_key",
            "  # no key\n  key",
            "interaction.idempotency_key: required key missing",
        ),
    ],
)
def test_mapping_errors_name_the_bad_key(old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    with pytest.raises(MappingError) as caught:
        parse_mapping(MINIMAL.replace(old, new, 1), "mine.yaml")
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("mine.yaml: ")


def test_mapping_errors_name_the_line_of_the_mapping() -> None:
    # Issue 13 item 6: an error names the line of the mapping as well as its
    # key, down to an entry of a `map` and across several problems at once.
    text = MINIMAL.replace(
        "  channel: {value: WEB}\n",
        "  channel:\n    column: c\n    map:\n      Web: WEB\n      Phone: FAX\n",
    ).replace("  product_id: {column: sku}\n", "  product_id: {value: [1]}\n  colour: red\n")
    with pytest.raises(MappingError) as caught:
        parse_mapping(text, "mine.yaml")
    assert caught.value.problems == [
        "line 13, interaction.channel.map['Phone']: unknown channel 'FAX' (one of WEB, MOBILE,"
        " EMAIL, CHAT, PHONE, SOCIAL, IN_STORE, SERVICE_DESK, PRODUCT, AGENT_DESKTOP, SMS)",
        "line 14, interaction.product_id.value: must be text, a number or true/false",
        "line 15, interaction.colour: unknown key",
    ], caught.value.problems


def test_a_column_the_file_lacks_is_named_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("email,at,sku,price,order\n")
    mapping = parse_mapping(MINIMAL.replace("column: sku", "column: skus"))
    with pytest.raises(MappingError) as caught:
        list(map_file(path, mapping, origin="mine.yaml"))
    assert caught.value.problems == [
        "interaction.product_id.column: no column 'skus' in the file (columns: email, at, sku, price, order)"
    ]


def test_an_unknown_mapping_name_lists_the_shipped_ones() -> None:
    with pytest.raises(MappingError, match="itsm_incidents"):
        load_mapping("no_such_mapping")


# --- bad rows -------------------------------------------------------------------------
def rejections(results: list[MapResult]) -> dict[int, str]:
    return {r.line: r.reason for r in results if isinstance(r, RejectedRow)}


def test_malformed_rows_are_rejected_with_their_reason_and_the_rest_mapped(tmp_path: Path) -> None:
    path = tmp_path / "cdnow.txt"
    path.write_text(
        "customer_id date number_of_cds dollar_value\n"
        "00001 19970101 1 11.77\n"  # 2: fine
        "00002 19971345 1 12.00\n"  # 3: no 45th day of the 13th month
        "00003 19970102 2\n"  # 4: a field short
        "00004 19970102 2 twelve\n"  # 5: not an amount
        "\n"
        "00005 19970103 many 9.99\n"  # 7: quantity is not a number
        "00006 19970103 1 -0.50\n"  # 8: fine (a refund)
    )
    results = list(map_file(path, load_mapping("cdnow_purchases")))
    assert rejections(results) == {
        3: "date: not a time in format %Y%m%d",
        4: "malformed row",
        5: "dollar_value: not an amount",
        7: "number_of_cds: not a number",
    }
    details = {r.line: r.detail for r in results if isinstance(r, RejectedRow)}
    assert details[3] == "line 3: date = '19971345': not a time in format %Y%m%d"
    assert details[4] == "line 4: 3 fields where the header has 4"
    good = rows_of(results)
    assert [r.line for r in good] == [2, 8]
    assert good[1].ingest is not None
    refund = good[1].ingest.interaction.amount
    assert (refund.units, refund.nanos) == (0, -500_000_000)


def itsm_header() -> str:
    return (
        "number,incident_state,active,reassignment_count,reopen_count,sys_mod_count,made_sla,"
        "caller_id,opened_by,opened_at,sys_created_by,sys_created_at,sys_updated_by,"
        "sys_updated_at,contact_type,location,category,subcategory,u_symptom,cmdb_ci,impact,"
        "urgency,priority,assignment_group,assigned_to,knowledge,u_priority_confirmation,notify,"
        "problem_id,rfc,vendor,caused_by,closed_code,resolved_by,resolved_at,closed_at"
    )


def itsm_row(
    number: str,
    state: str,
    reassignments: int,
    mod: int,
    caller: str,
    at: str,
    priority: str,
    group: str,
) -> str:
    fields = dict.fromkeys(itsm_header().split(","), "?")
    fields.update(
        number=number,
        incident_state=state,
        reassignment_count=str(reassignments),
        reopen_count="0",
        sys_mod_count=str(mod),
        caller_id=caller,
        sys_updated_at=at,
        contact_type="Phone",
        category="Category 1",
        priority=priority,
        assignment_group=group,
    )
    return ",".join(fields.values())


def test_itsm_rows_without_a_caller_or_with_an_unknown_priority_are_rejected(
    tmp_path: Path,
) -> None:
    path = tmp_path / "incidents.csv"
    rows = [
        itsm_row("INC1", "New", 0, 0, "Caller 1", "1/3/2016 09:00", "3 - Moderate", "?"),
        itsm_row("INC1", "Active", 1, 1, "Caller 1", "1/3/2016 10:00", "3 - Moderate", "Group 7"),
        itsm_row("INC1", "Active", 1, 2, "Caller 1", "1/3/2016 11:00", "1 - Critical", "Group 7"),
        itsm_row("INC2", "New", 0, 0, "?", "2/3/2016 09:00", "3 - Moderate", "?"),
        itsm_row("INC3", "New", 0, 0, "Caller 3", "2/3/2016 09:30", "5 - Whenever", "?"),
        itsm_row("INC3", "New", 0, 1, "Caller 3", "31/2/2016 09:40", "3 - Moderate", "?"),
        itsm_row("INC3", "Resolved", 0, 2, "Caller 3", "2/3/2016 09:50", "3 - Moderate", "?"),
    ]
    path.write_text("\n".join([itsm_header(), *rows]) + "\n")
    results = list(map_file(path, load_mapping("itsm_incidents")))
    assert rejections(results) == {
        5: "no caller: caller_id is unknown ('?')",
        6: "priority: value not in the map of interaction.attributes.priority",
        7: "sys_updated_at: not a time in format %d/%m/%Y %H:%M",
    }
    types = {r.line: r.ingest.interaction.type for r in rows_of(results) if r.ingest}
    # INC3's first two rows were rejected: its first mapped row opens the ticket.
    assert types == {
        2: "ticket.opened",
        3: "ticket.reassigned",
        4: "ticket.priority_changed",
        8: "ticket.opened",
    }
    reassigned = rows_of(results)[1].ingest
    assert reassigned is not None
    assert reassigned.interaction.attributes["team"].string_value == "Group 7"
    assert "previous_team" not in reassigned.interaction.attributes  # it was "?": missing


# --- other formats ----------------------------------------------------------------------
def test_json_lines_with_nested_keys_and_profile_upserts(tmp_path: Path) -> None:
    mapping = parse_mapping(
        textwrap.dedent(
            """
            version: 1
            source: app
            file: {format: jsonl}
            customer:
              identifier: {type: EMAIL, column: user.email}
              extra_identifiers: [{type: PHONE, column: user.phone}]
            profile:
              display_name: {template: "{user.first} {user.last}"}
              signup_date: {column: user.since, format: iso}
              attributes:
                beta: {column: user.beta, type: bool}
            interaction:
              type: {column: event, map: {login: product.login, nps: survey.nps}}
              occurred_at: {column: ts, format: unix}
              channel: {value: mobile}
              attributes:
                score: {column: score, type: number, for_types: [survey.nps], required: true}
              idempotency_key: "{id}"
            """
        )
    )
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"id": 1, "event": "login", "ts": 1700000000, "user": {"email": "a@example.com", '
        '"phone": "+33612345678", "first": "Ann", "last": "Lee", "since": "2020-01-02T03:04:05+01:00", "beta": true}}\n'
        '{"id": 2, "event": "nps", "ts": 1700000100, "score": 9, "user": {"email": "a@example.com"}}\n'
        '{"id": 3, "event": "nps", "ts": 1700000200, "user": {"email": "b@example.com"}}\n'
        "not json\n"
    )
    results = list(map_file(path, mapping))
    assert rejections(results) == {3: "score: missing", 4: "malformed row"}
    first, second = rows_of(results)
    assert first.resolve is not None and first.ingest is not None
    assert [i.value for i in first.resolve.resolve.identifiers] == ["a@example.com", "+33612345678"]
    profile = first.resolve.resolve.profile
    assert profile.display_name == "Ann Lee"
    assert profile.signup_date.ToDatetime(tzinfo=UTC) == datetime(2020, 1, 2, 2, 4, 5, tzinfo=UTC)
    assert profile.attributes["beta"].bool_value is True
    assert first.ingest.interaction.type == "product.login"
    assert first.ingest.interaction.channel == common_pb2.CHANNEL_MOBILE
    assert not first.ingest.interaction.attributes
    assert second.ingest is not None
    assert second.ingest.interaction.attributes["score"].number_value == 9
    # Only the fields the row has are upserted.
    assert second.resolve is not None and list(second.resolve.update_mask.paths) == []


def test_skip_conditions_leave_rows_out_without_rejecting_them(tmp_path: Path) -> None:
    text = shipped_mappings()["cdnow_purchases"].read_text(encoding="utf-8")
    mapping = parse_mapping(
        text.replace("group_by:", 'skip: [{column: dollar_value, equals: "0.00"}]\ngroup_by:')
    )
    path = tmp_path / "log.txt"
    path.write_text(
        "customer_id date number_of_cds dollar_value\n1 19970101 1 0.00\n1 19970101 2 2.00\n"
    )
    results = list(map_file(path, mapping))
    assert Counter(type(r).__name__ for r in results) == {"SkippedRow": 1, "MappedRow": 1}
    assert [r.line for r in results] == [2, 3]
