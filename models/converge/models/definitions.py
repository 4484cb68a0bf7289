"""Prediction definitions: what churn, escalation and a purchase mean, as
configuration a business writes, not code.

A definitions file is YAML (validated here with pydantic; every error names
the file, the line and the key). `load_definitions(name_or_path)` takes a path
or the name of a file shipped in `converge/models/definitions/` (`default`:
the behaviour Converge had before definitions existed). Every key is
documented in the shipped `default.yaml`; in short:

- `churn`: `horizon_days`, `population` (`active`, `with_history`,
  `profiles`) and one `label` kind (`cancels_all_products`, `any_of_types`,
  `none_of_types`, `profile_attribute`);
- `escalation`: `horizon_hours`, `outcome` (types, typed events with
  attribute conditions, an outcome attribute of the ticket's events),
  `cutoffs` (`every_hours`, or per ticket `after_events` + `delay_minutes`),
  and `open_tickets`, the closing policy (`inactive_days`,
  `close_when_customer_left`);
- `cross_sell`: `horizon_days`, `purchase_types`, `products` (`from_data` or
  a list), `prospects`;
- `cutoffs`: `every_days`, `weeks`, `end` (`latest_complete`: the latest
  interaction seen minus the horizon, never the clock; or a date);
- `split`: `method` (`auto`, `time`, `stratified`) and `gap` (`horizon` or
  `none`).

Nothing here imports pandas, LightGBM or a service: the command line loads a
file (and reports its errors) before any of them.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from converge.models.predictions import Prediction
from converge.runtime import config_files
from converge.runtime.config_files import ConfigFileError

Scalar = str | int | float | bool
HOLDING_DEFAULT = ("purchase", "subscription.started")
ESCALATION_DEFAULT = ("ticket.escalated", "ticket.sla_breached")


class DefinitionError(ConfigFileError, ValueError):
    """A definitions file that cannot be used; each problem names its line
    and key. (Also a ValueError, as callers catch it so.)"""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttributeTest(_Model):
    """An attribute condition: `name` holds one of `in` (or equals `equals`)."""

    name: str = Field(min_length=1)
    equals: Scalar | None = None
    in_: tuple[Scalar, ...] | None = Field(default=None, alias="in")

    @model_validator(mode="after")
    def _one(self) -> AttributeTest:
        if (self.equals is None) == (self.in_ is None):
            raise ValueError("give exactly one of equals or in")
        return self

    def holds(self, attributes: Any) -> bool:
        value = attributes.get(self.name) if attributes else None
        if value is None:
            return False
        wanted = self.in_ if self.in_ is not None else (self.equals,)
        return any(_same(value, w) for w in wanted if w is not None)


def _same(value: Any, wanted: Scalar) -> bool:
    """Attribute values compare as their kind, text case-insensitively (an
    export's "High" is the configuration's "high")."""
    if isinstance(wanted, bool) or isinstance(value, bool):
        return str(value).lower() == str(wanted).lower()
    if isinstance(wanted, int | float) and isinstance(value, int | float):
        return float(value) == float(wanted)
    return str(value).strip().lower() == str(wanted).strip().lower()


class EventTest(_Model):
    """Events of `type` (a "prefix.*" pattern allowed) whose attributes all pass."""

    type: str = Field(min_length=1)
    where: tuple[AttributeTest, ...] = ()

    def matches(self, type_: str, attributes: Any) -> bool:
        return type_matches(type_, (self.type,)) and all(t.holds(attributes) for t in self.where)


def type_matches(type_: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(type_ == p or (p.endswith(".*") and type_.startswith(p[:-1])) for p in patterns)


class ChurnLabel(_Model):
    """Exactly one kind of churn label."""

    cancels_all_products: bool | None = None
    any_of_types: tuple[str, ...] | None = None
    where: tuple[AttributeTest, ...] = ()
    none_of_types: tuple[str, ...] | None = None
    profile_attribute: AttributeTest | None = None

    @model_validator(mode="after")
    def _one(self) -> ChurnLabel:
        kinds = [
            k
            for k in ("cancels_all_products", "any_of_types", "none_of_types", "profile_attribute")
            if getattr(self, k) not in (None, False)
        ]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of cancels_all_products, any_of_types, none_of_types, "
                f"profile_attribute (got {', '.join(kinds) or 'none'})"
            )
        if self.where and self.any_of_types is None:
            raise ValueError("where: only with any_of_types")
        return self

    @property
    def kind(self) -> str:
        for k in ("any_of_types", "none_of_types", "profile_attribute"):
            if getattr(self, k) is not None:
                return k
        return "cancels_all_products"


class Churn(_Model):
    horizon_days: float = Field(default=30, gt=0)
    population: Literal["active", "with_history", "profiles"] = "active"
    label: ChurnLabel = ChurnLabel(cancels_all_products=True)

    @model_validator(mode="after")
    def _fits(self) -> Churn:
        snapshot = self.label.profile_attribute is not None
        if snapshot != (self.population == "profiles"):
            raise ValueError(
                "population: 'profiles' goes with a profile_attribute label, and only with it"
            )
        return self

    @property
    def horizon(self) -> timedelta:
        return timedelta(days=self.horizon_days)


class Outcome(_Model):
    """What counts as an escalation of a ticket in the label window: any of
    `types`, or an event matching one of `events`; or, with `attribute`, the
    ticket's recorded outcome (an attribute its events carry, such as
    made_sla: false) whatever the window."""

    types: tuple[str, ...] = ESCALATION_DEFAULT
    events: tuple[EventTest, ...] = ()
    attribute: AttributeTest | None = None


class TicketCutoffs(_Model):
    every_hours: float | None = Field(default=None, gt=0)
    after_events: int | None = Field(default=None, ge=1)
    delay_minutes: float = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one(self) -> TicketCutoffs:
        if (self.every_hours is None) == (self.after_events is None):
            raise ValueError("give exactly one of every_hours or after_events")
        return self


class OpenTickets(_Model):
    inactive_days: float | None = Field(default=30, gt=0)
    close_when_customer_left: bool = True


class Escalation(_Model):
    horizon_hours: float = Field(default=72, gt=0)
    outcome: Outcome = Outcome()
    cutoffs: TicketCutoffs = TicketCutoffs(every_hours=48)
    open_tickets: OpenTickets = OpenTickets()

    @property
    def horizon(self) -> timedelta:
        return timedelta(hours=self.horizon_hours)


class CrossSell(_Model):
    horizon_days: float = Field(default=14, gt=0)
    purchase_types: tuple[str, ...] = HOLDING_DEFAULT
    products: Literal["from_data"] | tuple[str, ...] = "from_data"
    prospects: bool = False

    @field_validator("products")
    @classmethod
    def _some(cls, v: Any) -> Any:
        if isinstance(v, tuple) and not v:
            raise ValueError("an empty list: name products or say from_data")
        return v

    @property
    def horizon(self) -> timedelta:
        return timedelta(days=self.horizon_days)


class Cutoffs(_Model):
    every_days: float = Field(default=7, gt=0)
    weeks: int = Field(default=26, ge=1, le=520)
    end: Literal["latest_complete"] | date = "latest_complete"


class SplitRule(_Model):
    method: Literal["auto", "time", "stratified"] = "auto"
    gap: Literal["horizon", "none"] = "horizon"
    # Snapshot (stratified) splits only: evaluate by k-fold cross-validation,
    # pooling every fold's out-of-fold predictions; 1 is one split.
    folds: int = Field(default=1, ge=1, le=20)


class Definitions(_Model):
    version: Literal[1] = 1
    description: str = ""
    churn: Churn = Churn()
    escalation: Escalation = Escalation()
    cross_sell: CrossSell = CrossSell()
    cutoffs: Cutoffs = Cutoffs()
    split: SplitRule = SplitRule()
    # Where the file came from, for messages and the run's record.
    origin: str = Field(default="", exclude=True)

    def horizon(self, prediction: Prediction) -> timedelta:
        part: Churn | Escalation | CrossSell = getattr(self, prediction)
        return part.horizon

    def snapshot(self, prediction: Prediction) -> bool:
        """Whether the prediction's rows are one profile snapshot (no time)."""
        return prediction == "churn" and self.churn.population == "profiles"

    def explicit_end(self) -> datetime | None:
        end = self.cutoffs.end
        if isinstance(end, date):
            return datetime(end.year, end.month, end.day, tzinfo=UTC)
        return None


# --- loading ----------------------------------------------------------------------


def parse_definitions(text: str, origin: str = "<definitions>") -> Definitions:
    """Parses a definitions file, or raises DefinitionError naming, for every
    problem, its line and key."""
    data, root = config_files.parse_yaml(
        text, origin, DefinitionError, expected="churn, escalation, ...", empty={}
    )
    parsed = config_files.validate(
        Definitions, data, root, origin, DefinitionError, aliases={"in_": "in"}
    )
    return parsed.model_copy(update={"origin": origin})


def shipped_definitions() -> dict[str, Traversable]:
    """The definitions shipped with Converge, by name ("default")."""
    return config_files.shipped("converge.models", "definitions")


def load_definitions(ref: str | Path | None = None) -> Definitions:
    """A definitions file by path or by the name of a shipped one (None: the
    built-in `default`)."""
    text, origin = config_files.read(
        "default" if ref is None else ref,
        "converge.models",
        "definitions",
        "definitions",
        DefinitionError,
    )
    return parse_definitions(text, origin)
