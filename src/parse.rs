//! Parse: raw RFC 5322 bytes → [`Inbound`], the plain data every later stage
//! works on.
//!
//! This is the only module that touches mail-parser. Everything the rules
//! need is extracted here once (decoded Subject, addresses lower-cased, text
//! body, attachments, the signals of automatic mail, Authentication-Results,
//! forwarded mail), so that `decide` stays a pure function of plain values.
//!
//! Submodules: `charset` reads header lines (and undeclared bodies) written
//! in a legacy charset, `forward` finds a forwarded message (attached or
//! pasted inline by the usual clients), `html` renders HTML-only mail as
//! text, `reply` cuts a reply at crmgate's "reply above this line" marker,
//! `report` reads delivery reports (RFC 3464). Parsing is lenient: only
//! input without any header line is refused ([`ParseError::Unparseable`]).

mod charset;
mod forward;
mod html;
mod reply;
mod report;

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};

use mail_parser::{Address, Header, HeaderValue, Message, MessageParser, MimeHeaders, PartType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A mailbox from a header: display name and lower-cased address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    pub name: Option<String>,
    /// Lower-cased, without angle brackets.
    pub address: String,
}

impl Mailbox {
    pub fn new(name: Option<&str>, address: &str) -> Mailbox {
        Mailbox {
            name: name.map(str::to_string).filter(|n| !n.trim().is_empty()),
            address: address.trim().to_ascii_lowercase(),
        }
    }
}

/// One attachment kept on the ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub data: Vec<u8>,
    /// An image the HTML body shows by its `cid:` (a signature's logo):
    /// kept on the ticket, not listed in notifications.
    pub inline: bool,
}

/// Why a message counts as automatic mail (SPEC rule 4), as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoSignal {
    /// `Auto-Submitted` other than `no`, with its value.
    AutoSubmitted(String),
    /// `Precedence: bulk|junk|list`.
    Precedence(String),
    /// `X-Autoreply`, `X-Autorespond`, `X-MS-Exchange-Inbox-Rules-Loop`,
    /// `X-Auto-Response-Suppress: All`, `List-Id`, `List-Unsubscribe`: the
    /// header's name.
    Header(String),
    /// `multipart/report` (delivery status, disposition, feedback).
    Report,
}

impl AutoSignal {
    pub fn describe(&self) -> String {
        match self {
            AutoSignal::AutoSubmitted(v) => format!("Auto-Submitted: {v}"),
            AutoSignal::Precedence(v) => format!("Precedence: {v}"),
            AutoSignal::Header(h) => h.clone(),
            AutoSignal::Report => "multipart/report".into(),
        }
    }
}

/// One `Authentication-Results` header, top-most first as they appear.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthResult {
    /// Lower-cased authserv-id.
    pub authserv_id: String,
    pub dmarc_pass: bool,
    /// Lower-cased `header.d` (or `header.i` domain) of each `dkim=pass`.
    pub dkim_pass_domains: Vec<String>,
}

/// What a delivery report (RFC 3464) says, enough to find the outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryReport {
    /// `Final-Recipient` / `Original-Recipient` addresses whose `Action` is `failed`.
    pub failed_recipients: Vec<String>,
    /// `Diagnostic-Code` (or `Status`) text, for the log and the agents.
    pub diagnostic: String,
    /// Message-ID of the returned message (the `message/rfc822` or
    /// `text/rfc822-headers` part), where present.
    pub original_message_id: Option<String>,
    /// The `X-Crmgate-Outbox` header of the returned message: the outbox row
    /// the report is about, even when the remote MTA rewrote the envelope
    /// sender and the VERP address was lost.
    pub outbox_id: Option<i64>,
}

/// A forwarded message found inside an agent's mail (SPEC rule 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The forwarded mail's original sender: the requester of the new ticket.
    pub original_from: Mailbox,
    pub original_subject: String,
    /// The forwarded text, as the requester wrote it.
    pub original_text: String,
    /// What the agent wrote above the forwarded block (may be empty).
    pub agent_text: String,
}

/// The plain data of one inbound message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inbound {
    /// First `From` mailbox; `None` when the header is missing or unreadable.
    pub from: Option<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    /// Decoded (RFC 2047) and unfolded; empty when missing.
    pub subject: String,
    /// Without angle brackets.
    pub message_id: Option<String>,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    /// Unix seconds from the Date header, when it parses.
    pub date: Option<i64>,
    /// The text body (text/plain parts joined, charset decoded, `\n` line
    /// endings); for HTML-only mail a text rendering of the HTML; for a
    /// reply to a notification, only what is above the marker (see
    /// `cut_at_marker`). Shared (not copied) with the entries the rules
    /// plan from it.
    pub text: std::sync::Arc<str>,
    /// The HTML body, when there is one.
    pub html: Option<String>,
    /// The message answered a notification: `text` and `html` are what
    /// its writer added above crmgate's reply marker, the quoted rest is
    /// cut (see `parse::reply`); the stored raw message keeps it all.
    pub cut_at_marker: bool,
    pub attachments: Vec<Attachment>,
    /// The first signal of automatic mail found, if any.
    pub auto: Option<AutoSignal>,
    pub report: Option<DeliveryReport>,
    /// Values of the top-level `X-Crmgate-Loop` headers.
    pub loop_hosts: Vec<String>,
    pub auth_results: Vec<AuthResult>,
    /// `X-Spam-Flag: YES`.
    pub spam_flag: bool,
    /// The mailing list the message came through, lower-cased: the id of
    /// `List-Id` (without `<>`) and the address of `List-Post`, for
    /// `[auto] human_lists`.
    pub list_ids: Vec<String>,
    /// crmgate's own SPF/DKIM check, set by intake before decide (parse
    /// leaves it empty: it asks no DNS).
    pub sender_check: crate::helpdesk::SenderCheck,
    pub forward: Option<Forward>,
    /// Hex SHA-256 of the normalised text body: the duplicate check compares it.
    pub body_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The header block cannot be parsed at all: the message goes to quarantine.
    #[error("the header block cannot be parsed")]
    Unparseable,
}

