//! Thread: which ticket a message belongs to.
//!
//! In the SPEC's order: the ticket number in the Subject (after decoding and
//! whatever reply or forward prefixes), then a `+NUMBER` recipient tag, then
//! an In-Reply-To or References naming a message in the log. This module
//! produces the candidates as plain values; the store says which exists.
//! It also owns the shape of crmgate's own tagged addresses (`+NUMBER`,
//! `+NUMBER.MAC` on the work notes' Reply-To, `+bounce-ID-MAC`), since
//! recognising them is part of threading.

use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;

/// What to look up, in order; the first that names a ticket wins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Candidates {
    /// Ticket numbers from our signed reply addresses (`+NUMBER.MAC` whose
    /// MAC checks): crmgate's own word, so they come before the Subject,
    /// which a person may have edited.
    pub signed_numbers: Vec<String>,
    /// Ticket numbers from the Subject, normalised to the configured case.
    pub subject_numbers: Vec<String>,
    /// Ticket numbers from `+NUMBER` recipient tags.
    pub tag_numbers: Vec<String>,
    /// In-Reply-To first, then References newest first.
    pub message_ids: Vec<String>,
}

/// Every ticket number the pattern finds in a subject, upper-cased as the
/// configured prefix is (numbers are stored as `TKT0000042`).
pub fn subject_numbers(subject: &str, pattern: &Regex) -> Vec<String> {
    pattern
        .captures_iter(subject)
        .filter_map(|c| c.name("number"))
        .map(|m| m.as_str().to_ascii_uppercase())
        .collect()
}

/// The `+tag` of a CRM address, if `address` is `local+tag@domain` for one of
/// the `bases` (lower-cased CRM addresses).
pub fn plus_tag<'a>(address: &'a str, bases: &[&str]) -> Option<&'a str> {
    let (local, domain) = address.rsplit_once('@')?;
    let (base_local, tag) = local.split_once('+')?;
    bases
        .iter()
        .any(|b| {
            b.rsplit_once('@').is_some_and(|(bl, bd)| {
                bl.eq_ignore_ascii_case(base_local) && bd.eq_ignore_ascii_case(domain)
            })
        })
        .then_some(tag)
}

/// The address without its `+tag`, lower-cased.
pub fn strip_tag(address: &str) -> String {
    let address = address.to_ascii_lowercase();
    match address.rsplit_once('@') {
        Some((local, domain)) => match local.split_once('+') {
            Some((base, _)) => format!("{base}@{domain}"),
            None => address,
        },
        None => address,
    }
}

/// What one recipient tag says about the ticket.
#[derive(Debug, PartialEq, Eq)]
enum Tag {
    Signed(String),
    Plain(Vec<String>),
    /// A `NUMBER.MAC` tag whose MAC does not check: it names nothing.
    Forged,
}

/// Read a `+tag`: with a key, `NUMBER.MAC` is a signed reply address and
/// must check; anything else is searched for ticket numbers as the SPEC's
/// plain `+NUMBER`. Without a key nothing is signed, so a dotted tag is plain.
fn read_tag(tag: &str, pattern: &Regex, key: Option<&[u8]>) -> Tag {
    if key.is_some() {
        if let Some((number, given)) = tag.rsplit_once('.') {
            if let [number] = subject_numbers(number, pattern).as_slice() {
                let expected = mac(key, &format!("notes-{number}"));
                return match expected.eq_ignore_ascii_case(given) {
                    true => Tag::Signed(number.clone()),
                    false => Tag::Forged,
                };
            }
        }
    }
    Tag::Plain(subject_numbers(tag, pattern))
}

