-- Topic presence (owned by presence): who is in a topic, human or agent,
-- and their status. One row per (topic, session); a session belongs to the
-- connection that tracked it last.
CREATE TABLE topic_sessions (
    tenant_id     TEXT   NOT NULL,
    topic         TEXT   NOT NULL,
    session_id    TEXT   NOT NULL,
    principal     TEXT   NOT NULL,
    kind          TEXT   NOT NULL CHECK (kind IN ('human', 'agent_for')),
    agent_id      TEXT,
    since_ms      BIGINT NOT NULL,
    state         TEXT   NOT NULL CHECK (state IN ('available', 'busy', 'blocked')),
    note          TEXT   NOT NULL,
    until_ms      BIGINT,
    edge_id       TEXT   NOT NULL,
    connection_id TEXT   NOT NULL,
    PRIMARY KEY (tenant_id, topic, session_id)
);
CREATE INDEX topic_sessions_connection ON topic_sessions (tenant_id, connection_id);
CREATE INDEX topic_sessions_until ON topic_sessions (until_ms);
