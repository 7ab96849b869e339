//! Quick actions: what a believed agent does on a ticket by mail (SPEC,
//! "Quick actions"). Lines at the top of the agent's own text, each a `/`,
//! a word and its arguments, are read here into plain [`QuickAction`]s and
//! checked against the same rules as the CLI's; intake carries them out
//! through `desk`, after the message's own entry, in its transaction.
//! Pure: no store, no clock.

use crate::config::{is_address, Config};
use crate::decide::{admit_to_watch_group, Facts, NotAdmitted, Plan};
use crate::helpdesk::{EntryKind, Role, SendKind};

/// One action of the block, as the agent asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuickAction {
    /// `/resolve`: the closure notice goes, as `ticket resolve`.
    Resolve,
    /// `/reopen`: a resolved ticket is open again.
    Reopen,
    /// `/assign AGENT` (lower-cased; `me`/`moi` already replaced).
    Assign(String),
    /// `/watch`, `/notes` or `/requester` `add|remove ADDR…`.
    List(ListChange),
    /// `/email ADDR… [cc ADDR…]`: the ticket's e-mail function.
    Email(EmailTo),
    /// `/help`: the agent gets the list of quick actions.
    Help,
}

/// A change to one of the ticket's lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListChange {
    /// Requesters, watch list or work-notes list.
    pub role: Role,
    /// Added, else taken off.
    pub add: bool,
    /// Lower-cased, each once.
    pub addresses: Vec<String>,
}

/// Who the e-mail function writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailTo {
    /// Shown in To and sent to.
    pub to: Vec<String>,
    /// Shown in Cc and sent to.
    pub cc: Vec<String>,
}

/// One line of the block and what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuickLine {
    /// As written (trimmed): quoted in the ticket's `system` entries.
    pub line: String,
    /// What the line asks.
    pub action: QuickAction,
}

/// The block read off the top of a text, and the text without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuickBlock {
    /// In the order written: the order they run in.
    pub lines: Vec<QuickLine>,
    /// What the agent wrote below the block: the comment or work note.
    pub rest: String,
}

/// Why a line of the block is refused: the whole message is carried out
/// in nothing, and the agent is told which line and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuickProblem {
    /// Not one of the SPEC's words.
    UnknownWord(String),
    /// `add`/`remove` (or `ajouter`/`retirer`) expected.
    AddOrRemove,
    /// The action needs an address and has none.
    MissingArgument,
    /// An argument that is no mail address.
    NotAnAddress(String),
    /// An address where only an agent may stand (`/assign`, `/notes`).
    NotAnAgent(String),
    /// An agent (or former agent) for the watch group.
    AgentInWatchGroup(String),
    /// A CRM address for the watch group or the e-mail function.
    CrmAddress(String),
    /// `/resolve` on a resolved ticket, `/reopen` on an open one, a list
    /// change that changes nothing: what `desk` refuses when it runs.
    Refused(String),
}

/// A refused line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuickRefusal {
    /// As written, quoted in the notice.
    pub line: String,
    /// Why, told to the agent in the configured language.
    pub problem: QuickProblem,
}

/// The block at the top of `text`, if it starts with one: blank lines may
/// stand among the action lines, the first other line ends the block, and
/// a `/word` further down is ordinary text. `sender` replaces `me`/`moi`.
///
/// # Errors
/// The first line that cannot be read (unknown word, missing or malformed
/// argument).
pub fn read_block(text: &str, sender: &str) -> Option<Result<QuickBlock, QuickRefusal>> {
    let mut lines = Vec::new();
    let mut consumed = 0;
    for raw in text.split_inclusive('\n') {
        let line = raw.trim();
        if line.is_empty() {
            consumed += raw.len();
            continue;
        }
        if !line.starts_with('/') || line.starts_with("//") {
            break;
        }
        match read_line(line, sender) {
            Ok(action) => lines.push(QuickLine {
                line: line.to_string(),
                action,
            }),
            Err(problem) => {
                return Some(Err(QuickRefusal {
                    line: line.to_string(),
                    problem,
                }))
            }
        }
        consumed += raw.len();
    }
    if lines.is_empty() {
        return None;
    }
    Some(Ok(QuickBlock {
        lines,
        rest: text[consumed..].to_string(),
    }))
}

