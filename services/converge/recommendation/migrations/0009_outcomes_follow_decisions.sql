-- An outcome belongs to its decision: when the decision leaves the log (the
-- retention purge, an erasure, anything later), its outcomes go with it in
-- the same statement. Before, decision_outcomes named its decision by text
-- with no foreign key, so the retention purge of decisions left their
-- outcomes behind, customer ids included, for ever.
--
-- Outcomes already orphaned so are dropped first. RecordOutcome only ever
-- wrote the id of a logged decision (it reads it as uuid FOR SHARE), so
-- every stored id casts.
DELETE FROM decision_outcomes o
WHERE NOT EXISTS (SELECT 1 FROM decisions d WHERE d.decision_id = o.decision_id::uuid);

ALTER TABLE decision_outcomes
    ALTER COLUMN decision_id TYPE uuid USING decision_id::uuid,
    ADD CONSTRAINT decision_outcomes_decision_id_fkey
        FOREIGN KEY (decision_id) REFERENCES decisions (decision_id) ON DELETE CASCADE;
