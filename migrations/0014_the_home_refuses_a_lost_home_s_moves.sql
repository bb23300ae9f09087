-- meridian_store_remote as in 0013 but for one case, with the same signature (a host
-- of the previous release calling it during a rolling upgrade gets the same answers
-- but in this one).
--
-- The home itself stored a move committed elsewhere whenever it was not forced: after
-- a forced move, the lost home's own later move (made while it was cut off, or before
-- it heard of the forced move) was stored in the new home at its free version and gave
-- the aggregate to the move's target, which had refused that move (0013) and still
-- named the new home: commands were sent back and forth and refused everywhere. And
-- the hole the lost home's refused events left below that move stopped every other
-- region's copy of the new home's stream, waiting for versions the new home could not
-- send. The home now refuses every move made elsewhere but a forced one, as it
-- refuses their events.

CREATE OR REPLACE FUNCTION meridian_store_remote(
    p_local     TEXT,
    e_event_id  UUID[],
    e_agg_type  TEXT[],
    e_agg_id    TEXT[],
    e_version   BIGINT[],
    e_type      TEXT[],
    e_payload   TEXT[],
    e_metadata  TEXT[],
    e_home      TEXT[],
    e_moves     BOOLEAN[],
    e_recorded  TIMESTAMPTZ[]
) RETURNS TABLE (stored INT, duplicates INT, divergent INT, early INT)
LANGUAGE plpgsql AS $$
DECLARE
    v_stored INT := 0;
    v_dup    INT := 0;
    v_div    INT := 0;
    v_home   TEXT;
    v_ver    BIGINT;
    v_early  INT := 0;
    v_n      INT;
    v_cmd    UUID;
    v_origin TEXT;
    v_forced BOOLEAN;
