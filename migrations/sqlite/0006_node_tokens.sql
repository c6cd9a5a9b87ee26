-- Node tokens: a token bound to the one device it admits (Part B §3's
-- scoped token; a connection with it and another key closes with 4008).
-- SQLite cannot change a CHECK constraint, so the table is rebuilt.
CREATE TABLE operator_tokens_v2 (
    token_id      TEXT    PRIMARY KEY,
    tenant_id     TEXT    NOT NULL,
    digest        TEXT    NOT NULL UNIQUE,
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'client', 'node')),
    scopes        TEXT    NOT NULL,
    label         TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER,
    device_id     TEXT,
    CHECK ((role = 'node') = (device_id IS NOT NULL))
);
INSERT INTO operator_tokens_v2
    (token_id, tenant_id, digest, role, scopes, label, created_at_ms, revoked_at_ms)
    SELECT token_id, tenant_id, digest, role, scopes, label, created_at_ms, revoked_at_ms
    FROM operator_tokens;
DROP TABLE operator_tokens;
ALTER TABLE operator_tokens_v2 RENAME TO operator_tokens;
