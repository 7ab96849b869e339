-- Entries by sender and body are searched only for mail without a
-- Message-ID: mail with one is found along thread_ids (and, across
-- instances, kept once by the unique entries_once).
DROP INDEX entries_sender_hash;
CREATE INDEX entries_sender_hash ON entries (sender, body_hash, at) WHERE message_id IS NULL;
