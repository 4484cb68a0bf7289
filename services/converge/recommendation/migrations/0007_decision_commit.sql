-- Recommend's write in one round trip. The rules need the customer's contact
-- history, so Recommend reads it (with its digest) while identity and scoring
-- answer, decides, and then calls commit_decision once: under the customer's
-- contact lock it re-reads the digest and writes the decision and its
-- contacts only if the history is still the one the rules saw ('stale'
-- otherwise: Recommend reads again and decides again). One statement outside
-- any transaction block is its own transaction, committed with the server's
-- synchronous_commit like any other: nothing is less durable than before.

-- The fingerprint of a customer's contact history since a time: the rows the
-- rules read (proposed or declined after `since`), every column, in a fixed
-- order, independent of the session's time zone. STABLE: it sees the snapshot
-- of the statement that calls it.
CREATE FUNCTION contact_history_digest(customer uuid, since timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT md5(coalesce(string_agg(
        concat_ws(',', decision_id, action_id, action_name, action_kind, channel,
                  extract(epoch FROM proposed_at), extract(epoch FROM declined_at),
                  not_delivered),
        '|' ORDER BY decision_id, action_id), ''))
    FROM contact_ledger
    WHERE customer_id = customer AND (proposed_at > since OR declined_at > since)
$$;

-- Writes one decision and the contacts it proposed if the customer's history
-- since `since` still has the digest `seen`. Answers 'written', 'stale' (the
-- history changed: nothing written), 'key_taken' (the idempotency key is
-- bound to another decision) or 'erased' (the customer was erased). Each
-- statement of a PL/pgSQL function takes a new snapshot, so what is read after
-- the lock includes everything committed by whoever held it before.
CREATE FUNCTION commit_decision(
    p_decision_id uuid, p_customer_id uuid, p_decided_at timestamptz, p_trigger text,
    p_policy_version text, p_idempotency_key text, p_request_sha256 bytea, p_body bytea,
    p_since timestamptz, p_seen text,
    p_action_ids text[], p_action_names text[], p_action_kinds text[], p_channels text[]
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    written uuid;
BEGIN
    -- The same key as contact/store.py's LOCK_CUSTOMER (and the erasure's).
    PERFORM pg_advisory_xact_lock(hashtext('contact:' || p_customer_id::text));
    IF contact_history_digest(p_customer_id, p_since) IS DISTINCT FROM p_seen THEN
        RETURN 'stale';
    END IF;
    IF EXISTS (SELECT 1 FROM decision_erased_customers WHERE customer_id = p_customer_id) THEN
        RETURN 'erased';
    END IF;
    INSERT INTO decisions (decision_id, customer_id, decided_at, trigger, policy_version,
                           idempotency_key, request_sha256, body)
    VALUES (p_decision_id, p_customer_id, p_decided_at, p_trigger, p_policy_version,
            p_idempotency_key, p_request_sha256, p_body)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING decision_id INTO written;
    IF written IS NULL THEN
        RETURN 'key_taken';
    END IF;
    INSERT INTO contact_ledger
        (customer_id, decision_id, action_id, action_name, action_kind, channel, proposed_at)
    SELECT p_customer_id, p_decision_id::text, r.action_id, r.action_name, r.action_kind,
           r.channel, p_decided_at
    FROM unnest(p_action_ids, p_action_names, p_action_kinds, p_channels)
        AS r(action_id, action_name, action_kind, channel)
    WHERE NOT EXISTS (SELECT 1 FROM contact_erased_customers e
                      WHERE e.customer_id = p_customer_id)
    ON CONFLICT (decision_id, action_id) DO NOTHING;
    RETURN 'written';
END
$$;
