-- Customers erased from this service (ForgetCustomer, or identity's forget
-- event followed). An ingest validated before an erasure may reach the
-- database after it; inside its own transaction (which holds
-- store.INGEST_LOCK shared, so an erasure is either wholly before or wholly
-- after it) it refuses the rows of any customer listed here, so nothing of an
-- erased customer comes back. Identity deletes a forgotten customer and keeps
-- no list of erased ids, so this service keeps its own: the bare random id,
-- nothing attached (no time, no reason), which says nothing about the person.
CREATE TABLE erased_customers (
    customer_id uuid PRIMARY KEY
);
