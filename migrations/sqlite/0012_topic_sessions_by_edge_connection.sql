-- An edge reads the connections its sessions belong to in pages, in
-- (tenant, connection) order: this index answers each page from where the
-- last one ended. It covers the lookups by edge alone too.
CREATE INDEX topic_sessions_edge_connection ON topic_sessions (edge_id, tenant_id, connection_id);
DROP INDEX topic_sessions_edge;
