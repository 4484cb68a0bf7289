"""The policy area's rules: reading a policy text, the shipped default, the
book of the active policy every replica follows, and storing and activating
versions. Plain types only (no gRPC, no SQL: those live in servicer.py and
store.py)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import Any

from converge.recommendation.policy.model import ActivePolicy, Policy
from converge.recommendation.policy.store import (
    ANY_ACTIVE,
    ActivationConflict,
    ActivationListener,
    IdempotencyConflict,
    NewVersion,
    PolicyStore,
    StoredVersion,
    text_sha256,
)
from converge.recommendation.policy.validation import (
    PolicyCheck,
    PolicyProblem,
    check_policy_text,
    problems_summary,
)
from converge.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from converge.runtime.tasks import stop_task, wait_event

logger = logging.getLogger(__name__)

# The version name of the shipped default, in effect until a version is activated.
DEFAULT_VERSION = "default"


def violations(problems: tuple[PolicyProblem, ...] | list[PolicyProblem]) -> list[FieldViolation]:
    """Problems as field violations: the path into the policy as the field
    ("yaml" for the text as a whole), the line and column leading the description."""
    return [
        FieldViolation(p.path or "yaml", f"line {p.line}, column {p.column}: {p.message}")
        for p in problems
    ]


def load_policy_text(text: str) -> Policy:
    """The policy a YAML text describes; InvalidArgument naming the path and
    line of every error otherwise (warnings do not refuse it)."""
    checked = check_policy_text(text)
    if checked.policy is None:
        raise InvalidArgument(violations(checked.errors), message=_message(checked.errors))
    return checked.policy


def _message(errors: tuple[PolicyProblem, ...]) -> str:
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid policy: line {first.line}, {first.path or 'the text'}: {first.message}{more}"


def default_policy_text() -> str:
    """The shipped default policy's YAML (policy/default_policy.yaml)."""
    resource = files("converge.recommendation.policy") / "default_policy.yaml"
    return resource.read_text(encoding="utf-8")


@functools.cache
def default_policy() -> ActivePolicy:
    """The shipped default, version "default": what every replica applies
    while no version was ever activated, and after it was activated again."""
    return ActivePolicy(DEFAULT_VERSION, load_policy_text(default_policy_text()))


# --- the book every replica keeps ---------------------------------------------------
class PolicyBook:
    """The active policy in memory (`PolicySource`): what every decision of
    this replica applies, read without I/O.

    It follows activations made on any replica without a restart: each
    activation NOTIFYs the database's channel, which wakes the book at once;
    it also re-reads the active version every `poll_interval_s`, a safety net
    for a notification lost with its connection (the listener is then
    opened again). A replica that starts reads the active version before it
    serves. A stored version this build cannot read (never the case for a
    version it stored itself) is logged and the policy in effect kept."""

    def __init__(self, store: PolicyStore, poll_interval_s: float) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self._active = default_policy()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._listener: ActivationListener | None = None
        self._task: asyncio.Task[None] | None = None

    def active(self) -> ActivePolicy:
        return self._active

    async def start(self) -> None:
        await self.refresh()
        await self._listen()
        self._task = asyncio.create_task(self._follow(), name="policy-book")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        if self._listener is not None:
            await self.store.stop_listening(self._listener)
            self._listener = None

    async def refresh(self) -> ActivePolicy:
        """Reads the active version and switches to it when it changed."""
        async with self._lock:
            version = await self.store.active_version()
            if version is None:
                if self._active.version != DEFAULT_VERSION:
                    logger.info(
                        "policy version %s active (was %s)", DEFAULT_VERSION, self._active.version
                    )
                    self._active = default_policy()
                return self._active
            if str(version) == self._active.version:
                return self._active
            stored = await self.store.get(version)
            if stored is None or stored.yaml is None:  # (a version is never deleted)
                return self._active
            # (Off the event loop: a policy text takes tens of milliseconds
            # to read, and decisions keep being served meanwhile.)
            checked = await asyncio.to_thread(check_policy_text, stored.yaml)
            if checked.policy is None:
                logger.error(
                    "policy version %s cannot be read by this build, keeping version %s: %s",
                    version,
                    self._active.version,
                    problems_summary(checked.errors),
                )
                return self._active
            logger.info("policy version %s active (was %s)", version, self._active.version)
            self._active = ActivePolicy(str(version), checked.policy)
            return self._active

    def _activated(self) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        try:
            self._listener = await self.store.listen(self._activated)
        except Exception:  # (the poll still follows; the next round listens again)
            logger.warning("cannot listen for policy activations, polling", exc_info=True)
            self._listener = None

    async def _follow(self) -> None:
        while True:
            await wait_event(self._wake, self.poll_interval_s)
            self._wake.clear()
            if self._listener is None or self._listener.is_closed():
                if self._listener is not None:
                    await self.store.stop_listening(self._listener)
                await self._listen()
            try:
                await self.refresh()
            except Exception:
                logger.warning("reading the active policy failed, retrying", exc_info=True)


