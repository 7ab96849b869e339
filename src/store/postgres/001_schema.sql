-- The ticket log on PostgreSQL: the same tables and constraints as the
-- SQLite schema after all its migrations (src/store/schema.sql and the
-- list in src/store/mod.rs). Times are Unix seconds (UTC); addresses are
-- lower-cased; every integer is BIGINT (flags are 0 or 1), so one set of
-- queries reads both engines.

-- Ticket numbers are unique whatever their case, and found whatever the
-- case typed, as SQLite's COLLATE NOCASE column does.
CREATE EXTENSION IF NOT EXISTS citext;

CREATE TABLE tickets (
    id          BIGSERIAL PRIMARY KEY,
    number      CITEXT NOT NULL UNIQUE,
    subject     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('new', 'open', 'resolved')),
    owner       TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    -- When it was set resolved ([ticket] reopen_within_days counts from
    -- it); empty while not resolved.
    resolved_at BIGINT
);

CREATE TABLE participants (
    id          BIGSERIAL PRIMARY KEY,
    ticket_id   BIGINT NOT NULL REFERENCES tickets (id),
    role        TEXT NOT NULL CHECK (role IN ('requester', 'watch', 'notes')),
    address     TEXT NOT NULL,
    name        TEXT,
    added_at    BIGINT NOT NULL,
    UNIQUE (ticket_id, role, address)
);

CREATE TABLE raw_messages (
    id          BIGSERIAL PRIMARY KEY,
    received_at BIGINT NOT NULL,
    peer        TEXT,
    mail_from   TEXT,
    rcpt_to     TEXT NOT NULL,
    data        BYTEA NOT NULL
);

CREATE TABLE entries (
    id          BIGSERIAL PRIMARY KEY,
    ticket_id   BIGINT NOT NULL REFERENCES tickets (id),
    kind        TEXT NOT NULL CHECK (kind IN ('comment', 'work_note', 'email', 'receipt', 'closure', 'system')),
    from_addr   TEXT NOT NULL,
    from_name   TEXT,
    at          BIGINT NOT NULL,
    subject     TEXT NOT NULL,
    body        TEXT NOT NULL,
    html        TEXT,
    message_id  TEXT,
    by_agent    BIGINT NOT NULL DEFAULT 0,
    sender      TEXT,
    body_hash   TEXT,
    raw_id      BIGINT REFERENCES raw_messages (id),
    duplicates  BIGINT NOT NULL DEFAULT 0,
    -- SQLite keeps a long body here as a blob written in place; here it is
    -- text, and `body` is empty then too.
    long_body   TEXT
);
CREATE INDEX entries_ticket ON entries (ticket_id, id);
CREATE INDEX entries_sender_hash ON entries (sender, body_hash, at);
-- SPEC rule 2 across instances: a message with a Message-ID is logged once
-- whichever instance receives it first (tickets::insert_entry inserts with
-- ON CONFLICT DO NOTHING; intake then counts it a duplicate).
CREATE UNIQUE INDEX entries_once ON entries (message_id, sender, body_hash)
    WHERE message_id IS NOT NULL AND sender IS NOT NULL AND body_hash IS NOT NULL;

CREATE TABLE attachments (
    id           BIGSERIAL PRIMARY KEY,
    entry_id     BIGINT NOT NULL REFERENCES entries (id),
    filename     TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         BIGINT NOT NULL,
    data         BYTEA NOT NULL,
    sha256       TEXT,
    same_as      BIGINT REFERENCES attachments (id)
);
CREATE INDEX attachments_entry ON attachments (entry_id);
CREATE INDEX attachments_sha256 ON attachments (sha256) WHERE sha256 IS NOT NULL;

CREATE TABLE thread_ids (
    message_id    TEXT NOT NULL,
    ticket_id     BIGINT NOT NULL REFERENCES tickets (id),
    agent_inbound BIGINT NOT NULL DEFAULT 0,
    at            BIGINT NOT NULL,
    seq           BIGSERIAL PRIMARY KEY
);
CREATE INDEX thread_ids_message_id ON thread_ids (message_id);
CREATE INDEX thread_ids_ticket ON thread_ids (ticket_id, seq);

CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    ticket_id       BIGINT REFERENCES tickets (id),
    entry_id        BIGINT REFERENCES entries (id),
    kind            TEXT NOT NULL,
    recipients      TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT,
    -- The instance whose relay worker holds the row, until when
    -- (outbox::lease_due): another takes it over once the lease ran out.
    leased_by       TEXT,
    leased_until    BIGINT
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at, id);
CREATE INDEX outbox_message_id ON outbox (message_id);
CREATE INDEX outbox_queued ON outbox (id) WHERE status = 'queued';

-- A row's bytes (mail passed on as it is), or its plan (a copy the relay
-- composes when it sends it), `message` then empty.
CREATE TABLE outbox_messages (
    outbox_id BIGINT PRIMARY KEY REFERENCES outbox (id),
    message   BYTEA NOT NULL,
    plan      TEXT
);

-- `rowid`: the name of SQLite's implicit key, which the pruning of old
-- rows walks, so that its query is written once.
CREATE TABLE sends (
    rowid      BIGSERIAL PRIMARY KEY,
    address    TEXT NOT NULL,
    ticket_id  BIGINT,
    automatic  BIGINT NOT NULL,
    at         BIGINT NOT NULL,
    sender     TEXT
);
CREATE INDEX sends_automatic ON sends (address, automatic, at);
CREATE INDEX sends_ticket ON sends (ticket_id, address, automatic, at);
CREATE INDEX sends_sender ON sends (sender, at) WHERE sender IS NOT NULL;

CREATE TABLE quarantine (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    sender      TEXT,
    subject     TEXT,
    message_id  TEXT,
    raw_id      BIGINT REFERENCES raw_messages (id)
);

CREATE TABLE known_agents (
    address     TEXT PRIMARY KEY,
    name        TEXT,
    first_seen  BIGINT NOT NULL,
    removed_at  BIGINT
);

CREATE TABLE reply_all_notices (
    ticket_id   BIGINT NOT NULL,
    agent       TEXT NOT NULL,
    day         TEXT NOT NULL,
    PRIMARY KEY (ticket_id, agent, day)
);
