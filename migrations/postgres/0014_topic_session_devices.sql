-- The device whose connection tracked a session: only that device may
-- track it again, untrack it or set its status. Sessions tracked before
-- this column existed have no device ('') and stay open to any peer of
-- their tenant until they leave.
ALTER TABLE topic_sessions ADD COLUMN device_id TEXT NOT NULL DEFAULT '';
CREATE INDEX topic_sessions_edge ON topic_sessions (edge_id);
