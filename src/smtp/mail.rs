//! MAIL FROM: opens a transaction.
//!
//! The null reverse-path `<>` is accepted: delivery reports about mail
//! crmgate sent must get in. Of the parameters, SIZE, BODY, SMTPUTF8, RET
//! and ENVID are accepted and ignored (a sender may add them whether or not
//! we advertise the extension); smtp-proto also parses others (BY,
//! REQUIRETLS, HOLDFOR, AUTH, ...), which crmgate does not implement and
//! therefore refuses with `555` rather than silently dropping a promise.

use std::borrow::Cow;

use smtp_proto::{
    MailFrom, MAIL_BY_NOTIFY, MAIL_BY_RETURN, MAIL_BY_TRACE, MAIL_CONPERM, MAIL_REQUIRETLS,
};

use super::command::names_bare_postmaster;
use super::replies;
use super::session::{Session, Transaction};
use super::Deliver;

/// MAIL flags for extensions crmgate does not offer.
const UNSUPPORTED_MAIL_FLAGS: u64 =
    MAIL_REQUIRETLS | MAIL_CONPERM | MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE;

impl<D: Deliver> Session<D> {
    pub(super) fn mail(&mut self, from: &MailFrom<Cow<'_, str>>, line: &[u8]) {
        if self.helo.is_none() {
            self.reply(replies::REPLY_EHLO_FIRST);
            return;
        }
        if self.transaction.is_some() {
            self.reply(replies::REPLY_NESTED_MAIL);
            return;
        }
        if has_unsupported_parameter(from) {
            self.reply(replies::REPLY_UNSUPPORTED_PARAMETER);
            return;
        }
        if from.size > self.settings.max_message_bytes {
            self.reply(replies::REPLY_TOO_LARGE);
            return;
        }
        let mail_from = if !from.address.is_empty() {
            Some(from.address.to_lowercase())
        } else if names_bare_postmaster(line) {
            Some("postmaster".to_string())
        } else {
            None
        };
        self.transaction = Some(Transaction {
            mail_from,
            rcpt_to: Vec::new(),
            size_hint: from.size,
        });
        self.reply(replies::REPLY_SENDER_OK);
    }
}

fn has_unsupported_parameter(from: &MailFrom<Cow<'_, str>>) -> bool {
    from.flags & UNSUPPORTED_MAIL_FLAGS != 0
        || from.by != 0
        || from.hold_for != 0
        || from.hold_until != 0
        || from.mt_priority != 0
        || from.trans_id.is_some()
        || from.solicit.is_some()
        || from.mtrk.is_some()
        || from.auth.is_some()
}
