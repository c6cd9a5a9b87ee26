-- The connection directory (owned by backplane): which edge holds which
-- connection of which device, kept alive by each edge's heartbeat. Rows of
-- an edge that stops heartbeating expire.
CREATE TABLE connections (
    connection_id   TEXT   PRIMARY KEY,
    tenant_id       TEXT   NOT NULL,
    device_id       TEXT   NOT NULL,
    edge_id         TEXT   NOT NULL,
    role            TEXT   NOT NULL CHECK (role IN ('client', 'node')),
    connected_at_ms BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL
);
CREATE INDEX connections_device ON connections (tenant_id, device_id);
CREATE INDEX connections_edge ON connections (edge_id);
CREATE INDEX connections_expires ON connections (expires_at_ms);

-- Edges as presence sees them (owned by presence): refreshed by each
-- edge's presence refresh; the topic sessions of an edge that stops
-- refreshing leave.
CREATE TABLE presence_edges (
    edge_id         TEXT   PRIMARY KEY,
    refreshed_at_ms BIGINT NOT NULL
);
