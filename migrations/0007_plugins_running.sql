-- Which plugin version each host runs, per aggregate type: an upload is answered once
-- every live host of the region runs the new version (or after a timeout, naming the
-- hosts that do not yet), so a command sent anywhere after the answer runs it.
-- A row is written when a host has compiled a version and swapped it in; rows of
-- hosts that left are ignored (only members with a fresh heartbeat are asked).

CREATE TABLE plugins_running (
    node_id        TEXT        NOT NULL,
    aggregate_type TEXT        NOT NULL,
    version        INT         NOT NULL,
    since          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, aggregate_type)
);
