-- The decision log: every recommendation (and every alert's decision), stored
-- as the whole converge.v1.Decision message so GetDecision replays exactly
-- what was shown, months later, whatever the code has become since; beside it
-- the columns lists filter and page on. Outcomes attach through the outcomes
-- area's table (decision_outcomes), read when a decision is read.
CREATE TABLE decisions (
    decision_id      uuid PRIMARY KEY,
    customer_id      uuid NOT NULL,
    decided_at       timestamptz NOT NULL,
    -- DecisionTrigger's name in lower case: 'recommend', 'interaction', 'schedule'.
    trigger          text NOT NULL,
    policy_version   text NOT NULL,
    -- Recommend's idempotency key and the fingerprint of the request that
    -- bound it (SHA-256 of the request without its key); null without a key.
    idempotency_key  text UNIQUE,
    request_sha256   bytea,
    -- The serialized converge.v1.Decision, outcomes left out (they are read
    -- from decision_outcomes).
    body             bytea NOT NULL
);
-- ListDecisions: one customer's, newest first (the page key is decided_at, decision_id).
CREATE INDEX decisions_customer ON decisions (customer_id, decided_at DESC, decision_id DESC);
-- The retention purge.
CREATE INDEX decisions_decided_at ON decisions (decided_at);

-- Customers erased from the decision log (EraseCustomerData). A Recommend
-- or an alert that read the customer just before the erasure may write its
-- decision just after; the insert skips customers listed here, so nothing of
-- an erased customer comes back. The bare random id only.
CREATE TABLE decision_erased_customers (
    customer_id uuid PRIMARY KEY
);