BEGIN
    FOR i IN 1 .. coalesce(array_length(e_event_id, 1), 0) LOOP
        IF EXISTS (SELECT 1 FROM events WHERE event_id = e_event_id[i]) THEN
            v_dup := v_dup + 1;
            CONTINUE;
        END IF;
        SELECT home_region, version INTO v_home, v_ver FROM streams
         WHERE aggregate_type = e_agg_type[i] AND aggregate_id = e_agg_id[i]
           FOR UPDATE;
        -- The region that committed it (a move is committed by the home it leaves,
        -- or for a forced one by the home it names).
        v_origin := CASE WHEN e_moves[i] THEN e_metadata[i]::jsonb ->> 'origin_region'
                         ELSE e_home[i] END;
        v_forced := CASE WHEN e_moves[i]
                         THEN coalesce((e_payload[i]::jsonb ->> 'forced')::boolean, false)
                         ELSE false END;
        -- The home refuses what another region committed of its aggregate: events,
        -- and moves too but a forced one (how another region takes the aggregate away
        -- from a lost home). An unforced move from elsewhere is a lost home's own late
        -- move, made on a history this region replaced.
        IF v_home IS NOT NULL AND v_home = p_local AND NOT v_forced THEN
            v_div := v_div + 1;
            PERFORM meridian_keep_divergent(e_event_id[i], e_agg_type[i], e_agg_id[i],
                e_version[i], v_origin, e_type[i], e_payload[i], e_metadata[i], e_recorded[i]);
            CONTINUE;
        END IF;
        -- Built on an event of its region that was refused here: its region went on
        -- writing on a history this region does not have (a lost home, after a forced
        -- move). Its predecessor will never be stored, so it is refused too rather
        -- than held for it, which would hold every later event of its stream.
        IF (v_home IS NULL OR v_home <> p_local) AND NOT v_forced
           AND e_version[i] > coalesce(v_ver, 0) + 1 AND EXISTS (
               SELECT 1 FROM divergent_events
                WHERE aggregate_type = e_agg_type[i] AND aggregate_id = e_agg_id[i]
                  AND version = e_version[i] - 1 AND origin_region = v_origin) THEN
            v_div := v_div + 1;
            PERFORM meridian_keep_divergent(e_event_id[i], e_agg_type[i], e_agg_id[i],
                e_version[i], v_origin, e_type[i], e_payload[i], e_metadata[i], e_recorded[i]);
            CONTINUE;
        END IF;
        -- Its predecessor has not arrived (it comes from another region's stream):
        -- stop here, the relay offers this event again once the gap is filled.
        IF (v_home IS NULL OR v_home <> p_local)
           AND e_version[i] > coalesce(v_ver, 0) + 1 THEN
            v_early := i;
            EXIT;
        END IF;
        -- Its predecessor was stored by a transaction whose id is newer than this
        -- one's (this one waited for the stream row above while that one stored it):
        -- stored now, it would come before its predecessor in the region's order,
        -- which walks transaction ids. Offered again, it is stored by a new
        -- transaction, newer than the predecessor's.
        IF (v_home IS NULL OR v_home <> p_local) AND e_version[i] > 1 AND EXISTS (
               SELECT 1 FROM events
                WHERE aggregate_type = e_agg_type[i] AND aggregate_id = e_agg_id[i]
                  AND version = e_version[i] - 1
                  AND tx_id > pg_current_xact_id_if_assigned()) THEN
            v_early := i;
            EXIT;
        END IF;
        -- Next in line, but committed by a region that is not the home this region
        -- knows: the late events of a home that was lost and forced away (it went on
        -- writing, cut off). The new home's history replaces them; stored, they would
        -- mix both histories and give the home back to the lost region. A forced move
        -- is the one event that may come from elsewhere: it is how a home changes
        -- without the old home's word.
        IF v_home IS NOT NULL AND v_home <> p_local AND v_origin IS NOT NULL
           AND v_origin <> v_home AND NOT v_forced THEN
            v_div := v_div + 1;
            PERFORM meridian_keep_divergent(e_event_id[i], e_agg_type[i], e_agg_id[i],
                e_version[i], v_origin, e_type[i], e_payload[i], e_metadata[i], e_recorded[i]);
            CONTINUE;
        END IF;
        INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type,
                            payload, metadata, recorded_at, received_at)
        VALUES (e_event_id[i], e_agg_type[i], e_agg_id[i], e_version[i], e_type[i],
                e_payload[i]::jsonb, e_metadata[i]::jsonb, e_recorded[i], clock_timestamp())
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        -- Stored meanwhile by another transaction (it committed while this one
        -- waited for the stream row above): a duplicate, not another history.
        IF v_n = 0 AND EXISTS (SELECT 1 FROM events WHERE event_id = e_event_id[i]) THEN
            v_dup := v_dup + 1;
            CONTINUE;
        END IF;
        IF v_n = 0 THEN
            v_div := v_div + 1;
            PERFORM meridian_keep_divergent(e_event_id[i], e_agg_type[i], e_agg_id[i],
                e_version[i], v_origin, e_type[i], e_payload[i], e_metadata[i], e_recorded[i]);
            IF e_moves[i] THEN
                UPDATE streams SET home_region = e_home[i]
                 WHERE aggregate_type = e_agg_type[i] AND aggregate_id = e_agg_id[i];
            END IF;
            CONTINUE;
        END IF;
        v_stored := v_stored + 1;
        INSERT INTO streams (aggregate_type, aggregate_id, version, home_region)
        VALUES (e_agg_type[i], e_agg_id[i], e_version[i], e_home[i])
        ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
           SET version = greatest(streams.version, EXCLUDED.version),
               home_region = CASE WHEN EXCLUDED.version >= streams.version
                                  THEN EXCLUDED.home_region ELSE streams.home_region END;
        v_cmd := (e_metadata[i]::jsonb ->> 'command_id')::uuid;
        IF v_cmd IS NOT NULL THEN
            INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_version, last_version)
            VALUES (v_cmd, e_agg_type[i], e_agg_id[i], e_version[i], e_version[i])
            ON CONFLICT (command_id) DO UPDATE
               SET first_version = least(commands.first_version, EXCLUDED.first_version),
                   last_version = greatest(commands.last_version, EXCLUDED.last_version)
             WHERE commands.aggregate_type = EXCLUDED.aggregate_type
               AND commands.aggregate_id = EXCLUDED.aggregate_id;
        END IF;
    END LOOP;
    RETURN QUERY SELECT v_stored, v_dup, v_div, v_early;
END;
$$;
