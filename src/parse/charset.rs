//! Header lines written in a legacy charset without saying which.
//!
//! RFC 5322 headers are ASCII, with RFC 2047 encoded-words for the rest,
//! or UTF-8 (RFC 6532). Old clients and some gateways put their own
//! charset's bytes straight into Subject and display names instead:
//! Outlook Express writes windows-1252, Japanese mailers Shift_JIS or raw
//! ISO-2022-JP escapes, Chinese ones GB2312, Russian ones KOI8-R.
//! mail-parser reads header bytes as UTF-8 and would turn each of those
//! letters into U+FFFD. Before it parses, each such line of a header block
//! is decoded here and re-encoded as UTF-8, with the charset the message
//! declares for its body when that charset reads the lines, else the one
//! `chardetng` (Firefox's detector for unlabelled legacy text) guesses.

use std::borrow::Cow;

use chardetng::{EncodingDetector, Iso2022JpDetection, Utf8Detection};
use encoding_rs::{Encoding, ISO_2022_JP, UTF_8, WINDOWS_1252};
use regex::bytes::Regex;

/// How far into the body the declared charset of the first text part is
/// looked for: MIME part headers come early; a 25 MB body is not scanned.
const CHARSET_SCAN_BYTES: usize = 64 * 1024;

/// `block` (the first `end` bytes of `raw`, a header block) with every line
/// in a legacy charset re-encoded as UTF-8; `raw` itself when every line is
/// already UTF-8. `context` is where the declared charset is looked for
/// when the block declares none: the whole message, for a part's header.
pub(super) fn repair_header_block<'a>(raw: &'a [u8], end: usize, context: &[u8]) -> Cow<'a, [u8]> {
    let block = &raw[..end.min(raw.len())];
    if std::str::from_utf8(block).is_ok() && !block.contains(&0x1b) {
        return Cow::Borrowed(raw);
    }
    let lines: Vec<&[u8]> = block.split_inclusive(|&b| b == b'\n').collect();
    let legacy: Vec<&[u8]> = lines
        .iter()
        .copied()
        .filter(|l| line_kind(l) == LineKind::Legacy)
        .collect();
    let encoding = if legacy.is_empty() {
        WINDOWS_1252
    } else {
        legacy_encoding(
            &legacy,
            declared_charset(block).or_else(|| declared_charset(context)),
            tld(block),
        )
    };
    let mut out = Vec::with_capacity(raw.len() + 64);
    for line in lines {
        match line_kind(line) {
            LineKind::Utf8 => out.extend_from_slice(line),
            LineKind::MostlyUtf8 => out.extend_from_slice(String::from_utf8_lossy(line).as_bytes()),
            LineKind::Iso2022Jp => {
                out.extend_from_slice(ISO_2022_JP.decode_without_bom_handling(line).0.as_bytes());
            }
            LineKind::Legacy => {
                out.extend_from_slice(encoding.decode_without_bom_handling(line).0.as_bytes());
            }
        }
    }
    out.extend_from_slice(&raw[block.len()..]);
    Cow::Owned(out)
}

