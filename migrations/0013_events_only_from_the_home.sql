-- Three corrections where regions meet; the functions are otherwise those of 0009
-- (meridian_append) and 0011 (meridian_store_remote), with the same signatures, so a
-- host of the previous release calling them during a rolling upgrade gets the same
-- answers but in the cases below.
--
-- 1. A region that is neither an aggregate's home nor its lost home stored the lost
--    home's late events after a forced move (the lost region went on writing, cut
--    off): they were next in line whenever that region had not received the new
--    home's versions for them, and each stored one also gave the home back to the
--    lost region. An event next in line is now stored only if it was committed by the
--    home this region knows (or is a forced move, which may come from anywhere); the
--    others are divergent, as they already were in the new home itself. The lost
--    home's events after those build on them: each is divergent too, not held for a
--    predecessor that will never be stored (which would hold that region's whole
--    stream). Divergent events are now kept, in `divergent_events`.
-- 2. A relayed event's command id, already known here for another aggregate (a client
--    reused an id across aggregates and regions), widened that command's versions to
--    the other aggregate's: a retry of the command then answered with events it never
--    decided. The claim stays with its own aggregate.
-- 3. An append read the stream's home (the home-region fence) without a lock, so a
--    relayed forced move that gave the home away meanwhile, holding the stream row
--    with no new version, let the append's compare-and-set through once it committed:
--    an event written, and acknowledged, in a region that was no longer the home. The
--    compare-and-set now checks the home too; the append is a conflict, and its retry
--    finds the aggregate homed elsewhere.

-- Every event refused as divergent, kept: what a lost home committed in its last
-- moments is not part of the history any more, but an operator may want to read it
-- (or replay it by hand in the new home). It is also how a region knows that a lost
-- home's later events build on refused ones (below).
CREATE TABLE divergent_events (
    event_id       UUID PRIMARY KEY,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    version        BIGINT NOT NULL,
    origin_region  TEXT,
    event_type     TEXT NOT NULL,
    payload        JSONB NOT NULL,
    metadata       JSONB NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL,
    refused_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX divergent_events_by_aggregate
    ON divergent_events (aggregate_type, aggregate_id, version);

CREATE FUNCTION meridian_keep_divergent(
    p_event_id UUID, p_agg_type TEXT, p_agg_id TEXT, p_version BIGINT, p_origin TEXT,
    p_type TEXT, p_payload TEXT, p_metadata TEXT, p_recorded TIMESTAMPTZ
) RETURNS VOID LANGUAGE sql AS $$
    INSERT INTO divergent_events (event_id, aggregate_type, aggregate_id, version,
                                  origin_region, event_type, payload, metadata, recorded_at)
    VALUES (p_event_id, p_agg_type, p_agg_id, p_version, p_origin, p_type,
            p_payload::jsonb, p_metadata::jsonb, p_recorded)
    ON CONFLICT (event_id) DO NOTHING;
$$;

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
        IF v_home IS NOT NULL AND v_home = p_local AND NOT e_moves[i] THEN
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
     WHERE NOT t.r = ANY(v_fenced) AND NOT t.r = ANY(v_dup)
       AND (SELECT s.home_region FROM streams s
             WHERE s.aggregate_type = t.ty AND s.aggregate_id = t.id) <> p_home;

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
           -- Checked again under the row's lock: a relayed forced move may have given
           -- the home away (without a new version here) after the fence above read it.
           AND s.home_region = p_home
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
        -- A command that decided no events on a new aggregate writes nothing, but
        -- its decision stands only if the aggregate is still at version 0.
        SELECT i.r FROM input i
         WHERE i.expected = 0 AND i.cnt = 0
           AND coalesce((SELECT s.version FROM streams s
                          WHERE s.aggregate_type = i.ty AND s.aggregate_id = i.id), 0) = 0
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
      LEFT JOIN LATERAL (
            SELECT c.first_version, c.last_version, c.aggregate_type, c.aggregate_id
              FROM commands c
             WHERE t.r = ANY(v_dup) AND c.command_id = p_command[t.r]
            -- OFFSET 0 keeps the planner from flattening this into a hash join.
            OFFSET 0) c ON true
      LEFT JOIN LATERAL (
            SELECT s.version FROM streams s
             WHERE NOT t.r = ANY(v_dup) AND NOT t.r = ANY(v_ok)
               AND s.aggregate_type = p_type[t.r] AND s.aggregate_id = p_id[t.r]
            OFFSET 0) s ON true;
END;
$$;
