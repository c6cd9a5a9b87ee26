-- The delegate a token was issued by (over the edge's HTTP API); NULL
-- for tokens an admin token issued, or the command line or the first start
-- minted. Revoking a token revokes every token issued on its behalf,
-- theirs too.
ALTER TABLE operator_tokens ADD COLUMN issued_by TEXT;
CREATE INDEX operator_tokens_by_issuer ON operator_tokens (issued_by)
    WHERE issued_by IS NOT NULL;
