-- An idempotency key is bound to one request: a repeat of the same request
-- answers the first answer, another request under the same key is refused
-- (INVALID_ARGUMENT naming idempotency_key), as Recommend and RecordOutcome
-- already do. Each key is stored with the SHA-256 of its request's
-- deterministic serialization (without the key). Rows written before this
-- migration have no fingerprint and are accepted as before.
ALTER TABLE alert_requests ADD COLUMN request_sha256 bytea;
-- CreateWebhook's key lives on the webhook it created.
ALTER TABLE webhooks ADD COLUMN request_sha256 bytea;
ALTER TABLE webhook_redeliveries ADD COLUMN request_sha256 bytea;

-- DeleteWebhook's keys (it kept none before): a repeat answers the first
-- deletion's count of dropped deliveries instead of 0.
CREATE TABLE webhook_deletions (
    idempotency_key     text PRIMARY KEY,
    webhook_id          uuid NOT NULL,
    request_sha256      bytea NOT NULL,
    dropped_deliveries  bigint NOT NULL,
    deleted_at          timestamptz NOT NULL
);
