//! The plan of one outgoing copy: what the outbox keeps instead of the
//! copy's bytes, so that a message is written once (the raw message and
//! its entry) and each copy is composed by the relay when it is sent.
//!
//! A plan holds by value whatever may change between ingest and send (the
//! scrub list of agents and former agents, a rendered template, the
//! language, the hostname, the thread) and refers to the entry for the
//! big things (its text and HTML, its attachments), which never change
//! once written. [`draft`] is the one way a [`Draft`] is built from a
//! plan: [`crate::apply`] builds the plan, and the relay rebuilds the
//! draft from it with the entry read back, so the copy sent is the one
//! planned at ingest, byte for byte, across a restart or a new
//! configuration.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::{ComposeError, Draft, Scrub};
use crate::config::Languages;
use crate::helpdesk::SendKind;
use crate::parse::{Attachment, Mailbox};
use crate::templates;

/// What the outbox keeps of one copy. Stored as JSON in one column: it is
/// read whole, only by the relay and never searched, and a few hundred
/// bytes of JSON cost one row written once where a column per field would
/// cost a schema change each time a copy learns something new. Its kind
/// and Message-ID are the outbox row's own columns, and its entry is the
/// row's `entry_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyPlan {
    /// The ticket's number, for the subject's tag (empty: mail of no ticket).
    pub number: String,
    /// As configured at ingest.
    #[serde(with = "languages")]
    pub language: Languages,
    pub from_name: String,
    pub from_address: String,
    /// A work note's signed reply address, signed with the key of ingest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_address: Option<String>,
    pub to: Vec<Mailbox>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<Mailbox>,
    /// Without the ticket's tag.
    pub subject: String,
    pub text: PlannedText,
    /// Attachments kept on the ticket, named in the body: (file name, size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listed: Vec<(String, u64)>,
    /// The entry's attachments go along (the e-mail function only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attachments: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    /// Unix seconds: the Date of ingest, not of the attempt.
    pub date: i64,
    pub loop_host: String,
    /// The agents and former agents as they were at ingest: an agent
    /// removed from the configuration before the copy leaves is scrubbed
    /// all the same. `None` for mail only agents receive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub: Option<Scrub>,
}

/// Where a copy's text comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlannedText {
    /// Written for this copy and kept here: a notice's template rendered
    /// at ingest (the templates directory may change before it is sent).
    Here(String),
    /// The entry's text as it is, without HTML: a receipt's or a
    /// closure's entry is its rendered template.
    Entry,
    /// The entry's text and HTML as a notification carries them
    /// ([`notification_text`]).
    Notification,
}

/// What a copy carries of its entry, as written at ingest or read back.
pub struct EntryBody<'a> {
    pub text: &'a str,
    pub html: Option<&'a str>,
    /// The entry's attachments, in the order they were kept: read only
    /// when the plan sends them along.
    pub attachments: Cow<'a, [Attachment]>,
}

/// The most text one copy carries. Real mail is far below it; a longer
/// text (a log pasted whole, 25 MB of it) stays whole on the ticket, and
/// each copy carries its beginning and says where the rest is, instead of
/// holding the whole text once more per copy while it is composed and
/// sent.
pub const NOTIFICATION_TEXT_MAX: usize = 1024 * 1024;

/// `text`, cut at the last line end before [`NOTIFICATION_TEXT_MAX`] with
/// a note naming the ticket, when it is longer. A function of the entry's
/// text and the plan alone: applied at send time, it cuts where ingest
/// would have.
pub fn notification_text(text: &str, number: &str, language: Languages) -> String {
    if text.len() <= NOTIFICATION_TEXT_MAX {
        return text.to_string();
    }
    let mut end = NOTIFICATION_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let head = &text[..end];
    let head = head.rfind('\n').map_or(head, |i| &head[..=i]);
    let note = templates::cut_note(language, text.len(), number);
    let mut out = String::with_capacity(head.len() + note.len());
    out.push_str(head);
    out.push_str(&note);
    out
}

