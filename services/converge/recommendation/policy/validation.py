"""Checking a policy's YAML text: every problem with its path and line.

`check_policy_text(text)` never raises for any text: it answers the policy
(when there is no ERROR) and every problem found, each naming its path into
the document ("actions[2].min_probability"), its line and column (from 1),
in text order. Three layers:

1. the text itself: at most 1 MiB, YAML (the shared `ConfigLoader`: YAML 1.2
   booleans, duplicate keys refused; numbers also as YAML 1.2 says, so
   `21:00` stays a time of day and is not read as the base-60 number 1260),
   anchors and aliases bounded (an alias "bomb" expands to more values than
   any policy needs, and a recursive alias never ends), no key or value
   holding a control character (tab and line feed aside) or half of a
   surrogate pair;
2. the shape (`model.Policy`, pydantic): each error's `loc` becomes a path
   and is found in the YAML node tree for its line;
3. what pydantic cannot see: names that refer to nothing (an offer, a
   product, a team, an action), duplicate names, time zones zoneinfo does
   not know, conditions that name no subject or two; and WARNINGs for what
   is allowed but probably a mistake (an action no customer can reach, an
   unknown feature name, no control group anywhere).

Pure: no I/O beyond reading the shipped feature sets once (for their names).
"""

from __future__ import annotations

import enum
import functools
import math
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import time, timedelta
from typing import Any

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel, ValidationError

from converge.recommendation.policy.model import (
    ActionSpec,
    Condition,
    Policy,
)
from converge.runtime.config_files import ConfigLoader

# The largest policy text accepted, in UTF-8 bytes.
MAX_POLICY_BYTES = 1 << 20
# The most values (scalars, lists, mappings) a document may hold once its
# aliases are expanded. The default policy holds about 400; a YAML bomb
# (nested aliases doubling at each level) would reach billions.
MAX_EXPANDED_VALUES = 100_000

Loc = tuple[int | str, ...]


class Severity(enum.Enum):
    ERROR = "error"  # the policy cannot be stored or activated
    WARNING = "warning"  # allowed, but probably a mistake


@dataclass(frozen=True)
class PolicyProblem:
    severity: Severity
    # A path into the document: "actions[2].offer"; "" for the document itself.
    path: str
    # From 1; 0 when unknown.
    line: int
    column: int
    message: str


@dataclass(frozen=True)
class PolicyCheck:
    """What a check found: the policy when there is no error, and every problem."""

    policy: Policy | None
    problems: tuple[PolicyProblem, ...]

    @property
    def valid(self) -> bool:
        return self.policy is not None

    @property
    def errors(self) -> tuple[PolicyProblem, ...]:
        return tuple(p for p in self.problems if p.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[PolicyProblem, ...]:
        return tuple(p for p in self.problems if p.severity is Severity.WARNING)


class PolicyLoader(ConfigLoader):  # type: ignore[misc]
    """The shared loader with YAML 1.2's numbers: decimal integers and floats
    only. YAML 1.1 (PyYAML's default) reads `21:00` as 1260 (base 60), `010`
    as 8 (octal) and `1_000` as 1000; in a policy each of these is a typo or
    a time of day, which the schema then reports by its path."""


PolicyLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in ConfigLoader.yaml_implicit_resolvers.items()
}
PolicyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789")
)
PolicyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+.0123456789"),
)


