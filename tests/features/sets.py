"""Feature sets the tests configure: attribute filters and categorical
features of customers and tickets, on top of the built-in set or alone."""

from __future__ import annotations

from pathlib import Path

from converge.features.config import parse_feature_set
from converge.features.engine import FeatureSet

FILTERED_AND_CATEGORICAL = """\
version: 1
name: tests_filtered
builtin: true
features:
  - name: network_tickets_30d
    description: Network tickets opened at high or urgent priority in the last 30 days.
    entity: customer
    aggregation: count
    types: [ticket.opened]
    where:
      category: network
      priority: [high, urgent]
    window_days: 30
  - name: phone_calls_inbound_7d
    description: Inbound calls on the phone channel in the last 7 days.
    entity: customer
    aggregation: count
    types: [conversation.call]
    channel: phone
    where: {direction: inbound}
    window_days: 7
  - name: tv_order_value_mean_365d
    description: Mean amount of purchases of product tv over a year.
    entity: customer
    aggregation: mean
    attribute: amount
    types: [purchase]
    where: {product_id: tv}
    window_days: 365
  - name: last_ticket_category
    description: The category of the customer's latest ticket opened.
    entity: customer
    aggregation: category
    attribute: category
    types: [ticket.opened]
  - name: last_network_ticket_priority
    description: The priority of the latest network ticket opened.
    entity: customer
    aggregation: category
    attribute: priority
    types: [ticket.opened]
    where: {category: network}
  - name: ticket_current_category
    description: The ticket's category as last sent.
    entity: ticket
    aggregation: category
    attribute: category
  - name: ticket_assignment_group
    description: The group the ticket is assigned to, as last sent.
    entity: ticket
    aggregation: category
    attribute: assignment_group
    min_category_count: 5
  - name: ticket_urgent_updates
    description: Updates of the ticket sent while its urgency was high.
    entity: ticket
    aggregation: count
    types: [ticket.updated]
    where: {urgency: high}
"""


def filtered_set(text: str = FILTERED_AND_CATEGORICAL) -> FeatureSet:
    return parse_feature_set(text, "tests")


def write_set(folder: Path, text: str = FILTERED_AND_CATEGORICAL, name: str = "set.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path