fn read_line(line: &str, sender: &str) -> Result<QuickAction, QuickProblem> {
    let mut words = line[1..].splitn(2, char::is_whitespace);
    let word = words.next().unwrap_or("").to_lowercase();
    let args = words.next().unwrap_or("");
    let bare = |word: &str| {
        if args.trim().is_empty() {
            Ok(())
        } else {
            Err(QuickProblem::UnknownWord(format!(
                "/{word} {}",
                args.trim()
            )))
        }
    };
    Ok(match word.as_str() {
        "resolve" | "résoudre" | "resoudre" => {
            bare(&word)?;
            QuickAction::Resolve
        }
        "reopen" | "rouvrir" => {
            bare(&word)?;
            QuickAction::Reopen
        }
        "help" | "aide" => {
            bare(&word)?;
            QuickAction::Help
        }
        "assign" | "assigner" => {
            let addresses = addresses(args, sender)?;
            match addresses.as_slice() {
                [one] => QuickAction::Assign(one.clone()),
                [] => return Err(QuickProblem::MissingArgument),
                [_, second, ..] => return Err(QuickProblem::NotAnAddress(second.clone())),
            }
        }
        "watch" | "surveillance" => change(Role::Watch, args, sender)?,
        "notes" => change(Role::Notes, args, sender)?,
        "requester" | "demandeur" => change(Role::Requester, args, sender)?,
        "email" | "courriel" => {
            let (to, cc) = match split_cc(args) {
                Some((to, cc)) => (addresses(to, sender)?, addresses(cc, sender)?),
                None => (addresses(args, sender)?, Vec::new()),
            };
            if to.is_empty() {
                return Err(QuickProblem::MissingArgument);
            }
            QuickAction::Email(EmailTo { to, cc })
        }
        _ => return Err(QuickProblem::UnknownWord(format!("/{word}"))),
    })
}

/// `add|remove ADDR…`, in English or French.
fn change(role: Role, args: &str, sender: &str) -> Result<QuickAction, QuickProblem> {
    let args = args.trim_start();
    let (verb, rest) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
    let add = match verb.to_lowercase().as_str() {
        "add" | "ajouter" => true,
        "remove" | "retirer" => false,
        _ => return Err(QuickProblem::AddOrRemove),
    };
    let addresses = addresses(rest, sender)?;
    if addresses.is_empty() {
        return Err(QuickProblem::MissingArgument);
    }
    Ok(QuickAction::List(ListChange {
        role,
        add,
        addresses,
    }))
}

/// `to… cc cc…`: the word `cc` alone separates the two.
fn split_cc(args: &str) -> Option<(&str, &str)> {
    let lower = args.to_ascii_lowercase();
    let mut at = 0;
    for token in lower.split_inclusive([' ', '\t', ',']) {
        let word = token.trim_matches([' ', '\t', ',']);
        if word == "cc" {
            return Some((&args[..at], &args[at + token.len()..]));
        }
        at += token.len();
    }
    None
}

/// Addresses bare or in `<…>`, separated by spaces or commas, lower-cased;
/// `me` and `moi` are the sender.
fn addresses(args: &str, sender: &str) -> Result<Vec<String>, QuickProblem> {
    let mut out = Vec::new();
    for token in args.split([' ', '\t', ',']).filter(|t| !t.is_empty()) {
        let address = token
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_ascii_lowercase();
        let address = match address.as_str() {
            "me" | "moi" => sender.to_ascii_lowercase(),
            _ => address,
        };
        if !is_address(&address) {
            return Err(QuickProblem::NotAnAddress(token.to_string()));
        }
        if !out.contains(&address) {
            out.push(address);
        }
    }
    Ok(out)
}

