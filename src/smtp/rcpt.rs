//! RCPT TO: one recipient of the open transaction.
//!
//! crmgate never relays: the next stage says which addresses are its own
//! (`Deliver::accepts_recipient`), everything else is `550 5.1.1`. NOTIFY
//! and ORCPT are accepted and ignored; RRVS and CONNEG, which smtp-proto
//! also parses, are refused with `555`.

use std::borrow::Cow;

use smtp_proto::{RcptTo, RCPT_CONNEG, RCPT_RRVS_CONTINUE, RCPT_RRVS_REJECT};

use super::command::names_bare_postmaster;
use super::replies;
use super::session::Session;
use super::Deliver;

impl<D: Deliver> Session<D> {
    pub(super) fn rcpt(&mut self, to: &RcptTo<Cow<'_, str>>, line: &[u8]) {
        let max_recipients = self.settings.max_recipients;
        let deliver = self.deliver.clone();
        let Some(transaction) = &mut self.transaction else {
            self.reply(replies::REPLY_MAIL_FIRST);
            return;
        };
        if to.rrvs != 0 || to.flags & (RCPT_CONNEG | RCPT_RRVS_REJECT | RCPT_RRVS_CONTINUE) != 0 {
            self.reply(replies::REPLY_UNSUPPORTED_PARAMETER);
            return;
        }
        let address = if !to.address.is_empty() {
            to.address.to_lowercase()
        } else if names_bare_postmaster(line) {
            "postmaster".to_string()
        } else {
            self.reply(replies::REPLY_BAD_RECIPIENT_SYNTAX);
            return;
        };
        // The same address twice is one recipient: the message is stored once.
        if transaction.rcpt_to.contains(&address) {
            self.reply(replies::REPLY_RECIPIENT_OK);
            return;
        }
        if transaction.rcpt_to.len() >= max_recipients {
            self.reply(replies::REPLY_TOO_MANY_RECIPIENTS);
            return;
        }
        if !deliver.accepts_recipient(&address) {
            tracing::info!(peer = %self.peer, %address, "recipient refused: not an address of this helpdesk (550 5.1.1)");
            self.reply(replies::REPLY_NO_SUCH_USER);
            return;
        }
        transaction.rcpt_to.push(address);
        self.reply(replies::REPLY_RECIPIENT_OK);
    }
}
