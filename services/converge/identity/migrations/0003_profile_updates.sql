-- Profile history as one row per change of a profile (its fields together as
-- jsonb), not one row per field. Importing a CRM table wrote 22 rows per
-- customer, each with its own index entries, identity value and foreign-key
-- check: 155,000 rows for 7,043 customers, most of an import's time. Reads
-- that want one row per field (as of a time, the current profile, the history
-- and export) read the view `profile_changes` below, which spells it out as
-- before.
--
-- `fields` lists [field, value] pairs in the order the change named them (a
-- jsonb object would sort its keys, and history lists a change's fields in
-- their order); value is JSON null when the field was cleared (a value is
-- always an object, {"s": ...} and the like, never null).
--
-- No foreign key to customers: erasure deletes a customer's history itself in
-- its transaction, after locking the customers (store.delete_customers), and
-- every write of history to an existing customer first holds that customer's
-- row (FOR KEY SHARE), so a history row can never outlive its customer. One
-- lock per customer and statement instead of a trigger per field.
CREATE TABLE profile_updates (
    change_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id   uuid NOT NULL,
    fields        jsonb NOT NULL,
    effective_at  timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    actor         text NOT NULL DEFAULT '',
    merge_id      uuid              -- set for values taken over in a merge
);

-- Every row before keeps its change_id, so a history page token given out
-- before still resumes at the same place.
INSERT INTO profile_updates (change_id, customer_id, fields, effective_at, recorded_at, actor, merge_id)
OVERRIDING SYSTEM VALUE
SELECT change_id, customer_id, jsonb_build_array(jsonb_build_array(field, coalesce(value, 'null'::jsonb))),
       effective_at, recorded_at, actor, merge_id
FROM profile_changes;
SELECT setval(pg_get_serial_sequence('profile_updates', 'change_id'),
              coalesce(max(change_id), 0) + 1, false)
FROM profile_updates;
DROP TABLE profile_changes;

-- As of a time, per customer: latest first. Also erasure's delete by customer.
CREATE INDEX profile_updates_as_of ON profile_updates (customer_id, effective_at DESC, change_id DESC);
-- Unmerge removes a merge's takeovers; imports (merge_id NULL) never pay for it.
CREATE INDEX profile_updates_merge ON profile_updates (merge_id) WHERE merge_id IS NOT NULL;

-- One row per field changed, as the table was before; `position` is a field's
-- place in its change, so pages of the history can stop inside a change.
CREATE VIEW profile_changes AS
SELECT u.change_id, f.position, u.customer_id, f.pair ->> 0 AS field,
       nullif(f.pair -> 1, 'null'::jsonb) AS value,
       u.effective_at, u.recorded_at, u.actor, u.merge_id
FROM profile_updates u
CROSS JOIN LATERAL jsonb_array_elements(u.fields) WITH ORDINALITY AS f(pair, position);
