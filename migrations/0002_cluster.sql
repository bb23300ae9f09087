-- Membership of the regional cluster. Liveness is judged by the database's clock
-- (`now() - last_heartbeat`), so hosts' clocks never need to agree.
CREATE TABLE members (
    node_id        TEXT        PRIMARY KEY,
    -- Base URL other hosts forward commands to, e.g. http://10.0.0.5:8080.
    address        TEXT        NOT NULL,
    -- syncing | ready | draining
    state          TEXT        NOT NULL,
    started_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set by the first observer that finds the heartbeat too old; cleared by the next
    -- heartbeat. Only used to count membership changes (the membership epoch).
    dead           BOOLEAN     NOT NULL DEFAULT false
);

-- A released lease keeps its epoch and has no owner; the next owner bumps the epoch.
ALTER TABLE partition_leases ALTER COLUMN owner DROP NOT NULL;

-- Counts membership changes (joins, state changes, deaths, departures).
INSERT INTO region_settings (key, value) VALUES ('membership_epoch', '0')
ON CONFLICT (key) DO NOTHING;
