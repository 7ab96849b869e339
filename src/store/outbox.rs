//! The outbox: outgoing mail waiting for the relay, as rows.
