-- The sampled prediction log: one row per prediction of a sampled Score
-- answer, with the version that answered and the inputs it read, for drift
-- reports (GetDriftReport) and the customer's export. Rows older than the
-- retention horizon are purged; a customer's rows go with ForgetCustomer.
CREATE TABLE prediction_log (
    -- Written order, the export's page cursor.
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The Score answer's id (ScoreResponse.score_id) and the prediction's
    -- place in it: one answer can hold several predictions.
    score_id       text NOT NULL,
    position       integer NOT NULL,
    customer_id    uuid NOT NULL,
    prediction     text NOT NULL,
    ticket_id      text NOT NULL DEFAULT '',
    product_id     text NOT NULL DEFAULT '',
    model_name     text NOT NULL,
    model_version  text NOT NULL,
    -- The model's inputs by name: numbers as numbers, categories as their
    -- labels, missing inputs as null.
    features       jsonb NOT NULL,
    probability    double precision NOT NULL,
    band           text NOT NULL,
    channel        text NOT NULL DEFAULT '',
    scored_at      timestamptz NOT NULL
);
-- Drift windows: one prediction's version over a time range.
CREATE INDEX prediction_log_window ON prediction_log (prediction, model_version, scored_at);
-- Erasure and export by customer.
CREATE INDEX prediction_log_customer ON prediction_log (customer_id, seq);
-- The retention purge.
CREATE INDEX prediction_log_scored_at ON prediction_log (scored_at);
