-- Alerts (alerts/): raised by the follower of the interactions change stream,
-- changed by people (acknowledge, assign, resolve, dismiss) and by the
-- service (auto-resolve, escalation, capacity), announced through an outbox.

-- Where the follower stands in InteractionsService.StreamInteractions. It is
-- written in the same transaction as the alerts and events a batch produced,
-- so a batch is applied wholly or not at all, and never twice.
CREATE TABLE alert_stream_cursor (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cursor     text NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE alerts (
    alert_id           uuid PRIMARY KEY,
    kind               text NOT NULL,          -- churn_risk, escalation_risk, cross_sell_moment
    team               text NOT NULL,
    customer_id        uuid NOT NULL,
    ticket_id          text NOT NULL DEFAULT '',
    product_id         text NOT NULL DEFAULT '',
    -- "kind:customer:ticket-or-product": stable, shown to callers.
    dedup_key          text NOT NULL,
    -- waiting (over the team's daily capacity, not announced yet), open,
    -- acknowledged, assigned, escalated, resolved, dismissed, expired.
    status             text NOT NULL,
    probability        double precision NOT NULL,
    risk_band          integer NOT NULL,
    -- [{code, feature, value, contribution, text}], largest first.
    reasons            jsonb NOT NULL DEFAULT '[]',
    expected_value     numeric NOT NULL DEFAULT 0,
    priority           integer NOT NULL DEFAULT 0,
    action_name        text NOT NULL DEFAULT '',
    assignee           text NOT NULL DEFAULT '',
    occurrences        integer NOT NULL DEFAULT 1,
    decision_id        uuid NOT NULL,
    policy_version     text NOT NULL,
    due_by             timestamptz,
    escalated_to_team  text NOT NULL DEFAULT '',
    status_note        text NOT NULL DEFAULT '',
    dismiss_reason     integer NOT NULL DEFAULT 0,
    -- Waiting alerts expire then (the rule's expire_after).
    expires_at         timestamptz,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    -- When it was announced (left waiting), for the team's daily capacity.
    announced_at       timestamptz,
    last_cursor        text NOT NULL DEFAULT ''
);

-- Once only: one live alert per key. A duplicate folds into it.
CREATE UNIQUE INDEX alerts_one_live_per_key ON alerts (dedup_key)
    WHERE status IN ('waiting', 'open', 'acknowledged', 'assigned', 'escalated');
CREATE INDEX alerts_by_team ON alerts (team, created_at DESC, alert_id DESC);
CREATE INDEX alerts_by_escalated_team ON alerts (escalated_to_team, created_at DESC)
    WHERE escalated_to_team <> '';
CREATE INDEX alerts_by_customer ON alerts (customer_id);
CREATE INDEX alerts_due ON alerts (due_by) WHERE status = 'open';
CREATE INDEX alerts_waiting ON alerts (team, expected_value DESC) WHERE status = 'waiting';
CREATE INDEX alerts_by_key ON alerts (dedup_key, updated_at DESC);

-- The outbox: one row per alert event, ordered by the writing transaction
-- (xid) and then seq, as interactions' change stream (see converge.runtime.
-- cursors): a reader delivers only rows of transactions older than every one
-- still running, so no row can commit behind a cursor handed out.
CREATE TABLE alert_events (
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    event_id    uuid NOT NULL UNIQUE,
    alert_id    uuid NOT NULL,
    customer_id uuid NOT NULL,
    -- The teams that see it: the alert's team, and its lead team once escalated.
    teams       text[] NOT NULL,
    kind        text NOT NULL,
    type        integer NOT NULL,              -- AlertEventType
    actor_name  text NOT NULL DEFAULT '',
    actor_reason text NOT NULL DEFAULT '',
    occurred_at timestamptz NOT NULL,
    -- The alert after the event (alerts row as JSON), so the stream replays
    -- the alert as it was then.
    alert       jsonb NOT NULL,
    PRIMARY KEY (xid, seq)
);
CREATE INDEX alert_events_by_alert ON alert_events (alert_id);
CREATE INDEX alert_events_by_customer ON alert_events (customer_id);
CREATE INDEX alert_events_by_time ON alert_events (occurred_at);

-- Subscribers wait for this notification (sent at commit) instead of polling.
CREATE FUNCTION notify_alert_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('converge_alert_events', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER alert_events_stored AFTER INSERT ON alert_events
FOR EACH STATEMENT EXECUTE FUNCTION notify_alert_events();

-- Lifecycle calls already applied, by idempotency key: a repeat answers the
-- alert as it is without a second change.
CREATE TABLE alert_requests (
    idempotency_key text PRIMARY KEY,
    alert_id        uuid NOT NULL,
    operation       text NOT NULL,
    customer_id     uuid NOT NULL,
    applied_at      timestamptz NOT NULL
);
CREATE INDEX alert_requests_by_customer ON alert_requests (customer_id);

-- Customers erased (DataSubjectService): the follower, which may have read an
-- interaction of theirs before the erasure, never raises an alert for them
-- again. The bare random id only.
CREATE TABLE alert_erased_customers (
    customer_id uuid PRIMARY KEY
);