def check_policy_text(text: str, known_features: frozenset[str] | None = None) -> PolicyCheck:
    """Every problem of a policy's YAML text; the policy when none is an error.
    `known_features`: the feature names conditions may test (default: the
    built-in features and those of the shipped feature sets)."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_POLICY_BYTES:
        return _refused("", 0, 0, f"the text is {size} bytes, more than {MAX_POLICY_BYTES} (1 MiB)")
    root, data, problem = _parse(text)
    if problem is not None:
        return PolicyCheck(None, (problem,))
    if not isinstance(data, dict):
        line, column = _mark(root)
        return _refused(
            "", line, column, "must be a YAML mapping of keys (actions, catalogue, ...)"
        )
    characters = _characters_for_text(root)
    if characters:  # (before the shape: an unknown key's path would hold the character)
        return PolicyCheck(None, _sorted(characters))
    numbers = _numbers_for_text(data, root)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        return PolicyCheck(None, _sorted([*_shape_problems(e, root), *numbers]))
    except RecursionError:  # (nesting the node check let through: never seen, kept safe)
        return _refused("", 1, 1, "nested too deeply")
    if numbers:
        return PolicyCheck(None, _sorted(numbers))
    features = _known_features() if known_features is None else known_features
    checks = _SemanticChecks(root, features)
    checks.run(policy)
    problems = _sorted(checks.problems)
    failed = any(p.severity is Severity.ERROR for p in problems)
    return PolicyCheck(None if failed else policy, problems)


def _refused(path: str, line: int, column: int, message: str) -> PolicyCheck:
    return PolicyCheck(None, (PolicyProblem(Severity.ERROR, path, line, column, message),))


def _sorted(problems: Iterable[PolicyProblem]) -> tuple[PolicyProblem, ...]:
    unique = dict.fromkeys(problems)
    return tuple(sorted(unique, key=lambda p: (p.line == 0, p.line, p.column)))


# --- layer 1: the text ----------------------------------------------------------
def _parse(text: str) -> tuple[Any, Any, PolicyProblem | None]:
    """(node tree, data, None), or a problem naming where the text breaks."""
    try:
        loader = PolicyLoader(text)
    except yaml.reader.ReaderError as e:  # (a character YAML does not allow)
        line, column = _position(text, e.position)
        return None, None, PolicyProblem(Severity.ERROR, "", line, column, f"not valid YAML: {e}")
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            return None, None, _yaml_problem(e)
        except yaml.YAMLError as e:
            return None, None, PolicyProblem(Severity.ERROR, "", 0, 0, f"not valid YAML: {e}")
        except RecursionError:
            return None, None, PolicyProblem(Severity.ERROR, "", 1, 1, "nested too deeply")
        if root is None:
            return None, None, PolicyProblem(Severity.ERROR, "", 1, 1, "the text is empty")
        size = _expanded_size(root)
        if size is None:
            line, column = _mark(root)
            return (
                None,
                None,
                PolicyProblem(
                    Severity.ERROR, "", line, column, "an alias refers to a value that holds it"
                ),
            )
        if size > MAX_EXPANDED_VALUES:
            return (
                None,
                None,
                PolicyProblem(
                    Severity.ERROR,
                    "",
                    1,
                    1,
                    f"too many values once aliases are expanded (more than {MAX_EXPANDED_VALUES})",
                ),
            )
        try:
            data = loader.construct_document(root)
        except yaml.MarkedYAMLError as e:
            return None, None, _yaml_problem(e)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
            # (explicit tags with bad values: `!!float x`, `!!binary`; an
            # unhashable key such as a list: ConfigLoader's duplicate check)
            line, column = _mark(root)
            return None, None, PolicyProblem(Severity.ERROR, "", line, column, f"not usable: {e}")
        return root, data, None
    finally:
        loader.dispose()


# C0 and C1 control characters but tab and line feed (Unicode's Cc), and the
# halves of surrogate pairs (Cs).
_UNWANTED_CHARACTER = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _characters_for_text(root: Any) -> list[PolicyProblem]:
    """Keys and values holding a character no policy text means: a control
    character other than tab and line feed, or half of a surrogate pair.

    The YAML reader refuses them written as such, but a double-quoted
    escape ("\\0", "\\e", "\\ud800") writes any of them. Values reach
    answers and exports (display_text is what an agent reads: an escape
    sequence would drive their terminal); a request's own text holding NUL
    is refused likewise (runtime/fields.py); and a lone surrogate cannot be
    encoded into an answer at all (Recommend proposing an action whose
    display_text held one failed INTERNAL). Each node is reported once, at
    the path of its first use in the text and its own line."""
    problems: list[PolicyProblem] = []
    seen: set[int] = set()
    pending: list[tuple[Any, str]] = [(root, "")]
    while pending:  # (a stack, not recursion: nesting is only bounded by the value count)
        node, path = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            problem = _unwanted(node, path, "")
            if problem is not None:
                problems.append(problem)
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{index}]") for index, item in enumerate(node.value)]
            pending.extend(reversed(children))  # (popped in text order)
        elif isinstance(node, yaml.MappingNode):
            children = []
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    problem = _unwanted(key, path, "a key ")
                    if problem is not None:
                        problems.append(problem)
                        continue  # (its path would hold the character)
                    children.append((value, f"{path}.{key.value}" if path else str(key.value)))
                else:  # (a list or mapping as a key: the loader refused it already)
                    children += [(key, path), (value, path)]
            pending.extend(reversed(children))
    return problems


def _unwanted(node: Any, path: str, what: str) -> PolicyProblem | None:
    found = _UNWANTED_CHARACTER.search(str(node.value))
    if found is None:
        return None
    character = ord(found.group())
    kind = (
        "half of a surrogate pair, not a character"
        if 0xD800 <= character <= 0xDFFF
        else "a control character (text may hold tabs and line breaks, no other)"
    )
    line, column = _mark(node)
    return PolicyProblem(
        Severity.ERROR, path, line, column, f"{what}holds U+{character:04X}, {kind}"
    )


def _position(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _yaml_problem(error: yaml.MarkedYAMLError) -> PolicyProblem:
    mark = error.problem_mark or error.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    what = " ".join(part for part in (error.context, error.problem) if part)
    return PolicyProblem(Severity.ERROR, "", line, column, f"not valid YAML: {what}")


def _expanded_size(root: Any) -> int | None:
    """How many values the tree holds with every alias expanded (counted, not
    built: shared nodes are counted once per use), capped just above the
    limit; None when an alias refers to a node that contains it."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    cap = MAX_EXPANDED_VALUES + 1

    def size(node: Any) -> int | None:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            return None
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[Any] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            inner = size(child)
            if inner is None:
                return None
            total = min(cap, total + inner)
        visiting.discard(key)
        sizes[key] = total
        return total

    try:
        return size(root)
    except RecursionError:
        return cap


