-- Consumer groups: the acknowledged position of each member of an application's group.
--
-- A group of `members` members splits the region's events by aggregate: member `member`
-- (0-based) gets every event of the aggregates whose FNV-1a hash of type and id, modulo
-- `members`, is `member`. A position is a resume token in the gap-free tail order
-- (tx_id, position), so `tx_id` is kept beside it: "forward" means forward in that
-- order, not a larger number, and an acknowledgement only ever moves forward.
--
-- Positions are kept per layout (`members`): when a group is resized, the new layout's
-- members start from the oldest position stored for any other layout of the group, so
-- nothing is lost (events between that and an aggregate's old member's position are
-- delivered again).
CREATE TABLE consumer_group_positions (
    group_name TEXT        NOT NULL,
    members    INT         NOT NULL CHECK (members > 0),
    member     INT         NOT NULL CHECK (member >= 0 AND member < members),
    position   BIGINT      NOT NULL CHECK (position > 0),
    tx_id      XID8        NOT NULL,
    acked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, members, member)
);
