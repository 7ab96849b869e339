-- The text of a plain-text message is the beginning of its raw message's
-- body, kept anyway: the entry names those bytes (an offset and a length
-- in raw_messages.data, each CRLF there read as LF) rather than holding
-- them a second time. Entries from before keep their text.
ALTER TABLE entries ADD COLUMN raw_body_at BIGINT;
ALTER TABLE entries ADD COLUMN raw_body_len BIGINT;
