"""One transform from features to a model's input, for training and scoring.

An `InputSchema` is learned once, at training time, from the training rows:
the ordered input names, which inputs are categorical, and per categorical
input its categories (values seen at least `min_count` times, the rest
grouped as `OTHER`; at serving, a value never seen maps to `OTHER` too, and a
missing value stays missing). It is stored with every registered model
version (`input_schema.json`), so a version is always fed exactly the inputs,
in the order and with the category codes, it was trained on.

Inputs come from three places, named as training names them:
- the customer's and the ticket's feature values (`{name: float | str}`;
  text values are categorical);
- the profile: `profile_segment`, `profile_plan`, `profile_region`,
  `profile_owner_team` (categorical), `profile_tenure_days` (days from
  `signup_date` to the cutoff) and each custom attribute as
  `profile_attr_<name>` (text categorical, numbers and flags numeric);
- for cross-sell, the candidate product as `candidate_product`.

`matrix(columns)` turns whole columns into the float matrix LightGBM takes
(categories as their integer codes, missing as NaN) without a pandas frame;
`vector(...)` turns one entity's values into one row, the way scoring will.

This module imports nothing from the services or from training: both import
it.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

OTHER = "other"
MIN_COUNT = 20
SCHEMA_FILE = "input_schema.json"
FORMAT = 1
PROFILE_TEXT_FIELDS = ("segment", "plan", "region", "owner_team")
CANDIDATE = "candidate_product"
Value = float | str | None
FloatMatrix = npt.NDArray[np.float64]


def profile_values(
    profile: Mapping[str, Any] | None, cutoff: datetime, exclude: Iterable[str] = ()
) -> dict[str, float | str]:
    """A profile's inputs at `cutoff`. `exclude` names custom attributes that
    are never inputs (one that is a label, such as `churned`)."""
    if profile is None:
        return {}
    skip = set(exclude)
    out: dict[str, float | str] = {}
    for key in PROFILE_TEXT_FIELDS:
        value = profile.get(key)
        if value:
            out[f"profile_{key}"] = str(value)
    signup = profile.get("signup_date")
    if isinstance(signup, datetime):
        out["profile_tenure_days"] = (cutoff - signup) / timedelta(days=1)
    for name, value in (profile.get("attributes") or {}).items():
        if name in skip:
            continue
        if isinstance(value, bool | int | float):
            out[f"profile_attr_{name}"] = float(value)
        elif isinstance(value, str) and value:
            out[f"profile_attr_{name}"] = value
    return out


def entity_values(
    customer_values: Mapping[str, Value],
    ticket_values: Mapping[str, Value] | None,
    profile: Mapping[str, Any] | None,
    at: datetime,
) -> dict[str, Value]:
    """Everything an entity's input row can read at `at`, by input name: the
    customer's and the ticket's feature values and the profile's inputs
    (`InputSchema.rows` picks each model's)."""
    merged: dict[str, Value] = {**customer_values, **(ticket_values or {})}
    merged.update(profile_values(profile, at))
    return merged


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


@dataclass(frozen=True)
class InputSchema:
    """The inputs of one model, in order; `categories[name]` for each
    categorical input (its codes are the positions; `OTHER` is last)."""

    names: tuple[str, ...]
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    min_count: int = MIN_COUNT

    @property
    def categorical(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n in self.categories)

    @classmethod
    def learn(
        cls,
        columns: Mapping[str, Sequence[Value] | npt.NDArray[Any]],
        min_count: int = MIN_COUNT,
        categorical: Iterable[str] = (),
        order: Sequence[str] | None = None,
    ) -> InputSchema:
        """The schema of `columns` (name -> one value per row): a column is
        categorical when it holds text or is named in `categorical`."""
        forced = set(categorical)
        names = tuple(order) if order is not None else tuple(columns)
        categories: dict[str, tuple[str, ...]] = {}
        for name in names:
            values = columns[name]
            array = np.asarray(values)
            if name not in forced and array.dtype.kind in "fiub":
                continue  # numeric through and through
            counts = Counter(str(v) for v in values if v is not None and v == v)
            if name not in forced and not any(_is_text(v) for v in values):
                continue
            kept = sorted(v for v, c in counts.items() if c >= min_count and v != OTHER)
            categories[name] = (*kept, OTHER)
        return cls(names=names, categories=categories, min_count=min_count)

    # --- applying --------------------------------------------------------------------

    def codes(self, name: str, values: Sequence[Value] | npt.NDArray[Any]) -> FloatMatrix:
        """One categorical input's codes (OTHER for values not kept, NaN for
        missing)."""
        levels = self.categories[name]
        index = {level: float(i) for i, level in enumerate(levels)}
        other = index[OTHER]
        return np.fromiter(
            (math.nan if v is None or v != v else index.get(str(v), other) for v in values),
            dtype=np.float64,
            count=len(values),
        )

    def grouped(self, name: str, values: Sequence[Value] | npt.NDArray[Any]) -> list[str | None]:
        """One categorical input's values with the rare and unseen ones as OTHER."""
        kept = set(self.categories[name])
        return [
            None if v is None or v != v else (str(v) if str(v) in kept else OTHER) for v in values
        ]

    def matrix(
        self, columns: Mapping[str, Sequence[Value] | npt.NDArray[Any]], n: int
    ) -> FloatMatrix:
        """The model input for `n` rows: one column per input, in order (an
        absent column is all missing)."""
        out = np.full((n, len(self.names)), np.nan, dtype=np.float64)
        for j, name in enumerate(self.names):
            values = columns.get(name)
            if values is None:
                continue
            if name in self.categories:
                out[:, j] = self.codes(name, values)
            else:
                out[:, j] = np.asarray(
                    [math.nan if v is None else float(v) for v in values]  # type: ignore[arg-type]
                    if not isinstance(values, np.ndarray)
                    else values,
                    dtype=np.float64,
                )
        return out

    def vector(
        self,
        customer_values: Mapping[str, Value],
        ticket_values: Mapping[str, Value] | None,
        profile: Mapping[str, Any] | None,
        at: datetime,
        candidate_product: str = "",
    ) -> FloatMatrix:
        """One row of input for one entity at `at` (the serving side)."""
        return self.rows(
            entity_values(customer_values, ticket_values, profile, at), (candidate_product,)
        )

    def rows(
        self, values: Mapping[str, Value], candidate_products: Sequence[str] = ("",)
    ) -> FloatMatrix:
        """One entity's input, one row per candidate product (`""`: none), from
        its `entity_values`: what `vector` gives for each candidate, with the
        shared values coded once (scoring scores several candidates, and
        several models, of one customer in one call)."""
        # Written for few rows: the columns' machinery of `matrix` costs more
        # than the values here (the same codes and NaNs: test_parity holds it).
        first = np.full((1, len(self.names)), np.nan, dtype=np.float64)
        out = first[0]
        indexes = self._code_indexes
        for j, name in enumerate(self.names):
            value = values.get(name)
            if value is None:
                continue
            index = indexes.get(name)
            if index is None:
                out[j] = float(value)
            elif value == value:  # (NaN: missing)
                out[j] = index.get(str(value), index[OTHER])
        if len(candidate_products) == 1 and not candidate_products[0]:
            return first
        matrix = np.repeat(first, len(candidate_products), axis=0)
        column = self._candidate_column
        if column is not None:
            j, index = column
            for n, product in enumerate(candidate_products):
                if product:  # (else whatever `values` held, as `vector` leaves it)
                    matrix[n, j] = index.get(product, index[OTHER]) if index else float(product)
        return matrix

    @functools.cached_property
    def _candidate_column(self) -> tuple[int, dict[str, float] | None] | None:
        """Where the candidate product goes, and its codes (None: not an input)."""
        if CANDIDATE not in self.names:
            return None
        return self.names.index(CANDIDATE), self._code_indexes.get(CANDIDATE)

    @functools.cached_property
    def _code_indexes(self) -> dict[str, dict[str, float]]:
        """Per categorical input, each category's code (as `codes` numbers them)."""
        return {
            name: {level: float(i) for i, level in enumerate(levels)}
            for name, levels in self.categories.items()
        }

    # --- storing ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "min_count": self.min_count,
            "inputs": [
                {"name": n, "kind": "categorical", "categories": list(self.categories[n])}
                if n in self.categories
                else {"name": n, "kind": "numeric"}
                for n in self.names
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSchema:
        if data.get("format") != FORMAT:
            raise ValueError(
                f"input schema format {data.get('format')!r}; this code reads {FORMAT}"
            )
        inputs = data["inputs"]
        return cls(
            names=tuple(i["name"] for i in inputs),
            categories={
                i["name"]: tuple(i["categories"]) for i in inputs if i["kind"] == "categorical"
            },
            min_count=int(data.get("min_count", MIN_COUNT)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> InputSchema:
        return cls.from_dict(json.loads(text))
