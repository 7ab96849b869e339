//! Scrub: replace agents' and former agents' addresses in text meant for
//! people who are not agents.
//!
//! This is the last line of the rule "agents' personal addresses are never
//! given to requesters": whatever `decide` planned, the text and HTML bodies,
//! display names, subjects and attachment names of a public copy go through
//! here before mail-builder encodes them. It works on decoded text, so it
//! must recognise an address however a mail client or a person wrote it:
//! any letter case, `mailto:` links, URL-encoded (`%40`), HTML entities
//! (`&#64;`, `&#x40;`, `&commat;`, every character as an entity), with
//! invisible characters or, in HTML, tags between its characters.
//!
//! Only whole addresses are replaced: agent `an@x.org` is not touched inside
//! `jan@x.org` or `an@x.org.uk`, which belong to someone else. Where a
//! character could either continue an address or end it, the scrubber errs
//! on the side of replacing, because a requester's mangled address costs
//! less than an agent's leaked one.

use std::sync::{Arc, Mutex, PoisonError};

use regex::{Regex, RegexBuilder};

use super::Scrub;

/// The last scrubber built, with the [`Scrub`] it was built from.
///
/// Compiling the patterns of one agent costs milliseconds (the HTML form
/// allows tags and entities between every character), and the list of
/// agents changes only on reload, so the daemon's writer reuses it instead
/// of compiling it again for every outgoing message. Keyed on the whole
/// `Scrub`, so a change of agents or replacement builds a new one.
static LAST: Mutex<Option<(Scrub, Arc<Scrubber>)>> = Mutex::new(None);

/// What may sit between two characters of an address in HTML and still
/// render as one address: tags and comments, and the invisible characters,
/// raw or as entities.
const HTML_GAP: &str = r"(?:<[^<>]*>|&shy;|&#0*173;?|&#x0*ad;?|&zerowidthspace;|&zwj;|&zwnj;|&#0*820[345];?|&#x0*200[bcd];?|[\u{AD}\u{200B}-\u{200D}\u{2060}\u{FEFF}])*";

/// An address tag after `+` (`jane+helpdesk@…` is still Jane's mailbox).
const TAG_CHARS: &str = r"[a-z0-9._=-]{0,64}";

/// How many times the scrubber re-reads its own output. One pass suffices
/// for every form we know; the later passes are a guard against a removal
/// that makes two halves of an address meet.
const MAX_PASSES: usize = 4;

/// A compiled [`Scrub`]: one pattern per address for text, one for HTML.
///
/// Compiling costs more than scanning a body, so [`super::compose`] builds
/// one per message and uses it for every header and part.
#[derive(Debug, Clone)]
pub struct Scrubber {
    text_patterns: Vec<Regex>,
    html_patterns: Vec<Regex>,
    replacement: String,
}

impl Scrubber {
    /// Compile the patterns for every address of `scrub`.
    ///
    /// Empty entries and the replacement itself are skipped (scrubbing the
    /// public address into itself would never end).
    pub fn new(scrub: &Scrub) -> Scrubber {
        let replacement = scrub.replacement.trim().to_string();
        let mut addresses: Vec<String> = scrub
            .addresses
            .iter()
            .map(|a| a.trim().to_lowercase())
            .filter(|a| !a.is_empty() && *a != replacement.to_lowercase())
            .collect();
        addresses.sort();
        addresses.dedup();
        let text_patterns = addresses
            .iter()
            .filter_map(|a| compile(a, INVISIBLE_GAP))
            .collect();
        let html_patterns = addresses
            .iter()
            .filter_map(|a| compile(a, HTML_GAP))
            .collect();
        Scrubber {
            text_patterns,
            html_patterns,
            replacement,
        }
    }

    /// The scrubber for `scrub`, compiled once and reused while the same
    /// addresses are asked for (see [`LAST`]).
    pub fn shared(scrub: &Scrub) -> Arc<Scrubber> {
        let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((key, scrubber)) = last.as_ref() {
            if key == scrub {
                return scrubber.clone();
            }
        }
        let scrubber = Arc::new(Scrubber::new(scrub));
        *last = Some((scrub.clone(), scrubber.clone()));
        scrubber
    }

