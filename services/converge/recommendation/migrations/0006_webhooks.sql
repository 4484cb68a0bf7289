-- Webhooks (Standard Webhooks, issue 16 item 3): the registered endpoints and
-- one delivery per (alert event, webhook), written by the alerts area inside
-- the transaction that writes the alert event (the transactional outbox), so
-- an event is never announced without its deliveries. A delivery is pending
-- until a 2xx answer (delivered), its retry budget is spent (dead: a dead
-- letter) or its webhook is deleted (the pending row is removed).
CREATE TABLE webhooks (
    webhook_id         uuid PRIMARY KEY,
    team               text NOT NULL,
    url                text NOT NULL,
    -- Name of the signing secret(s) in the service's secret store (a
    -- setting); the secret itself is never stored here.
    secret_id          text NOT NULL,
    -- AlertKind names in lower case ("escalation_risk"); empty means all.
    kinds              text[] NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL,
    created_by_name    text NOT NULL DEFAULT '',
    created_by_reason  text NOT NULL DEFAULT '',
    -- CreateWebhook's idempotency key: a repeat returns the first webhook.
    idempotency_key    text UNIQUE,
    -- Set by DeleteWebhook, or when the receiver answered 410 Gone (the
    -- specification: stop sending). Kept for its dead letters.
    deleted_at         timestamptz,
    deleted_reason     text NOT NULL DEFAULT ''
);
-- Fan-out at enqueue: the live webhooks of a team.
CREATE INDEX webhooks_team ON webhooks (team) WHERE deleted_at IS NULL;

CREATE SEQUENCE webhook_dead_letter_seq;

CREATE TABLE webhook_deliveries (
    -- The dead letter's id too, once it is one.
    delivery_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Written order.
    seq               bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    webhook_id        uuid NOT NULL,
    -- The event's id: the `webhook-id` header, the same on every attempt.
    event_id          text NOT NULL,
    team              text NOT NULL,
    kind              text NOT NULL,
    alert_id          text NOT NULL,
    customer_id       text NOT NULL,
    -- Posted byte for byte on every attempt (the AlertEvent as proto3 JSON).
    body              bytea NOT NULL,
    occurred_at       timestamptz NOT NULL,
    -- pending | delivered | dead
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts          integer NOT NULL DEFAULT 0,
    -- When a pending delivery may next be claimed; '-infinity' = at once.
    -- A claim moves it past the attempt's lease, so a replica that dies
    -- mid-attempt leaves it to be claimed again (at least once).
    due_at            timestamptz NOT NULL DEFAULT '-infinity',
    first_attempt_at  timestamptz,
    last_attempt_at   timestamptz,
    last_status       integer NOT NULL DEFAULT 0,
    last_error        text NOT NULL DEFAULT '',
    delivered_at      timestamptz,
    dead_at           timestamptz,
    -- The dead-letter list's order (newest first) and page cursor.
    dead_seq          bigint,
    -- One delivery, hence one body, per event and webhook: an event enqueued
    -- twice (a replayed alert transaction) adds nothing.
    UNIQUE (event_id, webhook_id)
);
-- The dispatcher's claim: pending deliveries by due time.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (due_at) WHERE state = 'pending';
-- ListDeadLetters, newest first.
CREATE INDEX webhook_dead_letters ON webhook_deliveries (dead_seq) WHERE state = 'dead';
-- Erasure and export by customer.
CREATE INDEX webhook_deliveries_customer ON webhook_deliveries (customer_id);
-- DeleteWebhook drops a webhook's pending deliveries.
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, state);

-- Results of RedeliverDeadLetter by idempotency key: a repeat answers the
-- first attempt's result instead of posting again.
CREATE TABLE webhook_redeliveries (
    idempotency_key  text PRIMARY KEY,
    delivery_id      uuid NOT NULL,
    delivered        boolean NOT NULL,
    http_status      integer NOT NULL,
    attempted_at     timestamptz NOT NULL
);
