-- A command that decided no events was accepted at expected version 0 without a look
-- at `streams`: a host deciding on a stale, empty state (an aggregate that in fact
-- had events) was told its decision stood. Every other expected version is checked by
-- the compare-and-set on the stream row; version 0 with no events now checks that
-- the row, if there is one, is at version 0, and is a conflict (retried on fresh
-- state) when it is not.
--
-- Only that clause changed; everything else is as in 0005.

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