def _mark(node: Any) -> tuple[int, int]:
    if node is None:
        return 1, 1
    return int(node.start_mark.line) + 1, int(node.start_mark.column) + 1


# --- finding a path in the node tree --------------------------------------------
@functools.cache
def _field_names() -> frozenset[str]:
    """Every key the schema knows, at any depth: what tells a key of a path
    from the name pydantic gives a member of a union ("str", "literal[...]")."""
    names: set[str] = set()
    pending: list[type[BaseModel]] = [Policy]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            pending.extend(_models_in(info.annotation))
    return frozenset(names)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for argument in getattr(annotation, "__args__", ()):
        found.extend(_models_in(argument))
    return found


@dataclass(frozen=True)
class _Place:
    path: str
    line: int
    column: int


def locate(root: Any, loc: Sequence[int | str], at_key: bool = False) -> _Place:
    """The path of `loc` (pydantic's members of unions left out) and the line
    and column of the deepest node it reaches: the value's own place for a
    scalar, the key's for a mapping or list value or with `at_key` (an
    unknown key), the parent's when the key is absent."""
    node: Any = root
    key_mark = value_mark = _mark(root)
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            if isinstance(node, yaml.SequenceNode) and 0 <= part < len(node.value):
                node = node.value[part]
                key_mark = value_mark = _mark(node)
            else:
                node = None
            continue
        if isinstance(node, yaml.MappingNode):
            pair = next(
                (
                    (k, v)
                    for k, v in node.value
                    if isinstance(k, yaml.ScalarNode) and k.value == part
                ),
                None,
            )
            if pair is not None:
                path += f".{part}" if path else part
                node = pair[1]
                key_mark, value_mark = _mark(pair[0]), _mark(pair[1])
                continue
        if part in _field_names():
            path += f".{part}" if path else part
            node = None
        # else: the name of a union's member, not a key.
    if at_key or not isinstance(node, yaml.ScalarNode):
        line, column = key_mark
    else:
        line, column = value_mark
    return _Place(path, line, column)


# --- layer 2: the shape ---------------------------------------------------------
_PLAIN_WORDS = {
    "str": "text",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "decimal": "an amount",
}


def _is_member(part: str) -> bool:
    return part not in _field_names() and (part in _PLAIN_WORDS or "[" in part)


