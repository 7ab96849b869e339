//! EHLO and HELO: the client names itself; any open transaction ends.

use super::replies::{self, Capabilities};
use super::session::Session;
use super::Deliver;

impl<D: Deliver> Session<D> {
    pub(super) fn ehlo(&mut self, host: &str) {
        self.helo = Some(host.to_string());
        self.transaction = None;
        let capabilities = Capabilities {
            max_message_bytes: self.settings.max_message_bytes,
            starttls: self.settings.tls.is_some() && !self.tls_active,
        };
        let hostname = self.settings.hostname.clone();
        replies::write_ehlo(self.out(), &hostname, capabilities);
    }

    pub(super) fn helo(&mut self, host: &str) {
        self.helo = Some(host.to_string());
        self.transaction = None;
        let hostname = self.settings.hostname.clone();
        replies::write_helo(self.out(), &hostname);
    }
}
