-- The identity service's schema: customers, their identifiers, the history of
-- their profiles and contact preferences, merges, erasures, and the outbox of
-- identity events other services follow.

CREATE TABLE customers (
    customer_id  uuid PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- Set while this customer is merged into another; lookups follow it.
    merged_into  uuid REFERENCES customers (customer_id),
    -- Current profile, derived from profile_changes (latest effective value per field).
    profile      jsonb NOT NULL DEFAULT '{}'::jsonb,
    CHECK (merged_into IS DISTINCT FROM customer_id)
);
CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;
CREATE INDEX customers_segment ON customers ((profile -> 'segment' ->> 's'));
CREATE INDEX customers_owner_team ON customers ((profile -> 'owner_team' ->> 's'));

-- The primary key makes "one identifier, one customer" a database fact: many
-- concurrent Resolve calls with the same new identifier create one customer.
CREATE TABLE identifiers (
    kind         smallint NOT NULL,
    source       text NOT NULL DEFAULT '',
    value        text NOT NULL,
    customer_id  uuid NOT NULL REFERENCES customers (customer_id) ON DELETE CASCADE,
    attached_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, source, value)
);
CREATE INDEX identifiers_customer ON identifiers (customer_id);

-- Every change of a profile field, kept so a profile can be read as of any time.
CREATE TABLE profile_changes (
    change_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id   uuid NOT NULL REFERENCES customers (customer_id) ON DELETE CASCADE,
    field         text NOT NULL,
    value         jsonb,            -- NULL: the field was cleared
    effective_at  timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    actor         text NOT NULL DEFAULT '',
    merge_id      uuid              -- set for values taken over in a merge
);
CREATE INDEX profile_changes_as_of ON profile_changes (customer_id, field, effective_at DESC, change_id DESC);

CREATE TABLE merges (
    merge_id               uuid PRIMARY KEY,
    surviving_customer_id  uuid NOT NULL REFERENCES customers (customer_id) ON DELETE CASCADE,
    merged_customer_id     uuid NOT NULL REFERENCES customers (customer_id) ON DELETE CASCADE,
    joining_identifiers    jsonb NOT NULL DEFAULT '[]'::jsonb,
    actor                  text NOT NULL DEFAULT '',
    reason                 text NOT NULL DEFAULT '',
    policy                 text NOT NULL DEFAULT '',
    merged_at              timestamptz NOT NULL DEFAULT now(),
    unmerged_at            timestamptz,
    unmerged_by            text
);
CREATE INDEX merges_surviving ON merges (surviving_customer_id);
CREATE INDEX merges_merged ON merges (merged_customer_id);

CREATE TABLE contact_preferences (
    customer_id        uuid PRIMARY KEY REFERENCES customers (customer_id) ON DELETE CASCADE,
    do_not_contact     boolean NOT NULL DEFAULT false,
    preferred_channel  smallint NOT NULL DEFAULT 0,
    wants_human        boolean NOT NULL DEFAULT false,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE consents (
    customer_id  uuid NOT NULL REFERENCES customers (customer_id) ON DELETE CASCADE,
    channel      smallint NOT NULL,
    status       smallint NOT NULL,
    updated_at   timestamptz NOT NULL,
    source       text NOT NULL DEFAULT '',
    PRIMARY KEY (customer_id, channel)
);

-- Every consent or preference change, for audit ("who allowed what, when").
CREATE TABLE preference_changes (
    change_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id  uuid NOT NULL REFERENCES customers (customer_id) ON DELETE CASCADE,
    field        text NOT NULL,
    value        jsonb NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    source       text NOT NULL DEFAULT '',
    actor        text NOT NULL DEFAULT ''
);
CREATE INDEX preference_changes_customer ON preference_changes (customer_id, change_id);

-- Erasures are recorded without personal data: ids are random, not derived
-- from the person, and the customer ids erased are not kept.
CREATE TABLE erasures (
    erasure_id   uuid PRIMARY KEY,
    erased_at    timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL DEFAULT '',
    reason       text NOT NULL DEFAULT '',
    customers    integer NOT NULL,
    services     jsonb NOT NULL DEFAULT '[]'::jsonb,
    complete     boolean NOT NULL DEFAULT false
);

-- Outbox of identity events, written in the same transaction as the change.
CREATE TABLE identity_events (
    event_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type         smallint NOT NULL,
    customer_id        uuid NOT NULL,
    other_customer_id  uuid,
    merge_id           uuid,
    occurred_at        timestamptz NOT NULL DEFAULT now()
);

-- Idempotency keys: a repeated request finds its first result here and has no
-- second effect. Claimed in the same transaction as the effect.
CREATE TABLE idempotency_keys (
    method       text NOT NULL,
    key          text NOT NULL,
    fingerprint  bytea NOT NULL,
    result       jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (method, key)
);
