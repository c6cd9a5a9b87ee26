-- A tenant's approvals are listed a page at a time, newest first: the
-- listing reads them in this index's order instead of sorting them all.
CREATE INDEX approvals_tenant_created ON approvals (tenant_id, created_at_ms DESC, approval_id);
