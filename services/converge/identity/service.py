"""The identity service's rules: resolve, merge and its protection, unmerge,
profiles with history, contact preferences, erasure and export.

No gRPC here: plain types in and out; domain errors from `converge.runtime.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from converge.identity.domain import (
    Actor,
    AttachedIdentifier,
    BulkOutcome,
    BulkRow,
    BulkSummary,
    Customer,
    ExportPage,
    ExportPosition,
    Idempotency,
    IdentityEvent,
    LockedCustomer,
    Merge,
    PeerErasure,
    PeerExport,
    PreferenceUpdate,
    ProfileChange,
    ProfileFields,
    ResolveResult,
    TaggedValue,
)
from converge.identity.identifiers import IdentifierKind, NormalizedIdentifier
from converge.identity.settings import IdentitySettings, SurvivorPolicy
from converge.identity.store import (
    EVENT_FORGOTTEN,
    FreshCustomer,
    IdentityStore,
    IdentityTransaction,
    RetryableConflict,
)
from converge.runtime.errors import (
    Aborted,
    AlreadyExists,
    ConvergeError,
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidArgument,
    NotFound,
    translate,
)

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
# Rows of a bulk resolve handled per transaction.
BULK_BATCH = 500
# While a batch is written, the next one's reading lets the write go on
# every this many rows (a few milliseconds of checks).
BULK_STEP_ASIDE = 25


def _fingerprint_mismatch(field: str = "idempotency_key") -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, "already used for a different request")])


def violated_field(error: ConvergeError) -> str:
    """The first field an InvalidArgument names ("" for any other error)."""
    return error.violations[0].field if isinstance(error, InvalidArgument) else ""


class Peers(Protocol):
    """The other services asked to erase and export a customer (gRPC clients
    in `peers.py`, built in `app.py`)."""

    @property
    def names(self) -> list[str]: ...

    async def erase(
        self, name: str, customer_ids: Sequence[str], erasure_id: str
    ) -> PeerErasure: ...

    async def export(
        self, name: str, customer_ids: Sequence[str], page_token: str
    ) -> PeerExport: ...


class IdentityService:
    def __init__(self, store: IdentityStore, settings: IdentitySettings, peers: Peers) -> None:
        self.store = store
        self.settings = settings
        self.peers = peers
        self.unique_kinds = {IdentifierKind[name] for name in settings.unique_identifier_types}

    # --- reads ---------------------------------------------------------------
    async def root_of_customer(self, tx: IdentityTransaction, customer_id: str) -> str:
        roots = await tx.roots_of([customer_id])
        if customer_id not in roots:
            raise NotFound("customer", customer_id)
        return roots[customer_id]

    async def root_of_identifier(
        self, tx: IdentityTransaction, identifier: NormalizedIdentifier
    ) -> str:
        roots = await tx.find_roots([identifier])
        if identifier not in roots:
            raise NotFound("customer with identifier", identifier.kind.name)
        return roots[identifier]

    async def _owner_of_identifier(
        self, tx: IdentityTransaction, identifier: NormalizedIdentifier | None
    ) -> str:
        assert identifier is not None
        attached = (await tx.owners([identifier])).get(identifier)
        if attached is None:
            raise NotFound("customer with identifier", identifier.kind.name)
        return attached.customer_id

    async def get_customer(
        self,
        customer_id: str | None,
        identifier: NormalizedIdentifier | None,
        as_of: datetime | None = None,
    ) -> Customer:
        if customer_id is not None and as_of is None:
            # (Recommend's read, on every decision: one statement, one snapshot)
            async with self.store.connection() as tx:
                found = await tx.load_root_customer(customer_id)
            if found is None:
                raise NotFound("customer", customer_id)
            return found
        async with self.store.reading() as tx:
            root = await self._root(tx, customer_id, identifier)
            customer = await tx.load_customer(root, as_of)
        if customer is None:
            raise NotFound("customer", root)
        return customer

    async def _root(
        self,
        tx: IdentityTransaction,
        customer_id: str | None,
        identifier: NormalizedIdentifier | None,
    ) -> str:
        if customer_id is not None:
            return await self.root_of_customer(tx, customer_id)
        assert identifier is not None
        return await self.root_of_identifier(tx, identifier)

    async def batch_get(
        self, customer_ids: Sequence[str], as_of: datetime | None
    ) -> list[Customer | None]:
        async with self.store.reading() as tx:
            roots = await tx.roots_of(customer_ids)
            loaded = await tx.load_customers(sorted(set(roots.values())), as_of)
        return [loaded.get(roots.get(c, "")) for c in customer_ids]

    async def list_customers(
        self,
        after: str,
        limit: int,
        *,
        segment: str,
        plan: str,
        region: str,
        owner_team: str,
        name_prefix: str,
    ) -> tuple[list[Customer], str]:
        async with self.store.reading() as tx:
            ids = await tx.list_customer_ids(
                after, segment, plan, region, owner_team, name_prefix, limit + 1
            )
            more = len(ids) > limit
            ids = ids[:limit]
            customers = [c for c in [await tx.load_customer(i) for i in ids] if c is not None]
        return customers, (ids[-1] if more and ids else "")

    async def list_profile_changes(
        self,
        customer_id: str,
        start: datetime,
        end: datetime,
        after: tuple[int, int],
        limit: int,
    ) -> tuple[list[ProfileChange], tuple[int, int] | None]:
        """A page of field changes after the position `after`, and the position
        the next page starts after (None on the last page)."""
        async with self.store.reading() as tx:
            root = await self.root_of_customer(tx, customer_id)
            rows = await tx.list_profile_changes(root, start, end, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return [change for _, change in rows], (rows[-1][0] if more and rows else None)

    async def list_merges(self, customer_id: str, include_undone: bool) -> list[Merge]:
        async with self.store.reading() as tx:
            root = await self.root_of_customer(tx, customer_id)
            members = await tx.cluster_members(root)
            return await tx.list_merges(members, include_undone)

    # --- writes --------------------------------------------------------------
    async def _run(
        self,
        method: str,
        idempotency: Idempotency | None,
        work: Callable[[IdentityTransaction], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """Runs `work` in a transaction, retrying on races, at most once per idempotency key.

        Returns `work`'s result: small JSON (ids and flags) that is also what a
        repeated request with the same key gets back.
        """
        for _ in range(MAX_ATTEMPTS):
            try:
                async with self.store.transaction() as tx:
                    if idempotency is not None:
                        claimed, prior = await tx.claim_idempotency_key(
                            method, idempotency.key, idempotency.fingerprint
                        )
                        if not claimed:
                            if prior is not None and prior.get("fingerprint_mismatch"):
                                raise _fingerprint_mismatch()
                            assert prior is not None
                            return {**prior, "replayed": True}
                    result = await work(tx)
                    if idempotency is not None:
                        await tx.save_idempotency_result(method, idempotency.key, result)
                    return result
            except RetryableConflict:
                continue
        raise Aborted("too many concurrent changes to the same customers; retry")

    async def create_customer(
        self,
        profile: ProfileFields,
        identifiers: Sequence[NormalizedIdentifier],
        actor: Actor,
        idempotency: Idempotency | None,
    ) -> Customer:
        async def work(tx: IdentityTransaction) -> dict[str, Any]:
            taken = await tx.find_roots(identifiers)
            if taken:
                raise _already_attached(identifiers, taken)
            customer_id = str(uuid.uuid4())
            await tx.insert_customer(customer_id)
            await tx.record_profile_changes(customer_id, dict(profile), None, actor.name)
            try:
                await tx.attach_identifiers(customer_id, identifiers)
            except RetryableConflict:
                raise _already_attached(identifiers, {}) from None
            return {"customer_id": customer_id}

        result = await self._run("CreateCustomer", idempotency, work)
        return await self.get_customer(result["customer_id"], None)

    async def resolve(
        self,
        identifiers: Sequence[NormalizedIdentifier],
        profile: ProfileFields,
        *,
        lookup_only: bool,
        actor: Actor,
        idempotency: Idempotency | None,
        upsert: ProfileFields | None = None,
    ) -> ResolveResult:
        identifiers = sorted(set(identifiers))
        if not upsert:
            # Most calls name a customer that exists with every identifier given:
            # two reads, no transaction, no locks, nothing to write. A merge
            # between the two reads sends the call down the full path.
            async with self.store.connection() as tx:
                owners = await tx.find_roots(identifiers)
                roots = set(owners.values())
                if len(owners) == len(identifiers) and len(roots) == 1:
                    known = await tx.load_customer(roots.pop(), require_root=True)
                    if known is not None:
                        return ResolveResult(known, False, (), ())

        result = await self._resolve_core(
            identifiers, profile, lookup_only, actor, idempotency, upsert
        )
        async with self.store.reading() as tx:
            root = await self.root_of_customer(tx, result["customer_id"])
            customer = await tx.load_customer(root)
            merges = [m for m in [await tx.get_merge(i) for i in result["merge_ids"]] if m]
        assert customer is not None
        return ResolveResult(
            customer=customer,
            created=bool(result["created"]) and not result.get("replayed", False),
            merges=tuple(merges),
            attached=tuple(
                NormalizedIdentifier(IdentifierKind(k), s, v) for k, s, v in result["attached"]
            ),
        )

    async def _resolve_core(
        self,
        identifiers: Sequence[NormalizedIdentifier],
        profile: ProfileFields,
        lookup_only: bool,
        actor: Actor,
        idempotency: Idempotency | None,
        upsert: ProfileFields | None,
        effective_at: datetime | None = None,
    ) -> dict[str, Any]:
        async def work(tx: IdentityTransaction) -> dict[str, Any]:
            return await self._resolve_in(
                tx, identifiers, profile, lookup_only, actor, upsert, effective_at
            )

        return await self._run("Resolve", idempotency, work)

    async def bulk_resolve(
        self, rows: AsyncIterable[tuple[str, BulkRow | InvalidArgument]]
    ) -> BulkSummary:
        """Resolves a stream of rows, BULK_BATCH at a time (see `resolve_batch`).
        Each row comes with its reference, or as why its checks refused it; a
        row refused is listed with its reference and the stream goes on."""
        summary = BulkSummary()

        async def flush(
            batch: list[tuple[str, BulkRow]], refused: list[tuple[str, str, str]]
        ) -> None:
            summary.rejections.extend(refused)
            if not batch:
                return
            outcomes = await self.resolve_batch([row for _, row in batch])
            for (row_ref, _), outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome.error, ConvergeError):
                    # (The service names a row's fields as in ResolveRequest.)
                    field = violated_field(outcome.error)
                    summary.rejections.append(
                        (row_ref, f"resolve.{field}" if field else "", outcome.error.message)
                    )
                    continue
                summary.created += outcome.created
                summary.matched += not outcome.created
                summary.merged += outcome.merges

        # A batch is written while the next one is read and checked, so the
        # database's work and this process's overlap; batches are still
        # written one at a time, in stream order. Reading a message's rows
        # never waits on anything, so it would hold the event loop for the
        # whole message while each of the write's statements, answered long
        # since, waited for it: the reading steps aside every few rows.
        writing: asyncio.Future[None] | None = None
        batch: list[tuple[str, BulkRow]] = []
        refused: list[tuple[str, str, str]] = []
        try:
            async for row_ref, row in rows:
                summary.received += 1
                if summary.received % BULK_STEP_ASIDE == 0 and writing is not None:
                    await asyncio.sleep(0)
                if isinstance(row, InvalidArgument):
                    refused.append((row_ref, violated_field(row), row.message))
                    continue
                batch.append((row_ref, row))
                if len(batch) >= BULK_BATCH:
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(flush(batch, refused))
                    batch, refused = [], []
            if writing is not None:
                await writing
            await flush(batch, refused)
        finally:
            if writing is not None and not writing.done():
                writing.cancel()  # the stream broke off: its batch rolls back
                await asyncio.gather(writing, return_exceptions=True)
        return summary

    async def resolve_batch(self, rows: Sequence[BulkRow]) -> list[BulkOutcome]:
        """Resolves many rows with the effects of resolving them one by one, in
        order, but set-based where it can: rows sent before are answered from
        their saved results in one read; rows that only bring new identifiers
        (the bulk of a first import) are created together, and rows that only
        touch customers known by every identifier (a re-import with changed
        values) are updated together, each group in one transaction. The rest,
        and every row of a group that raced with another writer, go one by one."""
        outcomes = await self._replayed_rows(rows)
        pending = [i for i in range(len(rows)) if i not in outcomes]
        for index in await self._create_fresh_rows(rows, pending):
            outcomes[index] = BulkOutcome(created=True)
        pending = [i for i in pending if i not in outcomes]
        for index in await self._update_known_rows(rows, pending):
            outcomes[index] = BulkOutcome()
        rest = [i for i in range(len(rows)) if i not in outcomes]
        outcomes.update(
            zip(rest, await self.resolve_one_by_one([rows[i] for i in rest]), strict=True)
        )
        return [outcomes[i] for i in range(len(rows))]

    async def resolve_one_by_one(self, rows: Sequence[BulkRow]) -> list[BulkOutcome]:
        """Resolves rows in order, each in a transaction of its own, as
        Resolve would: what `resolve_batch` leaves to it, and what its
        set-based paths must equal."""
        outcomes: list[BulkOutcome] = []
        for row in rows:
            try:
                result = await self._resolve_core(
                    sorted(set(row.identifiers)),
                    row.profile,
                    row.lookup_only,
                    row.actor,
                    row.idempotency,
                    row.upsert,
                    row.effective_at,
                )
            except ConvergeError as error:
                outcomes.append(BulkOutcome(error=error))
                continue
            except Exception as error:
                if translate(error) is not None:
                    raise  # the database is down or raced: the caller resends the whole
                # One row the checks let through and the database refused: that
                # row is rejected, the rest of the stream goes on.
                logger.exception("bulk resolve: a row failed unexpectedly")
                outcomes.append(BulkOutcome(error=InternalError("this row could not be stored")))
                continue
            outcomes.append(
                BulkOutcome(
                    created=bool(result["created"]) and not result.get("replayed", False),
                    merges=len(result["merge_ids"]),
                )
            )
        return outcomes

    async def batch_resolve(
        self, rows: Sequence[BulkRow]
    ) -> list[tuple[BulkOutcome, str, list[AttachedIdentifier]]]:
        """Resolves each row like Resolve; returns per row its outcome, the
        surviving customer and who each of its identifiers belongs to."""
        outcomes = await self.resolve_batch(rows)
        identifiers = sorted({i for row in rows for i in row.identifiers})
        async with self.store.reading() as tx:
            owners = await tx.owners(identifiers)
            roots = await tx.find_roots(identifiers)
        results: list[tuple[BulkOutcome, str, list[AttachedIdentifier]]] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome.error is not None:
                results.append((outcome, "", []))
                continue
            found = [owners[i] for i in row.identifiers if i in owners]
            survivor = next((roots[i] for i in row.identifiers if i in roots), "")
            results.append((outcome, survivor, found))
        return results

    async def _replayed_rows(self, rows: Sequence[BulkRow]) -> dict[int, BulkOutcome]:
        """The rows whose idempotency key a finished request already used: its
        result again (a re-run of an import), or the refusal of a key reused
        for other content, as `_run` answers them one by one."""
        keys = {row.idempotency.key for row in rows if row.idempotency is not None}
        if not keys:
            return {}
        async with self.store.connection() as tx:
            saved = await tx.saved_results("Resolve", sorted(keys))
        outcomes: dict[int, BulkOutcome] = {}
        for index, row in enumerate(rows):
            if row.idempotency is None or row.idempotency.key not in saved:
                continue
            fingerprint, result = saved[row.idempotency.key]
            if fingerprint != row.idempotency.fingerprint:
                outcomes[index] = BulkOutcome(error=_fingerprint_mismatch())
            elif result is not None:  # (None: still running; one by one waits for it)
                outcomes[index] = BulkOutcome(merges=len(result["merge_ids"]))
        return outcomes

    async def _create_fresh_rows(self, rows: Sequence[BulkRow], pending: Sequence[int]) -> set[int]:
        """Creates, in one transaction, the pending rows none of whose
        identifiers is known or shared with another pending row; returns their
        indexes."""
        # A key given to two rows of the batch is a replay or a refusal, decided
        # one by one; here both would be created under it.
        key_uses = _key_uses(rows, pending)
        owner_row: dict[NormalizedIdentifier, int] = {}
        for index in pending:
            for identifier in rows[index].identifiers:
                shared = owner_row.get(identifier, index) != index
                owner_row[identifier] = -1 if shared else index
        candidates = [
            i
            for i in pending
            if not (row := rows[i]).lookup_only
            and all(owner_row[x] == i for x in row.identifiers)
            and (row.idempotency is None or key_uses[row.idempotency.key] == 1)
        ]
        # The merge protection a new customer meets one by one: a row it
        # refuses goes there, to be refused with the reason.
        candidates = [i for i in candidates if self._unique_kinds_hold(rows[i].identifiers)]
        if len(candidates) < 2:
            return set()
        fresh: list[FreshCustomer] = []
        for i in candidates:
            row = rows[i]
            customer_id = uuid.uuid4()
            key = row.idempotency
            fresh.append(
                FreshCustomer(
                    customer_id,
                    sorted(set(row.identifiers)),
                    {**row.profile, **(row.upsert or {})},
                    row.effective_at,
                    None if key is None else key.key,
                    None if key is None else key.fingerprint,
                    None
                    if key is None
                    else _resolve_result(str(customer_id), True, [], row.identifiers),
                )
            )
        actors = {rows[i].actor.name for i in candidates}
        try:
            async with self.store.transaction() as tx:
                # Rows with a known identifier, or whose key another request
                # holds (a re-run it replays), are left to one by one.
                created = await tx.insert_fresh_customers(
                    fresh, actors.pop() if len(actors) == 1 else "bulk"
                )
        except RetryableConflict:
            return set()  # raced with another writer: one by one
        except Exception as error:
            if translate(error) is not None:
                raise
            return set()  # a row the database refuses: one by one finds which
        return {candidates[position] for position in created}

    async def _update_known_rows(self, rows: Sequence[BulkRow], pending: Sequence[int]) -> set[int]:
        """Resolves, in one transaction, the pending rows all of whose
        identifiers belong to one customer already (nothing to attach, nothing
        to merge): their profile upserts in row order, then their results
        saved. A customer that another pending row also names is left to the
        one-by-one path with all its rows, so every customer's changes keep
        the rows' order. Returns the indexes done."""
        key_uses = _key_uses(rows, pending)
        candidates = [
            i
            for i in pending
            if not rows[i].lookup_only
            and ((key := rows[i].idempotency) is None or key_uses[key.key] == 1)
        ]
        if not candidates:
            return set()
        try:
            async with self.store.transaction() as tx:
                roots = await tx.find_roots(
                    sorted({x for i in pending for x in rows[i].identifiers})
                )
                chosen: dict[int, str] = {}
                for i in candidates:
                    found = {roots.get(x) for x in rows[i].identifiers}
                    if len(found) == 1 and (root := found.pop()) is not None:
                        chosen[i] = root
                others = {
                    roots[x]
                    for i in pending
                    if i not in chosen
                    for x in rows[i].identifiers
                    if x in roots
                }
                # The merge protection a row would meet one by one: such a
                # customer's rows are refused there, with the reason.
                clusters = await tx.cluster_identifiers(set(chosen.values()), self.unique_kinds)
                for root, identifiers in clusters.items():
                    try:
                        self._check_unique_kinds({root: identifiers})
                    except FailedPrecondition:
                        others.add(root)
                chosen = {i: root for i, root in chosen.items() if root not in others}
                if not chosen:
                    return set()
                locked = await tx.lock_customers(chosen.values())
                if len(locked) != len(set(chosen.values())) or any(
                    c.merged_into is not None for c in locked.values()
                ):
                    raise RetryableConflict()  # merged or erased since we looked
                keys = {i: key for i in chosen if (key := rows[i].idempotency) is not None}
                claimed = await tx.claim_idempotency_keys(
                    "Resolve",
                    [k.key for k in keys.values()],
                    [k.fingerprint for k in keys.values()],
                    [_resolve_result(chosen[i], False, [], []) for i in keys],
                )
                if len(claimed) != len(keys):
                    raise RetryableConflict()  # a concurrent request took a key
                await tx.update_known_profiles(
                    [
                        (root, rows[i].upsert or {}, rows[i].effective_at, rows[i].actor.name)
                        for i, root in sorted(chosen.items())
                    ]
                )
        except (RetryableConflict, FailedPrecondition):
            return set()  # raced with another writer: one by one
        except Exception as error:
            if translate(error) is not None:
                raise
            return set()  # a row the database refuses: one by one finds which
        return set(chosen)

    async def _resolve_in(
        self,
        tx: IdentityTransaction,
        identifiers: Sequence[NormalizedIdentifier],
        profile: ProfileFields,
        lookup_only: bool,
        actor: Actor,
        upsert: ProfileFields | None,
        effective_at: datetime | None = None,
    ) -> dict[str, Any]:
        owners = await tx.find_roots(identifiers)
        new = [i for i in identifiers if i not in owners]
        roots = sorted(set(owners.values()))
        if not roots:
            if lookup_only:
                raise NotFound(
                    "customer with identifiers", ", ".join(i.kind.name for i in identifiers)
                )
            self._check_unique_kinds({"new": list(identifiers)})
            customer_id = str(uuid.uuid4())
            await tx.insert_customer(customer_id)
            await tx.record_profile_changes(
                customer_id, {**profile, **(upsert or {})}, effective_at, actor.name
            )
            await tx.attach_identifiers(customer_id, identifiers)
            return _resolve_result(customer_id, True, [], identifiers)
        if lookup_only and len(roots) > 1:
            raise FailedPrecondition(
                "the identifiers belong to different customers",
                [("IDENTIFIERS_SPLIT", "identifiers", f"{len(roots)} customers match")],
            )

        locked = await tx.lock_customers(roots)
        if len(locked) != len(roots) or any(r.merged_into is not None for r in locked.values()):
            raise RetryableConflict()  # merged or erased since we looked: look again
        clusters = {root: await tx.cluster_members(root) for root in roots}
        cluster_identifiers = {
            root: await tx.identifiers_of(members) for root, members in clusters.items()
        }
        survivor = self._pick_survivor(locked)
        if lookup_only:
            return _resolve_result(survivor, False, [], [])
        self._check_unique_kinds({**cluster_identifiers, "new": new})
        if len(roots) > 1 and not self.settings.auto_merge:
            raise FailedPrecondition(
                "the identifiers belong to different customers and automatic merging is off",
                [("MERGE_DISABLED", "identifiers", f"{len(roots)} customers match")],
            )
        merge_ids = []
        for other in roots:
            if other == survivor:
                continue
            joining = [i for i in identifiers if owners.get(i) in (other, survivor)]
            merge = await self._merge(
                tx, survivor, other, joining, Actor(actor.name or "resolve", actor.reason)
            )
            merge_ids.append(merge.merge_id)
        await tx.attach_identifiers(await self._home_of_new(tx, survivor, owners), new)
        if upsert:
            await tx.record_profile_changes(survivor, dict(upsert), effective_at, actor.name)
        return _resolve_result(survivor, False, merge_ids, new)

    async def _home_of_new(
        self, tx: IdentityTransaction, survivor: str, known: dict[NormalizedIdentifier, str]
    ) -> str:
        """The customer that new identifiers of a resolve are attached to: the
        one customer its known identifiers are attached to, even when that one
        is merged into another, so that an unmerge gives them back with it (a
        call matched by a merged-away person's phone brings that person's new
        email). Identifiers of several customers (the resolve that joins them)
        make the new ones the survivor's."""
        attached = await tx.owners(list(known))
        owners = {a.customer_id for a in attached.values()}
        return owners.pop() if len(owners) == 1 else survivor

    def _pick_survivor(self, locked: dict[str, LockedCustomer]) -> str:
        ordered = sorted(locked.values(), key=lambda r: (r.created_at, r.customer_id))
        chosen = (
            ordered[0] if self.settings.merge_survivor is SurvivorPolicy.OLDEST else ordered[-1]
        )
        return chosen.customer_id

    def _unique_kinds_hold(self, identifiers: Sequence[NormalizedIdentifier]) -> bool:
        """Whether one new customer with these identifiers passes the merge
        protection (`_check_unique_kinds` without the error)."""
        seen: dict[tuple[IdentifierKind, str], str] = {}
        for identifier in identifiers:
            if identifier.kind in self.unique_kinds:
                value = seen.setdefault((identifier.kind, identifier.source), identifier.value)
                if value != identifier.value:
                    return False
        return True

    def _check_unique_kinds(self, groups: dict[str, list[NormalizedIdentifier]]) -> None:
        """Merge protection: no customer may end up with two values of a unique kind."""
        values: dict[tuple[IdentifierKind, str], set[str]] = {}
        for identifiers in groups.values():
            for identifier in identifiers:
                if identifier.kind in self.unique_kinds:
                    values.setdefault((identifier.kind, identifier.source), set()).add(
                        identifier.value
                    )
        conflicts = [(kind, source) for (kind, source), found in values.items() if len(found) > 1]
        if conflicts:
            raise FailedPrecondition(
                "refusing to join customers with conflicting identifiers of a unique kind: "
                + ", ".join(kind.name for kind, _ in conflicts),
                [
                    (
                        "CONFLICTING_UNIQUE_IDENTIFIER",
                        f"{kind.name}{'/' + source if source else ''}",
                        "the customers carry different values",
                    )
                    for kind, source in conflicts
                ],
            )

    async def _merge(
        self,
        tx: IdentityTransaction,
        survivor: str,
        merged: str,
        joining: Sequence[NormalizedIdentifier],
        actor: Actor,
    ) -> Merge:
        merge = await tx.insert_merge(
            survivor, merged, joining, actor.name, actor.reason, self.settings.merge_survivor.value
        )
        # Policy "fill missing": the survivor keeps its own values and takes the
        # merged customer's for fields it lacks; unmerge removes exactly those.
        survivor_profile = await tx.current_profile(survivor)
        merged_profile = await tx.current_profile(merged)
        taken = {k: v for k, v in merged_profile.items() if k not in survivor_profile}
        await tx.record_profile_changes(
            survivor, taken, None, f"merge:{merge.merge_id}", merge.merge_id
        )
        return merge

    async def merge_customers(
        self, surviving_id: str, merged_id: str, actor: Actor, idempotency: Idempotency | None
    ) -> tuple[Merge, Customer]:
        async def work(tx: IdentityTransaction) -> dict[str, Any]:
            survivor = await self.root_of_customer(tx, surviving_id)
            merged = await self.root_of_customer(tx, merged_id)
            if survivor == merged:
                raise FailedPrecondition(
                    "the customers are already one",
                    [("ALREADY_MERGED", f"customers/{merged_id}", f"part of {survivor}")],
                )
            locked = await tx.lock_customers([survivor, merged])
            if any(r.merged_into is not None for r in locked.values()):
                raise RetryableConflict()
            groups = {
                c: await tx.identifiers_of(await tx.cluster_members(c)) for c in (survivor, merged)
            }
            self._check_unique_kinds(groups)
            merge = await self._merge(
                tx, survivor, merged, [], Actor(actor.name or "manual", actor.reason)
            )
            return {"merge_id": merge.merge_id, "customer_id": survivor}

        result = await self._run("MergeCustomers", idempotency, work)
        async with self.store.reading() as tx:
            merge = await tx.get_merge(result["merge_id"])
            customer = await tx.load_customer(
                await self.root_of_customer(tx, result["customer_id"])
            )
        assert merge is not None and customer is not None
        return merge, customer

    async def unmerge(self, merge_id: str, actor: Actor) -> tuple[Merge, Customer, Customer]:
        async def work(tx: IdentityTransaction) -> dict[str, Any]:
            merge = await tx.merge_for_update(merge_id)
            if merge is None:
                raise NotFound("merge", merge_id)
            if merge.unmerged_at is None:
                await tx.lock_customers([merge.surviving_customer_id, merge.merged_customer_id])
                await tx.undo_merge(merge, actor.name)
            return {"merge_id": merge_id}

        await self._run("UnmergeCustomers", None, work)
        async with self.store.reading() as tx:
            merge = await tx.get_merge(merge_id)
            assert merge is not None
            survivor = await tx.load_customer(
                await self.root_of_customer(tx, merge.surviving_customer_id)
            )
            restored = await tx.load_customer(
                await self.root_of_customer(tx, merge.merged_customer_id)
            )
        assert survivor is not None and restored is not None
        return merge, survivor, restored

    async def update_customer(
        self,
        customer_id: str,
        changes: dict[str, TaggedValue | None],
        effective_at: datetime | None,
        actor: Actor,
        idempotency: Idempotency | None,
    ) -> Customer:
        async def work(tx: IdentityTransaction) -> dict[str, Any]:
            root = await self.root_of_customer(tx, customer_id)
            await tx.lock_customers([root])
            await tx.record_profile_changes(root, changes, effective_at, actor.name)
            return {"customer_id": root}

        result = await self._run("UpdateCustomer", idempotency, work)
        return await self.get_customer(result["customer_id"], None)

    async def remove_identifier(self, identifier: NormalizedIdentifier, actor: Actor) -> Customer:
        async def work(tx: IdentityTransaction) -> dict[str, Any]:
            root = await self.root_of_identifier(tx, identifier)
            await tx.detach_identifier(identifier)  # announced as IDENTIFIER_REMOVED
            return {"customer_id": root}

        result = await self._run("RemoveIdentifier", None, work)
        logger.info("identifier of kind %s removed by %s", identifier.kind.name, actor.name)
        return await self.get_customer(result["customer_id"], None)

    async def update_preferences(
        self,
        customer_id: str | None,
        identifier: NormalizedIdentifier | None,
        update: PreferenceUpdate,
        actor: Actor,
        idempotency: Idempotency | None,
    ) -> Customer:
        async def work(tx: IdentityTransaction) -> dict[str, Any]:
            root = await self._root(tx, customer_id, identifier)
            # Kept on the customer named (not its survivor), so that an unmerge
            # gives a merged-away person their own consents back; reads combine
            # the latest of every customer merged together.
            named = customer_id or await self._owner_of_identifier(tx, identifier)
            now = datetime.now(UTC)
            await tx.update_preferences(
                named,
                update.do_not_contact,
                update.preferred_channel,
                update.wants_human,
                [(c, s, at or now, src) for c, s, at, src in update.consents],
                actor.name,
            )
            return {"customer_id": root}

        result = await self._run("UpdateContactPreferences", idempotency, work)
        return await self.get_customer(result["customer_id"], None)

    # --- events ---------------------------------------------------------------
    async def events(
        self, cursor: tuple[int, int], follow: bool
    ) -> AsyncGenerator[IdentityEvent, None]:
        """The outbox's events after `cursor`, in stream order; with `follow`,
        then every new one as it commits, until the caller stops."""
        while True:
            events = await self.store.events_after(cursor, 500)
            for event in events:
                cursor = (event.xid, event.event_id)
                yield event
            if not events and not follow:
                return
            if not events:
                await asyncio.sleep(0.2)

    # --- privacy -------------------------------------------------------------
    async def forget(
        self,
        customer_id: str | None,
        identifier: NormalizedIdentifier | None,
        actor: Actor,
        idempotency: Idempotency | None,
    ) -> tuple[str, list[PeerErasure], bool, datetime]:
        """Erases the customer everywhere. Identity's own data goes last, and
        only when every other service confirmed, so a failed erasure can be
        retried: identity still knows which ids to erase."""
        if idempotency is not None:
            async with self.store.transaction() as tx:
                claimed, prior = await tx.claim_idempotency_key(
                    "ForgetCustomer", idempotency.key, idempotency.fingerprint
                )
                if prior is not None and prior.get("fingerprint_mismatch"):
                    # A key bound to another erasure: never erase someone else.
                    raise _fingerprint_mismatch()
                if not claimed and prior and prior.get("complete"):
                    return (
                        prior["erasure_id"],
                        [PeerErasure(**p) for p in prior["services"]],
                        True,
                        datetime.fromisoformat(prior["erased_at"]),
                    )
                # An unfinished earlier attempt is retried in full below.
        async with self.store.reading() as tx:
            root = await self._root(tx, customer_id, identifier)
            members = await tx.cluster_members(root)
        erasure_id = str(uuid.uuid4())
        outcomes = [await self.peers.erase(peer, members, erasure_id) for peer in self.peers.names]
        complete = all(o.done for o in outcomes)
        erased_at = datetime.now(UTC)
        async with self.store.transaction() as tx:
            erased = 0
            if complete:
                erased = await tx.delete_customers(members)
                for member in members:
                    await tx.record_event(EVENT_FORGOTTEN, member)
            identity = PeerErasure(
                "identity",
                complete,
                {"customers": erased},
                "" if complete else "waiting for the other services to confirm",
            )
            outcomes = [identity, *outcomes]
            services = [o.__dict__ for o in outcomes]
            await tx.record_erasure(
                erasure_id, actor.name, actor.reason, len(members), services, complete
            )
            if idempotency is not None:
                await tx.save_erasure_result(
                    idempotency.key,
                    idempotency.fingerprint,
                    {
                        "erasure_id": erasure_id,
                        "services": services,
                        "complete": complete,
                        "erased_at": erased_at.isoformat(),
                    },
                )
        logger.info("erasure %s complete=%s (%d ids)", erasure_id, complete, len(members))
        return erasure_id, outcomes, complete, erased_at

    async def export(
        self,
        customer_id: str | None,
        identifier: NormalizedIdentifier | None,
        position: ExportPosition | None,
    ) -> ExportPage:
        """One page of everything the platform holds on a customer: identity's
        own part first, then each other service's pages in name order (a
        stable order, so a position means the same on every replica). A
        service that cannot be asked is listed as unavailable and skipped, as
        on the first page: the export goes on and says what it lacks."""
        async with self.store.reading() as tx:
            root = await self._root(tx, customer_id, identifier)
            members = await tx.cluster_members(root)
            customer = None
            changes: list[ProfileChange] = []
            merges: list[Merge] = []
            if position is None:
                customer = await tx.load_customer(root)
                assert customer is not None
                for member in members:
                    rows = await tx.list_profile_changes(
                        member,
                        datetime.min.replace(tzinfo=UTC),
                        datetime.max.replace(tzinfo=UTC),
                        (0, 0),
                        1_000_000,
                    )
                    changes.extend(change for _, change in rows)
                merges = await tx.list_merges(members, True)
        names = sorted(self.peers.names)
        first, token = 0, ""
        if position is not None:
            # A token of another customer's export, or one begun before this
            # customer was merged into another, would mix two people's data.
            if position.customer_id != root or position.service not in names:
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "page_token",
                            "not a page of this customer's export (or it changed since): "
                            "start again without a token",
                        )
                    ]
                )
            first, token = names.index(position.service), position.service_token
        unavailable: list[str] = []
        for index in range(first, len(names)):
            outcome = await self.peers.export(names[index], members, token)
            if not outcome.done:
                unavailable.append(names[index])
                token = ""
                continue
            following = None
            if outcome.next_token:
                following = ExportPosition(root, names[index], outcome.next_token)
            elif index + 1 < len(names):
                following = ExportPosition(root, names[index + 1], "")
            return ExportPage(customer, changes, merges, [outcome.page], unavailable, following)
        return ExportPage(customer, changes, merges, [], unavailable, None)


def _resolve_result(
    customer_id: str, created: bool, merge_ids: list[str], attached: Sequence[NormalizedIdentifier]
) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "created": created,
        "merge_ids": merge_ids,
        "attached": [[int(i.kind), i.source, i.value] for i in attached],
    }


def _key_uses(rows: Sequence[BulkRow], indexes: Sequence[int]) -> Counter[str]:
    """How many of the rows at `indexes` carry each idempotency key."""
    return Counter(key.key for i in indexes if (key := rows[i].idempotency) is not None)


def _already_attached(
    identifiers: Sequence[NormalizedIdentifier], taken: dict[NormalizedIdentifier, str]
) -> AlreadyExists:
    kinds = ", ".join(sorted({i.kind.name for i in (taken or identifiers)}))
    return AlreadyExists(f"identifiers already belong to another customer: {kinds}")
