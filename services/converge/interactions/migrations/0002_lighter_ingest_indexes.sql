-- Every index on `interactions` is paid for by every ingested row. The
-- occurred_at b-tree served only retention purges; a BRIN index serves them
-- too (interactions arrive roughly in time order, and a purge rechecks what a
-- block range lets through) at a fraction of the cost per row.
DROP INDEX interactions_occurred;
CREATE INDEX interactions_occurred_brin ON interactions USING brin (occurred_at);
