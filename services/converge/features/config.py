"""Feature sets as configuration: `load_feature_set(name_or_path)` reads a
YAML file (or a set shipped in `sets/`) into a `FeatureSet`, validated with
pydantic; every problem names the file, the line and the key.

The format (version 1; the shipped sets explain every key in comments):

    version: 1
    name: itsm_incidents          # the set's version is "<name>-<digest>"
    builtin: true                 # start from the built-in features (default)
    features:
      - name: ticket_subcategory
        description: The subcategory the ticket was opened with.
        entity: ticket            # customer | ticket ("ticket_" names)
        aggregation: category     # count sum mean trend last time_since category
        attribute: subcategory
        types: [ticket.opened]
        channel: phone            # optional, a channel name
        where: {category: network, priority: [high, urgent]}
        window_days: 30           # count/sum/mean/trend of customers, 1..365
        used_by: [escalation]

The loader never imports the interactions service: names of types and
channels are checked for shape here, and against the catalogue when the
service loads the set.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from converge.features.definitions import CHANNEL_NAMES, FeatureDefinition, Prediction
from converge.features.engine import BUILTIN, MAX_WINDOW_DAYS, FeatureSet

FORMAT_VERSION = 1
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_SET_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
# What each entity can aggregate (see converge.features.definitions).
_CUSTOMER_AGGREGATIONS = ("count", "sum", "mean", "trend", "last", "time_since", "category")
_TICKET_AGGREGATIONS = ("count", "last", "category")
_WINDOWED = ("count", "sum", "mean", "trend")
_VALUED = ("sum", "mean", "trend", "last", "category")
_ALL_PREDICTIONS: tuple[Prediction, ...] = ("churn", "escalation", "cross_sell")
Scalar = str | int | float | bool


class FeatureSetError(Exception):
    """A feature set that cannot be used; each problem names its line and key."""

    def __init__(self, origin: str, problems: list[str]) -> None:
        self.origin = origin
        self.problems = problems
        super().__init__(f"{origin}: " + "; ".join(problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class FeatureSpec(_Model):
    """One feature of a configured set."""

    name: str
    description: str = Field(min_length=1, max_length=500)
    entity: Literal["customer", "ticket"]
    aggregation: Literal["count", "sum", "mean", "trend", "last", "time_since", "category"]
    attribute: str = ""
    types: list[str] = Field(default_factory=list, max_length=50)
    channel: str = ""
    where: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict, max_length=10)
    window_days: int | None = Field(default=None, ge=1, le=MAX_WINDOW_DAYS)
    unit: str = Field(default="", max_length=40)
    may_be_missing: bool | None = None
    min_category_count: int = Field(default=0, ge=0, le=1_000_000)
    used_by: list[Literal["churn", "escalation", "cross_sell"]] | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("must be lower-case letters, digits and _ (at most 63)")
        return name

    @field_validator("types")
    @classmethod
    def _check_types(cls, types: list[str]) -> list[str]:
        for type_ in types:
            if not _TYPE_NAME.match(type_):
                raise ValueError(f"{type_!r} is not an interaction type name")
        return types

    @field_validator("channel")
    @classmethod
    def _check_channel(cls, channel: str) -> str:
        if channel and channel not in CHANNEL_NAMES[1:]:
            raise ValueError(f"unknown channel (one of {', '.join(CHANNEL_NAMES[1:])})")
        return channel

    @field_validator("where")
    @classmethod
    def _check_where(cls, where: dict[str, Scalar | list[Scalar]]) -> dict[str, Any]:
        for attribute, values in where.items():
            if not _NAME.match(attribute):
                raise ValueError(f"{attribute}: not an attribute name")
            if isinstance(values, list) and not values:
                raise ValueError(f"{attribute}: list at least one value")
        return where

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        ticket = self.entity == "ticket"
        if self.name.startswith("ticket_") != ticket:
            raise ValueError('name: ticket features start with "ticket_", customer features do not')
        allowed = _TICKET_AGGREGATIONS if ticket else _CUSTOMER_AGGREGATIONS
        if self.aggregation not in allowed:
            raise ValueError(
                f"aggregation: a {self.entity} feature aggregates by one of {', '.join(allowed)}"
            )
        windowed = not ticket and self.aggregation in _WINDOWED
        if windowed and self.window_days is None:
            raise ValueError(f"window_days: required for {self.aggregation} (1 to 365 days)")
        if not windowed and self.window_days is not None:
            raise ValueError(
                "window_days: only count, sum, mean and trend of customers have a window "
                "(ticket features read the ticket's own interactions)"
            )
        if self.aggregation in _VALUED and not self.attribute:
            raise ValueError(f"attribute: required for {self.aggregation}")
        if self.aggregation in ("count", "time_since") and self.attribute:
            raise ValueError(f"attribute: not used by {self.aggregation} (filter with where:)")
        if self.attribute and not _NAME.match(self.attribute):
            raise ValueError("attribute: not an attribute name")
        if self.aggregation == "time_since" and self.unit not in ("", "days", "hours"):
            raise ValueError("unit: days or hours")
        if self.min_category_count and self.aggregation != "category":
            raise ValueError("min_category_count: only for category features")
        return self

    def definition(self) -> FeatureDefinition:
        default_unit = {"count": "count", "time_since": "days"}.get(self.aggregation, "")
        missing = self.aggregation not in ("count", "sum")
        default_use: tuple[Prediction, ...] = (
            ("escalation",) if self.entity == "ticket" else _ALL_PREDICTIONS
        )
        return FeatureDefinition(
            name=self.name,
            description=self.description,
            entity=self.entity,
            aggregation=self.aggregation,
            window_days=self.window_days,
            interaction_types=tuple(self.types),
            channel=CHANNEL_NAMES.index(self.channel) if self.channel else 0,
            attribute=self.attribute,
            unit=self.unit or default_unit,
            may_be_missing=missing if self.may_be_missing is None else self.may_be_missing,
            used_by=tuple(self.used_by) if self.used_by is not None else default_use,
            filters=tuple(
                (
                    attribute,
                    tuple(_text(v) for v in (values if isinstance(values, list) else [values])),
                )
                for attribute, values in sorted(self.where.items())
            ),
            min_category_count=self.min_category_count,
        )


class FeatureSetSpec(_Model):
    """A feature set file."""

    version: Literal[1]
    name: str
    builtin: bool = True
    features: list[FeatureSpec] = Field(default_factory=list, max_length=1000)

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _SET_NAME.match(name):
            raise ValueError("must be lower-case letters, digits, _ . - (at most 63)")
        return name

    @model_validator(mode="after")
    def _check(self) -> FeatureSetSpec:
        taken = {d.name for d in BUILTIN.definitions} if self.builtin else set()
        for i, feature in enumerate(self.features):
            if feature.name in taken:
                why = "a built-in feature" if self.builtin else "an earlier feature"
                raise ValueError(f"features[{i}].name: {feature.name!r} is already {why}")
            taken.add(feature.name)
        if not self.builtin and not self.features:
            raise ValueError("features: list at least one feature, or set builtin: true")
        return self

    def feature_set(self) -> FeatureSet:
        definitions = [f.definition() for f in self.features]
        if self.builtin:
            definitions = [*BUILTIN.definitions, *definitions]
        return FeatureSet(self.name, definitions)


# --- loading ----------------------------------------------------------------------
class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML 1.2 booleans (only true/false), dates left as text, and duplicate
    keys refused (as the connectors' mappings read YAML)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return dict(super().construct_mapping(node, deep=deep))


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_KEY_PREFIX = re.compile(r"^([A-Za-z_][\w.]*(?:\[\d+\][\w.]*)*): (.*)$", re.DOTALL)
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _line_of(root: Any, loc: tuple[int | str, ...]) -> int:
    """The line (1-based) of the deepest YAML node `loc` reaches: the key's
    own line when it names one, else its nearest parent's."""
    node: Any = root
    line: int = root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    node, line = value_node, int(key_node.start_mark.line) + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = int(node.start_mark.line) + 1
        else:
            return line
    return line


