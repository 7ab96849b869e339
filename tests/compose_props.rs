//! Property: no agent address ever in a public copy.
//!
//! Arbitrary text and HTML, with agents' addresses written into them in
//! random letter case and in every form mail clients and people use
//! (`mailto:`, `%40`, entities, quoted "From:" and "a écrit :" lines,
//! invisible characters, tags), go through `compose` with a scrub. The raw
//! bytes, and every header and part once parsed back with mail-parser and
//! decoded the way a reader or a browser would, must not contain any of
//! those addresses.

use crmgate::compose::{compose, scrub_html, scrub_text, Draft, Scrub};
use crmgate::config::Languages;
use crmgate::helpdesk::SendKind;
use crmgate::parse::{Attachment, Mailbox};
use mail_parser::{Address, HeaderValue, MessageParser, MimeHeaders, PartType};
use proptest::prelude::*;

const REPLACEMENT: &str = "support@helpdesk.example";

/// How one agent address is written at one place.
#[derive(Debug, Clone, Copy)]
enum Form {
    Plain,
    Mailto,
    NameAngle,
    QuotedFrom,
    QuotedDe,
    Wrote,
    AEcrit,
    Percent40,
    PercentAll,
    MailtoEncodedAngles,
    EntityDecimal,
    EntityHex,
    EntityNamed,
    EntityEveryChar,
    EntityDots,
    ZeroWidth,
    FullWidthAt,
    /// HTML only: tags between the characters.
    Tags,
}

const TEXT_FORMS: [Form; 17] = [
    Form::Plain,
    Form::Mailto,
    Form::NameAngle,
    Form::QuotedFrom,
    Form::QuotedDe,
    Form::Wrote,
    Form::AEcrit,
    Form::Percent40,
    Form::PercentAll,
    Form::MailtoEncodedAngles,
    Form::EntityDecimal,
    Form::EntityHex,
    Form::EntityNamed,
    Form::EntityEveryChar,
    Form::EntityDots,
    Form::ZeroWidth,
    Form::FullWidthAt,
];

fn write_form(address: &str, form: Form) -> String {
    let (local, domain) = address.split_once('@').unwrap_or((address, ""));
    match form {
        Form::Plain => address.to_string(),
        Form::Mailto => format!("mailto:{address}"),
        Form::NameAngle => format!("Jane Doe <{address}>"),
        Form::QuotedFrom => format!("\n> From: Jane Doe <{address}>\n"),
        Form::QuotedDe => format!("\n> De : Jane Doe <{address}>\n"),
        Form::Wrote => format!("\nOn Mon, Jane Doe <{address}> wrote:\n"),
        Form::AEcrit => format!("\nLe lun. 3 mars, Jane Doe <{address}> a écrit :\n"),
        Form::Percent40 => format!("mailto:{local}%40{domain}"),
        Form::PercentAll => address.bytes().map(|b| format!("%{b:02X}")).collect(),
        Form::MailtoEncodedAngles => {
            format!("mailto:Jane%20Doe%20%3C{local}%40{domain}%3E")
        }
        Form::EntityDecimal => format!("{local}&#64;{domain}"),
        Form::EntityHex => format!("{local}&#x40;{domain}"),
        Form::EntityNamed => format!("{local}&commat;{domain}"),
        Form::EntityEveryChar => address
            .chars()
            .map(|c| format!("&#{};", c as u32))
            .collect(),
        Form::EntityDots => address.replace('.', "&#46;").replace('@', "&#64;"),
        Form::ZeroWidth => format!("{local}\u{200B}@\u{AD}{domain}"),
        Form::FullWidthAt => format!("{local}\u{FF20}{domain}"),
        Form::Tags => format!("<span>{local}</span>@<b>{domain}</b>"),
    }
}

