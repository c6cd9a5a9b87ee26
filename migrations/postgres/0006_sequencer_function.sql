-- One sequencing round in one round trip. The steps are those of
-- docs/decisions/0004: lock the sequence row (one sequencer at a time),
-- then position the committed items in insertion order. In a volatile
-- PL/pgSQL function each statement takes a fresh snapshot, so the UPDATE
-- sees everything the previous sequencer committed while this one waited
-- for the lock.
CREATE FUNCTION muster_sequence_outbox(max_items BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    last BIGINT;
    sequenced BIGINT;
BEGIN
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
