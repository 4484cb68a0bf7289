-- The scoring service's schema. Scoring owns no customer data of its own
-- today; the schema exists from the start so that the sampled prediction log
-- (issue 14, item 5) arrives as an ordinary migration.
SELECT 1;