/// The text of a body part in raw 8-bit that declares no charset (and is
/// not UTF-8): read in the charset `context` (the message) declares for
/// its text, else the detector's guess, instead of as U+FFFD.
pub(super) fn decode_undeclared(bytes: &[u8], context: &[u8]) -> Option<String> {
    if std::str::from_utf8(bytes).is_ok() {
        return None;
    }
    let lines: Vec<&[u8]> = bytes.split_inclusive(|&b| b == b'\n').collect();
    let encoding = legacy_encoding(&lines, declared_charset(context), None);
    Some(encoding.decode_without_bom_handling(bytes).0.into_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// ASCII or UTF-8 (RFC 6532): left as it is.
    Utf8,
    /// UTF-8 with a stray byte or two (a truncated display name): read as
    /// UTF-8, the stray bytes as U+FFFD, rather than every letter as
    /// windows-1252 mojibake.
    MostlyUtf8,
    /// 7-bit ISO-2022-JP escapes (`ESC $ B`): unambiguous, whatever the
    /// rest of the message says.
    Iso2022Jp,
    /// Bytes of some legacy 8-bit or multi-byte charset.
    Legacy,
}

fn line_kind(line: &[u8]) -> LineKind {
    if line.is_ascii() {
        let escaped = line
            .windows(3)
            .any(|w| matches!(w, [0x1b, b'$', b'B' | b'@'] | [0x1b, b'(', b'J' | b'B']));
        return if escaped {
            LineKind::Iso2022Jp
        } else {
            LineKind::Utf8
        };
    }
    let mut rest = line;
    let (mut valid, mut invalid) = (0usize, 0usize);
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                valid += s.bytes().filter(|b| !b.is_ascii()).count();
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                valid += good.iter().filter(|b| !b.is_ascii()).count();
                let skip = e.error_len().unwrap_or(bad.len());
                invalid += skip;
                rest = &bad[skip..];
            }
        }
    }
    match (valid, invalid) {
        (_, 0) => LineKind::Utf8,
        // Legacy single-byte text almost never forms valid multi-byte
        // UTF-8 sequences: a few make a UTF-8 line with a stray byte.
        (v, i) if v >= 4 && v > 2 * i => LineKind::MostlyUtf8,
        _ => LineKind::Legacy,
    }
}

/// The charset that reads the `legacy` lines: the declared one when it
/// decodes them all without error, else the detector's guess (helped by
/// the sender's top-level domain, as Firefox is by the page's).
fn legacy_encoding(
    legacy: &[&[u8]],
    declared: Option<&'static Encoding>,
    tld: Option<String>,
) -> &'static Encoding {
    if let Some(encoding) = declared {
        if legacy.iter().all(|line| {
            encoding
                .decode_without_bom_handling_and_without_replacement(line)
                .is_some()
        }) {
            return encoding;
        }
    }
    let mut detector = EncodingDetector::new(Iso2022JpDetection::Deny);
    for line in legacy {
        detector.feed(line, false);
    }
    detector.feed(b"", true);
    let guess = detector.guess(tld.as_deref().map(str::as_bytes), Utf8Detection::Deny);
    if guess == UTF_8 {
        WINDOWS_1252
    } else {
        guess
    }
}

/// The charset the message declares for its text: the `charset` of the
/// first `Content-Type: text/…` in `bytes` (the top-level header, else the
/// first text part's). US-ASCII and UTF-8 say nothing about 8-bit bytes
/// that are not UTF-8, so they count as none.
fn declared_charset(bytes: &[u8]) -> Option<&'static Encoding> {
    static RE: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    let re = RE
        .get_or_init(|| {
            Regex::new(
                r#"(?im)^content-type:[ \t]*text/[^\r\n]*?(?:\r?\n[ \t][^\r\n]*?)*?charset[ \t]*=[ \t]*"?([A-Za-z0-9_.:+-]+)"#,
            )
            .ok()
        })
        .as_ref()?;
    let scanned = &bytes[..bytes.len().min(CHARSET_SCAN_BYTES)];
    let label = re.captures(scanned)?.get(1)?.as_bytes();
    let lower = label.to_ascii_lowercase();
    if lower.starts_with(b"us-ascii") || lower == b"ascii" || lower.starts_with(b"ansi_x3.4") {
        return None;
    }
    Encoding::for_label_no_replacement(label).filter(|e| *e != UTF_8)
}