/// Gather the candidates of one message. `key` is `reply_secret_file`'s,
/// which signs the work notes' reply addresses.
pub fn candidates(
    subject: &str,
    rcpt_to: &[String],
    crm_addresses: &[&str],
    in_reply_to: &[String],
    references: &[String],
    pattern: &Regex,
    key: Option<&[u8]>,
) -> Candidates {
    let mut signed_numbers = Vec::new();
    let mut tag_numbers = Vec::new();
    for tag in rcpt_to.iter().filter_map(|r| plus_tag(r, crm_addresses)) {
        match read_tag(tag, pattern, key) {
            Tag::Signed(number) => signed_numbers.push(number),
            Tag::Plain(numbers) => tag_numbers.extend(numbers),
            Tag::Forged => tracing::debug!(tag, "reply address tag with a bad MAC ignored"),
        }
    }
    let mut message_ids: Vec<String> = in_reply_to.to_vec();
    message_ids.extend(references.iter().rev().cloned());
    message_ids.dedup();
    Candidates {
        signed_numbers,
        subject_numbers: subject_numbers(subject, pattern),
        tag_numbers,
        message_ids,
    }
}

/// Reply and forward prefixes of every language the helpdesk meets, and
/// `[2]`-style counters. Matched at the start, any case, repeated.
fn prefix_regex() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        match Regex::new(
            r"(?i)^\s*(?:(?:re|tr|fwd?|aw|wg|sv|vs|antw|rv|réf\.?|ref\.?|r|i|enc|res|odp|pd|vb|doorst|ynt|ilt|svar|vl|atb)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]|\[\d+\])\s*",
        ) {
            Ok(re) => re,
            Err(e) => unreachable!("constant regex: {e}"),
        }
    })
}

/// The fixed words of crmgate's own automatic subjects (the receipt's and
/// the closure's, see [`crate::templates::AUTOMATIC_SUBJECT_WORDS`]) at
/// the start, with their colon, any case; a non-breaking space before the
/// colon, as French Outlook writes it, counts as a space. A bilingual
/// helpdesk's subject has the words of each language, slash between.
fn automatic_words_regex() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        let words: Vec<String> = crate::templates::AUTOMATIC_SUBJECT_WORDS
            .iter()
            .map(|w| regex::escape(w).replace(' ', r"[\s\u{a0}]+"))
            .collect();
        let words = words.join("|");
        let slash = regex::escape(crate::templates::LANGUAGE_SLASH.trim());
        match Regex::new(&format!(
            r"(?i)^[\s\u{{a0}}]*(?:{words})(?:[\s\u{{a0}}]*{slash}[\s\u{{a0}}]*(?:{words}))*[\s\u{{a0}}]*(?:[:：][\s\u{{a0}}]*|$)",
        )) {
            Ok(re) => re,
            Err(e) => unreachable!("regex of constant words: {e}"),
        }
    })
}

