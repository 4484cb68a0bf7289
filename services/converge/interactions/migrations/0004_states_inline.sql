-- A customer with a few months of daily activity has a feature state of 3-4
-- KB. Past about 2 KB PostgreSQL moved it out of line into the TOAST table
-- (STORAGE EXTERNAL: uncompressed), so every rewrite also deleted and
-- inserted TOAST chunks and their index entries. States up to a page stay
-- in the row; HOT updates (fillfactor 50) still apply while a new version
-- fits beside the old one.
ALTER TABLE customer_state SET (toast_tuple_target = 8160);
