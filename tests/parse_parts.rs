//! Which parts of a message are its body and which are kept as attachments,
//! on the hand-made messages of `fixtures/parts/` (see `fixtures/README.md`).

use std::path::Path;

use crmgate::parse::{parse, Inbound};

fn parsed(name: &str) -> Inbound {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/parts")
        .join(name);
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    parse(&raw).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn names(m: &Inbound) -> Vec<(&str, &str, bool)> {
    m.attachments
        .iter()
        .map(|a| (a.filename.as_str(), a.content_type.as_str(), a.inline))
        .collect()
}

#[test]
fn a_named_text_after_the_pdf_is_the_body_of_a_fax() {
    let m = parsed("fax-text-after-pdf.eml");
    assert_eq!(
        &*m.text,
        "Fax reçu de +33 1 23 45 67 89, 2 pages, le 5 mars 2024 à 08:14.\n"
    );
    assert_eq!(names(&m), [("fax-4711.pdf", "application/pdf", false)]);
    assert!(m.attachments[0].data.starts_with(b"%PDF-1.4"));
}

#[test]
fn a_part_without_content_type_is_text_plain_and_the_body() {
    let m = parsed("fax-text-without-content-type.eml");
    assert_eq!(&*m.text, "Fax received from +33 1 98 76 54 32, 1 page.\n");
    assert_eq!(names(&m), [("fax-4712.pdf", "application/pdf", false)]);
}

#[test]
fn an_invitation_beside_the_alternatives_is_kept_as_an_attachment() {
    let m = parsed("outlook-invitation.eml");
    assert_eq!(
        &*m.text,
        "Bonjour, pouvez-vous installer le poste lundi ?\n"
    );
    assert!(m.html.as_deref().is_some_and(|h| h.contains("<p>Bonjour")));
    assert_eq!(names(&m), [("attachment-1.ics", "text/calendar", false)]);
    let ics = String::from_utf8_lossy(&m.attachments[0].data);
    assert!(ics.starts_with("BEGIN:VCALENDAR"), "{ics}");
    assert!(ics.contains("SUMMARY;LANGUAGE=fr-FR:Installation du poste"));
}

#[test]
fn a_logo_the_html_shows_is_inline_and_an_unnamed_photo_is_attached() {
    let m = parsed("outlook-logo-and-photo.eml");
    assert_eq!(
        names(&m),
        [
            ("image001.png", "image/png", true),
            ("attachment-2.png", "image/png", false),
        ]
    );
    assert_ne!(m.attachments[0].data, m.attachments[1].data);
    assert!(m.text.starts_with("Mon écran reste noir, photo jointe."));
}