/// The draft of a planned copy of `kind`, with the entry's text when the
/// plan refers to it.
///
/// # Errors
/// [`ComposeError::Plan`] when the plan refers to an entry and none is given.
pub fn draft(
    kind: SendKind,
    message_id: &str,
    plan: &CopyPlan,
    entry: Option<EntryBody<'_>>,
) -> Result<Draft, ComposeError> {
    let (text, html, attachments) = match (&plan.text, entry) {
        (PlannedText::Here(text), entry) => (
            text.clone(),
            None,
            entry
                .map(|e| e.attachments.into_owned())
                .unwrap_or_default(),
        ),
        (PlannedText::Entry, Some(entry)) => {
            (entry.text.to_string(), None, entry.attachments.into_owned())
        }
        (PlannedText::Notification, Some(entry)) => (
            notification_text(entry.text, &plan.number, plan.language),
            // A text that long is cut: the HTML would say more than it.
            entry
                .html
                .filter(|html| {
                    entry.text.len() <= NOTIFICATION_TEXT_MAX && html.len() <= NOTIFICATION_TEXT_MAX
                })
                .map(str::to_string),
            entry.attachments.into_owned(),
        ),
        (_, None) => {
            return Err(ComposeError::Plan(format!(
                "the copy {message_id} carries an entry's text, and has no entry"
            )))
        }
    };
    Ok(Draft {
        kind,
        ticket_number: plan.number.clone(),
        language: plan.language,
        from_name: plan.from_name.clone(),
        from_address: plan.from_address.clone(),
        reply_address: plan.reply_address.clone(),
        to: plan.to.clone(),
        cc: plan.cc.clone(),
        subject: plan.subject.clone(),
        text,
        html,
        listed_attachments: plan.listed.clone(),
        attachments: if plan.attachments {
            attachments
        } else {
            Vec::new()
        },
        message_id: message_id.to_string(),
        in_reply_to: plan.in_reply_to.clone(),
        references: plan.references.clone(),
        date: plan.date,
        loop_host: plan.loop_host.clone(),
        scrub: plan.scrub.clone(),
    })
}

/// `[gateway] language` as a plan keeps it: the words of the configuration.
mod languages {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::Languages;

    /// A match, so that a new setting does not compile without its word.
    fn word(languages: Languages) -> &'static str {
        match languages {
            Languages::Fr => "fr",
            Languages::En => "en",
            Languages::FrEn => "fr+en",
            Languages::EnFr => "en+fr",
        }
    }

    const ALL: [Languages; 4] = [
        Languages::Fr,
        Languages::En,
        Languages::FrEn,
        Languages::EnFr,
    ];

    pub fn serialize<S: Serializer>(languages: &Languages, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(word(*languages))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Languages, D::Error> {
        let stored = String::deserialize(d)?;
        ALL.into_iter()
            .find(|l| word(*l) == stored)
            .ok_or_else(|| serde::de::Error::custom(format!("no language {stored:?}")))
    }
}

impl CopyPlan {
    /// The plan as stored.
    ///
    /// # Errors
    /// Never in practice: every field serializes.
    pub fn to_json(&self) -> Result<String, ComposeError> {
        serde_json::to_string(self).map_err(|e| ComposeError::Plan(e.to_string()))
    }

    /// A stored plan.
    ///
    /// # Errors
    /// [`ComposeError::Plan`] when the column is not a plan.
    pub fn from_json(json: &str) -> Result<CopyPlan, ComposeError> {
        serde_json::from_str(json).map_err(|e| ComposeError::Plan(format!("unreadable plan: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_text_goes_into_copies_whole() {
        let text = "Bonjour,\nl'imprimante ne marche plus.\n";
        assert_eq!(notification_text(text, "TKT0000001", Languages::Fr), text);
    }

    #[test]
    fn a_long_text_is_cut_at_a_line_end_with_a_note_naming_the_ticket() {
        let line = "é".repeat(40) + "\n";
        let text = line.repeat(2 * NOTIFICATION_TEXT_MAX / line.len());
        let cut = notification_text(&text, "TKT0000042", Languages::En);
        assert!(cut.len() <= NOTIFICATION_TEXT_MAX + 200, "{}", cut.len());
        let (head, note) = cut.split_once("\n[… cut:").unwrap();
        assert!(text.starts_with(head) && head.ends_with('\n'));
        assert!(note.contains(&format!("{} bytes", text.len())), "{note}");
        assert!(note.contains("ticket TKT0000042"), "{note}");
        // Both languages, the first one first.
        let cut = notification_text(&text, "TKT0000042", Languages::FrEn);
        let (_, note) = cut.split_once("\n[… coupé :").unwrap();
        let (fr, en) = note.split_once("[… cut:").unwrap();
        assert!(fr.contains("billet TKT0000042"), "{fr}");
        assert!(en.contains("ticket TKT0000042"), "{en}");
    }

    #[test]
    fn a_plan_that_names_an_entry_needs_one() {
        let plan = CopyPlan {
            number: "TKT0000001".into(),
            language: Languages::FrEn,
            from_name: "Support".into(),
            from_address: "support@example.org".into(),
            reply_address: None,
            to: vec![Mailbox::new(None, "alice@u.example")],
            cc: Vec::new(),
            subject: "Printer".into(),
            text: PlannedText::Notification,
            listed: Vec::new(),
            attachments: false,
            in_reply_to: None,
            references: Vec::new(),
            date: 0,
            loop_host: "crm.example.org".into(),
            scrub: None,
        };
        let back = CopyPlan::from_json(&plan.to_json().unwrap()).unwrap();
        assert_eq!(back, plan);
        assert!(draft(SendKind::PublicCopy, "m@h", &plan, None).is_err());
    }
}