/// The top-level domain of the From address, lower-case, for the
/// detector: `.jp`, `.ru`, `.cn` say which legacy charsets are likely.
fn tld(block: &[u8]) -> Option<String> {
    let from = block
        .split(|&b| b == b'\n')
        .find(|l| l.len() > 5 && l[..5].eq_ignore_ascii_case(b"from:"))?;
    let at = from.iter().rposition(|&b| b == b'@')?;
    let domain: Vec<u8> = from[at + 1..]
        .iter()
        .copied()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        .collect();
    let label = domain.rsplit(|&b| b == b'.').next()?;
    (!label.is_empty()
        && label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-'))
    .then(|| String::from_utf8_lossy(label).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repaired(raw: &[u8]) -> String {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(raw.len(), |p| p + 2);
        String::from_utf8(repair_header_block(raw, end, raw).into_owned()).expect("UTF-8 out")
    }

    fn encode(encoding: &'static Encoding, text: &str) -> Vec<u8> {
        let (bytes, _, unmappable) = encoding.encode(text);
        assert!(!unmappable, "{text} in {}", encoding.name());
        bytes.into_owned()
    }

    /// A header block whose Subject and From name are raw bytes of `encoding`,
    /// with or without a body charset, from an address under `tld`.
    fn message(label: &str, subject: &str, name: &str, tld: &str, declared: bool) -> Vec<u8> {
        let encoding = Encoding::for_label(label.as_bytes()).expect("known label");
        let mut raw = b"From: ".to_vec();
        raw.extend(encode(encoding, name));
        raw.extend(format!(" <sender@mail.example.{tld}>\r\nSubject: ").as_bytes());
        raw.extend(encode(encoding, subject));
        raw.extend(b"\r\nMIME-Version: 1.0\r\n");
        if declared {
            raw.extend(format!("Content-Type: text/plain; charset=\"{label}\"\r\n").as_bytes());
        }
        raw.extend(b"\r\nbody\r\n");
        raw
    }

    const SAMPLES: [(&str, &str, &str, &str); 5] = [
        ("GB2312", "打印机坏了，无法打印文件", "王小明", "cn"),
        (
            "Shift_JIS",
            "プリンターが壊れました。印刷できません",
            "山田太郎",
            "jp",
        ),
        (
            "KOI8-R",
            "Принтер не работает, ничего не печатает",
            "Иван Петров",
            "ru",
        ),
        (
            "windows-1252",
            "Réunion – café à 10 h, merci d’avance",
            "Sébastien Lefèvre",
            "fr",
        ),
        ("ISO-2022-JP", "プリンターが壊れました", "山田太郎", "jp"),
    ];

    #[test]
    fn raw_headers_are_read_in_the_declared_body_charset() {
        for (label, subject, name, tld) in SAMPLES {
            let out = repaired(&message(label, subject, name, tld, true));
            assert!(
                out.contains(&format!("Subject: {subject}\r\n")),
                "{label}: {out}"
            );
            assert!(out.contains(&format!("From: {name} <")), "{label}: {out}");
            assert!(
                out.ends_with("\r\n\r\nbody\r\n"),
                "{label}: the body is left alone"
            );
        }
    }

    #[test]
    fn raw_headers_without_a_charset_are_detected() {
        // With the sender's country as a hint, and without one.
        for (label, subject, name, tld) in SAMPLES {
            for tld in [tld, "org"] {
                let out = repaired(&message(label, subject, name, tld, false));
                assert!(
                    out.contains(&format!("Subject: {subject}\r\n")),
                    "{label} .{tld}: {out}"
                );
                assert!(
                    out.contains(&format!("From: {name} <")),
                    "{label} .{tld}: {out}"
                );
            }
        }
    }

    #[test]
    fn a_declared_charset_that_cannot_read_the_headers_gives_way_to_detection() {
        // The body says ISO-2022-JP (7-bit): the 8-bit Subject is not that.
        let mut raw = b"From: a@example.ru\r\nSubject: ".to_vec();
        raw.extend(encode(encoding_rs::KOI8_R, "Принтер не работает"));
        raw.extend(b"\r\nContent-Type: text/plain; charset=iso-2022-jp\r\n\r\nx\r\n");
        assert!(repaired(&raw).contains("Subject: Принтер не работает\r\n"));
    }

    #[test]
    fn utf8_lines_stay_and_a_stray_byte_does_not_make_mojibake() {
        let raw = "From: Jöhn <j@example.org>\r\nSubject: Säying\r\n\r\nx".as_bytes();
        assert!(matches!(
            repair_header_block(raw, raw.len(), raw),
            Cow::Borrowed(_)
        ));
        let mut raw = b"From: ".to_vec();
        raw.extend("Юникод запрещен".as_bytes());
        raw.extend(b"\xf1 <headers@gmail.com>\r\nSubject: s\r\n\r\nx");
        assert!(repaired(&raw).starts_with("From: Юникод запрещен\u{fffd} <headers@gmail.com>"));
    }
}
