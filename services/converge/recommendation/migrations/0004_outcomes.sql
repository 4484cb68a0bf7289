-- Outcomes of decisions (RecordOutcome): what came of a proposed action, or
-- of an action held out for its control group, one row per recorded outcome.
-- The decisions store reads these rows for `Decision.outcomes`; the actions
-- report joins them to the decisions' exposures to measure lift. No foreign
-- key to the decisions table (areas stay apart); decision_id is its id.
CREATE TABLE decision_outcomes (
    outcome_id      uuid PRIMARY KEY,
    decision_id     text NOT NULL,
    -- The alert it was recorded through; '' when recorded by decision.
    alert_id        text NOT NULL DEFAULT '',
    customer_id     uuid NOT NULL,
    -- The proposed action's id; for a control-group member, the held-out
    -- action's name (it was never proposed, so it has no id).
    action_id       text NOT NULL,
    action_name     text NOT NULL,
    action_kind     text NOT NULL,
    product_id      text NOT NULL DEFAULT '',
    -- 'treatment': the action was proposed; 'control': held out at random.
    arm             text NOT NULL CHECK (arm IN ('treatment', 'control')),
    outcome         text NOT NULL CHECK (outcome IN
                        ('presented', 'accepted', 'declined', 'ignored', 'converted', 'not_delivered')),
    -- Value realised (CONVERTED), in `currency`; null when none was given.
    value           numeric(22, 4),
    currency        text NOT NULL DEFAULT '',
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    -- The "action.outcome" interaction written to the interactions service.
    interaction_id  text NOT NULL,
    -- The caller's other facts (tagged JSON values, as interactions store
    -- them) and who recorded it; kept here, since the interaction type
    -- "action.outcome" declares no further attributes.
    attributes      jsonb NOT NULL DEFAULT '{}',
    actor           text NOT NULL DEFAULT '',
    -- Copied from the decision so the report filters without reading it.
    policy_version  text NOT NULL,
    decided_at      timestamptz NOT NULL
);
-- Decision.outcomes, in the order they happened.
CREATE INDEX decision_outcomes_decision ON decision_outcomes (decision_id, occurred_at, outcome_id);
-- The report: one policy version, decisions since a time.
CREATE INDEX decision_outcomes_report ON decision_outcomes (decided_at, policy_version);
-- Erasure and export by customer.
CREATE INDEX decision_outcomes_customer ON decision_outcomes (customer_id);

-- RecordOutcome's idempotency keys: the first request's fingerprint and what
-- it recorded. The same key with the same request answers the first result
-- (duplicate = true); with another request it is refused.
CREATE TABLE outcome_requests (
    idempotency_key  text PRIMARY KEY,
    request_sha256   bytea NOT NULL,
    outcome_id       uuid NOT NULL,
    interaction_id   text NOT NULL,
    customer_id      uuid NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX outcome_requests_customer ON outcome_requests (customer_id);
