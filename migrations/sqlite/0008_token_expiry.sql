-- Tokens may expire: minted with a lifetime (Tyrum's `ttl_seconds`), a
-- token is refused from this moment on. NULL: it never expires.
ALTER TABLE operator_tokens ADD COLUMN expires_at_ms INTEGER;
