-- Multi-region: events received from other regions, the home-region fence, relay state.

-- The append function gains the home-region fence ('not_home'): a region never writes
-- an aggregate whose home is elsewhere, whatever its cache believes. Otherwise it is
-- the function of 0001, unchanged.
CREATE OR REPLACE FUNCTION meridian_append(
    p_node      TEXT,
    p_home      TEXT,
    p_partition INT[],
    p_epoch     BIGINT[],
    p_type      TEXT[],
    p_id        TEXT[],
    p_expected  BIGINT[],
    p_count     INT[],
    p_command   UUID[],
    e_req       INT[],
    e_event_id  UUID[],
    e_version   BIGINT[],
    e_type      TEXT[],
    e_payload   TEXT[],
    e_metadata  TEXT[]
) RETURNS TABLE (req INT, outcome TEXT, first_version BIGINT, last_version BIGINT,
                 agg_type TEXT, agg_id TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced INT[] := '{}';
    v_dup    INT[] := '{}';
    v_ok     INT[] := '{}';
    v_away   INT[] := '{}';
BEGIN
    -- Fencing. FOR SHARE holds off a concurrent takeover of these partitions until we
    -- commit; a takeover that committed first has bumped the epoch, so we refuse.
    IF EXISTS (SELECT 1 FROM unnest(p_partition) AS t(part) WHERE part IS NOT NULL) THEN
        PERFORM 1 FROM partition_leases l
         WHERE l.partition IN (SELECT DISTINCT part FROM unnest(p_partition) AS t(part))
         ORDER BY l.partition FOR SHARE;
        SELECT coalesce(array_agg(t.r), '{}') INTO v_fenced
          FROM unnest(p_partition, p_epoch) WITH ORDINALITY AS t(part, ep, r)
         WHERE t.part IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM partition_leases l
                WHERE l.partition = t.part AND l.epoch = t.ep AND l.owner = p_node);
    END IF;

    -- Idempotency: claim each command id; an id already claimed is a duplicate.
    WITH claimed AS (
        INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_version, last_version)
        SELECT t.c, p_type[t.r], p_id[t.r], p_expected[t.r] + 1, p_expected[t.r] + p_count[t.r]
          FROM unnest(p_command) WITH ORDINALITY AS t(c, r)
         WHERE t.c IS NOT NULL AND NOT t.r = ANY(v_fenced)
        ON CONFLICT (command_id) DO NOTHING
        RETURNING command_id
    )
    SELECT coalesce(array_agg(t.r), '{}') INTO v_dup
      FROM unnest(p_command) WITH ORDINALITY AS t(c, r)
     WHERE t.c IS NOT NULL AND NOT t.r = ANY(v_fenced)
       AND t.c NOT IN (SELECT command_id FROM claimed);

    -- Home-region fence: an aggregate whose home is another region (it was created
    -- there, or moved away) is never written here. Its command id is given back below.
    SELECT coalesce(array_agg(t.r), '{}') INTO v_away
      FROM unnest(p_type, p_id) WITH ORDINALITY AS t(ty, id, r)
      JOIN streams s ON s.aggregate_type = t.ty AND s.aggregate_id = t.id
     WHERE s.home_region <> p_home
       AND NOT t.r = ANY(v_fenced) AND NOT t.r = ANY(v_dup);

    -- Expected-version compare-and-set on each aggregate's stream row.
    WITH input AS (
        SELECT t.r, t.ty, t.id, t.expected, t.cnt
          FROM unnest(p_type, p_id, p_expected, p_count) WITH ORDINALITY AS t(ty, id, expected, cnt, r)
         WHERE NOT t.r = ANY(v_fenced) AND NOT t.r = ANY(v_dup) AND NOT t.r = ANY(v_away)
    ), moved AS (
        UPDATE streams s SET version = i.expected + i.cnt
          FROM input i
         WHERE i.expected > 0 AND s.aggregate_type = i.ty AND s.aggregate_id = i.id
           AND s.version = i.expected
        RETURNING i.r
    ), created AS (
        INSERT INTO streams (aggregate_type, aggregate_id, version, home_region)
        SELECT i.ty, i.id, i.cnt, p_home FROM input i WHERE i.expected = 0 AND i.cnt > 0
        ON CONFLICT (aggregate_type, aggregate_id) DO NOTHING
        RETURNING aggregate_type, aggregate_id
    )
    SELECT coalesce(array_agg(x.r), '{}') INTO v_ok FROM (
        SELECT m.r FROM moved m
        UNION ALL
        SELECT i.r FROM input i JOIN created c ON c.aggregate_type = i.ty AND c.aggregate_id = i.id
         WHERE i.expected = 0
        UNION ALL
        -- A command that decided no events on a new aggregate has nothing to check.
        SELECT i.r FROM input i WHERE i.expected = 0 AND i.cnt = 0
    ) x;

    -- Conflicting requests give their command ids back, so a retry can run.
    DELETE FROM commands
     WHERE command_id IN (
        SELECT t.c FROM unnest(p_command) WITH ORDINALITY AS t(c, r)
         WHERE t.c IS NOT NULL AND NOT t.r = ANY(v_fenced) AND NOT t.r = ANY(v_dup)
           AND NOT t.r = ANY(v_ok));

    INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata)
    SELECT e.eid, p_type[e.rq], p_id[e.rq], e.ver, e.ty, e.payload::jsonb, e.meta::jsonb
      FROM unnest(e_req, e_event_id, e_version, e_type, e_payload, e_metadata)
           WITH ORDINALITY AS e(rq, eid, ver, ty, payload, meta, ord)
     WHERE e.rq = ANY(v_ok)
     ORDER BY e.ord;

    RETURN QUERY
    SELECT t.r::INT,
           CASE WHEN t.r = ANY(v_fenced) THEN 'fenced'
                WHEN t.r = ANY(v_away) THEN 'not_home'
                WHEN t.r = ANY(v_dup) THEN 'duplicate'
                WHEN t.r = ANY(v_ok) THEN 'ok'
                ELSE 'conflict' END,
           CASE WHEN t.r = ANY(v_dup) THEN c.first_version
                ELSE p_expected[t.r] + 1 END,
           CASE WHEN t.r = ANY(v_dup) THEN c.last_version
                WHEN t.r = ANY(v_ok) THEN p_expected[t.r] + p_count[t.r]
                WHEN t.r = ANY(v_fenced) THEN NULL
                ELSE coalesce(s.version, 0) END,
           coalesce(c.aggregate_type, p_type[t.r]),
           coalesce(c.aggregate_id, p_id[t.r])
      FROM unnest(p_type) WITH ORDINALITY AS t(ty, r)
      LEFT JOIN commands c ON t.r = ANY(v_dup) AND c.command_id = p_command[t.r]
      LEFT JOIN streams s ON NOT t.r = ANY(v_dup) AND NOT t.r = ANY(v_ok)
                         AND s.aggregate_type = p_type[t.r] AND s.aggregate_id = p_id[t.r];
