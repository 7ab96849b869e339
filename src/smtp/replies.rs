//! Every reply a client can see, with its enhanced status code, in one place.
//!
//! A sender's MTA acts on the three-digit code (retry on 4xx, bounce on
//! 5xx), and a human reading a bounce acts on the enhanced status code
//! (RFC 3463) and the text. Keeping them here, named, makes the listener's
//! behaviour reviewable at a glance and lets tests refer to a reply by name
//! rather than by a string copied from the code.

use std::fmt;

/// One SMTP reply line.
///
/// `status` is the RFC 3463 enhanced status code; it is empty for the
/// replies that must not carry one (the greeting, `354`, the EHLO lines),
/// because ENHANCEDSTATUSCODES applies only to 2xx, 4xx and 5xx replies
/// given after EHLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: &'static str,
    pub text: &'static str,
}

impl Reply {
    const fn new(code: u16, status: &'static str, text: &'static str) -> Self {
        Self { code, status, text }
    }

    /// "550 5.1.1": what a test or a log usually matches on.
    pub fn prefix(&self) -> String {
        if self.status.is_empty() {
            self.code.to_string()
        } else {
            format!("{} {}", self.code, self.status)
        }
    }

    /// Appends the reply line, CRLF included, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        self.write_with(out, "");
    }

    /// Appends the reply line with `detail` after the fixed text (a queue
    /// id, or the policy's sentence). Control characters in `detail` become
    /// spaces: a CR or LF there would let the detail forge a reply line.
    pub fn write_with(&self, out: &mut Vec<u8>, detail: &str) {
        out.extend_from_slice(self.to_string().as_bytes());
        out.extend(
            detail
                .chars()
                .take(MAX_DETAIL_CHARS)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.prefix())?;
        f.write_str(self.text)
    }
}

/// A reply line stays readable and well under any client's line limit even
/// when the policy's sentence is long.
const MAX_DETAIL_CHARS: usize = 400;

/// Appends the greeting, `220 <hostname> ESMTP crmgate`.
pub fn write_greeting(out: &mut Vec<u8>, hostname: &str) {
    out.extend_from_slice(format!("220 {hostname} ESMTP crmgate\r\n").as_bytes());
}

/// Appends the HELO reply, `250 <hostname>`.
pub fn write_helo(out: &mut Vec<u8>, hostname: &str) {
    out.extend_from_slice(format!("250 {hostname}\r\n").as_bytes());
}

/// What EHLO advertises, besides the hostname line.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub max_message_bytes: usize,
    /// Only when a certificate is configured and the session is not yet in TLS.
    pub starttls: bool,
}

/// Appends the multi-line EHLO reply. Never DSN (crmgate sends no delivery
/// status notifications of its own) and never AUTH (it is an MX, not a
/// submission server).
pub fn write_ehlo(out: &mut Vec<u8>, hostname: &str, capabilities: Capabilities) {
    let mut lines = vec![
        hostname.to_string(),
        format!("SIZE {}", capabilities.max_message_bytes),
        "PIPELINING".to_string(),
        "8BITMIME".to_string(),
        "SMTPUTF8".to_string(),
        "ENHANCEDSTATUSCODES".to_string(),
    ];
    if capabilities.starttls {
        lines.push("STARTTLS".to_string());
    }
    let last = lines.len() - 1;
    for (index, line) in lines.iter().enumerate() {
        let separator = if index == last { ' ' } else { '-' };
        out.extend_from_slice(format!("250{separator}{line}\r\n").as_bytes());
    }
}

// --- Positive replies -------------------------------------------------------

