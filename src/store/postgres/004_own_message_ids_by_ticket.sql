-- crmgate's own Message-IDs name their ticket: found through its number
-- and thread_ids_ticket, they leave the index of Message-IDs (a random
-- place for every copy); an outgoing row's Message-ID is found through
-- outbox_ticket. Rows from before keep ours = 0 and stay in the index.
ALTER TABLE thread_ids ADD COLUMN ours BIGINT NOT NULL DEFAULT 0;
DROP INDEX thread_ids_message_id;
CREATE INDEX thread_ids_message_id ON thread_ids (message_id) WHERE ours = 0;
DROP INDEX outbox_message_id;
CREATE INDEX outbox_ticket ON outbox (ticket_id, id);