/// The subject a ticket shows and outgoing mail carries after `[NUMBER]`:
/// without reply/forward prefixes, old ticket tags, or the fixed words of
/// crmgate's own automatic subjects.
pub fn clean_subject(subject: &str, pattern: &Regex) -> String {
    let mut s = subject.replace(['\r', '\n', '\t'], " ");
    loop {
        let before = s.len();
        // Prefixes, then a bracketed or bare ticket tag at the start, then
        // the words of a receipt or closure notice being answered.
        while let Some(m) = prefix_regex().find(&s) {
            if m.end() == 0 {
                break;
            }
            s = s[m.end()..].to_string();
        }
        if let Some(m) = automatic_words_regex().find(&s) {
            s = s[m.end()..].to_string();
        }
        let trimmed = s.trim_start();
        if let Some(c) = pattern.captures(trimmed) {
            if let Some(n) = c.name("number") {
                let start = n.start();
                let lead = &trimmed[..start];
                if lead.trim().is_empty() || lead.trim() == "[" || lead.trim() == "(" {
                    let mut rest = &trimmed[n.end()..];
                    if !lead.trim().is_empty() {
                        rest = rest.trim_start_matches([']', ')']);
                    }
                    s = rest.trim_start_matches([':', '-', ' ']).to_string();
                }
            }
        }
        if s.len() == before {
            break;
        }
    }
    // Tags left in the middle, e.g. "Imprimante [TKT0000042]".
    let mut out = s.clone();
    for c in pattern.captures_iter(&s) {
        if let Some(n) = c.name("number") {
            for wrapped in [format!("[{}]", n.as_str()), format!("({})", n.as_str())] {
                out = out.replace(&wrapped, "");
            }
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

type HmacSha256 = Hmac<Sha256>;

/// A short MAC over `text`, or a fixed marker when no key is configured
/// (addresses still parse; they are then only as strong as the outbox id).
pub fn mac(key: Option<&[u8]>, text: &str) -> String {
    match key {
        Some(key) => match HmacSha256::new_from_slice(key) {
            Ok(mut m) => {
                m.update(text.as_bytes());
                hex::encode(&m.finalize().into_bytes()[..5])
            }
            Err(_) => "0".into(),
        },
        None => "0".into(),
    }
}

/// The Reply-To of a work note when `reply_secret_file` is set:
/// `internal+NUMBER.MAC@domain`. A reply to it names its ticket with
/// crmgate's signature, whatever the Subject became, and it goes to the
/// internal address, so it comes back as a work note (and, like any work
/// note, only from a believed agent). Without a key there is nothing to sign
/// with, and the Reply-To stays the From address, as the SPEC says.
pub fn reply_address(internal: &str, ticket_number: &str, key: Option<&[u8]>) -> Option<String> {
    key?;
    let (local, domain) = internal.rsplit_once('@')?;
    let number = ticket_number.to_ascii_uppercase();
    let mac = mac(key, &format!("notes-{number}"));
    Some(format!("{local}+{number}.{mac}@{domain}"))
}

/// The Message-ID of one of crmgate's outgoing copies on ticket `number`:
/// `NUMBER.RANDOM@hostname`. The number in it lets threading find the
/// ticket through its number (see [`own_message_id_number`]), so these IDs,
/// random keys, are kept out of the index of Message-IDs.
pub fn own_message_id(number: &str, hostname: &str) -> String {
    format!("{number}.{:016x}@{hostname}", rand::random::<u64>())
}

/// The ticket number in a Message-ID shaped as one of ours
/// ([`own_message_id`]: the prefix, digits, a dot and 16 hex digits before
/// the `@`), upper-cased as numbers are stored. Only a hint of where to
/// look: the store confirms the ID among that ticket's own, so an ID made
/// up to look like ours threads nowhere. The domain is not compared: copies
/// sent before `gateway.hostname` changed are ours too.
pub fn own_message_id_number(message_id: &str, prefix: &str) -> Option<String> {
    let (local, _domain) = message_id.rsplit_once('@')?;
    let (number, random) = local.split_once('.')?;
    let digits = number.get(prefix.len()..)?;
    let ours = number.get(..prefix.len())?.eq_ignore_ascii_case(prefix)
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 16
        && random.bytes().all(|b| b.is_ascii_hexdigit());
    ours.then(|| number.to_ascii_uppercase())
}

/// crmgate's envelope sender for one outbox row: `public+bounce-ID-MAC@domain`
/// (VERP), so a delivery report names the row it is about.
pub fn bounce_address(public: &str, outbox_id: i64, key: Option<&[u8]>) -> String {
    let (local, domain) = public.rsplit_once('@').unwrap_or((public, "localhost"));
    let tag = format!("bounce-{outbox_id}");
    format!("{local}+{tag}-{}@{domain}", mac(key, &tag))
}

/// The outbox id of a bounce address of ours, when its MAC checks.
pub fn parse_bounce_address(address: &str, public: &str, key: Option<&[u8]>) -> Option<i64> {
    let tag = plus_tag(address, &[public])?.to_ascii_lowercase();
    let rest = tag.strip_prefix("bounce-")?;
    let (id, given) = rest.rsplit_once('-')?;
    let id: i64 = id.parse().ok()?;
    (mac(key, &format!("bounce-{id}")) == given).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Languages};

    fn pattern() -> Regex {
        Config::embedded_default().ticket.pattern
    }

    #[test]
    fn numbers_behind_prefixes_of_every_language() {
        for s in [
            "RE: [TKT0000042] imprimante",
            "Réf. : TKT0000042 imprimante",
            "TR: Fwd: AW: WG: SV: VS: Antw: RV: tkt0000042",
            "Re[2]: RE: TKT0000042",
            "=?utf-8?q?ignored?= TKT0000042",
        ] {
            assert_eq!(subject_numbers(s, &pattern()), vec!["TKT0000042"], "{s}");
        }
        assert!(subject_numbers("TKT00000421 too long", &pattern()).is_empty());
        assert!(subject_numbers("XTKT0000042", &pattern()).is_empty());
    }

    #[test]
    fn clean_subject_drops_prefixes_and_tags() {
        let p = pattern();
        assert_eq!(
            clean_subject("RE: TR: [TKT0000042] Imprimante", &p),
            "Imprimante"
        );
        assert_eq!(
            clean_subject("Re[2]: AW: Fwd: Imprimante en panne", &p),
            "Imprimante en panne"
        );
        assert_eq!(
            clean_subject("Réf. : Imprimante [TKT0000042]", &p),
            "Imprimante"
        );
        assert_eq!(
            clean_subject("[2] RV: SV: VS: WG: Antw: sujet", &p),
            "sujet"
        );
        assert_eq!(
            clean_subject("Relance du serveur", &p),
            "Relance du serveur"
        );
        assert_eq!(clean_subject("", &p), "");
    }

    #[test]
    fn clean_subject_drops_the_words_of_the_receipt_and_the_closure() {
        let p = pattern();
        let every = [
            Languages::Fr,
            Languages::En,
            Languages::FrEn,
            Languages::EnFr,
        ];
        for (language, name) in every.iter().flat_map(|&l| [(l, "closure"), (l, "receipt")]) {
            let ours = format!(
                "[TKT0000042] {}",
                crate::templates::subject(name, language, "Imprimante en panne")
            );
            for reply in [
                format!("RE: {ours}"),
                format!("Re: {}", ours.to_uppercase())
                    .replace("IMPRIMANTE EN PANNE", "Imprimante en panne"),
                format!("AW: WG: {ours}"),
                ours.replace(" :", "\u{a0}:"),
                ours.clone(),
            ] {
                assert_eq!(clean_subject(&reply, &p), "Imprimante en panne", "{reply}");
            }
        }
        // A receipt of a ticket without a subject: the words alone.
        assert_eq!(clean_subject("RE: [TKT0000042] Billet résolu", &p), "");
        assert_eq!(
            clean_subject("RE: [TKT0000042] Billet résolu / Ticket resolved", &p),
            ""
        );
        // A slash in the ticket's own subject stays.
        assert_eq!(
            clean_subject("RE: [TKT0000042] Billet résolu : Imprimante / scanner", &p),
            "Imprimante / scanner"
        );
        // The words elsewhere, or another word that starts alike, stay.
        assert_eq!(
            clean_subject("RE: [TKT0000042] Imprimante : billet résolu ?", &p),
            "Imprimante : billet résolu ?"
        );
        assert_eq!(
            clean_subject("Ticket resolvedness survey", &p),
            "Ticket resolvedness survey"
        );
    }

    #[test]
    fn plus_tags_only_on_crm_addresses() {
        let bases = ["support@example.org", "support-notes@example.org"];
        assert_eq!(
            plus_tag("support+TKT0000042@example.org", &bases),
            Some("TKT0000042")
        );
        assert_eq!(plus_tag("SUPPORT+x@EXAMPLE.org", &bases), Some("x"));
        assert_eq!(plus_tag("other+TKT0000042@example.org", &bases), None);
        let c = candidates(
            "sans numéro",
            &["support+tkt0000042@example.org".into()],
            &bases,
            &["a@x".into()],
            &["first@x".into(), "last@x".into()],
            &pattern(),
            None,
        );
        assert_eq!(c.tag_numbers, ["TKT0000042"]);
        assert_eq!(c.message_ids, ["a@x", "last@x", "first@x"]);
    }

    #[test]
    fn bounce_addresses_round_trip_and_refuse_forged_macs() {
        let key = b"0123456789abcdef0123".as_slice();
        let a = bounce_address("support@example.org", 42, Some(key));
        assert!(a.starts_with("support+bounce-42-"));
        assert_eq!(
            parse_bounce_address(&a, "support@example.org", Some(key)),
            Some(42)
        );
        let forged = "support+bounce-43-0000000000@example.org";
        assert_eq!(
            parse_bounce_address(forged, "support@example.org", Some(key)),
            None
        );
        let plain = bounce_address("support@example.org", 7, None);
        assert_eq!(
            parse_bounce_address(&plain, "support@example.org", None),
            Some(7)
        );
    }

    #[test]
    fn signed_reply_addresses_name_their_ticket_and_nothing_else() {
        let key = b"0123456789abcdef0123".as_slice();
        let bases = ["support@example.org", "support-notes@example.org"];
        assert_eq!(
            reply_address("support-notes@example.org", "TKT0000042", None),
            None,
            "no key, no signed address: Reply-To stays the From"
        );
        let signed = reply_address("support-notes@example.org", "tkt0000042", Some(key))
            .expect("signed with a key");
        assert!(signed.starts_with("support-notes+TKT0000042."), "{signed}");
        let with = |rcpt: &str, key: Option<&[u8]>| {
            candidates(
                "[TKT0000007] autre",
                &[rcpt.into()],
                &bases,
                &[],
                &[],
                &pattern(),
                key,
            )
        };
        // Upper or lower case, as MTAs may rewrite local parts.
        for rcpt in [signed.clone(), signed.to_ascii_lowercase()] {
            let c = with(&rcpt, Some(key));
            assert_eq!(c.signed_numbers, ["TKT0000042"], "{rcpt}");
            assert!(c.tag_numbers.is_empty());
            assert_eq!(c.subject_numbers, ["TKT0000007"]);
        }
        // Another ticket's number under this MAC, or a made-up MAC: nothing.
        let local = signed.split_once('@').map(|(l, _)| l).unwrap_or_default();
        let mac = local.rsplit_once('.').map(|(_, m)| m).unwrap_or_default();
        assert_eq!(mac.len(), 10, "{signed}");
        let moved = format!("support-notes+TKT0000043.{mac}@example.org");
        let c = with(&moved, Some(key));
        assert!(
            c.signed_numbers.is_empty() && c.tag_numbers.is_empty(),
            "{c:?}"
        );
        let c = with("support-notes+TKT0000042.0000000000@example.org", Some(key));
        assert!(
            c.signed_numbers.is_empty() && c.tag_numbers.is_empty(),
            "{c:?}"
        );
        // Another key does not check either.
        let c = with(&signed, Some(b"another key".as_slice()));
        assert!(
            c.signed_numbers.is_empty() && c.tag_numbers.is_empty(),
            "{c:?}"
        );
        // The SPEC's plain +NUMBER keeps working with a key.
        let c = with("support-notes+TKT0000042@example.org", Some(key));
        assert_eq!(c.tag_numbers, ["TKT0000042"]);
        assert!(c.signed_numbers.is_empty());
    }

    #[test]
    fn our_message_ids_name_their_ticket_and_others_do_not() {
        let id = own_message_id("TKT0000042", "crm.example.com");
        assert!(id.ends_with("@crm.example.com"), "{id}");
        assert_eq!(
            own_message_id_number(&id, "TKT").as_deref(),
            Some("TKT0000042")
        );
        assert_ne!(
            id,
            own_message_id("TKT0000042", "crm.example.com"),
            "random"
        );
        // Any case, any host (the hostname may have changed since).
        assert_eq!(
            own_message_id_number("tkt0000042.00000000deadbeef@old.example", "TKT").as_deref(),
            Some("TKT0000042")
        );
        for other in [
            "quick.00000000deadbeef@crm.example.com",
            "TKT0000042.deadbeef@crm.example.com",
            "TKT0000042.00000000deadbeeg@crm.example.com",
            "TKT.00000000deadbeef@crm.example.com",
            "TKT00x0042.00000000deadbeef@crm.example.com",
            "ABC0000042.00000000deadbeef@crm.example.com",
            "TKT0000042.00000000deadbeef",
            "CAF1234@mail.example.com",
            "",
        ] {
            assert_eq!(own_message_id_number(other, "TKT"), None, "{other}");
        }
    }
}