# --- versions -------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyVersionView:
    """A policy version as callers see it: a stored one, or the shipped default."""

    version: str
    # None when left out (ListPolicyVersions with omit_yaml).
    yaml: str | None
    sha256: str
    description: str
    active: bool
    created_by: str
    created_reason: str
    created_at: datetime | None
    activated_at: datetime | None


@dataclass(frozen=True)
class Actor:
    name: str
    reason: str


@dataclass(frozen=True)
class VersionPage:
    versions: list[PolicyVersionView]
    # The version the next page starts below; None on the last page.
    next_before: int | None


@dataclass(frozen=True)
class ActivationResult:
    version: PolicyVersionView
    # "" when the default was in effect.
    previous_version: str


CheckText = Callable[[str], Awaitable[PolicyCheck]]


async def _check_here(text: str) -> PolicyCheck:
    return check_policy_text(text)


class PolicyService:
    """Stored versions: validating, storing, activating (and rolling back),
    reading and listing them, with who and when."""

    def __init__(
        self,
        store: PolicyStore,
        book: PolicyBook,
        *,
        clock: Callable[[], datetime],
        check: CheckText = _check_here,
    ) -> None:
        self.store = store
        self.book = book
        self.clock = clock
        # Where texts are checked: the runtime's CPU executor in the service
        # (a 1 MiB text keeps the event loop busy otherwise).
        self.check = check

    async def validate(self, text: str) -> PolicyCheck:
        return await self.check(text)

    async def get(self, version: str) -> PolicyVersionView:
        """A version by name; "" is the version this replica applies now."""
        if not version:
            version = self.book.active().version
        if version == DEFAULT_VERSION:
            return self._default_view(await self.store.default_activated_at())
        number = _version_number(version)
        stored = None if number is None else await self.store.get(number)
        if stored is None:
            raise NotFound("policy version", version)
        return _view(stored)

    async def page(self, before: int | None, page_size: int, omit_yaml: bool) -> VersionPage:
        rows = await self.store.page(before, page_size + 1, omit_yaml)
        more = len(rows) > page_size
        rows = rows[:page_size]
        return VersionPage([_view(r) for r in rows], rows[-1].version if more else None)

    async def create(
        self, text: str, description: str, idempotency_key: str, actor: Actor
    ) -> tuple[PolicyVersionView, tuple[PolicyProblem, ...]]:
        """Stores a valid text as a new version (not active); InvalidArgument
        naming every error's path and line otherwise. Returns its warnings."""
        checked = await self.check(text)
        if checked.policy is None:
            raise InvalidArgument(violations(checked.errors), message=_message(checked.errors))
        fingerprint = hashlib.sha256(
            "\x00".join((text_sha256(text), description)).encode()
        ).hexdigest()
        try:
            created = await self.store.create(
                NewVersion(
                    yaml=text,
                    description=description,
                    created_by=actor.name,
                    created_reason=actor.reason,
                    created_at=self.clock(),
                    idempotency_key=idempotency_key,
                    request_sha256=fingerprint,
                )
            )
        except IdempotencyConflict:
            raise _key_reused() from None
        if created.new:
            logger.info(
                "policy version %s stored by %s", created.version.version, actor.name or "?"
            )
        return _view(created.version), checked.warnings

    async def activate(
        self, version: str, expected_active: str | None, idempotency_key: str, actor: Actor
    ) -> ActivationResult:
        """Makes a stored version, or the shipped default ("default"), the
        active one on every replica (this one before it answers); rolling
        back is activating an older version, the default being the oldest.
        Activating the active version changes nothing. `expected_active`
        ("default" while the default is in effect) guards against a
        concurrent change: FailedPrecondition when another is active."""
        number: int | None = None
        if version != DEFAULT_VERSION:
            number = _version_number(version)
            if number is None:
                raise NotFound("policy version", version)
            await self._check_stored(number, version)
        expected: Any = ANY_ACTIVE
        if expected_active:
            expected = (
                None if expected_active == DEFAULT_VERSION else _version_number(expected_active)
            )
            if expected is None and expected_active != DEFAULT_VERSION:
                expected = -1  # (names no version: never the active one)
        try:
            activation = await self.store.activate(
                number,
                expected,
                self.clock(),
                actor.name,
                actor.reason,
                idempotency_key,
            )
        except IdempotencyConflict:
            raise _key_reused() from None
        except ActivationConflict as conflict:
            active = DEFAULT_VERSION if conflict.active is None else str(conflict.active)
            raise FailedPrecondition(
                f"the active policy version is {active}, not {expected_active}",
                [("ACTIVE_VERSION", "expected_active_version", f"the active version is {active}")],
            ) from None
        if activation is None:
            raise NotFound("policy version", version)
        if activation.changed:
            logger.info(
                "policy version %s activated by %s (was %s)",
                version,
                actor.name or "?",
                activation.previous or DEFAULT_VERSION,
            )
        # This replica applies it before the caller hears back; the others
        # follow the notification.
        await self.book.refresh()
        previous = "" if activation.previous is None else str(activation.previous)
        if activation.version is None:
            view = self._default_view(await self.store.default_activated_at())
        else:
            view = _view(activation.version)
        return ActivationResult(view, previous)

    async def _check_stored(self, number: int, version: str) -> None:
        """A stored text this build cannot read (a newer build's schema, say)
        is refused and the version in effect keeps serving. Versions never
        change once stored, so checking before the activation's transaction
        (off the event loop) checks what it activates."""
        stored = await self.store.get(number)
        if stored is None or stored.yaml is None:
            raise NotFound("policy version", version)
        checked = await self.check(stored.yaml)
        if checked.policy is None:
            raise FailedPrecondition(
                "the stored version is not valid for this build: "
                + problems_summary(checked.errors),
            )

    def _default_view(self, activated_at: datetime | None) -> PolicyVersionView:
        text = default_policy_text()
        return PolicyVersionView(
            version=DEFAULT_VERSION,
            yaml=text,
            sha256=text_sha256(text),
            description=default_policy().policy.description,
            active=self.book.active().version == DEFAULT_VERSION,
            created_by="",
            created_reason="",
            created_at=None,
            activated_at=activated_at,
        )


def _key_reused() -> InvalidArgument:
    return InvalidArgument(
        [
            FieldViolation(
                "idempotency_key",
                "used before for another request; use a new key for a new request",
            )
        ]
    )


def _version_number(version: str) -> int | None:
    if not version.isascii() or not version.isdigit() or len(version) > 18:
        return None
    number = int(version)
    return number if number > 0 else None


def _view(stored: StoredVersion) -> PolicyVersionView:
    return PolicyVersionView(
        version=str(stored.version),
        yaml=stored.yaml,
        sha256=stored.sha256,
        description=stored.description,
        active=stored.active,
        created_by=stored.created_by,
        created_reason=stored.created_reason,
        created_at=stored.created_at,
        activated_at=stored.activated_at,
    )
