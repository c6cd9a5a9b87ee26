-- What identity does once per database, claimed by its key. Replicas that
-- start together on an empty database race to insert the claim; the one
-- whose insert lands mints the admin token in the same transaction, the
-- others mint nothing.
CREATE TABLE identity_bootstrap (
    step     TEXT   PRIMARY KEY,
    at_ms    BIGINT NOT NULL
);

-- A database that has any token has had its first start (which minted the
-- admin token, perhaps since demoted or revoked): without this claim an
-- upgrade would mint another admin token.
INSERT INTO identity_bootstrap (step, at_ms)
SELECT 'admin', MIN(created_at_ms) FROM operator_tokens
HAVING COUNT(*) > 0;