/// Parse one message.
///
/// Never panics and is lenient: a missing From, Date or Message-ID, broken
/// MIME structure or unknown charsets still give an [`Inbound`] (the SPEC
/// refuses nothing for those), with the fields that could be read.
///
/// # Errors
/// [`ParseError::Unparseable`] when there is no header block to speak of:
/// empty input, or bytes without a single `Name: value` header line.
pub fn parse(raw: &[u8]) -> Result<Inbound, ParseError> {
    let raw = repair_header_block(raw);
    if !has_header_line(&raw) {
        return Err(ParseError::Unparseable);
    }
    // mail-parser is written not to panic, but it holds `debug_assert!`s
    // and unchecked offset arithmetic that debug builds check. Should hostile
    // input ever trip one, the message is one we cannot read anyway: it goes
    // to quarantine instead of taking the SMTP session down.
    let message = catch_unwind(AssertUnwindSafe(|| {
        MessageParser::default().parse(&raw[..])
    }))
    .ok()
    .flatten()
    .ok_or(ParseError::Unparseable)?;
    Ok(extract(&message))
}

/// Everything the later stages need, read once from the parsed message.
fn extract(message: &Message<'_>) -> Inbound {
    let headers = message.headers();
    let subject = message.subject().map(unfold).unwrap_or_default();
    let body = BodyParts::of(message);
    let (full_text, full_html) = bodies(message, &body);
    let attachments = attachments(message, &body, full_html.as_deref());
    // The duplicate check hashes the whole text, as it arrived; the rest
    // reads only what the writer added above crmgate's reply marker.
    // A delivery report is nobody's reply, whatever it quotes.
    let body_hash = body_hash(&full_text);
    let is_report = is_content_type(message, "multipart", "report");
    let cut = (!is_report)
        .then(|| reply::cut(&full_text, full_html.as_deref()))
        .flatten();
    let (text, html, cut_at_marker) = match cut {
        Some(cut) => (cut.text, cut.html, true),
        None => (full_text, full_html, false),
    };
    // A delivery report carries the bounced message as `message/rfc822`:
    // that is a returned copy, not something an agent forwarded.
    let forward = if is_report {
        None
    } else {
        forward::attached(message, &text, &subject).or_else(|| forward::inline(&text, &subject))
    };
    let from_mailboxes = mailboxes(message.from());
    let from = from_mailboxes.first().cloned();
    // The From that `dmarc=pass` vouches for must be the one crmgate reads:
    // one From header holding one mailbox, whose domain is the result's
    // `header.from`. Otherwise a genuine pass for the sender's own domain
    // would make a second From (or a second mailbox) believed.
    let from_headers = headers
        .iter()
        .filter(|h| h.name.as_str().eq_ignore_ascii_case("From"))
        .count();
    let dmarc_domain = from
        .as_ref()
        .filter(|_| from_headers == 1 && from_mailboxes.len() == 1)
        .and_then(|m| m.address.rsplit_once('@'))
        .map(|(_, domain)| domain.to_string());
    Inbound {
        from,
        to: message.all_to().flat_map(|a| mailboxes(Some(a))).collect(),
        cc: message.all_cc().flat_map(|a| mailboxes(Some(a))).collect(),
        reply_to: mailboxes(message.reply_to()),
        subject,
        message_id: message.message_id().and_then(clean_id),
        in_reply_to: ids(message.in_reply_to()),
        references: ids(message.references()),
        date: message
            .date()
            .filter(|d| d.is_valid())
            .map(|d| d.to_timestamp()),
        body_hash,
        text: text.into(),
        cut_at_marker,
        html,
        attachments,
        auto: auto_signal(headers, is_report),
        report: if is_report {
            report::delivery_report(message)
        } else {
            None
        },
        loop_hosts: header_texts(headers, "X-Crmgate-Loop")
            .filter(|v| !v.is_empty())
            .collect(),
        auth_results: header_texts(headers, "Authentication-Results")
            .map(|v| auth_result(&v, dmarc_domain.as_deref()))
            .collect(),
        spam_flag: header_texts(headers, "X-Spam-Flag").any(|v| v.eq_ignore_ascii_case("yes")),
        sender_check: crate::helpdesk::SenderCheck::default(),
        list_ids: list_ids(headers),
        forward,
    }
}

/// The top-level header block with its legacy-charset lines re-encoded as
/// UTF-8 (see [`charset`]); the body is left alone: its charset is declared.
fn repair_header_block(raw: &[u8]) -> Cow<'_, [u8]> {
    charset::repair_header_block(raw, header_block_end(raw), raw)
}

/// Offset just past the top-level header block (its blank line excluded),
/// or the whole input when there is no blank line.
fn header_block_end(raw: &[u8]) -> usize {
    let mut offset = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if line == b"\n" || line == b"\r\n" {
            return offset;
        }
        offset += line.len();
    }
    raw.len()
}

/// Whether the header block holds at least one `Name: value` line.
///
/// mail-parser accepts almost anything as a header; the SPEC wants input
/// that has no header at all (binary garbage, an empty DATA) quarantined,
/// so a field name of printable ASCII followed by a colon is required.
fn has_header_line(raw: &[u8]) -> bool {
    raw[..header_block_end(raw)]
        .split(|&b| b == b'\n')
        .any(|line| {
            let name_len = line
                .iter()
                .take_while(|&&b| (0x21..=0x7e).contains(&b) && b != b':')
                .count();
            let rest = line.get(name_len..).unwrap_or_default();
            let rest = rest.trim_ascii_start();
            name_len > 0 && rest.first() == Some(&b':')
        })
}

