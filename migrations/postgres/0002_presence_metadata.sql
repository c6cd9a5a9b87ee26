-- Free-form presence metadata (capabilities, edge id, what the client sent).
ALTER TABLE instance_presence ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
