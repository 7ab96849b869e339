-- No foreign keys on PostgreSQL: each child row's insert ran a check of
-- its own on the parent (`SELECT … FOR KEY SHARE`, through a trigger),
-- which also locked the parent's row and dirtied its page: a dozen
-- statements more per new ticket, on rows the same transaction had just
-- written, and a lock two instances met on every ticket they both
-- touched. What keeps the log whole without them (docs/decisions.md, "Two
-- engines"): a message's parents and children are written in one
-- transaction, by ids the parent's insert returned; crmgate never deletes
-- a ticket, an entry, a raw message or an outbox row, nor changes an id.
-- SQLite keeps its foreign keys.
ALTER TABLE participants DROP CONSTRAINT participants_ticket_id_fkey;
ALTER TABLE entries DROP CONSTRAINT entries_ticket_id_fkey;
ALTER TABLE entries DROP CONSTRAINT entries_raw_id_fkey;
ALTER TABLE attachments DROP CONSTRAINT attachments_entry_id_fkey;
ALTER TABLE attachments DROP CONSTRAINT attachments_same_as_fkey;
ALTER TABLE thread_ids DROP CONSTRAINT thread_ids_ticket_id_fkey;
ALTER TABLE outbox DROP CONSTRAINT outbox_ticket_id_fkey;
ALTER TABLE outbox DROP CONSTRAINT outbox_entry_id_fkey;
ALTER TABLE outbox_messages DROP CONSTRAINT outbox_messages_outbox_id_fkey;
ALTER TABLE quarantine DROP CONSTRAINT quarantine_raw_id_fkey;
