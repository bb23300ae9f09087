-- Which process heartbeats as a node id: a random id each process draws at start.
-- Two processes given one node id (a copied configuration, a replaced machine whose
-- predecessor still runs) shared one member row and took each other's partitions back
-- and forth. A host now waits for a live row of another process to go quiet before it
-- joins, refuses to start when it does not, and stops heartbeating when another
-- process took its row over. NULL: a row written before this column existed.
ALTER TABLE members ADD COLUMN incarnation UUID;
