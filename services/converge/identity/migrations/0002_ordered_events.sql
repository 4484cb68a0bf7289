-- Identity events were read in event_id order, but ids are taken when a row
-- is inserted and transactions commit in any order: a follower reading
-- "event_id > cursor" skipped for good an event whose transaction committed
-- after a later one's (a merge beside concurrent creates). The stream now
-- orders by (xid, event_id), the writing transaction's id first, and delivers
-- only events of transactions older than every transaction still running (the
-- snapshot's xmin), like the interactions change stream (its migration 0005):
-- nothing can later appear before a cursor already handed out.
--
-- Events written before this migration get xid 0: they keep their event_id
-- order, ahead of every later event, so a bare event_id cursor issued before
-- still resumes at the same place.
ALTER TABLE identity_events ADD COLUMN xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE identity_events ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE UNIQUE INDEX identity_events_commit_order ON identity_events (xid, event_id);

-- IDENTIFIER_REMOVED names the identifier removed, so followers that route by
-- identifier (interactions' identifier cache) stop routing it to its former
-- owner. Cleared when that customer is erased.
ALTER TABLE identity_events
    ADD COLUMN identifier_kind smallint,
    ADD COLUMN identifier_source text,
    ADD COLUMN identifier_value text;
