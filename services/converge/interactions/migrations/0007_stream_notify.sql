-- Followers of the change stream (StreamInteractions) wait for a notification
-- instead of each polling the table: every statement that stores interactions
-- (a COPY of a batch, a single insert) notifies the channel once, and
-- PostgreSQL delivers it when the transaction commits (not at all when it
-- rolls back; repeats within one transaction are folded into one). Each
-- service process listens on one connection and wakes its followers itself
-- (see change_feed.py).
--
-- The price: PostgreSQL serialises the commits of notifying transactions (a
-- lock held from just before commit until it is flushed), so one ingest
-- transaction's commit waits for another's. Ingest commits a batch at a time,
-- so this is one short wait per batch, not per row.
CREATE FUNCTION notify_interactions_stored() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('converge_interactions_stored', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER interactions_stored AFTER INSERT ON interactions
FOR EACH STATEMENT EXECUTE FUNCTION notify_interactions_stored();
