-- Sequencing rounds of this version took turns by an advisory lock only,
-- where rounds of earlier versions (the function of 0006 and 0007, and the
-- statements before it) took the sequence row's lock. During an upgrade
-- the two kinds can run side by side (a call planned before 0011 replaced
-- the function, a replica of an older release): each read the counter the
-- other was moving, so a round could write the head back below positions
-- given, or give a position twice. A round now takes the row's lock too,
-- once it has its horizon: whichever kind holds it, the other reads the
-- counter and the items after it is done.

CREATE OR REPLACE FUNCTION muster_sequence_outbox(max_items BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    floor_at BIGINT;
    s outbox_sequence%ROWTYPE;
    passed BOOLEAN;
    newest BIGINT;
    horizon xid8;
    sequenced BIGINT;
BEGIN
    -- The horizon must be a transaction id given after this round looks.
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'muster_sequence_outbox runs in a transaction of its own';
    END IF;
    SELECT floor_id INTO floor_at FROM outbox_sequence;
    IF NOT EXISTS (SELECT 1 FROM outbox WHERE position IS NULL AND id > floor_at) THEN
        RETURN 0;
    END IF;
    -- One round at a time. The lock goes at commit, after the commit is
    -- visible, so the next round's statements see this one's positions.
    PERFORM pg_advisory_xact_lock(7305596357311488865);
    newest := (SELECT MAX(id) FROM outbox);
    -- The round's first transaction id: given after `newest` was read.
    horizon := pg_current_xact_id();
    -- The row's lock as well, taken once the horizon is: a round of an
    -- older version, which took turns by this lock alone, then waits for
    -- this one (or this one for it) and never reads the counter it is
    -- about to move.
    SELECT * INTO s FROM outbox_sequence FOR UPDATE;
    -- From a snapshot no later than the update's: what ended before it is
    -- visible to the update.
    passed := s.candidate_horizon IS NOT NULL
        AND pg_snapshot_xmin(pg_current_snapshot()) >= s.candidate_horizon;
    UPDATE outbox SET position = s.last_position + pending.n
    FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM outbox
          WHERE position IS NULL AND id > s.floor_id ORDER BY id LIMIT max_items) AS pending
    WHERE outbox.id = pending.id;
    GET DIAGNOSTICS sequenced = ROW_COUNT;
    -- Every producer of an id up to the candidate has finished: what this
    -- statement sees unpositioned there (after the update above) is all
    -- that will ever be, and when it is nothing, the floor rises.
    IF passed AND NOT EXISTS (SELECT 1 FROM outbox WHERE position IS NULL
                              AND id > s.floor_id AND id <= s.candidate_id) THEN
        s.floor_id := GREATEST(s.floor_id, s.candidate_id);
        s.candidate_id := NULL;
    END IF;
    IF s.candidate_id IS NULL THEN
        s.candidate_id := newest;
        s.candidate_horizon := horizon;
    END IF;
    UPDATE outbox_sequence SET
        last_position = s.last_position + sequenced,
        floor_id = s.floor_id,
        candidate_id = s.candidate_id,
        candidate_horizon = s.candidate_horizon;
    RETURN sequenced;
END
$$;
