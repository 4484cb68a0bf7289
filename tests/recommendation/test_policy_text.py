"""Reading a policy's YAML text (policy/validation.py, policy/service.py):
the shipped default is valid, and every problem names its path, line and
column, whatever the text."""

from __future__ import annotations

import pytest

from converge.recommendation.policy.service import (
    DEFAULT_VERSION,
    default_policy,
    default_policy_text,
    load_policy_text,
)
from converge.recommendation.policy.validation import (
    MAX_POLICY_BYTES,
    PolicyProblem,
    Severity,
    check_policy_text,
)
from converge.runtime.errors import InvalidArgument

DEFAULT = default_policy_text()


def _line_of(text: str, fragment: str) -> int:
    """The line (from 1) where `fragment` first occurs in `text`."""
    return text[: text.index(fragment)].count("\n") + 1


def _edited(old: str, new: str) -> str:
    assert DEFAULT.count(old) == 1, old
    return DEFAULT.replace(old, new)


def _errors(text: str) -> list[PolicyProblem]:
    checked = check_policy_text(text)
    assert checked.policy is None
    return list(checked.errors)


def test_the_default_policy_is_valid_without_warnings() -> None:
    checked = check_policy_text(DEFAULT)
    assert checked.valid
    assert checked.problems == ()
    active = default_policy()
    assert active.version == DEFAULT_VERSION
    kinds = {a.kind for a in active.policy.actions}
    assert kinds == {
        "retention_offer",
        "proactive_support_call",
        "escalate_to_senior_agent",
        "escalate_to_human",
        "cross_sell_offer",
        "do_nothing",
    }
    human = next(a for a in active.policy.actions if a.kind == "escalate_to_human")
    assert not human.automated and human.contact_channels == []
    assert {t.name for t in active.policy.teams} == {
        "support",
        "sales",
        "retention",
        "support_leads",
        "sales_leads",
    }
    assert all(0.05 <= a.control_share <= 0.1 for a in active.policy.actions if a.control_share)


def test_a_value_out_of_range_names_its_path_line_and_column() -> None:
    text = _edited("min_probability: 0.5\n", "min_probability: 1.5\n")
    (problem,) = _errors(text)
    assert problem.path == "actions[0].min_probability"
    assert problem.line == _line_of(text, "min_probability: 1.5")
    assert problem.column == len("    min_probability: ") + 1
    assert "1.5" in problem.message


def test_a_misspelt_key_is_an_unknown_key_at_its_line() -> None:
    text = _edited("    cool_down: P2D\n", "    cooldown: P2D\n")
    (problem,) = _errors(text)
    assert (problem.path, problem.message) == ("actions[2].cooldown", "unknown key")
    assert (problem.line, problem.column) == (_line_of(text, "cooldown: P2D"), 5)


def test_an_unknown_offer_is_an_error_and_the_unused_one_a_warning() -> None:
    text = _edited("offer: credit_10\n", "offer: credit_99\n")
    checked = check_policy_text(text)
    assert not checked.valid
    (error,) = checked.errors
    assert error.path == "actions[1].offer"
    assert error.line == _line_of(text, "offer: credit_99")
    assert "credit_99" in error.message
    (warning,) = checked.warnings
    assert warning.path == "catalogue.offers[1].id"
    assert warning.severity is Severity.WARNING


def test_quiet_hours_unquoted_stay_times_of_day() -> None:
    # YAML 1.1 would read 21:00 as the number 1260 (base 60): 00:21 as a time.
    text = _edited('start: "21:00"', "start: 21:00")
    checked = check_policy_text(text)
    assert checked.policy is not None and checked.policy.contact.quiet_hours is not None
    assert checked.policy.contact.quiet_hours.start.hour == 21


def test_load_policy_text_raises_invalid_argument_naming_path_and_line() -> None:
    text = _edited("default_time_zone: Europe/Amsterdam", "default_time_zone: Mars/Olympus")
    with pytest.raises(InvalidArgument) as raised:
        load_policy_text(text)
    (violation,) = raised.value.violations
    assert violation.field == "contact.default_time_zone"
    assert violation.description.startswith(f"line {_line_of(text, 'Mars/Olympus')}, column ")
    assert "Mars/Olympus" in violation.description


def test_text_over_one_mebibyte_is_refused() -> None:
    text = DEFAULT + "#" * (MAX_POLICY_BYTES - len(DEFAULT.encode()) + 1)
    (problem,) = _errors(text)
    assert "1 MiB" in problem.message


def test_an_alias_bomb_is_refused_before_it_is_expanded() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        below = f"*a{level - 1}"
        levels.append(f"a{level}: &a{level} [{', '.join([below] * 10)}]")
    (problem,) = _errors("\n".join(levels) + "\nactions: []\n")
    assert "aliases" in problem.message


def test_a_recursive_alias_is_refused() -> None:
    (problem,) = _errors("actions: &loop [*loop]\n")
    assert "alias" in problem.message


def test_durations_and_times_of_day_written_as_numbers_are_refused() -> None:
    # pydantic alone reads numbers as seconds: seven seconds, 00:00:21.
    text = _edited("    window: P30D\n", "    window: 30\n").replace('start: "21:00"', "start: 21")
    errors = _errors(text)
    assert [(p.path, p.line) for p in errors] == [
        ("contact.frequency_caps[2].window", _line_of(text, "window: 30")),
        ("contact.quiet_hours.start", _line_of(text, "start: 21")),
    ]
    assert "ISO 8601" in errors[0].message


def test_a_character_yaml_refuses_is_a_problem_at_its_place() -> None:
    (problem,) = _errors("actions: []\ndescription: a\x1fb\n")
    assert (problem.line, problem.column) == (2, 15)


@pytest.mark.parametrize(
    ("escape", "character"),
    [("\\0", "U+0000"), ("\\e[2J", "U+001B"), ("\\r", "U+000D"), ("\\x85", "U+0085"),
     ("\\ud800", "U+D800")],
)  # fmt: skip
def test_a_control_character_written_as_an_escape_is_refused_at_its_path(
    escape: str, character: str
) -> None:
    # The YAML reader refuses these characters written as such, not as escapes.
    text = _edited(
        "display_text: Nothing to do for this customer now.",
        f'display_text: "Nothing to do{escape}"',
    )
    (problem,) = _errors(text)
    assert problem.path == "actions[6].display_text"
    assert (problem.line, problem.column) == (
        _line_of(text, 'display_text: "Nothing to do'),
        len("    display_text: ") + 1,
    )
    assert character in problem.message


def test_control_characters_in_keys_and_nested_values_are_refused_once_each() -> None:
    text = (
        "actions: []\n"
        '"de\\0scription": x\n'
        'routing: &r [{team: x, segments: [smb, "\\x01"]}]\n'
        "alerts: *r\n"
    )
    assert [(p.path, p.line, p.message.split(",")[0]) for p in _errors(text)] == [
        # (a key's problem names the mapping holding it: its own path would hold the NUL)
        ("", 2, "a key holds U+0000"),
        # (the alias's value is reported where it is written, not at each use)
        ("routing[0].segments[1]", 3, "holds U+0001"),
    ]


def test_tabs_and_line_breaks_stay_allowed_in_text() -> None:
    text = _edited(
        "display_text: Nothing to do for this customer now.",
        'display_text: "Nothing\\tto do\\nfor now \\u2028 or later"',
    )
    checked = check_policy_text(text)
    assert checked.policy is not None
    assert checked.policy.actions[6].display_text == "Nothing\tto do\nfor now \u2028 or later"
