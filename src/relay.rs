//! Relay: the outbox worker. Sends queued rows through the configured relay
//! (SMTP via lettre, or `.eml` files), retries with backoff, marks failures.
