-- Where a peer's inbound consumer resumes if it has gone missing. The relay replaces
-- the consumer at every start (delete, then create at the old one's acknowledgement
-- floor); a failure between the two (a JetStream API timeout during a NATS restart,
-- the host dying) left no consumer and no floor, and the next start had every event
-- of the peer's stream delivered again. The floor is now written here before the
-- delete, with the inbound stream's creation time, so a recreated stream (whose
-- sequence numbers start over) is never resumed at the old one's place.
ALTER TABLE relay_status
    ADD COLUMN inbound_resume_sequence BIGINT,
    ADD COLUMN inbound_stream_created  TIMESTAMPTZ;