/// Random letter case, from a bit mask.
fn recase(address: &str, mask: u64) -> String {
    address
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

/// One piece of a generated body: filler, or an agent address in some form.
#[derive(Debug, Clone)]
enum Piece {
    Filler(String),
    Agent {
        agent: usize,
        form: usize,
        case: u64,
        before: usize,
        after: usize,
    },
}

/// Characters that end an address on either side, as text and as HTML.
const TEXT_DELIMITERS: [&str; 12] = [
    " ", "\n", "<", ">", "(", ")", ",", ";", ": ", "\"", "'", ". ",
];
const HTML_DELIMITERS: [&str; 12] = [
    " ", "\n", "&lt;", "&gt;", "(", ")", ",", "&quot;", "<br>", "<p>", "</p>", "&nbsp;",
];

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        "[a-zA-Z0-9 àéèçôÉ.,;:!?'\"()\n-]{0,30}".prop_map(Piece::Filler),
        (0usize..3, 0usize..64, any::<u64>(), 0usize..12, 0usize..12).prop_map(
            |(agent, form, case, before, after)| Piece::Agent {
                agent,
                form,
                case,
                before,
                after
            }
        ),
    ]
}

fn render(pieces: &[Piece], agents: &[String], html: bool) -> String {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Filler(text) => out.push_str(text),
            Piece::Agent {
                agent,
                form,
                case,
                before,
                after,
            } => {
                let address = recase(&agents[agent % agents.len()], *case);
                let form = if html && form % (TEXT_FORMS.len() + 1) == TEXT_FORMS.len() {
                    Form::Tags
                } else {
                    TEXT_FORMS[form % TEXT_FORMS.len()]
                };
                let delimiters = if html {
                    HTML_DELIMITERS
                } else {
                    TEXT_DELIMITERS
                };
                out.push_str(delimiters[*before]);
                out.push_str(&write_form(&address, form));
                out.push_str(delimiters[*after]);
            }
        }
    }
    out
}

fn agent_address() -> impl Strategy<Value = String> {
    ("[a-z]{1,6}(\\.[a-z]{1,5})?", "[a-z]{1,6}", "(org|com|fr)")
        .prop_map(|(local, host, tld)| format!("{local}@{host}.{tld}"))
}

/// What a reader would read: entities and percent-escapes decoded,
/// invisible characters dropped, full-width look-alikes folded, tags
/// removed from HTML; lower-cased.
fn as_read(text: &str, html: bool) -> String {
    let mut s = text.to_string();
    if html {
        let mut stripped = String::new();
        let mut in_tag = false;
        for c in s.chars() {
            match c {
                '<' => in_tag = true,
                '>' if in_tag => in_tag = false,
                c if !in_tag => stripped.push(c),
                _ => {}
            }
        }
        s = stripped;
    }
    s = decode_entities(&s);
    s = percent_decode(&s);
    s.chars()
        .filter(|c| {
            !matches!(
                c,
                '\u{AD}' | '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}'
            )
        })
        .map(|c| match c {
            '\u{FF20}' | '\u{FE6B}' => '@',
            '\u{FF0E}' => '.',
            c => c,
        })
        .collect::<String>()
        .to_lowercase()
}

