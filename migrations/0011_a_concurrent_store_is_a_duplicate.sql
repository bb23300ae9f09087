-- Two transactions storing the same event at once (the gap fetch and the stream
-- task, or two relay leaders overlapping for a moment) both found it absent, and the
-- one that waited for the aggregate's stream row then hit the other's row on insert:
-- it counted the event as divergent (`meridian_relay_divergent_events_total`, an
-- error in the log), which tells an operator that histories differ when nothing
-- does. An insert that writes nothing now looks for the event id again (a new
-- statement sees what committed meanwhile) and counts it as a duplicate when it is
-- there. Otherwise the function is the one of 0008.

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
BEGIN
    FOR i IN 1 .. coalesce(array_length(e_event_id, 1), 0) LOOP
        IF EXISTS (SELECT 1 FROM events WHERE event_id = e_event_id[i]) THEN
            v_dup := v_dup + 1;
            CONTINUE;
        END IF;
        SELECT home_region, version INTO v_home, v_ver FROM streams
         WHERE aggregate_type = e_agg_type[i] AND aggregate_id = e_agg_id[i]
           FOR UPDATE;
        IF FOUND AND v_home = p_local AND NOT e_moves[i] THEN
            v_div := v_div + 1;
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
                   last_version = greatest(commands.last_version, EXCLUDED.last_version);
        END IF;
    END LOOP;
    RETURN QUERY SELECT v_stored, v_dup, v_div, v_early;
END;
$$;