/// Check the block against the rules the CLI obeys too: agents where an
/// agent is needed, the watch group without agents or CRM addresses, and
/// the e-mail function never to a CRM address.
///
/// # Errors
/// The first line the rules refuse.
pub fn check(facts: &Facts<'_>, block: &QuickBlock) -> Result<(), QuickRefusal> {
    let config = facts.config;
    for line in &block.lines {
        let refuse = |problem| QuickRefusal {
            line: line.line.clone(),
            problem,
        };
        match &line.action {
            QuickAction::Assign(agent) => require_agents(config, [agent]).map_err(refuse)?,
            QuickAction::List(ListChange {
                role: Role::Notes,
                addresses,
                ..
            }) => {
                require_agents(config, addresses).map_err(refuse)?;
            }
            QuickAction::List(ListChange {
                add: true,
                addresses,
                ..
            }) => {
                for address in addresses {
                    admit_to_watch_group(facts, address).map_err(|e| {
                        refuse(match e {
                            NotAdmitted::Agent => QuickProblem::AgentInWatchGroup(address.clone()),
                            NotAdmitted::CrmAddress => QuickProblem::CrmAddress(address.clone()),
                        })
                    })?;
                }
            }
            QuickAction::Email(EmailTo { to, cc }) => {
                if let Some(ours) = to
                    .iter()
                    .chain(cc)
                    .find(|a| crate::decide::accepts_recipient(config, a))
                {
                    return Err(refuse(QuickProblem::CrmAddress(ours.clone())));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn require_agents<'a>(
    config: &Config,
    addresses: impl IntoIterator<Item = &'a String>,
) -> Result<(), QuickProblem> {
    match addresses.into_iter().find(|a| config.agent(a).is_none()) {
        Some(not_agent) => Err(QuickProblem::NotAnAgent(not_agent.clone())),
        None => Ok(()),
    }
}

/// The message was only actions (or `/email`, whose text goes to the
/// partners): the agent's own entry is kept as a `system` entry listing the
/// block — it still stands for the message, so a second delivery is a
/// duplicate — and no copy of it is re-emitted. Other entries (a forward's
/// requester comment, the receipt) and notices stay.
pub fn actions_only(plan: &mut Plan, agent: &str, block: &QuickBlock) {
    let Some(index) = plan.entries.iter().position(|e| {
        e.by_agent
            && e.author.address == agent
            && matches!(e.kind, EntryKind::Comment | EntryKind::WorkNote)
    }) else {
        return;
    };
    let sends_email = block
        .lines
        .iter()
        .any(|l| matches!(l.action, QuickAction::Email(_)));
    let entry = &mut plan.entries[index];
    entry.kind = EntryKind::System;
    let lines: Vec<&str> = block.lines.iter().map(|l| l.line.as_str()).collect();
    entry.text = format!("quick actions by {agent}:\n{}", lines.join("\n")).into();
    entry.html = None;
    // `/email` keeps the attachments on its own `email` entry.
    entry.keeps_attachments &= !sends_email;
    plan.sends.retain(|s| {
        s.entry != index
            || !matches!(
                s.kind,
                SendKind::PublicCopy
                    | SendKind::AgentCopy
                    | SendKind::WorkNote
                    | SendKind::PartnerCopy
            )
    });
}

/// Nothing of the agent's own is left: white space, a signature (from a
/// `-- ` line) or quoted earlier mail (`>` lines, or a reply attribution
/// and all below it). Then no comment or work note is logged or sent.
pub fn nothing_remains(rest: &str) -> bool {
    for line in rest.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('>') {
            continue;
        }
        if line.trim_end() == "--" || is_attribution(trimmed) {
            return true;
        }
        return false;
    }
    true
}

/// A line that introduces quoted mail: Gmail's "Le … a écrit :", "On …
/// wrote:", an Outlook "De : / From:" header block, or an "Original
/// Message" separator.
fn is_attribution(line: &str) -> bool {
    let lower = line.to_lowercase();
    (lower.starts_with("le ") && (lower.ends_with("a écrit :") || lower.ends_with("a écrit:")))
        || (lower.starts_with("on ") && lower.ends_with("wrote:"))
        || lower.starts_with("de :")
        || lower.starts_with("de:")
        || lower.starts_with("from:")
        || lower.starts_with("-----original message")
        || lower.starts_with("-----message d'origine")
        || lower.starts_with("________________")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(text: &str) -> QuickBlock {
        read_block(text, "jane.doe@example.org").unwrap().unwrap()
    }

    fn problem(text: &str) -> QuickProblem {
        read_block(text, "jane.doe@example.org")
            .unwrap()
            .unwrap_err()
            .problem
    }

    #[test]
    fn blank_lines_may_stand_among_the_actions_and_the_first_text_line_ends_the_block() {
        let b = block("\n/resolve\n\n/assign me\nMerci, c'est réglé.\n/reopen\n");
        let actions: Vec<_> = b.lines.iter().map(|l| l.action.clone()).collect();
        assert_eq!(
            actions,
            [
                QuickAction::Resolve,
                QuickAction::Assign("jane.doe@example.org".into())
            ]
        );
        assert_eq!(b.rest, "Merci, c'est réglé.\n/reopen\n");
    }

    #[test]
    fn a_text_that_does_not_start_with_an_action_has_no_block() {
        assert!(read_block("Bonjour,\n/resolve\n", "a@b.c").is_none());
        assert!(read_block("// a comment\n", "a@b.c").is_none());
        assert!(read_block("", "a@b.c").is_none());
    }

    #[test]
    fn words_are_case_insensitive_and_french_words_and_accents_count() {
        assert_eq!(block("/RESOLVE").lines[0].action, QuickAction::Resolve);
        assert_eq!(block("/Résoudre").lines[0].action, QuickAction::Resolve);
        assert_eq!(block("/resoudre").lines[0].action, QuickAction::Resolve);
        assert_eq!(block("/Rouvrir").lines[0].action, QuickAction::Reopen);
        assert_eq!(block("/aide").lines[0].action, QuickAction::Help);
        assert_eq!(
            block("/assigner MOI").lines[0].action,
            QuickAction::Assign("jane.doe@example.org".into())
        );
        assert_eq!(
            block("/surveillance AJOUTER a@x.org").lines[0].action,
            QuickAction::List(ListChange {
                role: Role::Watch,
                add: true,
                addresses: vec!["a@x.org".into()]
            })
        );
        assert_eq!(
            block("/demandeur retirer a@x.org").lines[0].action,
            QuickAction::List(ListChange {
                role: Role::Requester,
                add: false,
                addresses: vec!["a@x.org".into()]
            })
        );
    }

    #[test]
    fn addresses_bare_or_bracketed_separated_by_commas_or_spaces() {
        assert_eq!(
            block("/watch add <A@X.org>, b@x.org  c@x.org,").lines[0].action,
            QuickAction::List(ListChange {
                role: Role::Watch,
                add: true,
                addresses: vec!["a@x.org".into(), "b@x.org".into(), "c@x.org".into()]
            })
        );
        assert_eq!(
            block("/email p@partner.org, q@partner.org cc <r@x.org>").lines[0].action,
            QuickAction::Email(EmailTo {
                to: vec!["p@partner.org".into(), "q@partner.org".into()],
                cc: vec!["r@x.org".into()]
            })
        );
        assert_eq!(
            block("/courriel p@partner.org").lines[0].action,
            QuickAction::Email(EmailTo {
                to: vec!["p@partner.org".into()],
                cc: vec![]
            })
        );
    }

    #[test]
    fn malformed_lines_are_refused_with_the_line() {
        let r = read_block("/resolve\n/frobnicate\n", "a@b.c")
            .unwrap()
            .unwrap_err();
        assert_eq!(r.line, "/frobnicate");
        assert_eq!(r.problem, QuickProblem::UnknownWord("/frobnicate".into()));
        assert_eq!(problem("/assign"), QuickProblem::MissingArgument);
        assert_eq!(problem("/watch add"), QuickProblem::MissingArgument);
        assert_eq!(problem("/watch a@x.org"), QuickProblem::AddOrRemove);
        assert_eq!(
            problem("/watch add not-an-address"),
            QuickProblem::NotAnAddress("not-an-address".into())
        );
        assert_eq!(problem("/email cc a@x.org"), QuickProblem::MissingArgument);
        assert_eq!(
            problem("/resolve now"),
            QuickProblem::UnknownWord("/resolve now".into())
        );
    }

    #[test]
    fn only_white_space_signatures_and_quotes_remain() {
        assert!(nothing_remains(""));
        assert!(nothing_remains("\n  \n"));
        assert!(nothing_remains("\n-- \nJane Doe\nSoutien TI\n"));
        assert!(nothing_remains("> old text\n> more\n"));
        assert!(nothing_remains(
            "\nLe lun. 30 nov. 2026 à 10:00, Alice <a@x.org> a écrit :\n> texte\n"
        ));
        assert!(nothing_remains(
            "On Mon, Nov 30, 2026 at 10:00 Alice wrote:\n> text\n"
        ));
        assert!(nothing_remains(
            "________________________________\nDe : Soutien TI <support@x>\nEnvoyé : lundi\n"
        ));
        assert!(!nothing_remains("Merci.\n-- \nJane\n"));
        assert!(!nothing_remains("\nJ'ai remplacé le toner.\n"));
    }
}
