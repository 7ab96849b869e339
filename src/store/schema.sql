-- The ticket log. Times are Unix seconds (UTC); addresses are lower-cased.

CREATE TABLE tickets (
    id          INTEGER PRIMARY KEY,
    number      TEXT NOT NULL UNIQUE COLLATE NOCASE,
    subject     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('new', 'open', 'resolved')),
    owner       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX tickets_state ON tickets (state, updated_at);

-- Requesters, watch list and work-notes list of each ticket.
CREATE TABLE participants (
    id          INTEGER PRIMARY KEY,
    ticket_id   INTEGER NOT NULL REFERENCES tickets (id),
    role        TEXT NOT NULL CHECK (role IN ('requester', 'watch', 'notes')),
    address     TEXT NOT NULL,
    name        TEXT,
    added_at    INTEGER NOT NULL,
    UNIQUE (ticket_id, role, address)
);
CREATE INDEX participants_address ON participants (address);

-- Each raw message is stored once, whatever the entries it produced.
CREATE TABLE raw_messages (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    peer        TEXT,
    mail_from   TEXT,
    rcpt_to     TEXT NOT NULL,
    data        BLOB NOT NULL
);

CREATE TABLE entries (
    id          INTEGER PRIMARY KEY,
    ticket_id   INTEGER NOT NULL REFERENCES tickets (id),
    kind        TEXT NOT NULL CHECK (kind IN ('comment', 'work_note', 'email', 'receipt', 'closure', 'system')),
    from_addr   TEXT NOT NULL,
    from_name   TEXT,
    at          INTEGER NOT NULL,
    subject     TEXT NOT NULL,
    body        TEXT NOT NULL,
    html        TEXT,
    message_id  TEXT,
    -- the sender as believed (agent) when the entry was written by an agent
    by_agent    INTEGER NOT NULL DEFAULT 0,
    sender      TEXT,
    body_hash   TEXT,
    raw_id      INTEGER REFERENCES raw_messages (id),
    -- how many more times the same message arrived (reply-all, several deliveries)
    duplicates  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX entries_ticket ON entries (ticket_id, id);
CREATE INDEX entries_message_id ON entries (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX entries_sender_hash ON entries (sender, body_hash, at);

CREATE TABLE attachments (
    id           INTEGER PRIMARY KEY,
    entry_id     INTEGER NOT NULL REFERENCES entries (id),
    filename     TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    data         BLOB NOT NULL
);
CREATE INDEX attachments_entry ON attachments (entry_id);

-- Every Message-ID crmgate knows on a ticket, inbound and outbound: the
-- References / In-Reply-To lookup of threading, and the threading headers
-- of outgoing mail (agent_inbound: never shown to non-agents).
CREATE TABLE thread_ids (
    message_id    TEXT NOT NULL,
    ticket_id     INTEGER NOT NULL REFERENCES tickets (id),
    agent_inbound INTEGER NOT NULL DEFAULT 0,
    at            INTEGER NOT NULL,
    seq           INTEGER PRIMARY KEY
);
CREATE INDEX thread_ids_message_id ON thread_ids (message_id);
CREATE INDEX thread_ids_ticket ON thread_ids (ticket_id, seq);

-- Outgoing mail: the retry schedule lives in columns, not in sleeps.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    ticket_id       INTEGER REFERENCES tickets (id),
    entry_id        INTEGER REFERENCES entries (id),
    kind            TEXT NOT NULL,
    recipients      TEXT NOT NULL, -- JSON array of envelope recipients
    message_id      TEXT NOT NULL,
    message         BLOB NOT NULL,
    status          TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at, id);
CREATE INDEX outbox_message_id ON outbox (message_id);

-- One row per automatic message or re-send to an address: the caps count these.
CREATE TABLE sends (
    address    TEXT NOT NULL,
    ticket_id  INTEGER,
    automatic  INTEGER NOT NULL,
    at         INTEGER NOT NULL
);
-- Each count stops at the cap, along one of these.
CREATE INDEX sends_automatic ON sends (address, automatic, at);
CREATE INDEX sends_ticket ON sends (ticket_id, address, automatic, at);

CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    sender      TEXT,
    subject     TEXT,
    message_id  TEXT,
    raw_id      INTEGER REFERENCES raw_messages (id)
);

-- Addresses that were agents once: scrubbed from mail to non-agents forever.
CREATE TABLE known_agents (
    address     TEXT PRIMARY KEY,
    name        TEXT,
    first_seen  INTEGER NOT NULL,
    removed_at  INTEGER
) WITHOUT ROWID;

-- "Reply to the CRM only" notices: one per agent, ticket and day.
CREATE TABLE reply_all_notices (
    ticket_id   INTEGER NOT NULL,
    agent       TEXT NOT NULL,
    day         TEXT NOT NULL,
    PRIMARY KEY (ticket_id, agent, day)
) WITHOUT ROWID;