def _member_word(part: str) -> str:
    if part in _PLAIN_WORDS:
        return _PLAIN_WORDS[part]
    if part.startswith("list["):
        return "a list"
    if part.startswith("literal["):
        return "one of " + part.removeprefix("literal[").removesuffix("]").replace("'", "")
    return part


def _shape_problems(error: ValidationError, root: Any) -> list[PolicyProblem]:
    """One problem per place: a union's members each report an error at the
    same place, said here once ("must be text, a number or true or false")."""
    by_place: dict[_Place, list[str]] = {}
    members: dict[_Place, list[str]] = {}
    shown: dict[_Place, str] = {}
    for raw in error.errors(include_url=False):
        kind = raw["type"]
        loc = tuple(raw["loc"])
        place = locate(root, loc, at_key=kind == "extra_forbidden")
        value = raw.get("input")
        if not isinstance(value, dict | list) and len(repr(value)) <= 80:
            shown[place] = f" (got {value!r})"
        member = loc[-1] if loc else None
        if isinstance(member, str) and _is_member(member) and kind.endswith("_type"):
            # One member of a union refused the value's type: said once for all.
            members.setdefault(place, []).append(_member_word(member))
            continue
        if isinstance(member, str) and _is_member(member) and kind == "literal_error":
            expected = str(raw.get("ctx", {}).get("expected", member))
            members.setdefault(place, []).append(expected.replace("'", ""))
            continue
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "required key missing"
        else:
            message = str(raw["msg"]).removeprefix("Value error, ") + shown.get(place, "")
        by_place.setdefault(place, [])
        if message not in by_place[place]:
            by_place[place].append(message)
    for place, words in members.items():
        unique = list(dict.fromkeys(words))
        said = ", ".join(unique[:-1]) + " or " + unique[-1] if len(unique) > 1 else unique[0]
        by_place.setdefault(place, []).insert(0, f"must be {said}{shown.get(place, '')}")
    return [
        PolicyProblem(Severity.ERROR, place.path, place.line, place.column, "; or ".join(messages))
        for place, messages in by_place.items()
    ]


def _numbers_for_text(data: dict[str, Any], root: Any) -> list[PolicyProblem]:
    """Durations and times of day written as bare numbers: pydantic reads
    them as seconds (`window: 7` would be seven seconds, `start: 21` 00:00:21),
    which no one writing a policy means."""
    problems: list[PolicyProblem] = []

    def walk(model: type[BaseModel], value: Any, loc: Loc) -> None:
        if not isinstance(value, dict):
            return
        for name, info in model.model_fields.items():
            if name not in value:
                continue
            given = value[name]
            if isinstance(given, int | float) and not isinstance(given, bool):
                message = None
                if _involves(info.annotation, timedelta):
                    message = "a duration is ISO 8601 text (P7D, PT4H), not a number"
                elif _involves(info.annotation, time):
                    message = 'a time of day is text ("21:00"), not a number'
                if message is not None:
                    place = locate(root, (*loc, name))
                    problems.append(
                        PolicyProblem(Severity.ERROR, place.path, place.line, place.column, message)
                    )
            for inner in _models_in(info.annotation):
                if isinstance(given, list):
                    for index, item in enumerate(given):
                        walk(inner, item, (*loc, name, index))
                else:
                    walk(inner, given, (*loc, name))

    walk(Policy, data, ())
    return problems


def _involves(annotation: Any, wanted: type) -> bool:
    if annotation is wanted:
        return True
    return any(_involves(argument, wanted) for argument in getattr(annotation, "__args__", ()))


# --- layer 3: what the schema cannot see ----------------------------------------
@functools.cache
def _known_features() -> frozenset[str]:
    """Built-in feature names and those of the shipped feature sets: a
    condition on any other name is probably a typo (a deployment with its own
    feature set may define more, hence a warning, not an error)."""
    from converge.features.config import load_feature_set, shipped_feature_sets
    from converge.features.engine import BUILTIN

    names = {d.name for d in BUILTIN.definitions}
    for name in shipped_feature_sets():
        names.update(d.name for d in load_feature_set(name).definitions)
    return frozenset(names)


@functools.cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


PROFILE_FIELDS = ("segment", "plan", "region", "owner_team")
_KIND_PREDICTION = {
    "churn_risk": "churn",
    "escalation_risk": "escalation",
    "cross_sell_moment": "cross_sell",
}


