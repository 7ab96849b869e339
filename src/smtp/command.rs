//! Command dispatch: one parsed command line → a reply and the loop's next step.
//!
//! smtp-proto parses the line; its errors map onto the syntax replies here.
//! Verbs crmgate implements go to their own files; the verbs smtp-proto
//! knows but an MX for a helpdesk does not offer (AUTH, BDAT, EXPN, ETRN,
//! ...) get `502`.

use smtp_proto::{Error as ParseError, Request};
use tracing::debug;

use super::data::DataReader;
use super::replies;
use super::session::{Session, Step};
use super::Deliver;

impl<D: Deliver> Session<D> {
    /// Answers one command line (line ending included).
    pub(super) fn command(&mut self, line: &[u8]) -> Step {
        debug!(command = %String::from_utf8_lossy(line).trim_end(), "command");
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(error) => {
                debug!(%error, "command refused");
                self.reply(match error {
                    ParseError::UnknownCommand => replies::REPLY_UNKNOWN_COMMAND,
                    ParseError::InvalidSenderAddress => replies::REPLY_BAD_SENDER_SYNTAX,
                    ParseError::InvalidRecipientAddress => replies::REPLY_BAD_RECIPIENT_SYNTAX,
                    ParseError::UnsupportedParameter { .. } => replies::REPLY_UNSUPPORTED_PARAMETER,
                    ParseError::ResponseTooLong => replies::REPLY_LINE_TOO_LONG,
                    ParseError::SyntaxError { .. }
                    | ParseError::InvalidParameter { .. }
                    | ParseError::NeedsMoreData { .. }
                    | ParseError::InvalidResponse { .. } => replies::REPLY_SYNTAX_ERROR,
                });
                return Step::Continue;
            }
        };

        match request {
            Request::Ehlo { host } => self.ehlo(&host),
            Request::Helo { host } => self.helo(&host),
            Request::Mail { from } => self.mail(&from, line),
            Request::Rcpt { to } => self.rcpt(&to, line),
            Request::Data => return self.data(),
            Request::Rset => {
                self.transaction = None;
                self.reply(replies::REPLY_OK);
            }
            Request::Noop { .. } => self.reply(replies::REPLY_OK),
            Request::Vrfy { .. } => self.reply(replies::REPLY_CANNOT_VERIFY),
            Request::Quit => {
                self.reply(replies::REPLY_BYE);
                return Step::Close;
            }
            Request::StartTls => return self.starttls(),
            Request::Lhlo { .. }
            | Request::Bdat { .. }
            | Request::Auth { .. }
            | Request::Expn { .. }
            | Request::Help { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.reply(replies::REPLY_NOT_IMPLEMENTED),
        }
        Step::Continue
    }

    /// DATA: `354` and the switch to receiving the message, once a sender
    /// and at least one recipient were accepted.
    fn data(&mut self) -> Step {
        let Some(transaction) = &self.transaction else {
            self.reply(replies::REPLY_MAIL_FIRST);
            return Step::Continue;
        };
        if transaction.rcpt_to.is_empty() {
            self.reply(replies::REPLY_RCPT_FIRST);
            return Step::Continue;
        }
        let reader = DataReader::new(self.settings.max_message_bytes, transaction.size_hint);
        self.reply(replies::REPLY_START_DATA);
        Step::Data(reader)
    }

    /// STARTTLS: only when a certificate is configured, and once.
    fn starttls(&mut self) -> Step {
        if self.settings.tls.is_none() {
            self.reply(replies::REPLY_NOT_IMPLEMENTED);
            return Step::Continue;
        }
        if self.tls_active {
            self.reply(replies::REPLY_ALREADY_TLS);
            return Step::Continue;
        }
        self.reply(replies::REPLY_READY_FOR_TLS);
        Step::StartTls
    }
}

/// Does this MAIL or RCPT line name `<postmaster>` (no domain)?
///
/// smtp-proto returns the same empty address for `<>` and `<postmaster>`;
/// RFC 5321 §4.5.1 requires accepting the latter as a recipient, so the
/// raw line decides which one it was.
pub(super) fn names_bare_postmaster(line: &[u8]) -> bool {
    line.windows(b"<postmaster>".len())
        .any(|window| window.eq_ignore_ascii_case(b"<postmaster>"))
}
