"""The webhook secret store: secret names (a webhook's `secret_id`) mapped to
one or more Standard Webhooks symmetric secrets (`whsec_` + base64 of 24 to
64 random bytes, as the specification says). Several secrets under one name
are a key rotation: every delivery then carries one signature per secret, and
a receiver holding either one verifies it.

The secrets come from a setting (`CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS`, a
Kubernetes Secret in the chart) and are checked once at start: a value that
is not a `whsec_` secret stops the service with a message naming the secret
(never its value)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, SecretStr
from standardwebhooks import Webhook

PREFIX = "whsec_"
# The specification: "Random. At least 24 bytes (192 bits, 512 maximum)".
MIN_BYTES, MAX_BYTES = 24, 64
EXPECTED = f"'{PREFIX}' followed by the base64 of {MIN_BYTES} to {MAX_BYTES} random bytes"


def secret_problem(value: str) -> str | None:
    """Why `value` is not a Standard Webhooks symmetric secret, or None."""
    if not value.startswith(PREFIX):
        return f"does not start with '{PREFIX}' (expected {EXPECTED})"
    try:
        encoded = value[len(PREFIX) :]
        # (unpadded base64 too, as the reference library reads it)
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return f"is not valid base64 after '{PREFIX}' (expected {EXPECTED})"
    if not MIN_BYTES <= len(key) <= MAX_BYTES:
        return f"holds {len(key)} bytes (expected {EXPECTED})"
    return None


class UnknownSecret(LookupError):
    """A webhook names a secret the store does not hold."""


class SecretStore:
    """Signers by secret name, built once from the checked setting."""

    @classmethod
    def from_setting(cls, setting: Mapping[str, Sequence[SecretStr]]) -> SecretStore:
        return cls(
            {name: [s.get_secret_value() for s in values] for name, values in setting.items()}
        )

    def __init__(self, secrets: Mapping[str, Sequence[str]]) -> None:
        problems = [
            f"webhook secret {name!r} #{index + 1} {problem}"
            for name, values in secrets.items()
            for index, value in enumerate(values)
            if (problem := secret_problem(value)) is not None
        ]
        problems += [
            f"webhook secret {name!r} has no value" for name, v in secrets.items() if not v
        ]
        if problems:
            raise ValueError("; ".join(problems))
        # The package's own Webhook signs: the reference implementation the
        # receivers' verifiers follow.
        self._signers = {
            name: tuple(Webhook(value) for value in values) for name, values in secrets.items()
        }

    def __contains__(self, secret_id: object) -> bool:
        return secret_id in self._signers

    def names(self) -> list[str]:
        return sorted(self._signers)

    def signers(self, secret_id: str) -> tuple[Webhook, ...]:
        """The secrets under `secret_id`, each signing on its own."""
        try:
            return self._signers[secret_id]
        except KeyError:
            raise UnknownSecret(f"no webhook secret named {secret_id!r}") from None


def _one_or_many(value: object) -> object:
    # A single secret may be given bare: {"crm": "whsec_..."}.
    if isinstance(value, dict):
        return {name: [v] if isinstance(v, str) else v for name, v in value.items()}
    return value


def _checked(value: dict[str, list[SecretStr]]) -> dict[str, list[SecretStr]]:
    SecretStore({name: [s.get_secret_value() for s in values] for name, values in value.items()})
    return value


# The setting's type: JSON {"name": ["whsec_...", ...]} (or one bare value per
# name), every value checked at start, none ever printed.
SecretsSetting = Annotated[
    dict[str, list[SecretStr]], BeforeValidator(_one_or_many), AfterValidator(_checked)
]
