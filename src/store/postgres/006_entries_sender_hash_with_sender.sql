-- A receipt or a system entry has no sender: the duplicate check never
-- reads it, so it leaves the index (SQLite: the same migration).
DROP INDEX entries_sender_hash;
CREATE INDEX entries_sender_hash ON entries (sender, body_hash, at)
    WHERE message_id IS NULL AND sender IS NOT NULL;
