-- Every ingest batch rewrites the state of each customer it touches. With
-- room left on each page the new version goes beside the old one (a HOT
-- update: no new primary-key entry, the old version pruned on the spot);
-- on full pages each rewrite also inserted into the key's index. Measured on
-- 2,000 states of ~1.8 KB rewritten ten times: half the database CPU per write.
ALTER TABLE customer_state SET (fillfactor = 50);
