-- A sequencing round that finds nothing to position returns before it
-- locks the sequence row. Locking gives the round a transaction id, and
-- committing one waits for a WAL flush: every wake-up that found its items
-- already positioned (by this replica's previous round or another
-- replica) paid a flush for nothing. The check reads the partial index
-- outbox_unsequenced. A round that sees unpositioned items still takes
-- the lock and re-reads them with a fresh snapshot, so items a concurrent
-- round positioned meanwhile are not positioned twice.
CREATE OR REPLACE FUNCTION muster_sequence_outbox(max_items BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    last BIGINT;
    sequenced BIGINT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox WHERE position IS NULL) THEN
        RETURN 0;
    END IF;
    SELECT last_position INTO last FROM outbox_sequence FOR UPDATE;
    UPDATE outbox SET position = last + pending.n
    FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM outbox
          WHERE position IS NULL ORDER BY id LIMIT max_items) AS pending
    WHERE outbox.id = pending.id;
    GET DIAGNOSTICS sequenced = ROW_COUNT;
    IF sequenced > 0 THEN
        UPDATE outbox_sequence SET last_position = last + sequenced;
    END IF;
    RETURN sequenced;
END
$$;
