//! Receive: the embedded SMTP listener.
//!
//! A tokio accept loop; each session is driven by smtp-proto's parser. The
//! session owns the protocol (limits, pipelining, dot-stuffing, timeouts);
//! what to do with a finished message is the [`Deliver`] implementation's
//! business, and its [`Verdict`] becomes the reply to DATA.

use std::future::Future;
use std::net::IpAddr;

pub mod replies;

/// The SMTP envelope of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The peer's address: decides whether an agent's From is believed.
    pub peer: IpAddr,
    pub helo: String,
    /// `None` for the null reverse-path `MAIL FROM:<>`. Lower-cased.
    pub mail_from: Option<String>,
    /// Accepted recipients, lower-cased, in RCPT order.
    pub rcpt_to: Vec<String>,
}

/// What became of a message handed over at the end of DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Durably committed (or quarantined, or recorded as a duplicate): `250`.
    Stored,
    /// Refused by policy: `550 5.7.1` followed by this sentence.
    Refused(String),
    /// Could not be committed: `451 4.3.0`, the client retries.
    TempFailure,
}

/// The stage after the listener: takes a whole message and says what became of it.
pub trait Deliver: Send + Sync + 'static {
    /// Is this RCPT address one crmgate accepts (a CRM address, with or
    /// without `+tag`, or postmaster)?
    fn accepts_recipient(&self, address: &str) -> bool;

    /// Store one message. Must not return `Stored` before the commit is durable.
    fn deliver(&self, envelope: Envelope, raw: Vec<u8>) -> impl Future<Output = Verdict> + Send;
}
