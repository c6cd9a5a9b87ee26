-- SQLite has one writer at a time, so an item's position (its rowid,
-- assigned at insert) already follows commit order: no sequencer here.
CREATE INDEX outbox_occurred ON outbox (occurred_at_ms);

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