END;
$$;

-- When an event received from another region was stored here (NULL for events
-- committed here). With `recorded_at` (its commit time in the origin region) this is
-- the relay's lag per event.
ALTER TABLE events ADD COLUMN received_at TIMESTAMPTZ;

-- Stores events received from another region, in the order they were committed there.
-- Idempotent on event id, so a redelivered batch changes nothing. Per event:
--   * an event for an aggregate homed *here* is divergent (only a forced move can make
--     two regions write one aggregate) and is skipped, unless it moves the home;
--   * a version already taken by another event is skipped (a forced move's data-loss
--     window), but a home move still takes effect so the old home is fenced;
--   * the aggregate's stream row follows: version and home (`e_home`: the home after
--     this event — its origin region, or the target of a home move).
-- Command ids travel in the events' metadata and are recorded, so a command retried
-- after its aggregate moved home is still recognised as a duplicate.
CREATE FUNCTION meridian_store_remote(
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
) RETURNS TABLE (stored INT, duplicates INT, divergent INT)
LANGUAGE plpgsql AS $$
DECLARE
    v_stored INT := 0;
    v_dup    INT := 0;
    v_div    INT := 0;
    v_home   TEXT;
    v_n      INT;
    v_cmd    UUID;
BEGIN
    FOR i IN 1 .. coalesce(array_length(e_event_id, 1), 0) LOOP
        IF EXISTS (SELECT 1 FROM events WHERE event_id = e_event_id[i]) THEN
            v_dup := v_dup + 1;
            CONTINUE;
        END IF;
        SELECT home_region INTO v_home FROM streams
         WHERE aggregate_type = e_agg_type[i] AND aggregate_id = e_agg_id[i]
           FOR UPDATE;
        IF FOUND AND v_home = p_local AND NOT e_moves[i] THEN
            v_div := v_div + 1;
            CONTINUE;
        END IF;
        INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type,
                            payload, metadata, recorded_at, received_at)
        VALUES (e_event_id[i], e_agg_type[i], e_agg_id[i], e_version[i], e_type[i],
                e_payload[i]::jsonb, e_metadata[i]::jsonb, e_recorded[i], clock_timestamp())
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_n = ROW_COUNT;
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
    RETURN QUERY SELECT v_stored, v_dup, v_div;
END;
$$;

-- Where the relay from each other region stands, written by the region's relay leader
-- and read by every host for `GET /v1/cluster` and the status page.
CREATE TABLE relay_status (
    region          TEXT        PRIMARY KEY,
    -- Commit in the origin region → stored here, for the newest event stored.
    lag_ms          BIGINT      NOT NULL,
    -- Messages JetStream still holds for us (sourced, not yet stored).
    pending         BIGINT      NOT NULL,
    events_received BIGINT      NOT NULL DEFAULT 0,
    last_event_at   TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