/// NOOP and RSET.
pub const REPLY_OK: Reply = Reply::new(250, "2.0.0", "Ok");
pub const REPLY_SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender ok");
pub const REPLY_RECIPIENT_OK: Reply = Reply::new(250, "2.1.5", "Recipient ok");
/// Followed by the transaction id, so a sender's log and ours can be matched.
pub const REPLY_STORED: Reply = Reply::new(250, "2.0.0", "Ok: queued as ");
pub const REPLY_START_DATA: Reply = Reply::new(354, "", "End data with <CR><LF>.<CR><LF>");
pub const REPLY_BYE: Reply = Reply::new(221, "2.0.0", "Bye");
/// VRFY: crmgate does not confirm addresses (that would help harvesters).
pub const REPLY_CANNOT_VERIFY: Reply = Reply::new(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const REPLY_READY_FOR_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");

// --- Refusals of a recipient or a message -----------------------------------

/// RCPT for an address that is not a CRM address nor postmaster: crmgate never relays.
pub const REPLY_NO_SUCH_USER: Reply = Reply::new(550, "5.1.1", "No such user here");
pub const REPLY_TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Too many recipients");
/// At MAIL (declared SIZE) or at the end of DATA (actual size).
pub const REPLY_TOO_LARGE: Reply = Reply::new(552, "5.3.4", "Message too big");
/// Followed by the policy's sentence saying why.
pub const REPLY_REFUSED: Reply = Reply::new(550, "5.7.1", "");
/// The message could not be committed; the sender keeps it and retries.
pub const REPLY_TEMP_FAILURE: Reply = Reply::new(
    451,
    "4.3.0",
    "Temporary failure, message not stored, please try again later",
);

/// crmgate's own check of an agent's From met a DNS failure (RFC 7601's
/// temperror): nothing is stored, the sender retries.
pub const REPLY_AUTH_TEMP_FAILURE: Reply = Reply::new(
    451,
    "4.4.3",
    "Cannot verify the sender now (DNS failure), please try again later",
);

// --- Protocol errors --------------------------------------------------------

pub const REPLY_UNKNOWN_COMMAND: Reply = Reply::new(500, "5.5.1", "Unknown command");
/// A command line over 4 KiB, or a data line over 1 MiB.
pub const REPLY_LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
/// Verbs smtp-proto knows but crmgate does not offer (AUTH, BDAT, EXPN, ...).
pub const REPLY_NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Command not implemented");
pub const REPLY_SYNTAX_ERROR: Reply = Reply::new(501, "5.5.4", "Syntax error");
pub const REPLY_BAD_SENDER_SYNTAX: Reply = Reply::new(501, "5.1.7", "Bad sender address syntax");
pub const REPLY_BAD_RECIPIENT_SYNTAX: Reply =
    Reply::new(501, "5.1.3", "Bad recipient address syntax");
pub const REPLY_UNSUPPORTED_PARAMETER: Reply =
    Reply::new(555, "5.5.4", "Parameter not recognized or not implemented");
pub const REPLY_EHLO_FIRST: Reply = Reply::new(503, "5.5.1", "Send EHLO or HELO first");
pub const REPLY_NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Sender already given");
pub const REPLY_MAIL_FIRST: Reply = Reply::new(503, "5.5.1", "Send MAIL first");
pub const REPLY_RCPT_FIRST: Reply = Reply::new(503, "5.5.1", "No valid recipients");
pub const REPLY_ALREADY_TLS: Reply = Reply::new(503, "5.5.1", "TLS already active");

// --- Session ends -----------------------------------------------------------

pub const REPLY_IDLE_TIMEOUT: Reply = Reply::new(421, "4.4.2", "Idle timeout, closing connection");
pub const REPLY_TOO_MANY_COMMANDS: Reply =
    Reply::new(421, "4.7.0", "Too many commands, closing connection");
pub const REPLY_TOO_MANY_SESSIONS: Reply = Reply::new(421, "4.7.0", "Too many connections");
/// The daemon is stopping; the sender retries later.
pub const REPLY_SHUTTING_DOWN: Reply =
    Reply::new(421, "4.3.0", "Service shutting down, try again later");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_cannot_forge_a_second_reply_line() {
        let mut out = Vec::new();
        REPLY_REFUSED.write_with(&mut out, "no\r\n250 2.0.0 fake");
        assert_eq!(out, b"550 5.7.1 no  250 2.0.0 fake\r\n");
    }

    #[test]
    fn ehlo_lines_end_with_a_space_separated_last_line() {
        let mut out = Vec::new();
        let capabilities = Capabilities {
            max_message_bytes: 10,
            starttls: true,
        };
        write_ehlo(&mut out, "mx.example", capabilities);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("250-mx.example\r\n250-SIZE 10\r\n"));
        assert!(text.ends_with("250 STARTTLS\r\n"));
        assert!(!text.contains("DSN") && !text.contains("AUTH"));
    }

    #[test]
    fn greeting_and_354_carry_no_enhanced_status() {
        assert_eq!(REPLY_START_DATA.prefix(), "354");
        assert_eq!(REPLY_NO_SUCH_USER.prefix(), "550 5.1.1");
    }
}
