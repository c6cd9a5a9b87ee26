-- The token a token was issued on behalf of (over the edge's HTTP API);
-- NULL for tokens minted by the command line or at first start. Revoking
-- a token revokes every token issued on its behalf, theirs too.
ALTER TABLE operator_tokens ADD COLUMN issued_by TEXT;
CREATE INDEX operator_tokens_by_issuer ON operator_tokens (issued_by)
    WHERE issued_by IS NOT NULL;
