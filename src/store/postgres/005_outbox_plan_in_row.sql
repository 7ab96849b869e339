-- An outgoing copy's plan in its outbox row rather than in a row of
-- outbox_messages of its own (rows from before keep theirs); the queued
-- rows have one index, which a sent row leaves, and the failed rows one
-- that holds only them (SQLite: the same migration).
ALTER TABLE outbox ADD COLUMN plan TEXT;
DROP INDEX outbox_due;
DROP INDEX outbox_queued;
CREATE INDEX outbox_queued ON outbox (id, next_attempt_at) WHERE status = 'queued';
CREATE INDEX outbox_failed ON outbox (id) WHERE status = 'failed';
