-- Ingest transactions no longer take turns (store.INGEST_LOCK is now shared
-- by ingests and exclusive only for erasure), so they commit in any order and
-- seq no longer gives the order in which interactions become visible. The
-- change stream orders by (xid, seq) instead: the id of the transaction that
-- stored a row, then its seq. A reader delivers only rows of transactions
-- older than every transaction still running (the snapshot's xmin), so
-- nothing can later appear before a cursor it handed out.
--
-- Rows stored before this migration get xid 0: they keep their seq order,
-- ahead of every later row, and a cursor issued before (a bare seq) still
-- resumes at the same place.
ALTER TABLE interactions ADD COLUMN xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE interactions ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
-- The stream reads and retention purges walk this key. seq stays unique (an
-- identity column) and orders ties in the timeline.
ALTER TABLE interactions DROP CONSTRAINT interactions_pkey;
ALTER TABLE interactions ADD PRIMARY KEY (xid, seq);
