-- An item is appended without a position and given one by the sequencer
-- (0004), so every item was entered twice in each index on position: once
-- with NULL at the append, again by the sequencer's update. Readers only
-- ever look for positioned items (a condition on position implies it is
-- not NULL), so these indexes leave unpositioned items out: an append
-- writes two index entries fewer.
DROP INDEX outbox_position;
CREATE UNIQUE INDEX outbox_position ON outbox (position) WHERE position IS NOT NULL;
DROP INDEX outbox_tenant_position;
CREATE INDEX outbox_tenant_position ON outbox (tenant_id, position)
    WHERE position IS NOT NULL;