/// Folded header text on one line: CR/LF and the folding whitespace become
/// one space.
fn unfold(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut pending_space = false;
    for ch in value.chars() {
        match ch {
            '\r' | '\n' => pending_space = true,
            ' ' | '\t' if pending_space => {}
            _ => {
                if pending_space && !out.is_empty() && !out.ends_with(' ') {
                    out.push(' ');
                }
                pending_space = false;
                out.push(ch);
            }
        }
    }
    out.trim().to_string()
}

/// The values of every top-level header named `name` (case-insensitive),
/// unfolded, in order of appearance.
fn header_texts<'a>(headers: &'a [Header<'a>], name: &'a str) -> impl Iterator<Item = String> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.as_str().eq_ignore_ascii_case(name))
        .map(|h| header_value_text(&h.value))
}

/// A header value as one line of text, whatever mail-parser made of it.
fn header_value_text(value: &HeaderValue<'_>) -> String {
    match value {
        HeaderValue::Text(t) => unfold(t),
        HeaderValue::TextList(list) => unfold(&list.join(", ")),
        HeaderValue::Address(a) => a
            .iter()
            .filter_map(|m| m.address.as_deref())
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    }
}

/// The mailboxes of an address header, groups flattened; entries without an
/// address (a bare group name, an empty list item) are dropped.
fn mailboxes(address: Option<&Address<'_>>) -> Vec<Mailbox> {
    address
        .map(|a| {
            a.iter()
                .filter_map(|m| {
                    let addr = m.address.as_deref()?.trim();
                    is_plausible_address(addr).then(|| Mailbox::new(m.name.as_deref(), addr))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Not empty, and free of what no mailbox of a real person holds: control
/// characters, spaces, quotes and backslashes. The fuzzer sent
/// `jane.do\0\0\\e…@example.org`, which a round trip through quoting
/// turned into the agent's own address; such a "mailbox" is dropped, as
/// an unreadable one is.
fn is_plausible_address(address: &str) -> bool {
    !address.is_empty()
        && !address
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '\\' | '"'))
}

/// A message id without angle brackets or surrounding space, if any is left.
fn clean_id(id: &str) -> Option<String> {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// The ids of In-Reply-To or References, in order.
fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(t) => clean_id(t).into_iter().collect(),
        HeaderValue::TextList(list) => list.iter().filter_map(|t| clean_id(t)).collect(),
        _ => Vec::new(),
    }
}

fn is_content_type(message: &Message<'_>, ctype: &str, subtype: &str) -> bool {
    message.root_part().is_content_type(ctype, subtype)
}

/// Which parts of the message are its body: indexes into `message.parts`.
///
/// mail-parser's choice first (the inline text parts, the alternatives).
/// When it found none, the first text part that is not explicitly an
/// attachment is the body, even named or after an attachment: a
/// fax-to-mail gateway writes its PDF first and its text, named
/// `message.txt`, after it; a part without Content-Type is text/plain
/// (RFC 2046). Everything else is an attachment (see [`attachments`]).
struct BodyParts {
    text: Vec<usize>,
    html: Vec<usize>,
}

impl BodyParts {
    fn of(message: &Message<'_>) -> BodyParts {
        let is_text = |id: &u32| {
            message
                .parts
                .get(*id as usize)
                .is_some_and(|p| matches!(p.body, PartType::Text(_) | PartType::Html(_)))
        };
        let text: Vec<usize> = message
            .text_body
            .iter()
            .filter(|id| is_text(id))
            .map(|&id| id as usize)
            .collect();
        let html: Vec<usize> = message
            .html_body
            .iter()
            .filter(|&&id| {
                message
                    .parts
                    .get(id as usize)
                    .is_some_and(|p| matches!(p.body, PartType::Html(_)))
            })
            .map(|&id| id as usize)
            .collect();
        if !text.is_empty() || !html.is_empty() {
            return BodyParts { text, html };
        }
        let fallback = message.parts.iter().position(|part| {
            // A multipart without a usable boundary comes out as one text:
            // that text is all the message says.
            let readable = match part.content_type() {
                None => true,
                Some(ct) if ct.ctype().eq_ignore_ascii_case("multipart") => true,
                Some(ct) => {
                    ct.ctype().eq_ignore_ascii_case("text")
                        && ct.subtype().is_some_and(|s| {
                            s.eq_ignore_ascii_case("plain") || s.eq_ignore_ascii_case("html")
                        })
                }
            };
            readable
                && matches!(part.body, PartType::Text(_) | PartType::Html(_))
                && !part
                    .content_disposition()
                    .is_some_and(|cd| cd.is_attachment())
        });
        match fallback {
            Some(id) => {
                let html = match message.parts[id].body {
                    PartType::Html(_) => vec![id],
                    _ => Vec::new(),
                };
                BodyParts {
                    text: vec![id],
                    html,
                }
            }
            None => BodyParts {
                text: Vec::new(),
                html: Vec::new(),
            },
        }
    }

    fn contains(&self, id: usize) -> bool {
        self.text.contains(&id) || self.html.contains(&id)
    }
}

/// Indexes of the parts that are another rendering of the body: the
/// unnamed text parts of a `multipart/alternative` (a broken HTML
/// alternative, Apple's `text/watch-html`, `text/enriched`), except a
/// `text/calendar`, which is an invitation and not the message's words.
fn alternative_renderings(message: &Message<'_>) -> Vec<usize> {
    let mut out = Vec::new();
    for part in &message.parts {
        let PartType::Multipart(children) = &part.body else {
            continue;
        };
        if !part.is_content_type("multipart", "alternative") {
            continue;
        }
        for &child in children {
            let Some(p) = message.parts.get(child as usize) else {
                continue;
            };
            let text = p.content_type().is_none_or(|ct| {
                ct.ctype().eq_ignore_ascii_case("text")
                    && !ct
                        .subtype()
                        .is_some_and(|s| s.eq_ignore_ascii_case("calendar"))
            });
            let attached = p.attachment_name().is_some()
                || p.content_disposition().is_some_and(|cd| cd.is_attachment());
            if text && !attached && matches!(p.body, PartType::Text(_) | PartType::Html(_)) {
                out.push(child as usize);
            }
        }
    }
    out
}

/// The text body (text/plain parts joined, HTML rendered as text when there
/// is no plain part) and the HTML body, both with `\n` line endings.
fn bodies(message: &Message<'_>, body: &BodyParts) -> (String, Option<String>) {
    let mut texts = Vec::new();
    for part in body.text.iter().filter_map(|&id| message.parts.get(id)) {
        match &part.body {
            PartType::Text(t) if t.contains(char::REPLACEMENT_CHARACTER) => {
                let t = undeclared_text(message, part).unwrap_or_else(|| t.to_string());
                texts.push(t.replace("\r\n", "\n"));
            }
            PartType::Text(t) => texts.push(t.replace("\r\n", "\n")),
            PartType::Html(h) => texts.push(html::to_text(h)),
            _ => {}
        }
    }
    let htmls: Vec<String> = body
        .html
        .iter()
        .filter_map(|&id| match &message.parts.get(id)?.body {
            PartType::Html(h) => Some(h.replace("\r\n", "\n")),
            _ => None,
        })
        .collect();
    let html = (!htmls.is_empty()).then(|| htmls.join("\n"));
    let mut text = if texts.len() == 1 {
        texts.pop().unwrap_or_default()
    } else {
        texts.join("\n")
    };
    // Some clients send an empty text/plain alternative next to the real
    // HTML body; the ticket log would show nothing.
    if text.trim().is_empty() {
        if let Some(h) = &html {
            text = html::to_text(h);
        }
    }
    (text, html)
}

/// The text of an 8-bit part that declares no charset, read by
/// [`charset::decode_undeclared`]; `None` when the part declares one, is
/// transfer-encoded, or is UTF-8 after all (its U+FFFD are its own).
fn undeclared_text(message: &Message<'_>, part: &mail_parser::MessagePart<'_>) -> Option<String> {
    let declared = part
        .content_type()
        .is_some_and(|ct| ct.attribute("charset").is_some());
    if declared || part.encoding != mail_parser::Encoding::None {
        return None;
    }
    let raw = message.raw_message();
    let bytes = raw.get(part.offset_body as usize..part.offset_end as usize)?;
    charset::decode_undeclared(bytes, raw)
}

/// The attachments kept on the ticket: every part that is not the body.
///
/// Named parts of any type, attached messages (`message/rfc822`, named
/// after their subject when unnamed), and every other part that is
/// neither body nor attachment by its headers — a `text/calendar`
/// invitation beside the alternatives, an unnamed image, the headers of a
/// returned message — given a name for its type. An image that the HTML
/// body shows by its `cid:` (a signature's logo) is kept too, marked
/// [`Attachment::inline`] so that notifications do not list it.
fn attachments(message: &Message<'_>, body: &BodyParts, html: Option<&str>) -> Vec<Attachment> {
    let raw = message.raw_message();
    let html_lower = html.map(str::to_ascii_lowercase);
    let renderings = alternative_renderings(message);
    let mut out = Vec::new();
    for (index, part) in message.parts.iter().enumerate() {
        if matches!(part.body, PartType::Multipart(_))
            || body.contains(index)
            || renderings.contains(&index)
        {
            continue;
        }
        let content_type = part
            .content_type()
            .map(|ct| match ct.subtype() {
                Some(sub) => format!("{}/{}", ct.ctype(), sub).to_ascii_lowercase(),
                None => ct.ctype().to_ascii_lowercase(),
            })
            .unwrap_or_else(|| "text/plain".to_string());
        let name = part
            .attachment_name()
            .map(|n| {
                if n.contains(char::REPLACEMENT_CHARACTER) {
                    legacy_attachment_name(raw, part).unwrap_or_else(|| n.to_string())
                } else {
                    n.to_string()
                }
            })
            .map(|n| unfold(&n).replace(['/', '\\'], "_"))
            .filter(|n| !n.is_empty());
        let ordinal = out.len();
        let (filename, data) = match &part.body {
            PartType::Message(nested) => {
                // An unencoded attached message shares the outer buffer:
                // its own bytes are the part's body range.
                let data = match part.encoding {
                    mail_parser::Encoding::None => raw
                        .get(part.offset_body as usize..part.offset_end as usize)
                        .unwrap_or_default()
                        .to_vec(),
                    _ => nested.raw_message().to_vec(),
                };
                let filename = name.unwrap_or_else(|| {
                    let subject = nested.subject().map(unfold).unwrap_or_default();
                    let stem = subject.replace(['/', '\\', ':'], "_");
                    let stem = stem.trim();
                    format!("{}.eml", if stem.is_empty() { "message" } else { stem })
                });
                (filename, data)
            }
            PartType::Binary(bytes) | PartType::InlineBinary(bytes) => (
                name.unwrap_or_else(|| generated_name(ordinal, &content_type)),
                bytes.to_vec(),
            ),
            PartType::Text(t) | PartType::Html(t) => (
                name.unwrap_or_else(|| generated_name(ordinal, &content_type)),
                t.as_bytes().to_vec(),
            ),
            PartType::Multipart(_) => continue,
        };
        // An empty part nobody named (the missing body of a returned
        // message) holds nothing to keep.
        if data.is_empty() && part.attachment_name().is_none() {
            continue;
        }
        let content_type = if matches!(part.body, PartType::Message(_)) {
            "message/rfc822".to_string()
        } else {
            content_type
        };
        let inline = part
            .content_id()
            .map(|id| {
                id.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .trim()
            })
            .filter(|id| !id.is_empty())
            .is_some_and(|id| {
                html_lower
                    .as_deref()
                    .is_some_and(|h| h.contains(&format!("cid:{}", id.to_ascii_lowercase())))
            });
        out.push(Attachment {
            filename,
            content_type,
            data,
            inline,
        });
    }
    out
}

/// The name of an attachment whose MIME header carries raw 8-bit bytes
/// (Outlook Express wrote `name="Résumé.doc"` in Latin-1): the part's
/// header block re-read as the top-level one is, in the part's own
/// declared charset, else the message's, else the detector's guess.
fn legacy_attachment_name(raw: &[u8], part: &mail_parser::MessagePart<'_>) -> Option<String> {
    let header = raw.get(part.offset_header as usize..part.offset_body as usize)?;
    let repaired = charset::repair_header_block(header, header.len(), raw);
    let parsed = MessageParser::default().parse_headers(&repaired[..])?;
    let name = parsed.root_part().attachment_name()?;
    (!name.contains(char::REPLACEMENT_CHARACTER)).then(|| name.to_string())
}

/// A name for an unnamed attachment: the parts of a report say what they
/// are, anything else is numbered with an extension for its type.
fn generated_name(index: usize, content_type: &str) -> String {
    let extension = match content_type {
        "message/delivery-status"
        | "message/global-delivery-status"
        | "message/disposition-notification"
        | "message/feedback-report" => {
            return format!("{}.txt", content_type.trim_start_matches("message/"));
        }
        "text/rfc822-headers" | "message/rfc822-headers" | "message/global-headers" => {
            return "returned-headers.txt".to_string();
        }
        "application/pdf" => "pdf",
        "message/rfc822" => "eml",
        "text/plain" => "txt",
        "text/html" => "html",
        "text/calendar" => "ics",
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        _ => "bin",
    };
    format!("attachment-{}.{extension}", index + 1)
}

/// The first signal of automatic mail (SPEC rule 4), checked in the SPEC's
/// order so the logged reason is stable.
fn auto_signal(headers: &[Header<'_>], is_report: bool) -> Option<AutoSignal> {
    let first_token = |v: &str| {
        v.split([';', '(', ' ', '\t'])
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    if let Some(v) =
        header_texts(headers, "Auto-Submitted").find(|v| !v.is_empty() && first_token(v) != "no")
    {
        return Some(AutoSignal::AutoSubmitted(v));
    }
    if let Some(v) = header_texts(headers, "Precedence")
        .find(|v| matches!(first_token(v).as_str(), "bulk" | "junk" | "list"))
    {
        return Some(AutoSignal::Precedence(v));
    }
    let present = |name: &str| {
        headers
            .iter()
            .any(|h| h.name.as_str().eq_ignore_ascii_case(name))
    };
    // `X-MS-Exchange-Inbox-Rules-Loop` alone is not here: an Exchange
    // inbox rule that forwarded a person's mail marks it so (rule 4).
    for name in ["X-Autoreply", "X-Autorespond"] {
        if present(name) {
            return Some(AutoSignal::Header(name.to_string()));
        }
    }
    // Outlook puts `All` on its own automatic replies; notifications (ours
    // included) say `OOF, AutoReply`, which must not count.
    if header_texts(headers, "X-Auto-Response-Suppress").any(|v| {
        v.split(',')
            .any(|item| item.trim().eq_ignore_ascii_case("all"))
    }) {
        return Some(AutoSignal::Header("X-Auto-Response-Suppress".to_string()));
    }
    for name in ["List-Id", "List-Unsubscribe"] {
        if present(name) {
            return Some(AutoSignal::Header(name.to_string()));
        }
    }
    is_report.then_some(AutoSignal::Report)
}

/// The `List-Id` id (RFC 2919) and `List-Post` address (RFC 2369).
fn list_ids(headers: &[Header<'_>]) -> Vec<String> {
    let bracketed = |v: &str| {
        let inner = v.rsplit_once('<').map_or(v, |(_, rest)| rest);
        inner
            .split('>')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    let mut ids: Vec<String> = header_texts(headers, "List-Id")
        .map(|v| bracketed(&v))
        .collect();
    ids.extend(
        header_texts(headers, "List-Post")
            .map(|v| bracketed(&v).trim_start_matches("mailto:").to_string()),
    );
    ids.retain(|id| !id.is_empty());
    ids
}

/// One `Authentication-Results` header (RFC 8601), read strictly.
///
/// Comments are removed first, so `(dkim=pass would be nice)` counts for
/// nothing; a result counts only when its own `method=result` token says
/// `pass`. `dmarc=pass` counts only when its `header.from` is `from_domain`,
/// the domain of the message's single From mailbox (`None`: no such From).
fn auth_result(value: &str, from_domain: Option<&str>) -> AuthResult {
    let value = strip_comments(value);
    let mut segments = value.split(';');
    let authserv_id = segments
        .next()
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut result = AuthResult {
        authserv_id,
        ..AuthResult::default()
    };
    for segment in segments {
        let mut tokens = segment.split_whitespace();
        let Some((method, outcome)) = tokens.next().and_then(|t| t.split_once('=')) else {
            continue;
        };
        let method = method.split('/').next().unwrap_or_default();
        if !outcome.eq_ignore_ascii_case("pass") {
            continue;
        }
        if method.eq_ignore_ascii_case("dmarc") {
            let header_from = tokens
                .filter_map(|t| t.split_once('='))
                .find(|(key, _)| key.eq_ignore_ascii_case("header.from"))
                .map(|(_, val)| val.trim_matches('"').to_ascii_lowercase());
            if header_from.is_some_and(|d| from_domain.is_some_and(|f| f.eq_ignore_ascii_case(&d)))
            {
                result.dmarc_pass = true;
            }
        } else if method.eq_ignore_ascii_case("dkim") {
            let mut d = None;
            let mut i = None;
            for token in tokens {
                if let Some((key, val)) = token.split_once('=') {
                    let val = val.trim_matches('"').to_ascii_lowercase();
                    if key.eq_ignore_ascii_case("header.d") {
                        d = Some(val);
                    } else if key.eq_ignore_ascii_case("header.i") {
                        i = val.rsplit_once('@').map(|(_, domain)| domain.to_string());
                    }
                }
            }
            if let Some(domain) = d.or(i).filter(|d| !d.is_empty()) {
                result.dkim_pass_domains.push(domain);
            }
        }
    }
    result
}

/// The text with RFC 5322 comments (nested parentheses, outside quoted
/// strings) removed.
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    let mut escaped = false;
    for ch in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(ch);
            }
            continue;
        }
        match ch {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(ch);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(ch);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                out.push(' ');
            }
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

/// Hex SHA-256 of the text body with `\n` line endings, each line's trailing
/// whitespace and the trailing blank lines removed: the same message relayed
/// twice (CRLF vs LF, a signature's trailing space stripped by one MTA) gets
/// the same hash.
fn body_hash(text: &str) -> String {
    // Line by line, without a normalised copy of the text (a 25 MB body
    // made three): lines end at `\r\n`, `\n` or a lone `\r`; blank lines
    // are held back until a line with text follows, so trailing ones count
    // for nothing.
    let mut hasher = Sha256::new();
    let mut started = false;
    let mut blank = 0usize;
    for piece in text.split('\n') {
        let piece = piece.strip_suffix('\r').unwrap_or(piece);
        for line in piece.split('\r') {
            let line = line.trim_end();
            if line.is_empty() {
                blank += 1;
                continue;
            }
            if started {
                hasher.update(b"\n");
            }
            for _ in 0..blank {
                hasher.update(b"\n");
            }
            hasher.update(line.as_bytes());
            started = true;
            blank = 0;
        }
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The normalisation `body_hash` hashes, spelt out with copies.
    fn body_hash_by_copies(text: &str) -> String {
        let normalised = text
            .replace("\r\n", "\n")
            .replace('\r', "\n")
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n");
        hex::encode(Sha256::digest(normalised.trim_end().as_bytes()))
    }

    #[test]
    fn body_hash_is_the_hash_of_the_normalised_text() {
        for text in [
            "",
            "\n",
            "a",
            "a\n",
            "a\r\nb\r\n",
            "\n\nlead\n\n\nmiddle  \t\n\n \n\r\n",
            "a\r\r\nb\rc\r",
            "x \u{a0}\ny\u{2003}\n\u{2003}\n",
            "  \n  \n",
            "sig-- \nname\n\n",
        ] {
            assert_eq!(body_hash(text), body_hash_by_copies(text), "{text:?}");
        }
    }

    fn parse_ok(raw: &str) -> Inbound {
        match parse(raw.as_bytes()) {
            Ok(inbound) => inbound,
            Err(e) => panic!("should parse: {e}"),
        }
    }

    #[test]
    fn no_header_block_is_unparseable() {
        assert!(matches!(parse(b""), Err(ParseError::Unparseable)));
        assert!(matches!(parse(b"\r\n\r\n"), Err(ParseError::Unparseable)));
        assert!(matches!(
            parse(b"just some words\nand more\n"),
            Err(ParseError::Unparseable)
        ));
        assert!(matches!(
            parse(&[0x00, 0xff, 0x13, 0x3a, 0x80, 0x0a, 0x01]),
            Err(ParseError::Unparseable)
        ));
    }

    #[test]
    fn missing_from_date_and_message_id_are_not_errors() {
        let m = parse_ok("Subject: hello\r\n\r\nbody\r\n");
        assert_eq!(m.from, None);
        assert_eq!(m.date, None);
        assert_eq!(m.message_id, None);
        assert_eq!(m.subject, "hello");
        assert_eq!(&*m.text, "body\n");
    }

    #[test]
    fn implausible_addresses_are_dropped() {
        let m = parse_ok(
            "From: Jane <jane.do\0\\\\e@example.org>\r\n\
             To: a\\b@example.org, x\u{1}y@example.org, ok@example.org\r\n\r\nHi\r\n",
        );
        assert_eq!(m.from, None);
        let to: Vec<&str> = m.to.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(to, ["ok@example.org"]);
    }

    #[test]
    fn addresses_ids_and_date() {
        let m = parse_ok(
            "From: \"Doe, Jane\" <Jane.Doe@Example.ORG>, other@example.org\r\n\
             To: Team: a@example.com, B <B@example.com>;, c@example.com\r\n\
             Cc: undisclosed-recipients:;\r\n\
             Reply-To: Desk <desk@example.net>\r\n\
             Message-ID: <abc@example.org>\r\n\
             In-Reply-To: <x1@example.org>\r\n\
             References: <x0@example.org>\r\n <x1@example.org>\r\n\
             Date: Mon, 4 Mar 2024 10:12:00 +0100\r\n\
             Subject: =?iso-8859-1?Q?R=E9union?=\r\n =?iso-8859-1?Q?_de_service?=\r\n\
             \r\nHi\r\n",
        );
        assert_eq!(
            m.from,
            Some(Mailbox::new(Some("Doe, Jane"), "jane.doe@example.org"))
        );
        let to: Vec<&str> = m.to.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(to, ["a@example.com", "b@example.com", "c@example.com"]);
        assert!(m.cc.is_empty());
        assert_eq!(
            m.reply_to,
            vec![Mailbox::new(Some("Desk"), "desk@example.net")]
        );
        assert_eq!(m.message_id.as_deref(), Some("abc@example.org"));
        assert_eq!(m.in_reply_to, ["x1@example.org"]);
        assert_eq!(m.references, ["x0@example.org", "x1@example.org"]);
        assert_eq!(m.date, Some(1_709_543_520));
        assert_eq!(m.subject, "Réunion de service");
    }

    #[test]
    fn raw_latin1_and_folded_subject() {
        let mut raw =
            b"From: a@example.org\r\nSubject: R\xe9union du\r\n\tcomit\xe9\r\n\r\nx\r\n".to_vec();
        let m = parse(&raw).expect("parses");
        assert_eq!(m.subject, "Réunion du comité");
        // Raw UTF-8 (RFC 6532) is kept as it is.
        raw = "Subject: Réunion\r\n\r\nx\r\n".as_bytes().to_vec();
        assert_eq!(parse(&raw).expect("parses").subject, "Réunion");
    }

    #[test]
    fn raw_legacy_headers_are_read_by_body_charset_or_detection() {
        // Shift_JIS Subject, body declared Shift_JIS.
        let mut raw = b"From: a@example.jp\r\nSubject: ".to_vec();
        raw.extend(encoding_rs::SHIFT_JIS.encode("印刷できません").0.iter());
        raw.extend(b"\r\nContent-Type: text/plain; charset=Shift_JIS\r\n\r\nx\r\n");
        assert_eq!(parse(&raw).expect("parses").subject, "印刷できません");
        // KOI8-R display name and Subject, nothing declared.
        let mut raw = b"From: ".to_vec();
        raw.extend(encoding_rs::KOI8_R.encode("Иван Петров").0.iter());
        raw.extend(b" <ivan@example.ru>\r\nSubject: ");
        raw.extend(encoding_rs::KOI8_R.encode("Принтер не работает").0.iter());
        raw.extend(b"\r\n\r\nx\r\n");
        let m = parse(&raw).expect("parses");
        assert_eq!(m.subject, "Принтер не работает");
        assert_eq!(
            m.from,
            Some(Mailbox::new(Some("Иван Петров"), "ivan@example.ru"))
        );
    }

    #[test]
    fn a_reply_keeps_its_words_above_the_marker_and_the_hash_of_all() {
        let full = "Merci !\n\nOn Mon, Soutien TI wrote:\n> ## Reply above this line ##\n> Old\n";
        let m = parse_ok(&format!("Subject: Re: [TKT0000001] x\r\n\r\n{full}"));
        assert!(m.cut_at_marker);
        assert_eq!(&*m.text, "Merci !\n");
        assert_eq!(
            m.body_hash,
            body_hash(full),
            "duplicates compare what arrived"
        );
        let m = parse_ok("Subject: s\r\n\r\nMerci !\n\nOn Mon, X wrote:\n> Old\n");
        assert!(!m.cut_at_marker);
        assert!(m.text.contains("> Old"));
    }

    #[test]
    fn automatic_mail_signals() {
        let auto = |headers: &str| parse_ok(&format!("{headers}Subject: s\r\n\r\nx\r\n")).auto;
        assert_eq!(auto("Auto-Submitted: no\r\n"), None);
        assert_eq!(
            auto("Auto-Submitted: auto-replied\r\n"),
            Some(AutoSignal::AutoSubmitted("auto-replied".into()))
        );
        assert_eq!(
            auto("Precedence: List\r\n"),
            Some(AutoSignal::Precedence("List".into()))
        );
        assert_eq!(auto("Precedence: first-class\r\n"), None);
        assert_eq!(
            auto("X-Autoreply: yes\r\n"),
            Some(AutoSignal::Header("X-Autoreply".into()))
        );
        assert_eq!(
            auto("X-Autorespond: on\r\n"),
            Some(AutoSignal::Header("X-Autorespond".into()))
        );
        // An inbox rule's forward or redirect is a person's mail; with
        // Outlook's `All`, an out-of-office.
        assert_eq!(
            auto("X-MS-Exchange-Inbox-Rules-Loop: a@example.org\r\n"),
            None
        );
        assert_eq!(
            auto("X-MS-Exchange-Inbox-Rules-Loop: a@example.org\r\nX-Auto-Response-Suppress: All\r\n"),
            Some(AutoSignal::Header("X-Auto-Response-Suppress".into()))
        );
        // Our own notifications carry `OOF, AutoReply`: not automatic.
        assert_eq!(auto("X-Auto-Response-Suppress: OOF, AutoReply\r\n"), None);
        assert_eq!(auto("X-Auto-Response-Suppress: Allow\r\n"), None);
        assert_eq!(
            auto("X-Auto-Response-Suppress: DR, all\r\n"),
            Some(AutoSignal::Header("X-Auto-Response-Suppress".into()))
        );
        assert_eq!(
            auto("List-Id: <helpdesk.example.org>\r\n"),
            Some(AutoSignal::Header("List-Id".into()))
        );
        assert_eq!(
            auto("List-Unsubscribe: <mailto:u@example.org>\r\n"),
            Some(AutoSignal::Header("List-Unsubscribe".into()))
        );
        assert_eq!(
            auto("Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n"),
            Some(AutoSignal::Report)
        );
        assert_eq!(auto(""), None);
    }

    #[test]
    fn authentication_results_are_read_strictly() {
        let m = parse_ok(
            "Authentication-Results: MX.Example.ORG;\r\n\
             \tdkim=pass header.d=Example.com header.s=sel;\r\n\
             \tdkim=fail header.d=evil.example;\r\n\
             \tspf=pass (dkim=pass header.d=comment.example) smtp.mailfrom=a@example.com;\r\n\
             \tdmarc=pass header.from=example.com\r\n\
             Authentication-Results: other.example; dkim=pass header.i=@Sub.Example.net;\r\n\
             \tdmarc=fail; arc=none\r\n\
             Authentication-Results: third.example; none\r\n\
             From: a@example.com\r\n\
             Subject: s\r\n\r\nx\r\n",
        );
        assert_eq!(
            m.auth_results,
            vec![
                AuthResult {
                    authserv_id: "mx.example.org".into(),
                    dmarc_pass: true,
                    dkim_pass_domains: vec!["example.com".into()],
                },
                AuthResult {
                    authserv_id: "other.example".into(),
                    dmarc_pass: false,
                    dkim_pass_domains: vec!["sub.example.net".into()],
                },
                AuthResult {
                    authserv_id: "third.example".into(),
                    ..AuthResult::default()
                },
            ]
        );
    }

    #[test]
    fn dmarc_pass_for_another_domain_or_an_ambiguous_from_does_not_count() {
        // Found by tests/spoofing.rs: a genuine pass for the attacker's
        // domain made an agent's From believed.
        let ar = "Authentication-Results: mx.example.org; dmarc=pass header.from=evil.example\r\n";
        for (from, counts) in [
            ("From: m@evil.example\r\n", true),
            ("From: m@EVIL.example\r\n", true),
            ("From: jane@example.org\r\n", false),
            ("From: m@evil.example\r\nFrom: jane@example.org\r\n", false),
            ("From: jane@example.org, m@evil.example\r\n", false),
            ("", false),
        ] {
            let m = parse_ok(&format!("{ar}{from}Subject: s\r\n\r\nx\r\n"));
            assert_eq!(m.auth_results[0].dmarc_pass, counts, "{from}");
        }
    }

    #[test]
    fn loop_headers_of_an_attached_message_do_not_count() {
        let m = parse_ok(
            "X-Crmgate-Loop: helpdesk.example.org\r\n\
             From: a@example.org\r\n\
             Content-Type: multipart/mixed; boundary=\"b\"\r\n\
             \r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
             --b\r\nContent-Type: message/rfc822\r\n\r\n\
             X-Crmgate-Loop: inner.example.org\r\nFrom: c@example.com\r\nSubject: inner\r\n\r\nold\r\n\
             --b--\r\n",
        );
        assert_eq!(m.loop_hosts, ["helpdesk.example.org"]);
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].filename, "inner.eml");
        assert_eq!(m.attachments[0].content_type, "message/rfc822");
        assert!(m.attachments[0].data.starts_with(b"X-Crmgate-Loop: inner"));
    }

    #[test]
    fn raw_latin1_attachment_name() {
        let mut raw = b"From: a@example.org\r\n\
            Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
            --b\r\nContent-Type: text/plain\r\n\r\nCV ci-joint\r\n\
            --b\r\nContent-Type: application/msword; name=\"R"
            .to_vec();
        raw.extend_from_slice(b"\xe9sum\xe9.doc\"\r\nContent-Disposition: attachment\r\n");
        raw.extend_from_slice(b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b--\r\n");
        let m = parse(&raw).expect("parses");
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].filename, "Résumé.doc");
        assert_eq!(m.attachments[0].content_type, "application/msword");
        assert_eq!(m.attachments[0].data, [0, 1, 2]);
    }

    #[test]
    fn empty_plain_alternative_falls_back_to_the_html() {
        let m = parse_ok(
            "Subject: s\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n\
             --a\r\nContent-Type: text/plain\r\n\r\n \r\n\
             --a\r\nContent-Type: text/html\r\n\r\n<p>Bonjour&nbsp;!</p><p>Merci</p>\r\n--a--\r\n",
        );
        assert_eq!(&*m.text, "Bonjour !\nMerci");
        assert_eq!(m.html.as_deref(), Some("<p>Bonjour&nbsp;!</p><p>Merci</p>"));
    }

    #[test]
    fn spam_flag() {
        assert!(parse_ok("X-Spam-Flag: yes\r\n\r\nx").spam_flag);
        assert!(parse_ok("X-Spam-Flag: YES \r\n\r\nx").spam_flag);
        assert!(!parse_ok("X-Spam-Flag: NO\r\n\r\nx").spam_flag);
        assert!(!parse_ok("Subject: YES\r\n\r\nx").spam_flag);
    }

    #[test]
    fn body_hash_ignores_line_endings_and_trailing_space() {
        let crlf = parse_ok("Subject: s\r\n\r\nHello  \r\nworld\r\n\r\n");
        let lf = parse_ok("Subject: s\n\nHello\nworld\n");
        let other = parse_ok("Subject: s\n\nHello\nWorld\n");
        assert_eq!(crlf.body_hash, lf.body_hash);
        assert_ne!(lf.body_hash, other.body_hash);
        assert_eq!(lf.body_hash.len(), 64);
        assert_eq!(lf.body_hash, hex::encode(Sha256::digest(b"Hello\nworld")));
    }

    #[test]
    fn delivery_report_with_our_outbox_header() {
        let m = parse_ok(
            "From: MAILER-DAEMON@mx.example.net\r\n\
             Subject: Undelivered Mail Returned to Sender\r\n\
             Content-Type: multipart/report; report-type=delivery-status; boundary=\"r\"\r\n\
             \r\n--r\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n\
             --r\r\nContent-Type: message/delivery-status\r\n\r\n\
             Reporting-MTA: dns; mx.example.net\r\n\r\n\
             Final-Recipient: rfc822; Requester@Example.com\r\n\
             Action: failed\r\nStatus: 5.1.1\r\n\
             Diagnostic-Code: smtp; 550 5.1.1 No such user\r\n\
             --r\r\nContent-Type: text/rfc822-headers\r\n\r\n\
             Message-ID: <TKT0000042.abc@helpdesk.example.org>\r\n\
             X-Crmgate-Outbox: 42\r\nSubject: [TKT0000042] Panne\r\n\
             --r--\r\n",
        );
        assert_eq!(m.auto, Some(AutoSignal::Report));
        assert_eq!(
            m.report,
            Some(DeliveryReport {
                failed_recipients: vec!["requester@example.com".into()],
                diagnostic: "550 5.1.1 No such user".into(),
                original_message_id: Some("TKT0000042.abc@helpdesk.example.org".into()),
                outbox_id: Some(42),
            })
        );
        assert_eq!(m.forward, None);
    }
}
