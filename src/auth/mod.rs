//! Auth: crmgate's own SPF, DKIM and DMARC, in and out.
//!
//! Inbound ([`verify`]), between receive and decide: for an agent's From
//! that neither a trusted relay nor our `authserv_id` vouches for, crmgate
//! checks the message itself, as the MX it is, and hands decide the answer
//! as plain data (a [`Verification`]). The DNS queries happen here, at
//! the edge; decide stays pure.
//!
//! Outbound ([`sign`]), in the relay: every message is DKIM-signed at send
//! time, after its last change, so the signature verifies at the other end.

pub mod sign;
pub mod verify;

pub use sign::{DkimSigner, SignError};
pub use verify::{aligned, Dkim, Spf, Verification, Verifier, VerifyError};
