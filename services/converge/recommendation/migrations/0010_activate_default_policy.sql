-- ActivatePolicy("default") goes back to the shipped default policy: it
-- deletes policy_active's row (no row: the default is in effect, as before)
-- and logs the switch like any activation. The log's version is then null,
-- as previous_version already is when the default was replaced; the foreign
-- key still holds every stored version it names.
ALTER TABLE policy_activations ALTER COLUMN version DROP NOT NULL;
