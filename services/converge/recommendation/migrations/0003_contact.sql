-- The contact ledger: every action a decision proposed to a customer, with
-- the channel it used ('' when it happened in the conversation), so the
-- contact rules can count contacts against frequency caps and see
-- cool-downs. An outcome marks a row: 'declined' starts the cool-down after
-- a rejection, 'not_delivered' stops the row counting. Rows older than the
-- longest window the policy needs are purged. No foreign key to the
-- decisions table (areas stay apart).
CREATE TABLE contact_ledger (
    customer_id    uuid NOT NULL,
    decision_id    text NOT NULL,
    action_id      text NOT NULL,
    action_name    text NOT NULL,
    action_kind    text NOT NULL,
    -- A contact channel ('email', 'sms', 'phone', 'push', 'in_app'); '' for
    -- an action carried out in the current conversation (no outbound contact).
    channel        text NOT NULL DEFAULT '',
    proposed_at    timestamptz NOT NULL,
    -- When the customer declined it (the latest decline); null if never.
    declined_at    timestamptz,
    -- Recorded as not delivered: counts against no cap and no cool-down.
    not_delivered  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (decision_id, action_id)
);
-- A decision's contact history read (one customer, since a time), and the
-- erasure and export by customer.
CREATE INDEX contact_ledger_customer ON contact_ledger (customer_id, proposed_at);
-- Declines are read by decline time: a row proposed long ago may have been
-- declined recently.
CREATE INDEX contact_ledger_declined ON contact_ledger (customer_id, declined_at)
    WHERE declined_at IS NOT NULL;
-- The retention purge.
CREATE INDEX contact_ledger_proposed_at ON contact_ledger (proposed_at);

-- Customers erased from the ledger (EraseCustomerData). A Recommend that
-- read the customer just before the erasure may record its contacts just
-- after; `record` drops rows of customers listed here, so nothing of an
-- erased customer comes back. The bare random id only.
CREATE TABLE contact_erased_customers (
    customer_id uuid PRIMARY KEY
);
