"""Identifier normalisation: the same person must match however a source wrote them.

Emails go through `email-validator` (syntax per RFC 5322/6531, no DNS) and are
then case-folded; phone numbers through `phonenumbers` (Google's libphonenumber)
to E.164. Neither is hand-written: both are maintained for exactly this job.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import IntEnum

import phonenumbers
from email_validator import EmailNotValidError, validate_email

MAX_IDENTIFIER_LENGTH = 256
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class IdentifierKind(IntEnum):
    """Mirrors `converge.v1.IdentifierType`; the numbers are the wire values."""

    EMAIL = 1
    PHONE = 2
    CRM_ID = 3
    SERVICE_DESK_USER_ID = 4
    DEVICE_ID = 5
    SOCIAL_HANDLE = 6
    EXTERNAL_ID = 7


# (A dict lookup: calling the enum costs more than the rest of a CRM id's checks.)
_KINDS: dict[int, IdentifierKind] = {kind.value: kind for kind in IdentifierKind}
_NEEDS_SOURCE = {IdentifierKind.SOCIAL_HANDLE, IdentifierKind.EXTERNAL_ID}


@dataclass(frozen=True, order=True)
class NormalizedIdentifier:
    """An identifier in the form it is stored and matched in."""

    kind: IdentifierKind
    source: str
    value: str


class IdentifierError(ValueError):
    """Why an identifier cannot be used; `part` is "type", "value" or "source"."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


def normalize(
    kind_number: int, value: str, source: str = "", *, default_phone_region: str | None = None
) -> NormalizedIdentifier:
    """Validates and normalises one identifier, or raises IdentifierError."""
    kind = _KINDS.get(kind_number)
    if kind is None:
        raise IdentifierError("type", f"unknown identifier type {kind_number}")
    value = value.strip()
    if not value:
        raise IdentifierError("value", "must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise IdentifierError("value", f"longer than {MAX_IDENTIFIER_LENGTH} characters")
    if _CONTROL.search(value):
        raise IdentifierError("value", "contains control characters")

    normalized_source = ""
    if kind in _NEEDS_SOURCE:
        normalized_source = source.strip().lower()
        if not _SOURCE.match(normalized_source):
            raise IdentifierError(
                "source", "required for this type: 1-64 of a-z, 0-9, '_', '.', '-'"
            )

    if kind is IdentifierKind.EMAIL:
        value = _normalize_email(value)
    elif kind is IdentifierKind.PHONE:
        value = _normalize_phone(value, default_phone_region)
    elif kind is IdentifierKind.SOCIAL_HANDLE:
        value = value.removeprefix("@").casefold()
        if not value:
            raise IdentifierError("value", "must not be empty")
    elif kind is IdentifierKind.DEVICE_ID:
        value = value.lower()
    return NormalizedIdentifier(kind, normalized_source, value)


# Both parsers are costly (tens of microseconds); the same raw value is
# normalised once while it is recent (re-imports, a file's repeated contacts).
# Only results are cached: a refused value raises again each time.
@functools.lru_cache(maxsize=16384)
def _normalize_email(value: str) -> str:
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as error:
        raise IdentifierError("value", f"not a valid email address: {error}") from None
    return checked.normalized.casefold()


@functools.lru_cache(maxsize=16384)
def _normalize_phone(value: str, default_region: str | None) -> str:
    try:
        number = phonenumbers.parse(value, default_region)
    except phonenumbers.NumberParseException as error:
        hint = "" if default_region else " (write it with +country code)"
        raise IdentifierError("value", f"not a phone number: {error}{hint}") from None
    if not phonenumbers.is_valid_number(number):
        raise IdentifierError("value", "not a valid phone number for its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
