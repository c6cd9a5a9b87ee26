-- When a token was last changed (ms since the epoch; 0: never). Edges
-- compare it with the change they last heard of to tell stale claims.
ALTER TABLE operator_tokens ADD COLUMN updated_at_ms INTEGER NOT NULL DEFAULT 0;
