-- Policy versions (CreatePolicyVersion): every YAML text stored as submitted,
-- with who stored it and why; versions are numbered 1, 2, ... in the order
-- they were stored. Only texts without errors are stored, so any version can
-- be activated (and rolled back to) later.
CREATE TABLE policy_versions (
    version          bigint PRIMARY KEY CHECK (version > 0),
    yaml             text NOT NULL,
    -- SHA-256 of the UTF-8 text, hex.
    sha256           text NOT NULL,
    description      text NOT NULL DEFAULT '',
    created_by       text NOT NULL DEFAULT '',
    created_reason   text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL,
    -- When it was last activated; null if never.
    activated_at     timestamptz,
    -- The caller's idempotency key ('' when none) and a digest of the request
    -- it was used with: the same key with another text or description is refused.
    idempotency_key  text NOT NULL DEFAULT '',
    request_sha256   text NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX policy_versions_idempotency_key
    ON policy_versions (idempotency_key) WHERE idempotency_key <> '';

-- The active version: at most one row, so there is at most one active
-- version. No row: the shipped default policy is in effect.
CREATE TABLE policy_active (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version       bigint NOT NULL REFERENCES policy_versions (version),
    activated_at  timestamptz NOT NULL
);

-- Every activation, for the audit: who switched from which version to which,
-- when and why; a rollback is an activation of an older version.
CREATE TABLE policy_activations (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version           bigint NOT NULL REFERENCES policy_versions (version),
    -- The version it replaced; null when the default was in effect.
    previous_version  bigint,
    activated_at      timestamptz NOT NULL,
    activated_by      text NOT NULL DEFAULT '',
    reason            text NOT NULL DEFAULT '',
    -- As for policy_versions: a repeated request has no second effect.
    idempotency_key   text NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX policy_activations_idempotency_key
    ON policy_activations (idempotency_key) WHERE idempotency_key <> '';
