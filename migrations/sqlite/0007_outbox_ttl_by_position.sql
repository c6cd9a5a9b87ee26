-- The TTL now goes through the outbox in position order (the oldest
-- items, a chunk at a time), as the size cap and acknowledgements do, so
-- nothing reads by occurred_at_ms any more. Every append wrote an entry
-- in this index for nothing.
DROP INDEX IF EXISTS outbox_occurred;