def _location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _problem(root: Any, error: Any) -> str:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    if loc and loc[-1] in ("str", "int", "float", "bool", "list[union[str,int,float,bool]]"):
        loc = loc[:-1]  # (a union member pydantic names; the key is the union's)
        message = "must be text, a number, true/false or a list of them"
    elif error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key missing"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        key = _KEY_PREFIX.match(message)
        if error["type"] == "value_error" and key:  # "<key>: <problem>", from a cross-key check
            loc = loc + tuple(
                int(index) if index else name for name, index in _PATH_PART.findall(key.group(1))
            )
            message = key.group(2)
        elif "input" in error and not isinstance(error["input"], dict | list):
            message += f" (got {error['input']!r})"
    where = _location(loc)
    line = _line_of(root, loc)
    return f"line {line}: {where}: {message}" if where else f"line {line}: {message}"


def parse_feature_set(text: str, origin: str = "<feature set>") -> FeatureSet:
    """Parses feature-set YAML, or raises FeatureSetError naming every bad key and its line."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise FeatureSetError(origin, [f"not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise FeatureSetError(origin, ["must be a YAML mapping of keys (version, name, features)"])
    try:
        spec = FeatureSetSpec.model_validate(data)
    except ValidationError as e:
        problems = list(dict.fromkeys(_problem(root, error) for error in e.errors()))
        raise FeatureSetError(origin, problems) from None
    try:
        return spec.feature_set()
    except ValueError as e:  # (the engine's own checks, which the spec should already make)
        raise FeatureSetError(origin, [str(e)]) from None


def shipped_feature_sets() -> dict[str, Traversable]:
    """The feature sets shipped with Converge, by name ("itsm_incidents")."""
    folder = resources.files("converge.features") / "sets"
    return {
        entry.name.removesuffix(".yaml"): entry
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def load_feature_set(ref: str | Path) -> FeatureSet:
    """A feature set from a file path or by the name of a shipped set; the
    built-in set for "" or "builtin"."""
    if str(ref) in ("", "builtin"):
        return BUILTIN
    path = Path(ref)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FeatureSetError(str(path), [f"cannot read it: {e}"]) from None
        return parse_feature_set(text, str(path))
    shipped = shipped_feature_sets()
    name = str(ref).removesuffix(".yaml")
    if name in shipped:
        return parse_feature_set(shipped[name].read_text(encoding="utf-8"), f"{name} (shipped)")
    raise FeatureSetError(
        str(ref),
        [f"no such file, and no shipped feature set of that name (shipped: {', '.join(shipped)})"],
    )
