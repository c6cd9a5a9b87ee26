-- The outbox: durable events and directed commands (owned by backplane;
-- every service appends in the transaction of its state change).
CREATE TABLE outbox (
    position        INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id       TEXT    NOT NULL,
    event_id        TEXT    NOT NULL UNIQUE,
    type            TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    target_kind     TEXT    CHECK (target_kind IN ('device', 'connection', 'edge')),
    target_id       TEXT,
    audience_roles  TEXT    NOT NULL DEFAULT '[]',
    audience_scopes TEXT    NOT NULL DEFAULT '[]',
    occurred_at_ms  INTEGER NOT NULL,
    CHECK ((target_kind IS NULL) = (target_id IS NULL))
);
CREATE INDEX outbox_tenant_position ON outbox (tenant_id, position);

-- Operator tokens (owned by identity). Only a SHA-256 digest is stored.
CREATE TABLE operator_tokens (
    token_id      TEXT    PRIMARY KEY,
    tenant_id     TEXT    NOT NULL,
    digest        TEXT    NOT NULL UNIQUE,
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'client')),
    scopes        TEXT    NOT NULL,
    label         TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);

-- Instance presence (owned by presence). Self-reported and observed
-- addresses stand side by side; neither decides anything.
CREATE TABLE instance_presence (
    tenant_id          TEXT    NOT NULL,
    instance_id        TEXT    NOT NULL,
    role               TEXT    NOT NULL CHECK (role IN ('gateway', 'client', 'node')),
    reported_host      TEXT    NOT NULL,
    reported_ip        TEXT    NOT NULL,
    observed_ip        TEXT    NOT NULL,
    version            TEXT    NOT NULL,
    mode               TEXT    NOT NULL,
    last_seen_at_ms    INTEGER NOT NULL,
    last_input_seconds INTEGER NOT NULL,
    reason             TEXT    NOT NULL,
    PRIMARY KEY (tenant_id, instance_id)
);
CREATE INDEX instance_presence_last_seen ON instance_presence (last_seen_at_ms);

-- Approval requests and decisions (owned by approvals).
CREATE TABLE approvals (
    approval_id   TEXT    PRIMARY KEY,
    tenant_id     TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    context       TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    decided_at_ms INTEGER,
    decided_by    TEXT,
    reason        TEXT
);
CREATE INDEX approvals_tenant_status ON approvals (tenant_id, status);

-- Runs (owned by execution). The idempotency key is unique per tenant.
CREATE TABLE runs (
    run_id          TEXT    PRIMARY KEY,
    tenant_id       TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    spec            TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    UNIQUE (tenant_id, idempotency_key)
);
