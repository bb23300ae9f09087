-- Meridian's event store for one region. Every host of the region shares these tables.

-- One row per aggregate: its current version. Appends move `version` forward with a
-- compare-and-set, which is what makes an append conditional on the expected version
-- without a lock per command; many aggregates' appends share one statement.
CREATE TABLE streams (
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    version        BIGINT      NOT NULL CHECK (version >= 0),
    -- The region that may write this aggregate; fixed when it is created.
    home_region    TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- The events themselves, in two orders: per aggregate (`version`) and per region
-- (`tx_id`, `position`). Positions come from a sequence, so two transactions can commit
-- in the opposite order of their positions; readers therefore walk (tx_id, position)
-- and never read past the oldest transaction still running (pg_snapshot_xmin), which
-- is what keeps a late-committing event from being skipped.
CREATE TABLE events (
    position        BIGSERIAL   NOT NULL,
    tx_id           XID8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    version         BIGINT      NOT NULL CHECK (version > 0),
    event_type      TEXT        NOT NULL,
    payload         JSONB       NOT NULL,
    -- command_id, plugin_version, origin_region, causation_id, correlation_id.
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT events_pkey PRIMARY KEY (position),
    -- The last line of defence: two writers can never both store version N.
    CONSTRAINT events_version_key UNIQUE (aggregate_type, aggregate_id, version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);
CREATE INDEX events_global_order ON events (tx_id, position);

-- Command ids already executed, so a retried command returns its first result and
-- writes nothing. The result is the version range the command appended.
CREATE TABLE commands (
    command_id     UUID        PRIMARY KEY,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    first_version  BIGINT      NOT NULL,
    last_version   BIGINT      NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The latest snapshot of an aggregate's state bytes. A snapshot is only used by the
-- plugin version that wrote it; any other version replays from the events.
CREATE TABLE snapshots (
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    plugin_version INT         NOT NULL,
    state          BYTEA       NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Uploaded plugin components. Versions count up per aggregate type; the newest runs
-- new commands. Stored here so every host of the region runs the same bytes. The same
-- bytes may appear under two versions: re-uploading an older build is how a type is
-- rolled back.
CREATE TABLE plugins (
    aggregate_type TEXT        NOT NULL,
    version        INT         NOT NULL CHECK (version > 0),
    sha256         TEXT        NOT NULL,
    size_bytes     BIGINT      NOT NULL,
    schema_version INT         NOT NULL,
    component      BYTEA       NOT NULL,
    uploaded_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, version)
);

-- Sandbox limits per aggregate type, when an operator changed the defaults.
CREATE TABLE plugin_limits (
    aggregate_type TEXT        PRIMARY KEY,
    limits         JSONB       NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Region-wide settings fixed at first start (e.g. the partition count).
CREATE TABLE region_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Who owns each virtual partition, and since which epoch. The epoch is the fencing
-- token: an append names the epoch its node believes it holds, and the append function
-- refuses it unless that is still the partition's current owner and epoch.
CREATE TABLE partition_leases (
    partition  INT         PRIMARY KEY,
    owner      TEXT        NOT NULL,
    epoch      BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Appends a batch of commands' events in one round trip and one transaction (group
-- commit). Each request is judged on its own, so one command's conflict never fails
-- another's:
--   'fenced'    the request names a partition epoch its node no longer holds;
--   'duplicate' its command id was already executed (first/last_version: that result,
--               agg_type/agg_id: the aggregate it ran on);
--   'conflict'  the aggregate's version is not the expected one (last_version: actual);
--   'ok'        appended (first/last_version: the versions written).
-- Request arrays are parallel (one element per request); event arrays are parallel
-- with `e_req` naming the request (1-based) each event belongs to.
CREATE FUNCTION meridian_append(
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

    -- Expected-version compare-and-set on each aggregate's stream row.
    WITH input AS (
        SELECT t.r, t.ty, t.id, t.expected, t.cnt
          FROM unnest(p_type, p_id, p_expected, p_count) WITH ORDINALITY AS t(ty, id, expected, cnt, r)
         WHERE NOT t.r = ANY(v_fenced) AND NOT t.r = ANY(v_dup)
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
