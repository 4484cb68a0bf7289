-- Every index on `interactions` is paid for by every ingested row. The
-- occurred_at b-tree served only retention purges; a BRIN index serves them
-- too (interactions arrive roughly in time order, and a purge rechecks what a
-- block range lets through) at a fraction of the cost per row.
DROP INDEX interactions_occurred;
CREATE INDEX interactions_occurred_brin ON interactions USING brin (occurred_at);

-- Live feature states as JSON text in bytea rather than jsonb: every ingest
-- batch rewrites the state of each customer it touches, and parsing ~2 KB of
-- jsonb per state made that about five times dearer (measured). Nothing
-- queries inside a state; convert_from(state, 'UTF8')::jsonb reads one. Stored
-- uncompressed: the states are small and compressing them is CPU on every write.
ALTER TABLE customer_state ALTER COLUMN state TYPE bytea USING convert_to(state::text, 'UTF8');
ALTER TABLE customer_state ALTER COLUMN state SET STORAGE EXTERNAL;