    /// Scrub plain text: a body, a display name, a subject, a file name.
    pub fn text(&self, text: &str) -> String {
        self.run(text, &self.text_patterns, false)
    }

    /// Scrub HTML: like [`Scrubber::text`], and tags between the characters
    /// of an address are kept after the replacement so the markup stays
    /// balanced.
    pub fn html(&self, html: &str) -> String {
        self.run(html, &self.html_patterns, true)
    }

    fn run(&self, input: &str, patterns: &[Regex], keep_tags: bool) -> String {
        let mut current = input.to_string();
        for _ in 0..MAX_PASSES {
            let mut changed = false;
            for pattern in patterns {
                if let Some(next) = replace_whole(&current, pattern, &self.replacement, keep_tags) {
                    current = next;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        current
    }
}

/// Replace every agent address in `text` with `scrub.replacement`.
pub fn scrub_text(text: &str, scrub: &Scrub) -> String {
    Scrubber::new(scrub).text(text)
}

/// Replace every agent address in `html` with `scrub.replacement`, including
/// entity-encoded forms and `mailto:` hrefs.
pub fn scrub_html(html: &str, scrub: &Scrub) -> String {
    Scrubber::new(scrub).html(html)
}

/// What may sit between two characters of an address in plain text:
/// characters a person does not see, which some clients and obfuscators put
/// inside addresses (soft hyphen, zero-width space and joiners, word joiner,
/// byte-order mark).
const INVISIBLE_GAP: &str = r"[\u{AD}\u{200B}-\u{200D}\u{2060}\u{FEFF}]*";

/// The pattern of one address in every written form, with `gap` allowed
/// between its characters.
///
/// Every piece is escaped, so building only fails on an absurdly long
/// address; then the literal form still catches the common case, and only
/// if even that fails is the address logged and skipped.
fn compile(address: &str, gap: &str) -> Option<Regex> {
    let build = |pattern: &str| {
        RegexBuilder::new(pattern)
            .case_insensitive(true)
            .size_limit(64 << 20)
            .build()
    };
    match build(&address_pattern(address, gap)).or_else(|_| build(&regex::escape(address))) {
        Ok(regex) => Some(regex),
        Err(error) => {
            tracing::error!(%address, %error, "cannot scrub this agent address");
            None
        }
    }
}

fn address_pattern(address: &str, gap: &str) -> String {
    let (local, domain) = match address.rfind('@') {
        Some(at) => (&address[..at], Some(&address[at + 1..])),
        None => (address, None),
    };
    let mut pattern = String::new();
    push_chars(&mut pattern, local, gap);
    if let Some(domain) = domain {
        // An optional `+tag`, then `@`, then the domain.
        pattern.push_str(&format!(
            "(?:{gap}(?:\\+|%2b|&#0*43;?|&#x0*2b;?|&plus;){TAG_CHARS})?"
        ));
        pattern.push_str(gap);
        pattern.push_str(&char_forms('@'));
        pattern.push_str(gap);
        push_chars(&mut pattern, domain, gap);
    }
    pattern
}

fn push_chars(pattern: &mut String, part: &str, gap: &str) {
    for (i, c) in part.chars().enumerate() {
        if i > 0 {
            pattern.push_str(gap);
        }
        pattern.push_str(&char_forms(c));
    }
}

/// Every way one character of an address is written in mail we have seen:
/// itself, percent-encoded (its UTF-8 bytes), as a decimal or hexadecimal
/// character reference, as a named entity, and for `@` and `.` the
/// full-width look-alikes a reader takes for them.
fn char_forms(c: char) -> String {
    let mut forms = vec![regex::escape(&c.to_string())];
    let mut utf8 = [0u8; 4];
    let percent: String = c
        .encode_utf8(&mut utf8)
        .bytes()
        .map(|b| format!("%{b:02x}"))
        .collect();
    forms.push(percent);
    let code = u32::from(c);
    forms.push(format!("&#0*{code};?"));
    forms.push(format!("&#x0*{code:x};?"));
    match c {
        '@' => forms.extend(["&commat;".into(), "\u{FF20}".into(), "\u{FE6B}".into()]),
        '.' => forms.extend(["&period;".into(), "\u{FF0E}".into()]),
        '_' => forms.extend(["&lowbar;".into(), "&underbar;".into()]),
        '+' => forms.push("&plus;".into()),
        '-' => forms.push("&#x2010;".into()),
        _ => {}
    }
    format!("(?:{})", forms.join("|"))
}

/// One pass of `pattern` over `text`, replacing the matches that are whole
/// addresses. `None` when nothing was replaced.
fn replace_whole(
    text: &str,
    pattern: &Regex,
    replacement: &str,
    keep_tags: bool,
) -> Option<String> {
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    let mut changed = false;
    while let Some(found) = pattern.find_at(text, from) {
        let (start, end) = (found.start(), found.end());
        if is_whole_address(text, start, end) {
            out.push_str(&text[copied..start]);
            out.push_str(replacement);
            if keep_tags {
                push_tags(&mut out, found.as_str());
            }
            copied = end;
            from = end;
            changed = true;
        } else {
            // Try again one character further: a shorter match may start
            // inside this one.
            from = start + text[start..].chars().next().map_or(1, char::len_utf8);
        }
        if from >= text.len() {
            break;
        }
    }
    if !changed {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

/// Keep the markup that sat inside a replaced address (`<b>` and `</b>`
/// around half of it) so the HTML stays balanced.
fn push_tags(out: &mut String, matched: &str) {
    let mut rest = matched;
    while let Some(open) = rest.find('<') {
        match rest[open..].find('>') {
            Some(close) => {
                out.push_str(&rest[open..open + close + 1]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
}

/// A match is a whole address when the character before it cannot continue
/// a local part and what follows cannot continue a domain: "…@x.org." ends
/// a sentence and "…@x.org.pdf" names a file, but "…@x.org.uk" is another
/// domain.
fn is_whole_address(text: &str, start: usize, end: usize) -> bool {
    if char_before(&text[..start]).is_some_and(continues_local_part) {
        return false;
    }
    let rest = &text[end..];
    is_whole_address_end(rest)
        || matches!(char_after(rest), Some(('.', used)) if is_file_extension(&rest[used..]))
}

/// File name extensions that people append to an address
/// (`notes jane@x.org.txt`) and that are not domain labels anyone mails to.
const FILE_EXTENSIONS: [&str; 28] = [
    "7z", "csv", "doc", "docx", "eml", "gif", "gz", "htm", "html", "ics", "jpeg", "jpg", "json",
    "log", "msg", "odt", "ods", "pdf", "png", "pptx", "rtf", "tar", "tgz", "txt", "vcf", "xls",
    "xlsx", "xml",
];

/// Whether `rest` (what follows the dot after an address) starts with one
/// of [`FILE_EXTENSIONS`] that ends there.
fn is_file_extension(rest: &str) -> bool {
    let label_end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or(rest.len());
    let label = rest[..label_end].to_ascii_lowercase();
    FILE_EXTENSIONS.contains(&label.as_str()) && is_whole_address_end(&rest[label_end..])
}

/// Nothing after this point continues a domain.
fn is_whole_address_end(rest: &str) -> bool {
    match char_after(rest) {
        None => true,
        Some(('.', used)) => !char_after(&rest[used..]).is_some_and(|(c, _)| continues_domain(c)),
        Some((c, _)) => !continues_domain(c),
    }
}

/// Letters, digits, `.`, `_` and `-` make a longer local part
/// (`jan@` is not `an@`). `+`, `=`, `/`, `'` and the like count as a
/// boundary: in URLs they separate words (`?cc=`, `body=write+to+`), and
/// wrongly replacing `o'brien@` is the lesser harm.
fn continues_local_part(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn continues_domain(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '-' | '_')
}

/// The character a reader sees just before `head`'s end, decoding a
/// trailing `%XX` or character reference. Non-ASCII percent-encoded bytes
/// and unknown entities come out as a space (a boundary).
fn char_before(head: &str) -> Option<char> {
    let bytes = head.as_bytes();
    let n = bytes.len();
    if n >= 3 && bytes[n - 3] == b'%' {
        if let Some(b) = hex_byte(&head[n - 2..]) {
            return Some(ascii_or_space(b));
        }
    }
    if head.ends_with(';') {
        let window = n.saturating_sub(16);
        if let Some(amp) = head[window..].rfind('&') {
            let entity = &head[window + amp + 1..n - 1];
            if let Some(c) = decode_entity(entity) {
                return Some(c);
            }
        }
    }
    head.chars().next_back()
}

/// The character a reader sees at the start of `rest`, and how many bytes
/// it takes there.
fn char_after(rest: &str) -> Option<(char, usize)> {
    if let Some(hex) = rest.strip_prefix('%').and_then(|r| r.get(..2)) {
        if let Some(b) = hex_byte(hex) {
            return Some((ascii_or_space(b), 3));
        }
    }
    if let Some(body) = rest.strip_prefix('&') {
        if let Some(semi) = body.get(..body.len().min(16)).and_then(|w| w.find(';')) {
            if let Some(c) = decode_entity(&body[..semi]) {
                return Some((c, semi + 2));
            }
        }
    }
    rest.chars().next().map(|c| (c, c.len_utf8()))
}

fn hex_byte(two: &str) -> Option<u8> {
    if two.len() == 2 && two.bytes().all(|b| b.is_ascii_hexdigit()) {
        u8::from_str_radix(two, 16).ok()
    } else {
        None
    }
}

fn ascii_or_space(b: u8) -> char {
    if b.is_ascii() {
        char::from(b)
    } else {
        ' '
    }
}

/// The character of an entity name without `&` and `;`: numeric references
/// and the few named ones that can sit inside an address. Any other entity
/// (`lt`, `nbsp`, `quot`…) reads as a space.
fn decode_entity(name: &str) -> Option<char> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse::<u32>().ok()?,
        };
        return char::from_u32(code);
    }
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some(match name.to_ascii_lowercase().as_str() {
        "period" => '.',
        "lowbar" | "underbar" => '_',
        "commat" => '@',
        _ => ' ',
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(addresses: &[&str]) -> Scrub {
        Scrub {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            replacement: "support@example.com".into(),
        }
    }

    fn jane() -> Scrub {
        scrub(&["jane.doe@example.org"])
    }

    #[test]
    fn replaces_bare_address_in_any_case() {
        assert_eq!(
            scrub_text("Write to Jane.Doe@Example.ORG today", &jane()),
            "Write to support@example.com today"
        );
    }

    #[test]
    fn replaces_quoted_from_lines_in_english_and_french() {
        let text = "> From: Jane Doe <jane.doe@example.org>\n\
                    > De : Jane Doe <JANE.DOE@example.org>\n\
                    On Mon, Jane Doe <jane.doe@example.org> wrote:\n\
                    Le lun., Jane Doe <jane.doe@example.org> a écrit :\n";
        let out = scrub_text(text, &jane());
        assert!(
            !out.to_lowercase().contains("jane.doe@example.org"),
            "{out}"
        );
        assert_eq!(out.matches("<support@example.com>").count(), 4, "{out}");
        assert!(out.contains("a écrit :"));
    }

    #[test]
    fn replaces_signature_and_mailto_links() {
        let text = "--\nJane Doe\nmailto:jane.doe@example.org\n\
                    <mailto:jane.doe@example.org?subject=Hi>\n";
        let out = scrub_text(text, &jane());
        assert_eq!(
            out,
            "--\nJane Doe\nmailto:support@example.com\n<mailto:support@example.com?subject=Hi>\n"
        );
    }

    #[test]
    fn replaces_percent_encoded_forms() {
        let text = "mailto:jane.doe%40example.org and \
                    mailto:Jane%20Doe%20%3Cjane.doe%40Example.org%3E and \
                    %6a%61%6e%65%2e%64%6f%65%40%65%78%61%6d%70%6c%65%2e%6f%72%67";
        let out = scrub_text(text, &jane());
        assert_eq!(
            out,
            "mailto:support@example.com and \
             mailto:Jane%20Doe%20%3Csupport@example.com%3E and support@example.com"
        );
    }

    #[test]
    fn replaces_html_entity_forms() {
        let html = "<p>jane&#46;doe&#64;example&#46;org, jane.doe&#x40;example.org, \
                    jane.doe&commat;example.org, \
                    &#106;&#97;&#110;&#101;&#46;&#100;&#111;&#101;&#64;&#101;&#120;&#97;&#109;&#112;&#108;&#101;&#46;&#111;&#114;&#103;</p>";
        let out = scrub_html(html, &jane());
        assert_eq!(
            out,
            "<p>support@example.com, support@example.com, support@example.com, support@example.com</p>"
        );
    }

    #[test]
    fn replaces_mailto_href_and_keeps_markup_balanced() {
        let html = r#"<a href="mailto:Jane.Doe@example.org">jane.doe<b>@</b>example.org</a>"#;
        let out = scrub_html(html, &jane());
        assert_eq!(
            out,
            r#"<a href="mailto:support@example.com">support@example.com<b></b></a>"#
        );
    }

    #[test]
    fn replaces_across_invisible_characters() {
        let out = scrub_text("jane.doe@\u{200B}example.org", &jane());
        assert_eq!(out, "support@example.com");
        let out = scrub_html("jane.doe&shy;@example<wbr>.org", &jane());
        assert_eq!(out, "support@example.com<wbr>");
    }

    #[test]
    fn replaces_tagged_address_of_an_agent() {
        assert_eq!(
            scrub_text("jane.doe+helpdesk@example.org", &jane()),
            "support@example.com"
        );
    }

    #[test]
    fn leaves_longer_addresses_of_other_people() {
        let s = scrub(&["an@x.org"]);
        for other in [
            "jan@x.org",
            "an@x.org.pdf.example",
            "an@x.org.uk",
            "an@x.organic",
            "an@x.org-shop.com",
            "bob.an@x.org",
            "j_an@x.org",
        ] {
            assert_eq!(scrub_text(other, &s), other);
        }
        assert_eq!(
            scrub_text("jan@x.org, an@x.org.", &s),
            "jan@x.org, support@example.com."
        );
    }

    #[test]
    fn treats_url_separators_as_boundaries() {
        let s = scrub(&["an@x.org"]);
        assert_eq!(
            scrub_text("mailto:a@b?cc=an@x.org&body=write+to+an@x.org", &s),
            "mailto:a@b?cc=support@example.com&body=write+to+support@example.com"
        );
    }

    #[test]
    fn overlapping_agents_are_each_replaced() {
        let s = scrub(&["an@x.org", "jan@x.org"]);
        assert_eq!(
            scrub_text("jan@x.org an@x.org", &s),
            "support@example.com support@example.com"
        );
    }

    #[test]
    fn replacement_that_contains_an_agent_suffix_is_left_alone() {
        // The public address ends in an agent's address; replacing must not
        // loop or eat the replacement.
        let s = Scrub {
            addresses: vec!["t@example.com".into(), "support@example.com".into()],
            replacement: "support@example.com".into(),
        };
        assert_eq!(scrub_text("t@example.com", &s), "support@example.com");
    }

    #[test]
    fn text_without_agents_is_unchanged() {
        let text = "Bonjour, écrivez à support@example.com. Merci !";
        assert_eq!(scrub_text(text, &jane()), text);
    }
}
