"""`converge customer` as a user runs it, against identity and interactions
running on real loopback ports: a customer found by an identifier shows its
profile, identifiers, recent interactions and live features; an unknown
identifier is not found (exit 4) and creates nobody."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from converge.v1 import common_pb2, identity_pb2
from tests.interactions.builders import email_ref, interaction, record

CONVERGE = str(Path(sys.executable).with_name("converge"))


async def _converge(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        CONVERGE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_customer_shows_profile_identifiers_timeline_and_features(platform) -> None:
    email = email_ref("lookup@example.com")
    resolved = await platform.identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[
                email.identifier,
                common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_CRM_ID, value="C-77"),
            ],
            profile=identity_pb2.Profile(display_name="Ada Lovelace", plan="fiber"),
        )
    )
    await platform.interactions.RecordInteraction(
        record(interaction(email, "product.login", days_ago=2))
    )
    services = [
        "--identity",
        platform.identity_address,
        "--interactions",
        platform.interactions_address,
    ]

    code, out, err = await _converge("customer", "crm_id:C-77", *services, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["customer"]["customerId"] == resolved.customer.customer_id
    assert shown["customer"]["profile"]["plan"] == "fiber"
    assert {i["identifier"]["value"] for i in shown["customer"]["identifiers"]} == {
        "lookup@example.com",
        "C-77",
    }
    assert [i["type"] for i in shown["recent_interactions"]] == ["product.login"]
    assert shown["features"]["count_7d_login"] == 1

    code, out, _ = await _converge("customer", resolved.customer.customer_id, *services)
    assert code == 0
    assert "Ada Lovelace" in out and "product.login" in out and "count_7d_login" in out


async def test_an_unknown_identifier_is_not_found_and_creates_nobody(platform) -> None:
    services = [
        "--identity",
        platform.identity_address,
        "--interactions",
        platform.interactions_address,
    ]
    code, _, err = await _converge("customer", "email:nobody@example.com", *services)
    assert code == 4, err
    assert "No such customer" in err
    listed = await platform.identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert list(listed.customers) == []
