-- Gap-free positions. Producers insert items without a position; the
-- backplane's sequencer gives committed items their positions, one
-- sequencer at a time (the row lock on outbox_sequence), so positions
-- become visible in increasing order and a reader tailing by position
-- never passes an item whose transaction commits later. `id` is only the
-- order of insertion.
ALTER TABLE outbox RENAME COLUMN position TO id;
ALTER TABLE outbox ADD COLUMN position BIGINT;
UPDATE outbox SET position = id;
CREATE UNIQUE INDEX outbox_position ON outbox (position);
CREATE INDEX outbox_unsequenced ON outbox (id) WHERE position IS NULL;
DROP INDEX outbox_tenant_position;
CREATE INDEX outbox_tenant_position ON outbox (tenant_id, position);
CREATE INDEX outbox_occurred ON outbox (occurred_at_ms);

CREATE TABLE outbox_sequence (
    singleton     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    last_position BIGINT  NOT NULL
);
INSERT INTO outbox_sequence (last_position) SELECT COALESCE(MAX(position), 0) FROM outbox;

-- How far each consumer (an edge, by its id) has acknowledged the stream.
CREATE TABLE outbox_consumers (
    consumer_id   TEXT   PRIMARY KEY,
    position      BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Leases for singleton jobs (compaction, pruning): one holder at a time.
CREATE TABLE leases (
    name          TEXT   PRIMARY KEY,
    holder        TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
