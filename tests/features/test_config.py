"""Feature sets as configuration: validation that names the file, the line
and the key; versions that follow the definitions; the shipped sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from converge.features.config import (
    FeatureSetError,
    load_feature_set,
    parse_feature_set,
    shipped_feature_sets,
)
from converge.features.engine import BUILTIN, FEATURE_SET_VERSION, MAX_WINDOW_DAYS
from tests.features.sets import FILTERED_AND_CATEGORICAL, filtered_set, write_set


def _problems(text: str) -> list[str]:
    with pytest.raises(FeatureSetError) as error:
        parse_feature_set(text, "mine.yaml")
    assert str(error.value).startswith("mine.yaml: ")
    return error.value.problems


def test_a_wrong_key_is_named_with_its_line() -> None:
    problems = _problems(
        "version: 1\n"  # 1
        "name: mine\n"  # 2
        "features:\n"  # 3
        "  - name: calls_7d\n"  # 4
        "    description: Calls.\n"  # 5
        "    entity: customer\n"  # 6
        "    aggregation: count\n"  # 7
        "    window_days: 900\n"  # 8
        "    colour: red\n"  # 9
        "  - name: ticket_sub\n"  # 10
        "    description: Sub.\n"  # 11
        "    entity: ticket\n"  # 12
        "    aggregation: category\n"  # 13
        "    attribute: subcategory\n"  # 14
        "    window_days: 3\n"  # 15
    )
    assert problems == [
        f"line 8, features[0].window_days: Input should be less than or equal to "
        f"{MAX_WINDOW_DAYS} (got 900)",
        "line 9, features[0].colour: unknown key",
        "line 15, features[1].window_days: only count, sum, mean and trend of customers have "
        "a window (ticket features read the ticket's own interactions)",
    ]


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        # A rule across keys names the key; its line is the feature's when the key is absent.
        ("    aggregation: sum\n    window_days: 7\n", "line 4, features[0].attribute: required"),
        ("    aggregation: count\n", "line 4, features[0].window_days: required for count"),
        (
            "    aggregation: count\n    window_days: 7\n    where: {priority: []}\n",
            "line 9, features[0].where.priority: list at least one value",
        ),
        (
            "    aggregation: count\n    window_days: 7\n    channel: pigeon\n",
            "line 9, features[0].channel: unknown channel",
        ),
        (
            "    aggregation: count\n    window_days: 7\n    types: [Ticket Opened]\n",
            "line 9, features[0].types: 'Ticket Opened' is not an interaction type name",
        ),
        ("    aggregation: distinct_count\n", "line 7, features[0].aggregation: Input should be"),
    ],
)
def test_each_rule_names_the_key_and_line(feature: str, expected: str) -> None:
    text = (
        "version: 1\nname: mine\nfeatures:\n  - name: calls_7d\n    description: Calls.\n"
        "    entity: customer\n" + feature
    )
    [problem] = _problems(text)
    assert problem.startswith(expected), problem


def test_names_must_follow_their_entity_and_not_repeat_a_built_in_one() -> None:
    [problem] = _problems(
        "version: 1\nname: mine\nfeatures:\n"
        "  - name: calls_7d\n    description: x\n    entity: ticket\n    aggregation: count\n"
    )
    assert problem == (
        'line 4, features[0].name: ticket features start with "ticket_", customer features do not'
    )
    [problem] = _problems(
        "version: 1\nname: mine\nfeatures:\n"
        "  - name: open_tickets\n    description: x\n    entity: customer\n"
        "    aggregation: count\n    window_days: 7\n"
    )
    assert problem == "line 4, features[0].name: 'open_tickets' is already a built-in feature"


def test_yaml_problems_and_the_format_version_are_reported() -> None:
    [problem] = _problems("version: 1\nname: a\nname: b\n")
    assert "duplicate key 'name'" in problem and "line 3" in problem
    [problem] = _problems("version: 2\nname: mine\n")
    assert problem.startswith("line 1, version: Input should be 1")
    [problem] = _problems("version: 1\nname: mine\nbuiltin: false\nfeatures: []\n")
    assert problem.startswith("line 4, features: list at least one feature")


def test_a_missing_file_names_the_shipped_sets() -> None:
    with pytest.raises(FeatureSetError) as error:
        load_feature_set("no_such_set")
    assert "itsm_incidents" in str(error.value) and "cdnow_purchases" in str(error.value)


def test_the_version_follows_the_definitions_and_the_state_version_what_is_kept() -> None:
    one = filtered_set()
    assert one.version.startswith("tests_filtered-") and one.version != FEATURE_SET_VERSION
    assert filtered_set().version == one.version  # (a digest, not a counter)
    reworded = filtered_set(FILTERED_AND_CATEGORICAL.replace("as last sent", "latest"))
    assert reworded.version != one.version
    assert reworded.state_version == one.state_version  # (nothing kept changed)
    narrower = filtered_set(FILTERED_AND_CATEGORICAL.replace("[high, urgent]", "[urgent]"))
    assert narrower.state_version != one.state_version
    assert one.max_window == 365 and BUILTIN.max_window == 90


def test_builtin_false_serves_only_the_listed_features(tmp_path: Path) -> None:
    text = FILTERED_AND_CATEGORICAL.replace("builtin: true", "builtin: false")
    configured = load_feature_set(write_set(tmp_path, text))
    assert configured.customer_names == (
        "network_tickets_30d",
        "phone_calls_inbound_7d",
        "tv_order_value_mean_365d",
        "last_ticket_category",
        "last_network_ticket_priority",
    )
    assert "open_tickets" not in configured.by_name


def test_the_shipped_sets_load_and_extend_the_built_in_set() -> None:
    shipped = shipped_feature_sets()
    assert {"itsm_incidents", "cdnow_purchases", "telco_customers"} <= set(shipped)
    for name in shipped:
        configured = load_feature_set(name)
        assert configured.version.startswith(f"{name}-")
        assert set(BUILTIN.by_name) <= set(configured.by_name)
    itsm = load_feature_set("itsm_incidents")
    assert {"ticket_subcategory", "ticket_symptom", "ticket_location"} <= set(itsm.ticket_names)
    assert load_feature_set("") is BUILTIN and load_feature_set("builtin") is BUILTIN
