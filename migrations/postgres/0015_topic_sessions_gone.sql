-- Sessions of an edge that presence took for gone (it stopped refreshing
-- for longer than the TTL) left their topics with leave diffs and wait
-- here: if the edge comes back with their connections still open, they
-- are tracked again, with their since and status; otherwise they go when
-- the edge has revived what it could, at its next start, or after an
-- hour. A peer that tracks or untracks one meanwhile, or whose connection
-- closes, drops it.
CREATE TABLE topic_sessions_gone (
    tenant_id     TEXT   NOT NULL,
    topic         TEXT   NOT NULL,
    session_id    TEXT   NOT NULL,
    principal     TEXT   NOT NULL,
    kind          TEXT   NOT NULL,
    agent_id      TEXT,
    since_ms      BIGINT NOT NULL,
    state         TEXT   NOT NULL,
    note          TEXT   NOT NULL,
    until_ms      BIGINT,
    edge_id       TEXT   NOT NULL,
    connection_id TEXT   NOT NULL,
    device_id     TEXT   NOT NULL,
    gone_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (edge_id, tenant_id, topic, session_id)
);
CREATE INDEX topic_sessions_gone_at ON topic_sessions_gone (gone_at_ms);
CREATE INDEX topic_sessions_gone_session ON topic_sessions_gone (tenant_id, topic, session_id);
CREATE INDEX topic_sessions_gone_connection ON topic_sessions_gone (tenant_id, connection_id);
