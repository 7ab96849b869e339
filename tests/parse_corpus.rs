//! The parser against real mail: every file of `fixtures/corpus/` (public
//! test suites of other mail libraries, see `fixtures/README.md`) parses,
//! a handful are checked field by field, and arbitrary or mutated bytes
//! never make `parse` panic.

use std::path::{Path, PathBuf};

use crmgate::parse::{parse, AutoSignal, DeliveryReport, Inbound, Mailbox};
use proptest::prelude::*;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus")
}

/// Every `.eml` of the corpus, sorted by name.
fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("fixtures/corpus exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    files.sort();
    files
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(corpus_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn parsed(name: &str) -> Inbound {
    parse(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The raw message without the header lines whose name is in `names`.
fn without_headers(raw: &[u8], names: &[&str]) -> Vec<u8> {
    let text = String::from_utf8_lossy(raw);
    text.split_inclusive('\n')
        .filter(|line| {
            !names.iter().any(|n| {
                line.len() > n.len()
                    && line.is_char_boundary(n.len())
                    && line[..n.len()].eq_ignore_ascii_case(n)
                    && line[n.len()..].starts_with(':')
            })
        })
        .collect::<String>()
        .into_bytes()
}

#[test]
fn every_corpus_file_parses() {
    let files = corpus_files();
    assert_eq!(files.len(), 105, "the corpus has 105 messages");
    for path in files {
        let raw = std::fs::read(&path).expect("readable fixture");
        if let Err(e) = parse(&raw) {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn encoded_iso_8859_1_subject_folded() {
    let m = parsed("092-sisimai-lhost-exchange2007-06.eml");
    assert_eq!(
        m.subject,
        "Non remis : Votre deuxième paire de chaussures à 5 euros"
    );
    let m = parsed("165-phpmime-m0001.eml");
    assert_eq!(m.subject, "Mail avec fichier attaché de 1ko");
}

#[test]
fn latin1_body_and_raw_latin1_headers() {
    let m = parsed("176-zbateson-m0001.eml");
    assert_eq!(
        m.subject,
        "Die Hasen und die Frösche (Microsoft Outlook 00)"
    );
    assert_eq!(
        m.to,
        vec![Mailbox::new(
            Some("Jürgen Schmürgen"),
            "schmuergen@example.com"
        )]
    );
    assert!(
        m.text.starts_with(
            "Die Hasen und die Frösche\n\nDie Hasen klagten einst über ihre mißliche Lage;"
        ),
        "{:?}",
        m.text
    );
    let m = parsed("109-mikel-invalid_subject_characters.eml");
    assert_eq!(
        m.subject,
        "Formação FrenetikPolis: Mega Campanha Final Verão | Cursos de Setembro"
    );
}

#[test]
fn windows_1252_body() {
    let m = parsed("100-sisimai-lhost-office365-01.eml");
    assert!(m.text.contains("If that doesn’t work"), "{:?}", m.text);
}

#[test]
fn pdf_attachment() {
    let m = parsed("119-mikel-attachment_pdf.eml");
    assert_eq!(m.attachments.len(), 1);
    let pdf = &m.attachments[0];
    assert_eq!(pdf.filename, "broken.pdf");
    assert_eq!(pdf.content_type, "application/pdf");
    assert_eq!(pdf.data.len(), 1026);
    assert!(pdf.data.starts_with(b"%PDF-"));
}

#[test]
fn non_ascii_attachment_filename() {
    let m = parsed("120-mikel-attachment_nonascii_filename.eml");
    let names: Vec<&str> = m.attachments.iter().map(|a| a.filename.as_str()).collect();
    assert_eq!(names, ["ciële.txt"]);
    assert_eq!(m.attachments[0].content_type, "text/plain");
}

#[test]
fn attached_message_is_named_after_its_subject() {
    let m = parsed("092-sisimai-lhost-exchange2007-06.eml");
    let eml = m
        .attachments
        .iter()
        .find(|a| a.content_type == "message/rfc822")
        .expect("the returned message is attached");
    assert_eq!(
        eml.filename,
        "Votre deuxième paire de chaussures à 5 euros.eml"
    );
    // The attached message's own bytes, not the whole report around it.
    assert!(eml
        .data
        .starts_with(b"Received: from SRV124.ville-saumur.fr (10.1.0.124)"));
    assert!(!eml.data.windows(11).any(|w| w == b"report-type"));
}

#[test]
fn delivery_report_failed_recipient_and_diagnostic() {
    let m = parsed("103-sisimai-lhost-sendmail-01.eml");
    assert_eq!(
        m.auto,
        Some(AutoSignal::AutoSubmitted("auto-generated (failure)".into()))
    );
    assert_eq!(
        m.report,
        Some(DeliveryReport {
            failed_recipients: vec!["userunknown@bouncehammer.jp".into()],
            diagnostic: "550 5.1.1 <userunknown@bouncehammer.jp>... User Unknown".into(),
            original_message_id: Some("E1C50F1B-1C83-4820-BC36-AC6FBFBE8568@example.org".into()),
            outbox_id: None,
        })
    );
    let names: Vec<&str> = m.attachments.iter().map(|a| a.filename.as_str()).collect();
    assert_eq!(
        names,
        ["delivery-status.txt", "バウンスメールのテスト(日本語).eml"]
    );
    // Several failed recipients in one report.
    let m = parsed("128-mikel-multi_address_bounce1.eml");
    let report = m.report.expect("a delivery report");
    assert_eq!(report.failed_recipients.len(), 5);
    assert!(report
        .failed_recipients
        .contains(&"kfhejkfbsjkjsbhds@gmail.com".to_string()));
    // A read receipt is automatic but not a delivery report.
    let m = parsed("157-flanker-disposition-notification.eml");
    assert_eq!(m.auto, Some(AutoSignal::Report));
    assert_eq!(m.report, None);
}

#[test]
fn outlook_automatic_reply_flagged_by_auto_response_suppress_all() {
    // The sample also carries X-MS-Exchange-Inbox-Rules-Loop; without it,
    // `X-Auto-Response-Suppress: All` alone must still flag the reply.
    let raw = without_headers(
        &read("096-sisimai-rfc3834-02.eml"),
        &["X-MS-Exchange-Inbox-Rules-Loop"],
    );
    let m = parse(&raw).expect("parses");
    assert_eq!(m.subject, "Automatic reply: Nyaan");
    assert_eq!(
        m.auto,
        Some(AutoSignal::Header("X-Auto-Response-Suppress".into()))
    );
    // `OOF, AutoReply, …` without `All` is what notifications carry: not
    // automatic once the sample's other signals are gone.
    let raw = without_headers(
        &read("099-sisimai-rfc3834-06.eml"),
        &["Auto-Submitted", "Precedence"],
    );
    assert_eq!(parse(&raw).expect("parses").auto, None);
}

#[test]
fn html_only_mail_is_rendered_as_text() {
    let m = parsed("181-zbateson-m2003.eml");
    assert!(m.html.as_deref().is_some_and(|h| h.starts_with("<html>")));
    assert!(
        m.text.starts_with(
            "Die Hasen und die Frösche\n\nDie Hasen klagten einst über ihre mißliche Lage; \
             \"wir leben\", sprach ein Redner,"
        ),
        "{:?}",
        m.text
    );
    assert!(m
        .text
        .ends_with("welche also wohl noch unglücklicher sein müssen als wir.\""));
    assert!(!m.text.contains('<'));
}

#[test]
fn message_without_message_id() {
    let m = parsed("134-mikel-utf8_headers.eml");
    assert_eq!(m.message_id, None);
    assert_eq!(
        m.from,
        Some(Mailbox::new(Some("Jöhn Doe"), "jdöe@mächine.example"))
    );
    assert_eq!(m.subject, "Säying Hello");
    assert_eq!(&*m.text, "body\n");
}

#[test]
fn list_mail_and_bulk_are_automatic() {
    assert_eq!(
        parsed("184-spamscope-mail_test_5.eml").auto,
        Some(AutoSignal::Precedence("bulk".into()))
    );
    assert_eq!(
        parsed("113-mikel-empty_in_reply_to.eml").auto,
        Some(AutoSignal::Header("List-Id".into()))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = parse(&raw);
    }

    #[test]
    fn header_like_garbage_never_panics(
        lines in proptest::collection::vec("[A-Za-z-]{1,12}: [ -~\u{80}-\u{ff}]{0,40}", 1..8),
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut raw = lines.join("\r\n").into_bytes();
        raw.extend_from_slice(b"\r\n\r\n");
        raw.extend_from_slice(&body);
        prop_assert!(parse(&raw).is_ok());
    }

    #[test]
    fn mutated_corpus_files_never_panic(
        index in 0usize..105,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let files = corpus_files();
        let mut raw = std::fs::read(&files[index % files.len()]).expect("readable fixture");
        if !raw.is_empty() {
            for (at, byte) in edits {
                let at = at.index(raw.len());
                raw[at] = byte;
            }
            if truncate {
                raw.truncate(cut.index(raw.len()));
            }
        }
        let _ = parse(&raw);
    }
}

/// mail-parser's `full_encoding` feature (encoding_rs) decodes the East
/// Asian charsets; without it these bodies come out as U+FFFD.
#[test]
fn east_asian_charsets_are_decoded() {
    let m = parsed("125-mikel-japanese_shift_jis.eml");
    assert!(m.text.starts_with("あいうえお\n"), "{:?}", m.text);
    let m = parsed("133-mikel-example14.eml");
    assert_eq!(m.subject, "Re: TEST テストテスト");
    let m = parsed("172-phpmime-m0018.eml");
    assert_eq!(m.attachments[0].filename, "사진.JPG");
}

/// Every part of every corpus message is kept somewhere: its text in the
/// text or HTML body, or its bytes as an attachment (an attached message
/// as a `message/rfc822` attachment). Only the alternative renderings of
/// the body (the text parts of a `multipart/alternative`) may be left out,
/// and parts with nothing in them.
#[test]
fn every_part_of_every_corpus_message_is_kept() {
    use mail_parser::{MessageParser, MimeHeaders, PartType};
    for path in corpus_files() {
        let name = path.display().to_string();
        let raw = std::fs::read(&path).expect("readable fixture");
        let inbound = parse(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Some(message) = MessageParser::default().parse(&raw[..]) else {
            continue;
        };
        let normalise = |s: &str| s.replace("\r\n", "\n").trim().to_string();
        let text = normalise(&inbound.text);
        let html = normalise(inbound.html.as_deref().unwrap_or_default());
        let mut in_alternative = Vec::new();
        for part in &message.parts {
            if let PartType::Multipart(children) = &part.body {
                if part.is_content_type("multipart", "alternative") {
                    in_alternative.extend(children.iter().map(|&c| c as usize));
                }
            }
        }
        let mut messages = 0;
        for (index, part) in message.parts.iter().enumerate() {
            let kept = match &part.body {
                PartType::Multipart(_) => continue,
                PartType::Message(_) => {
                    messages += usize::from(part.offset_end > part.offset_body);
                    continue;
                }
                PartType::Text(t) | PartType::Html(t) => {
                    // mail-parser reads undeclared 8-bit as U+FFFD where
                    // crmgate reads the letters: the rest must be there.
                    let t = normalise(t);
                    let found = |body: &str| t.split('\u{fffd}').all(|piece| body.contains(piece));
                    t.is_empty()
                        || in_alternative.contains(&index)
                        || found(&text)
                        || found(&html)
                        || inbound.attachments.iter().any(|a| {
                            a.data == t.as_bytes()
                                || normalise(&String::from_utf8_lossy(&a.data)) == t
                        })
                }
                PartType::Binary(b) | PartType::InlineBinary(b) => {
                    b.is_empty() || inbound.attachments.iter().any(|a| a.data == **b)
                }
            };
            assert!(
                kept,
                "{name}: part {index} ({:?}) is lost",
                part.content_type()
            );
        }
        let attached_messages = inbound
            .attachments
            .iter()
            .filter(|a| a.content_type == "message/rfc822")
            .count();
        assert!(
            attached_messages >= messages,
            "{name}: {messages} attached messages, {attached_messages} kept"
        );
    }
}

/// Raw 8-bit without a charset, in headers and in a body: read by the
/// declared body charset or by detection, never as U+FFFD nor as
/// windows-1252 mojibake of UTF-8.
#[test]
fn undeclared_8bit_headers_and_bodies_are_read() {
    let m = parsed("177-zbateson-github-102-02.eml");
    assert_eq!(
        m.subject,
        "Die Hasen und die Frösche (Microsoft Outlook 00)"
    );
    assert_eq!(
        m.to,
        vec![Mailbox::new(
            Some("Jürgen Schmürgen"),
            "schmuergen@example.com"
        )]
    );
    assert!(
        m.text.starts_with(
            "Die Hasen und die Frösche\n\nDie Hasen klagten einst über ihre mißliche Lage;"
        ),
        "{:?}",
        m.text
    );
    // A UTF-8 display name with one stray byte after it.
    let m = parsed("160-flanker-mailformed-headers.eml");
    let name = m.from.and_then(|f| f.name).unwrap_or_default();
    assert!(name.starts_with("Юникод запрещен"), "{name}");
}
