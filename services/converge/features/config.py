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
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from converge.features.definitions import CHANNEL_NAMES, FeatureDefinition, Prediction
from converge.features.engine import BUILTIN, MAX_WINDOW_DAYS, FeatureSet
from converge.runtime import config_files
from converge.runtime.config_files import ConfigFileError

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


class FeatureSetError(ConfigFileError):
    """A feature set that cannot be used; each problem names its line and key."""


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
def parse_feature_set(text: str, origin: str = "<feature set>") -> FeatureSet:
    """Parses feature-set YAML, or raises FeatureSetError naming every bad key and its line."""
    data, root = config_files.parse_yaml(
        text, origin, FeatureSetError, expected="version, name, features"
    )
    spec = config_files.validate(FeatureSetSpec, data, root, origin, FeatureSetError)
    try:
        return spec.feature_set()
    except ValueError as e:  # (the engine's own checks, which the spec should already make)
        raise FeatureSetError(origin, [str(e)]) from None


def shipped_feature_sets() -> dict[str, Traversable]:
    """The feature sets shipped with Converge, by name ("itsm_incidents")."""
    return config_files.shipped("converge.features", "sets")


def load_feature_set(ref: str | Path) -> FeatureSet:
    """A feature set from a file path or by the name of a shipped set; the
    built-in set for "" or "builtin"."""
    if str(ref) in ("", "builtin"):
        return BUILTIN
    text, origin = config_files.read(
        ref, "converge.features", "sets", "feature set", FeatureSetError
    )
    return parse_feature_set(text, origin)