fn decode_entities(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.get(..rest.len().min(12)).and_then(|w| w.find(';')) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let name = &rest[1..semi];
        let decoded = if let Some(hex) = name.strip_prefix("#x") {
            u32::from_str_radix(hex, 16).ok().and_then(char::from_u32)
        } else if let Some(dec) = name.strip_prefix('#') {
            dec.parse().ok().and_then(char::from_u32)
        } else {
            match name {
                "commat" => Some('@'),
                "period" => Some('.'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "amp" => Some('&'),
                "nbsp" => Some(' '),
                _ => None,
            }
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_clean(what: &str, text: &str, html: bool, agents: &[String]) {
    let read = as_read(text, html);
    for agent in agents {
        assert!(
            !read.contains(agent.as_str()),
            "{agent} leaked in {what}: {text:?}\nread as: {read:?}"
        );
    }
}

fn address_texts(address: &Address<'_>) -> Vec<String> {
    address
        .iter()
        .flat_map(|a| {
            [a.name(), a.address()]
                .into_iter()
                .flatten()
                .map(str::to_string)
        })
        .collect()
}

fn kind_of(n: usize) -> SendKind {
    [
        SendKind::PublicCopy,
        SendKind::PartnerCopy,
        SendKind::Receipt,
        SendKind::Closure,
        SendKind::Email,
    ][n % 5]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_agent_address_in_a_public_copy(
        agents in proptest::collection::vec(agent_address(), 1..4),
        text in proptest::collection::vec(piece(), 0..12),
        html in proptest::option::of(proptest::collection::vec(piece(), 0..12)),
        subject in proptest::collection::vec(piece(), 0..4),
        name in proptest::collection::vec(piece(), 0..3),
        attachment in proptest::collection::vec(piece(), 0..6),
        kind in 0usize..5,
        case in any::<u64>(),
    ) {
        let line = |pieces: &[Piece]| render(pieces, &agents, false).replace('\n', " ");
        let draft = Draft {
            kind: kind_of(kind),
            ticket_number: "TKT0000042".into(),
            language: Languages::Fr,
            from_name: format!("{} via Soutien TI", line(&name)),
            from_address: REPLACEMENT.into(),
            reply_address: None,
            to: vec![
                Mailbox::new(Some(&line(&name)), "requester@client.example"),
                Mailbox::new(None, &recase(&agents[0], case)),
            ],
            cc: vec![Mailbox::new(Some(&line(&subject)), "watcher@client.example")],
            subject: line(&subject),
            text: render(&text, &agents, false),
            html: html.as_ref().map(|h| render(h, &agents, true)),
            listed_attachments: vec![(format!("{}.pdf", line(&name)), 2048)],
            attachments: vec![Attachment {
                filename: format!("{}.txt", line(&name)),
                content_type: "text/plain".into(),
                data: render(&attachment, &agents, false).into_bytes(),
                inline: false,
            }],
            message_id: "TKT0000042.1.abc@helpdesk.example".into(),
            in_reply_to: None,
            references: vec![],
            date: 1_780_000_000,
            loop_host: "helpdesk.example".into(),
            scrub: Some(Scrub {
                addresses: agents.clone(),
                replacement: REPLACEMENT.into(),
            }),
        };
        let raw = compose(&draft).expect("compose");

        let lower = String::from_utf8_lossy(&raw).to_lowercase();
        for agent in &agents {
            prop_assert!(!lower.contains(agent.as_str()), "{} in raw bytes:\n{}", agent, lower);
        }

        let message = MessageParser::default().parse(&raw).expect("parse back");
        for header in message.headers() {
            match header.value() {
                HeaderValue::Text(t) => assert_clean(header.name(), t, false, &agents),
                HeaderValue::TextList(list) => {
                    for t in list {
                        assert_clean(header.name(), t, false, &agents);
                    }
                }
                HeaderValue::Address(address) => {
                    for t in address_texts(address) {
                        assert_clean(header.name(), &t, false, &agents);
                    }
                }
                _ => {}
            }
        }
        for part in &message.parts {
            if let Some(name) = part.attachment_name() {
                assert_clean("attachment name", name, false, &agents);
            }
            match &part.body {
                PartType::Text(t) => assert_clean("text part", t, false, &agents),
                PartType::Html(h) => assert_clean("html part", h, true, &agents),
                PartType::Binary(b) | PartType::InlineBinary(b) => {
                    assert_clean("binary part", &String::from_utf8_lossy(b), false, &agents);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn scrubbing_is_idempotent(
        agents in proptest::collection::vec(agent_address(), 1..4),
        text in proptest::collection::vec(piece(), 0..12),
    ) {
        let scrub = Scrub { addresses: agents.clone(), replacement: REPLACEMENT.into() };
        let plain = render(&text, &agents, false);
        let once = scrub_text(&plain, &scrub);
        prop_assert_eq!(scrub_text(&once, &scrub), once.clone());
        let html = render(&text, &agents, true);
        let once = scrub_html(&html, &scrub);
        prop_assert_eq!(scrub_html(&once, &scrub), once.clone());
    }

    #[test]
    fn other_peoples_addresses_are_left_alone(
        agent in agent_address(),
        filler in "[a-zA-Z0-9 àé.,;:!?()\n]{0,30}",
        prefix in "[a-z0-9]{1,3}",
        label in "[a-z]{2,4}",
    ) {
        // The agent's address with more local part before it, or another
        // domain label after it, is someone else's address.
        let (local, domain) = agent.split_once('@').expect("generated with @");
        let longer_local = format!("{prefix}{local}@{domain}");
        let longer_domain = format!("{local}@{domain}.{label}q");
        let text = format!("{filler} {longer_local}, {longer_domain} {filler}");
        let scrub = Scrub { addresses: vec![agent.clone()], replacement: REPLACEMENT.into() };
        prop_assert_eq!(scrub_text(&text, &scrub), text.clone());
        prop_assert_eq!(scrub_html(&text, &scrub), text);
    }
}

/// Where the real mail samples are: the repository's copy of the corpus.
fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus")
}

/// Every address of real mail, taken as an agent's: the worst case for the
/// scrubber. The public copy built from each sample's subject, names, text
/// and HTML must contain none of them.
#[test]
fn real_mail_scrubbed_of_every_address() {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let address = regex::Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
        .expect("valid pattern");
    let mut checked = 0;
    let mut scrubbed = 0;
    let mut paths: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.extension().is_none_or(|e| e != "eml") {
            continue;
        }
        let raw = std::fs::read(&path).expect("read sample");
        let Some(message) = MessageParser::default().parse(&raw) else {
            continue;
        };
        let text = message
            .body_text(0)
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let html = (message.html_body_count() > 0)
            .then(|| message.body_html(0).map(|h| h.into_owned()))
            .flatten();
        let subject = message.subject().unwrap_or_default().to_string();
        let mut to = Vec::new();
        for list in [message.from(), message.to(), message.cc()]
            .into_iter()
            .flatten()
        {
            for a in list.iter() {
                if let Some(addr) = a.address() {
                    to.push(Mailbox::new(a.name(), addr));
                }
            }
        }
        let mut agents: Vec<String> = to.iter().map(|m| m.address.clone()).collect();
        for source in [&text, html.as_deref().unwrap_or_default(), &subject] {
            for found in address.find_iter(source) {
                agents.push(found.as_str().trim_end_matches('.').to_lowercase());
            }
        }
        agents.retain(|a| a.contains('@') && a != REPLACEMENT);
        agents.sort();
        agents.dedup();
        if agents.is_empty() {
            continue;
        }
        let draft = Draft {
            kind: SendKind::PublicCopy,
            ticket_number: "TKT0000042".into(),
            language: Languages::En,
            from_name: "Support via Soutien TI".into(),
            from_address: REPLACEMENT.into(),
            reply_address: None,
            to,
            cc: vec![],
            subject,
            text,
            html,
            listed_attachments: vec![],
            attachments: vec![],
            message_id: "TKT0000042.1.abc@helpdesk.example".into(),
            in_reply_to: None,
            references: vec![],
            date: 1_780_000_000,
            loop_host: "helpdesk.example".into(),
            scrub: Some(Scrub {
                addresses: agents.clone(),
                replacement: REPLACEMENT.into(),
            }),
        };
        let out = compose(&draft).expect("compose");
        let lower = String::from_utf8_lossy(&out).to_lowercase();
        let parsed = MessageParser::default().parse(&out).expect("parse back");
        let name = path.display().to_string();
        for agent in &agents {
            assert!(
                !lower.contains(agent.as_str()),
                "{agent} in raw output of {name}"
            );
        }
        assert_clean(&name, parsed.subject().unwrap_or_default(), false, &agents);
        for t in address_texts(parsed.to().expect("To")) {
            assert_clean(&name, &t, false, &agents);
        }
        if let Some(t) = parsed.body_text(0) {
            assert_clean(&name, &t, false, &agents);
        }
        if parsed.html_body_count() > 0 {
            if let Some(h) = parsed.body_html(0) {
                assert_clean(&name, &h, true, &agents);
            }
        }
        checked += 1;
        scrubbed += agents.len();
    }
    eprintln!("{checked} samples, {scrubbed} addresses scrubbed");
    assert!(
        checked >= 20,
        "only {checked} samples with addresses in {}",
        dir.display()
    );
}
