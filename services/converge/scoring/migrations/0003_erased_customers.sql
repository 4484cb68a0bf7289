-- Customers erased from the prediction log (EraseCustomerData). A Score call
-- that resolved a customer just before the erasure may have its answer
-- written just after it; the writer's transaction (which holds
-- store.WRITE_LOCK shared, so an erasure is wholly before or wholly after it)
-- deletes what it wrote of any customer listed here, so nothing of an erased
-- customer comes back, whichever replica wrote it. The bare random id only,
-- nothing attached, which says nothing about the person.
CREATE TABLE erased_customers (
    customer_id uuid PRIMARY KEY
);
