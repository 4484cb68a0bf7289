-- The interactions service's schema: every interaction once, the live feature
-- state per customer, custom interaction types, the merges followed from the
-- identity service, and where that following stands.

CREATE TABLE interactions (
    -- Stored order: the change stream's cursor. Ingest transactions commit in
    -- this order (they take a transaction-level advisory lock first), so a
    -- reader never sees seq n+1 before seq n.
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    interaction_id   uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    -- The customer the interaction came with: the owner of its identifier, or
    -- the id given. Never rewritten: merges are followed in customer_links.
    customer_id      uuid NOT NULL,
    occurred_at      timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    channel          smallint NOT NULL,
    type             text NOT NULL,
    attributes       jsonb NOT NULL DEFAULT '{}'::jsonb,
    ticket_id        text NOT NULL DEFAULT '',
    product_id       text NOT NULL DEFAULT '',
    amount           numeric,
    currency         text NOT NULL DEFAULT '',
    sentiment        double precision,
    source           text NOT NULL,
    idempotency_key  text NOT NULL,
    identifier       jsonb,
    UNIQUE (source, idempotency_key)
);
CREATE INDEX interactions_timeline ON interactions (customer_id, occurred_at DESC, seq DESC);
CREATE INDEX interactions_ticket ON interactions (ticket_id) WHERE ticket_id <> '';
CREATE INDEX interactions_occurred ON interactions (occurred_at);

-- Live feature state per customer (see features.CustomerState), updated in the
-- same transaction as the interactions it folds in.
CREATE TABLE customer_state (
    customer_id  uuid PRIMARY KEY,
    state        jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE interaction_types (
    name        text PRIMARY KEY,
    spec        jsonb NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Merges as the identity service reports them: reads of a surviving customer
-- include the customers merged into it.
CREATE TABLE customer_links (
    merged_customer_id     uuid PRIMARY KEY,
    surviving_customer_id  uuid NOT NULL,
    merge_id               uuid NOT NULL
);
CREATE INDEX customer_links_surviving ON customer_links (surviving_customer_id);

CREATE TABLE identity_sync (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cursor         text NOT NULL,
    last_event_at  timestamptz,
    applied_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE idempotency_keys (
    method       text NOT NULL,
    key          text NOT NULL,
    fingerprint  bytea NOT NULL,
    result       jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (method, key)
);
