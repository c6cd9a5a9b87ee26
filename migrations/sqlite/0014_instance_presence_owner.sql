-- The edge whose connection wrote an entry last ('' when none): only that
-- edge's removal takes the entry away, so a device that reconnected
-- through another edge keeps its entry when the first edge finds its old
-- connection gone.
ALTER TABLE instance_presence ADD COLUMN edge_id TEXT NOT NULL DEFAULT '';
