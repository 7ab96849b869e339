//! Under which name mail leaves (SPEC, "Outgoing mail"): `"<sender's name>
//! via <display_name>"` for what a person wrote, the helpdesk's own name
//! for what crmgate writes, and a marked name for an agent's From that is
//! not believed.

use crate::config::{Config, Language};
use crate::parse::Mailbox;

/// The helpdesk itself, as the author of receipts, closures and `system`
/// entries.
pub fn helpdesk(config: &Config) -> Mailbox {
    Mailbox::new(Some(&config.gateway.display_name), &config.addresses.public)
}

/// `"<name> via <display_name>"`: an agent's configured name, else the
/// mailbox's display name, else its local part, so an agent's address
/// never shows even when the configuration gives no name.
pub fn via_display_name(mailbox: &Mailbox, config: &Config) -> String {
    let name = config
        .agent(&mailbox.address)
        .map(|a| a.name.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| mailbox.name.clone())
        .unwrap_or_else(|| {
            mailbox
                .address
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string()
        });
    format!("{name} via {}", config.gateway.display_name)
}

/// The work-notes list as the To of mail to it, with the agents' names.
pub fn agent_mailboxes(config: &Config, addresses: &[String]) -> Vec<Mailbox> {
    addresses
        .iter()
        .map(|a| Mailbox::new(config.agent(a).map(|x| x.name.as_str()), a))
        .collect()
}

/// The From name of the copies of an entry: marked when the entry is the
/// unverified sender's own words.
pub(super) fn entry_from_name(
    config: &Config,
    author: &Mailbox,
    sender: &Mailbox,
    unverified: bool,
) -> String {
    if unverified && author.address == sender.address {
        unverified_name(author, config)
    } else {
        via_display_name(author, config)
    }
}

/// The display name of an agent's From that is not believed: marked, in
/// the helpdesk's language, so no agent takes it for a colleague's word.
fn unverified_name(mailbox: &Mailbox, config: &Config) -> String {
    let name = mailbox.name.as_deref().unwrap_or(&mailbox.address);
    let mark = crate::templates::in_each(
        config.gateway.language,
        crate::templates::LANGUAGE_SLASH,
        |l| unverified_mark(l).to_string(),
    );
    format!(
        "{name} ({mark}: {}) via {}",
        mailbox.address, config.gateway.display_name
    )
}

/// The mark itself (`"Jane Doe (expéditeur non vérifié: jane.doe@…) via
/// Soutien TI"`).
fn unverified_mark(language: Language) -> &'static str {
    match language {
        Language::Fr => "expéditeur non vérifié",
        Language::En => "unverified sender",
    }
}
