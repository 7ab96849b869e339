//! crmgate: the mail gateway of a helpdesk CRM.
//!
//! Every exchange about a ticket passes through crmgate, so the whole
//! conversation stays on the ticket and no agent's personal address ever
//! reaches a requester. A message travels through these stages, one module
//! each:
//!
//! ```text
//!  SMTP client ──► smtp      receive: ESMTP sessions, limits, replies
//!                   │
//!                   ▼
//!                 parse      raw bytes → Inbound (mail-parser)
//!                   │
//!                   ▼
//!                 thread     which ticket: Subject number, +tag, References
//!                   │
//!                   ▼
//!                 decide     the helpdesk's rules, pure: Inbound + ticket → Decision
//!                   │
//!                   ▼
//!                 store      one SQLite transaction: entries, lists, outbox
//!                   │        (group commit; 250 only after it is durable)
//!                   ▼
//!                 compose    Decision → outgoing messages (mail-builder), scrubbed
//!                   │
//!                   ▼
//!                 relay      outbox worker: SMTP or .eml files (lettre), retries
//! ```
//!
//! [`intake`] ties parse → thread → decide → compose → store together for one
//! inbound message; the SMTP listener and `crmgate deliver` both call it.
//! [`writer`] is the daemon's one writing thread: it batches the messages
//! of many sessions (and the relay's outcomes) into one commit each.
//! [`apply`] writes a plan and queues its mail, for inbound mail and for the
//! CLI's ticket commands alike.
//! [`auth`] checks SPF, DKIM and DMARC of agents' mail before decide, and
//! DKIM-signs what the relay sends.
//! [`desk`] plans and writes what an agent does on a ticket without a mail
//! (comment, e-mail, resolve, lists…), with decide's rules; the CLI calls it.
//! [`cli`] holds the command line; [`daemon`] starts and stops the pieces.
//! [`helpdesk`] holds the nouns every stage shares (ticket states, entry
//! kinds, list roles, outbox kinds, the envelope), below them all.

pub mod apply;
pub mod auth;
pub mod cli;
pub mod compose;
pub mod config;
pub mod daemon;
pub mod decide;
pub mod desk;
pub mod health;
pub mod helpdesk;
pub mod intake;
pub mod metrics;
pub mod parse;
pub mod relay;
pub mod smtp;
pub mod store;
pub mod templates;
pub mod thread;
pub mod writer;
