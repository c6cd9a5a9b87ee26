-- The sequencer looks for unpositioned items above a floor. It found them
-- through the partial index outbox_unsequenced, from its first entry; but
-- positioning an item leaves its entry there, dead, until a vacuum, and
-- autovacuum comes when a fifth of the table is dead (200 000 items in an
-- outbox of a million). Every round, an empty one too, walked all of them:
-- 550 index pages and close to a millisecond per round at 200 000.
--
-- The floor is an id at or below which every item is positioned or will
-- never commit. Raising it safely takes three facts:
--  * ids are taken in the order producers ask for them, and a producer has
--    a transaction id before it takes an item id (muster_outbox_id below);
--  * transaction ids are given in increasing order;
--  * a snapshot's xmin is the oldest transaction still running.
-- A round notes the newest id it can see (the candidate), and only then
-- takes a transaction id of its own (the horizon): every producer that
-- took an id up to the candidate had its transaction id before that. Once
-- a later round's snapshot has an xmin at or above the horizon, all of
-- those producers have finished, so their items are visible or never will
-- be, and a round that positions every visible item above the floor may
-- raise the floor to the candidate. A long transaction delays only this,
-- never a delivery. Rounds take turns under an advisory lock rather than
-- the sequence row's lock, because locking a row would give the round its
-- transaction id before it looks.

ALTER TABLE outbox ALTER COLUMN id DROP IDENTITY;
-- One value at a time, in the order asked: a session's cache of values
-- would hand out ids out of that order.
CREATE SEQUENCE outbox_id_seq CACHE 1 OWNED BY outbox.id;
SELECT setval('outbox_id_seq', COALESCE((SELECT MAX(id) FROM outbox), 0) + 1, false);
-- An item id, after making sure the transaction has a transaction id.
-- Items are appended only with this default (outbox::append): an id taken
-- any other way could come before its transaction's id and slip under the
-- floor.
CREATE FUNCTION muster_outbox_id() RETURNS BIGINT
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN pg_current_xact_id() IS NOT NULL THEN nextval('outbox_id_seq') END
$$;

ALTER TABLE outbox ALTER COLUMN id SET DEFAULT muster_outbox_id();

ALTER TABLE outbox_sequence
    ADD COLUMN floor_id BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN candidate_id BIGINT,
    ADD COLUMN candidate_horizon xid8;

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
    SELECT * INTO s FROM outbox_sequence;
    -- From a snapshot no later than the update's: what ended before it is
    -- visible to the update.
    passed := s.candidate_horizon IS NOT NULL
        AND pg_snapshot_xmin(pg_current_snapshot()) >= s.candidate_horizon;
    newest := (SELECT MAX(id) FROM outbox);
    -- The round's first transaction id: given after `newest` was read.
    horizon := pg_current_xact_id();
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