class _SemanticChecks:
    def __init__(self, root: Any, features: frozenset[str]) -> None:
        self.root = root
        self.features = features
        self.problems: list[PolicyProblem] = []

    def error(self, loc: Loc, message: str) -> None:
        self.add(Severity.ERROR, loc, message)

    def warning(self, loc: Loc, message: str) -> None:
        self.add(Severity.WARNING, loc, message)

    def add(self, severity: Severity, loc: Loc, message: str) -> None:
        place = locate(self.root, loc)
        self.problems.append(PolicyProblem(severity, place.path, place.line, place.column, message))

    def run(self, policy: Policy) -> None:
        offers = self.unique(("catalogue", "offers"), [o.id for o in policy.catalogue.offers], "id")
        products = self.unique(
            ("catalogue", "products"), [p.id for p in policy.catalogue.products], "id"
        )
        actions = self.unique(("actions",), [a.name for a in policy.actions], "name")
        teams = self.unique(("teams",), [t.name for t in policy.teams], "name")
        for index, action in enumerate(policy.actions):
            self.action(("actions", index), action, policy, offers, products)
        self.catalogue_use(policy)
        self.contact(policy)
        self.arbitration(policy)
        self.teams(policy, teams)
        self.alerts(policy, actions, teams)
        self.routing(policy, teams)
        if policy.actions and all(a.control_share == 0 for a in policy.actions):
            self.warning(
                ("actions",),
                "no action has a control group (control_share 0 everywhere): "
                "its lift over doing nothing cannot be measured",
            )
        if not any(a.kind == "do_nothing" for a in policy.actions):
            self.warning(
                ("actions",),
                "no do_nothing action: when nothing is worth doing the answer is empty",
            )

    def unique(self, loc: Loc, names: list[str], key: str) -> set[str]:
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if name in first:
                self.error(
                    (*loc, index, key),
                    f"{name!r} is already the {key} of {_path(loc)}[{first[name]}]",
                )
            else:
                first[name] = index
        return set(names)

    # actions
    def action(
        self, loc: Loc, action: ActionSpec, policy: Policy, offers: set[str], products: set[str]
    ) -> None:
        kind = action.kind
        if action.offer is not None:
            if kind not in ("retention_offer", "proactive_support_call"):
                self.error((*loc, "offer"), f"a {kind} action makes no offer")
            elif action.offer not in offers:
                self.error(
                    (*loc, "offer"),
                    f"no offer {action.offer!r} in catalogue.offers{_known(offers)}",
                )
        if action.products:
            if kind != "cross_sell_offer":
                self.error(
                    (*loc, "products"), f"only cross_sell_offer actions offer products, not {kind}"
                )
            for index, product in enumerate(action.products):
                if product not in products:
                    self.error(
                        (*loc, "products", index),
                        f"no product {product!r} in catalogue.products{_known(products)}",
                    )
        elif kind == "cross_sell_offer" and not policy.catalogue.products:
            self.error(
                (*loc, "kind"), "a cross_sell_offer needs products: catalogue.products is empty"
            )
        if kind == "escalate_to_human":
            if action.automated:
                self.error((*loc, "automated"), "a hand-over to a human is never automated")
            if action.contact_channels:
                self.warning(
                    (*loc, "contact_channels"),
                    "a hand-over to a human happens in the current conversation; "
                    "contact channels make it an outbound contact",
                )
        if kind == "do_nothing":
            for key in ("prediction", "offer", "value", "cost"):
                if getattr(action, key) is not None:
                    self.warning(
                        (*loc, key), "do_nothing has no propensity, value or cost: ignored"
                    )
        elif kind == "cross_sell_offer" and action.prediction not in (None, "cross_sell"):
            self.error(
                (*loc, "prediction"), "a cross_sell_offer is ranked by the cross_sell prediction"
            )
        if action.prediction is None and action.min_probability > 0 and kind != "do_nothing":
            self.warning(
                (*loc, "min_probability"),
                "applies to the probability of `prediction`, which is not set",
            )
        if (
            action.urgent_above is not None
            and action.high_above is not None
            and action.urgent_above < action.high_above
        ):
            self.error((*loc, "urgent_above"), "must not be below high_above")
        if action.cool_down is not None:
            self.positive((*loc, "cool_down"), action.cool_down)
        self.conditions((*loc, "eligibility"), action.eligibility)
        if len(set(action.contact_channels)) < len(action.contact_channels):
            self.warning((*loc, "contact_channels"), "names a channel twice")

    def conditions(self, loc: Loc, conditions: list[Condition]) -> None:
        # Per subject, the numeric range every condition leaves open.
        ranges: dict[tuple[str, str], tuple[float, bool, float, bool]] = {}
        for index, condition in enumerate(conditions):
            here = (*loc, index)
            subjects = [
                (key, value)
                for key in ("feature", "context", "profile")
                if (value := getattr(condition, key)) is not None
            ]
            if len(subjects) != 1:
                self.error(
                    here,
                    "name exactly one of feature, context or profile"
                    + (f" (names {', '.join(k for k, _ in subjects)})" if subjects else ""),
                )
                continue
            key, subject = subjects[0]
            if key == "feature" and subject not in self.features:
                self.warning(
                    (*here, "feature"),
                    f"{subject!r} is not a built-in feature nor one of a shipped feature set: "
                    "unless the deployed feature set defines it, it is always missing",
                )
            if key == "profile" and not (
                subject in PROFILE_FIELDS
                or (subject.startswith("attributes.") and len(subject) > len("attributes."))
            ):
                self.error(
                    (*here, "profile"),
                    f"must be one of {', '.join(PROFILE_FIELDS)} or attributes.<name>",
                )
            tests = ("lt", "le", "gt", "ge", "equals", "one_of", "not_one_of", "missing")
            if all(getattr(condition, t) is None for t in tests):
                self.error(here, f"tests nothing: give one of {', '.join(tests)}")
                continue
            low, low_open, high, high_open = ranges.get(
                (key, subject), (-math.inf, False, math.inf, False)
            )
            for bound, value in (("gt", condition.gt), ("ge", condition.ge)):
                if value is not None and (value > low or (value == low and bound == "gt")):
                    low, low_open = value, bound == "gt"
            for bound, value in (("lt", condition.lt), ("le", condition.le)):
                if value is not None and (value < high or (value == high and bound == "lt")):
                    high, high_open = value, bound == "lt"
            ranges[(key, subject)] = (low, low_open, high, high_open)
            if low > high or (low == high and (low_open or high_open)):
                self.warning(
                    here,
                    f"no value of {subject!r} passes every condition of this list: "
                    "the action can never be proposed",
                )

    def catalogue_use(self, policy: Policy) -> None:
        offered = {a.offer for a in policy.actions if a.offer}
        for index, offer in enumerate(policy.catalogue.offers):
            if offer.id not in offered:
                self.warning(("catalogue", "offers", index, "id"), "no action makes this offer")
            if offer.valid_for is not None:
                self.positive(("catalogue", "offers", index, "valid_for"), offer.valid_for)
        cross_sells = [a for a in policy.actions if a.kind == "cross_sell_offer"]
        sold = {p for a in cross_sells for p in a.products}
        every = any(not a.products for a in cross_sells)
        for index, product in enumerate(policy.catalogue.products):
            if not every and product.id not in sold:
                self.warning(
                    ("catalogue", "products", index, "id"), "no action offers this product"
                )

    # contact, arbitration
    def contact(self, policy: Policy) -> None:
        contact = policy.contact
        self.time_zone(("contact", "default_time_zone"), contact.default_time_zone)
        for index, cap in enumerate(contact.frequency_caps):
            self.positive(("contact", "frequency_caps", index, "window"), cap.window)
        if contact.cool_down_after_rejection < timedelta(0):
            self.error(("contact", "cool_down_after_rejection"), "must not be negative")
        hours = contact.quiet_hours
        if hours is not None and hours.start == hours.end:
            self.error(
                ("contact", "quiet_hours", "end"),
                "equals start: say which hours are quiet (it may wrap midnight)",
            )
        if hours is not None and (hours.start.tzinfo is not None or hours.end.tzinfo is not None):
            self.error(
                ("contact", "quiet_hours"),
                "times are local to the customer: leave out the offset",
            )
        self.feature(("contact", "open_tickets_feature"), contact.open_tickets_feature)

    def arbitration(self, policy: Policy) -> None:
        if policy.arbitration.complaints_feature is not None:
            self.feature(
                ("arbitration", "complaints_feature"), policy.arbitration.complaints_feature
            )

    def feature(self, loc: Loc, name: str) -> None:
        if name not in self.features:
            self.warning(
                loc,
                f"{name!r} is not a built-in feature nor one of a shipped feature set: "
                "unless the deployed feature set defines it, it is always missing",
            )

    # teams, alerts, routing
    def teams(self, policy: Policy, teams: set[str]) -> None:
        reached = {r.default_team for r in policy.alerts} | {r.team for r in policy.routing}
        reached |= {t.lead_team for t in policy.teams if t.lead_team}
        for index, team in enumerate(policy.teams):
            loc: Loc = ("teams", index)
            self.time_zone((*loc, "time_zone"), team.time_zone)
            if team.ack_deadline is not None:
                self.positive((*loc, "ack_deadline"), team.ack_deadline)
            if team.lead_team is not None:
                if team.lead_team == team.name:
                    self.error((*loc, "lead_team"), "a team cannot be its own lead team")
                elif team.lead_team not in teams:
                    self.error(
                        (*loc, "lead_team"), f"no team {team.lead_team!r} in teams{_known(teams)}"
                    )
            if team.name not in reached:
                self.warning(
                    (*loc, "name"), "no alert rule, route or team sends alerts to this team"
                )

    def alerts(self, policy: Policy, actions: set[str], teams: set[str]) -> None:
        first: dict[str, int] = {}
        for index, rule in enumerate(policy.alerts):
            loc: Loc = ("alerts", index)
            if rule.kind in first:
                self.error(
                    (*loc, "kind"),
                    f"alerts[{first[rule.kind]}] is already the rule for {rule.kind}",
                )
            first.setdefault(rule.kind, index)
            if rule.prediction != _KIND_PREDICTION[rule.kind]:
                self.error(
                    (*loc, "prediction"),
                    f"a {rule.kind} alert follows the {_KIND_PREDICTION[rule.kind]} prediction",
                )
            if rule.auto_resolve_below is not None and rule.auto_resolve_below > rule.threshold:
                self.error((*loc, "auto_resolve_below"), "must not be above threshold")
            if rule.default_team not in teams:
                self.error(
                    (*loc, "default_team"), f"no team {rule.default_team!r} in teams{_known(teams)}"
                )
            if rule.action is not None and rule.action not in actions:
                self.error((*loc, "action"), f"no action {rule.action!r} in actions")
            if rule.expire_after is not None:
                self.positive((*loc, "expire_after"), rule.expire_after)
            if rule.dedup_window < timedelta(0):
                self.error((*loc, "dedup_window"), "must not be negative")

    def routing(self, policy: Policy, teams: set[str]) -> None:
        ruled = {r.kind for r in policy.alerts}
        for index, route in enumerate(policy.routing):
            loc: Loc = ("routing", index)
            if route.team not in teams:
                self.error((*loc, "team"), f"no team {route.team!r} in teams{_known(teams)}")
            for position, kind in enumerate(route.kinds):
                if kind not in ruled:
                    self.warning(
                        (*loc, "kinds", position), f"no alert rule raises {kind}: never routed"
                    )

    # values
    def positive(self, loc: Loc, duration: timedelta) -> None:
        if duration <= timedelta(0):
            self.error(loc, "must be a positive duration (ISO 8601, for example P7D or PT4H)")

    def time_zone(self, loc: Loc, name: str) -> None:
        if name not in _time_zones():
            self.error(
                loc, f"{name!r} is not an IANA time zone zoneinfo knows (Europe/Amsterdam, UTC)"
            )


def _path(loc: Loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _known(names: set[str]) -> str:
    shown = sorted(names)[:10]
    return f" (known: {', '.join(shown)})" if shown else " (none defined)"


def problems_summary(problems: Iterable[PolicyProblem]) -> str:
    """ "line N, path: message; ..." for logs and error messages."""
    return "; ".join(f"line {p.line}, {p.path or 'top level'}: {p.message}" for p in problems)
