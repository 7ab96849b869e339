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
//! It does so by reading the text first as a person would (a [`Reading`]:
//! escapes decoded, letters lower-cased, invisible characters and tags
//! turned into a gap marker), with every character of the reading mapped
//! back to the bytes it came from. The addresses are searched in the
//! reading, and the bytes behind each match are replaced in the original.
//!
//! Only whole addresses are replaced: agent `an@x.org` is not touched inside
//! `jan@x.org` or `an@x.org.uk`, which belong to someone else. Where a
//! character could either continue an address or end it, the scrubber errs
//! on the side of replacing, because a requester's mangled address costs
//! less than an agent's leaked one.

use std::sync::{Arc, Mutex, PoisonError};

use regex::{Regex, RegexBuilder};

use super::Scrub;

/// Stands in the reading for what a person does not see between two
/// characters: tags, soft hyphens, zero-width spaces and joiners.
const GAP: char = '\0';

/// An address tag after `+` (`jane+helpdesk@…` is still Jane's mailbox).
const TAG_CHARS: &str = r"[a-z0-9._=-]{0,64}";

/// How many times the scrubber re-reads its own output. One pass suffices
/// for every form we know; the later passes are a guard against a removal
/// that makes two halves of an address meet.
const MAX_PASSES: usize = 4;

/// A compiled [`Scrub`]: one pattern that finds every agent address in the
/// reading of a text.
///
/// Compiling costs more than scrubbing a message: take it from
/// [`Scrubber::shared`] and use it for every header and part.
#[derive(Debug, Clone)]
pub struct Scrubber {
    /// `None` when there is no address to scrub.
    pattern: Option<Regex>,
    replacement: String,
}

impl Scrubber {
    /// Compile the pattern for every address of `scrub`.
    ///
    /// Empty entries and the replacement itself are skipped (scrubbing the
    /// public address into itself would never end).
    pub fn new(scrub: &Scrub) -> Scrubber {
        let replacement = scrub.replacement.trim().to_string();
        let mut addresses: Vec<String> = scrub
            .addresses
            .iter()
            .map(|a| fold(a.trim()))
            .filter(|a| !a.is_empty() && *a != fold(&replacement))
            .collect();
        // Longest first: at one position, `an@x.org.uk` must be tried before
        // `an@x.org`.
        addresses.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        addresses.dedup();
        let pattern = if addresses.is_empty() {
            None
        } else {
            let alternatives: Vec<String> = addresses.iter().map(|a| address_pattern(a)).collect();
            compile(&alternatives.join("|"))
        };
        Scrubber {
            pattern,
            replacement,
        }
    }

    /// Scrub plain text: a body, a display name, a subject, a file name.
    pub fn text(&self, text: &str) -> String {
        self.run(text, false)
    }

    /// Scrub HTML: like [`Scrubber::text`], and tags between the characters
    /// of an address are skipped, then kept after the replacement so the
    /// markup stays balanced.
    pub fn html(&self, html: &str) -> String {
        self.run(html, true)
    }

    fn run(&self, input: &str, html: bool) -> String {
        let Some(pattern) = &self.pattern else {
            return input.to_string();
        };
        // HTML is read twice per pass: as rendered (tags are gaps, so
        // `jane<b>@</b>x.org` is seen whole) and as source (so attribute
        // values such as `href="mailto:…"` are seen at all).
        let readings: &[bool] = if html { &[true, false] } else { &[false] };
        let mut current = input.to_string();
        for _ in 0..MAX_PASSES {
            let mut changed = false;
            for &as_rendered in readings {
                if let Some(next) = replace_whole(&current, pattern, &self.replacement, as_rendered)
                {
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

impl Scrubber {
    /// The scrubber of `scrub`, compiled once and reused while the agents
    /// do not change.
    ///
    /// Every outgoing message of one configuration has the same [`Scrub`],
    /// and compiling it costs more than scrubbing a typical message, so the
    /// last one is kept.
    pub fn shared(scrub: &Scrub) -> Arc<Scrubber> {
        static LAST: Mutex<Option<(Scrub, Arc<Scrubber>)>> = Mutex::new(None);
        // A panic elsewhere while holding the lock leaves a usable cache.
        let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cached, scrubber)) = last.as_ref() {
            if cached == scrub {
                return Arc::clone(scrubber);
            }
        }
        let scrubber = Arc::new(Scrubber::new(scrub));
        *last = Some((scrub.clone(), Arc::clone(&scrubber)));
        scrubber
    }
}

/// Replace every agent address in `text` with `scrub.replacement`.
pub fn scrub_text(text: &str, scrub: &Scrub) -> String {
    Scrubber::shared(scrub).text(text)
}

/// Replace every agent address in `html` with `scrub.replacement`, including
/// entity-encoded forms and `mailto:` hrefs.
pub fn scrub_html(html: &str, scrub: &Scrub) -> String {
    Scrubber::shared(scrub).html(html)
}

/// Every piece is escaped, so building only fails on an absurd number of
/// agents; then the error is logged and nothing can be scrubbed, which the
/// log must make visible.
fn compile(pattern: &str) -> Option<Regex> {
    match RegexBuilder::new(pattern).size_limit(64 << 20).build() {
        Ok(regex) => Some(regex),
        Err(error) => {
            tracing::error!(%error, "cannot compile the agent addresses to scrub");
            None
        }
    }
}

/// One folded address, gaps allowed between its characters, with an
/// optional `+tag` before the `@`.
fn address_pattern(address: &str) -> String {
    let (local, domain) = match address.rfind('@') {
        Some(at) => (&address[..at], Some(&address[at + 1..])),
        None => (address, None),
    };
    let gap = format!("{}*", regex::escape(&GAP.to_string()));
    let spaced = |part: &str| -> String {
        part.chars()
            .map(|c| regex::escape(&c.to_string()))
            .collect::<Vec<_>>()
            .join(&gap)
    };
    let mut pattern = format!("(?:{}", spaced(local));
    if let Some(domain) = domain {
        pattern.push_str(&format!(
            "(?:{gap}\\+{TAG_CHARS})?{gap}@{gap}{}",
            spaced(domain)
        ));
    }
    pattern.push(')');
    pattern
}

/// The text as a reader sees it, lower-cased, with the way back to the
/// bytes of the input each part was read from.
struct Reading {
    text: String,
    /// Where the mapping to the input changes, in order of `text` offset.
    /// Most text is read byte for byte, so this stays short: a body of
    /// 25 MB costs no more than the reading itself.
    segments: Vec<Segment>,
}

/// A stretch of the reading and where it came from.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Offset in the reading where the stretch starts.
    text: usize,
    /// Offset in the input where it starts.
    input: usize,
    /// Where it ends in the input, for a decoded stretch.
    input_end: usize,
    /// Read byte for byte (same length, maybe another case), as opposed to
    /// decoded from an escape, a tag or a character that changes length.
    verbatim: bool,
}

impl Reading {
    fn new(input: &str, html: bool) -> Reading {
        let mut reading = Reading {
            text: String::with_capacity(input.len()),
            segments: Vec::new(),
        };
        // Once a `<` has no `>` after it, no later one has: remembering it
        // keeps "<<<<…" linear.
        let mut tags_closed = true;
        let mut at = 0;
        while let Some(rest) = input.get(at..).filter(|r| !r.is_empty()) {
            let tag_end = if html && tags_closed && starts_tag(rest) {
                let close = rest.find('>');
                tags_closed = close.is_some();
                close
            } else {
                None
            };
            let (c, used, raw) = if let Some(close) = tag_end {
                (GAP, close + 1, false)
            } else if let Some((c, used)) = percent_char(rest).or_else(|| entity_char(rest)) {
                (c, used, false)
            } else {
                let c = rest.chars().next().unwrap_or(' ');
                (c, c.len_utf8(), true)
            };
            reading.push(c, at, at + used, raw);
            at += used;
        }
        reading
    }

    /// Add `c`, read from `start..end` of the input; `raw` when it was
    /// there as itself rather than escaped or a tag.
    fn push(&mut self, c: char, start: usize, end: usize, raw: bool) {
        let text = self.text.len();
        let mut folded = fold_char(c);
        let verbatim = match (folded.next(), folded.next()) {
            (Some(one), None) => {
                self.text.push(one);
                raw && one.len_utf8() == end - start
            }
            (first, second) => {
                self.text
                    .extend(first.into_iter().chain(second).chain(folded));
                false
            }
        };
        let continues = self.segments.last().is_some_and(|last| {
            verbatim && last.verbatim && last.input + (text - last.text) == start
        });
        if !continues {
            self.segments.push(Segment {
                text,
                input: start,
                input_end: end,
                verbatim,
            });
        }
    }

    fn segment(&self, offset: usize) -> Segment {
        let i = self.segments.partition_point(|s| s.text <= offset);
        self.segments[i.saturating_sub(1)]
    }

    /// Where the reading's byte `offset` starts in the input.
    fn input_start(&self, offset: usize) -> usize {
        let s = self.segment(offset);
        if s.verbatim {
            s.input + (offset - s.text)
        } else {
            s.input
        }
    }

    /// Where the reading up to `end` (exclusive, > 0) ends in the input.
    fn input_end(&self, end: usize) -> usize {
        let s = self.segment(end - 1);
        if s.verbatim {
            s.input + (end - s.text)
        } else {
            s.input_end
        }
    }
}

/// Lower-case, with the look-alikes and invisible characters folded.
fn fold(text: &str) -> String {
    text.chars().flat_map(fold_char).collect()
}

fn fold_char(c: char) -> impl Iterator<Item = char> {
    let c = match c {
        '\u{AD}' | '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' => GAP,
        '\u{FF20}' | '\u{FE6B}' => '@',
        '\u{FF0E}' => '.',
        c => c,
    };
    c.to_lowercase()
}

/// `<` that opens a tag or a comment (not "a < b").
fn starts_tag(rest: &str) -> bool {
    let mut chars = rest.chars();
    chars.next() == Some('<')
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '/' | '!' | '?'))
}

/// A percent-escaped character at the start of `rest` (one to four `%XX`
/// forming one UTF-8 character), and its length.
fn percent_char(rest: &str) -> Option<(char, usize)> {
    let mut bytes = Vec::with_capacity(4);
    let mut used = 0;
    while bytes.len() < 4 {
        let b = rest
            .get(used..)?
            .strip_prefix('%')
            .and_then(|r| r.get(..2))
            .and_then(hex_byte);
        match b {
            Some(b) => {
                bytes.push(b);
                used += 3;
                if let Ok(s) = std::str::from_utf8(&bytes) {
                    return s.chars().next().map(|c| (c, used));
                }
            }
            None => return None,
        }
    }
    None
}

fn hex_byte(two: &str) -> Option<u8> {
    if two.len() == 2 && two.bytes().all(|b| b.is_ascii_hexdigit()) {
        u8::from_str_radix(two, 16).ok()
    } else {
        None
    }
}

/// A character reference at the start of `rest` and its length: numeric
/// (`&#64;`, `&#x40;`, the `;` optional as browsers allow) or one of the
/// named entities that can sit in or around an address.
fn entity_char(rest: &str) -> Option<(char, usize)> {
    let body = rest.strip_prefix('&')?;
    if let Some(number) = body.strip_prefix('#') {
        let (digits, radix, skip) = match number.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 3),
            None => (number, 10, 2),
        };
        let len = digits
            .find(|c: char| !c.is_digit(radix))
            .unwrap_or(digits.len())
            .min(8);
        if len == 0 {
            return None;
        }
        let code = u32::from_str_radix(&digits[..len], radix).ok()?;
        let c = char::from_u32(code).unwrap_or(' ');
        let semi = usize::from(digits[len..].starts_with(';'));
        return Some((c, skip + len + semi));
    }
    // Named entities are short; looking further would make "&&&&…" quadratic.
    let mut window = body.len().min(32);
    while !body.is_char_boundary(window) {
        window -= 1;
    }
    let len = body[..window].find(';')?;
    let c = match &body[..len] {
        "commat" => '@',
        "period" => '.',
        "lowbar" | "UnderBar" => '_',
        "plus" => '+',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "amp" => '&',
        "nbsp" => ' ',
        "shy" | "zwj" | "zwnj" | "ZeroWidthSpace" | "NoBreak" => GAP,
        _ => return None,
    };
    Some((c, len + 2))
}

/// One pass over `text`, replacing the matches that are whole addresses;
/// `html` reads tags as gaps and keeps them. `None` when nothing was
/// replaced.
fn replace_whole(text: &str, pattern: &Regex, replacement: &str, html: bool) -> Option<String> {
    let reading = Reading::new(text, html);
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = pattern.find_at(&reading.text, from) {
        let (start, end) = (found.start(), found.end());
        if is_whole_address(&reading.text, start, end) {
            let original_start = reading.input_start(start);
            let original_end = reading.input_end(end);
            // Characters folded from one source (an entity read as two
            // letters) cannot be split by a match; never copy backwards.
            if original_start >= copied {
                out.push_str(&text[copied..original_start]);
                out.push_str(replacement);
                if html {
                    push_tags(&mut out, &text[original_start..original_end]);
                }
                copied = original_end;
            }
            from = end;
        } else {
            // Try again one character further: a shorter match may start
            // inside this one.
            from = start
                + reading.text[start..]
                    .chars()
                    .next()
                    .map_or(1, char::len_utf8);
        }
        if from >= reading.text.len() {
            break;
        }
    }
    if copied == 0 {
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
        if !starts_tag(&rest[open..]) {
            rest = &rest[open + 1..];
            continue;
        }
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
fn is_whole_address(reading: &str, start: usize, end: usize) -> bool {
    if reading[..start]
        .chars()
        .next_back()
        .is_some_and(continues_local_part)
    {
        return false;
    }
    let rest = &reading[end..];
    is_whole_address_end(rest) || rest.strip_prefix('.').is_some_and(is_file_extension)
}

/// Nothing after this point continues a domain.
fn is_whole_address_end(rest: &str) -> bool {
    let mut chars = rest.chars();
    match chars.next() {
        None => true,
        Some('.') => !chars.next().is_some_and(continues_domain),
        Some(c) => !continues_domain(c),
    }
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
    FILE_EXTENSIONS.contains(&&rest[..label_end]) && is_whole_address_end(&rest[label_end..])
}

/// ASCII letters, digits, `.`, `_` and `-` make a longer local part
/// (`jan@` is not `an@`). `+`, `=`, `/`, `'` and the like count as a
/// boundary: in URLs they separate words (`?cc=`, `body=write+to+`), and
/// wrongly replacing `o'brien@` is the lesser harm. So does a non-ASCII
/// letter: the fuzzer sent `jane.doe@example.orgö«…`, which a reader sees
/// as the agent's address followed by noise.
fn continues_local_part(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// ASCII letters, digits and `-`: what a host name is made of. Not `_`:
/// the fuzzer sent `jane.doe@example.org_----=_1342…`, where a reader sees
/// the agent's address.
fn continues_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
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
    fn a_non_ascii_letter_or_an_underscore_ends_the_address() {
        assert_eq!(
            scrub_text(
                "<jane.doe@example.orgö«port@x> éjane.doe@example.org",
                &jane()
            ),
            "<support@example.comö«port@x> ésupport@example.com"
        );
        // ASCII still continues it: another address, left alone.
        assert_eq!(
            scrub_text(
                "jane.doe@example.organic.com xjane.doe@example.org",
                &jane()
            ),
            "jane.doe@example.organic.com xjane.doe@example.org"
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
    fn replaces_entities_of_capital_letters() {
        // Found by the property test: `&#74;` is `J`, which case-insensitive
        // matching of `&#106;` cannot see.
        assert_eq!(
            scrub_html("&#74;ane.&#x44;oe%45@example.org", &jane()),
            "&#74;ane.&#x44;oe%45@example.org"
        );
        assert_eq!(
            scrub_html("&#74;ane.&#x44;o%45@example.org", &jane()),
            "support@example.com"
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
    fn regression_entity_window_inside_a_multibyte_character() {
        // Found by the property test: looking back for an entity must not
        // cut a full-width character in two.
        let s = scrub(&["a@aaaaa.org"]);
        let html = " a\u{FF20}aaaaa.org(&lt;,a&#64;aaaaa.org ";
        assert_eq!(
            scrub_html(html, &s),
            " support@example.com(&lt;,support@example.com "
        );
        assert_eq!(
            scrub_html("\u{FF20}\u{FF20}&#97;&#64;aaaaa.org", &s),
            "\u{FF20}\u{FF20}support@example.com"
        );
    }

    #[test]
    fn shared_scrubber_follows_the_agents() {
        // Other tests share the cache in parallel, so only behaviour is
        // asserted: a changed scrub is never answered with a stale one.
        assert_eq!(
            Scrubber::shared(&jane()).text("jane.doe@example.org"),
            "support@example.com"
        );
        let other = scrub(&["bob@example.org"]);
        assert_eq!(
            Scrubber::shared(&other).text("bob@example.org jane.doe@example.org"),
            "support@example.com jane.doe@example.org"
        );
        assert_eq!(
            scrub_text("jane.doe@example.org", &jane()),
            "support@example.com"
        );
    }

    #[test]
    fn maps_back_through_case_changes_and_escapes() {
        // `İ` lower-cases to two characters; escapes are longer than what
        // they read as. The bytes around the match must survive intact.
        let s = scrub(&["an@x.org"]);
        assert_eq!(
            scrub_text("İİ %41n&#64;x.org İ an@X.ORG é", &s),
            "İİ support@example.com İ support@example.com é"
        );
        assert_eq!(
            scrub_html("<p>İ</p><i>a</i>n@x.org<p>é", &s),
            "<p>İ</p><i>support@example.com</i><p>é"
        );
    }

    #[test]
    fn unclosed_tags_and_stray_ampersands_are_read_as_text() {
        let s = scrub(&["an@x.org"]);
        let html = format!("{} an@x.org {}", "<a".repeat(5000), "&".repeat(5000));
        let expected = format!(
            "{} support@example.com {}",
            "<a".repeat(5000),
            "&".repeat(5000)
        );
        // Not assert_eq: the strings are too long to print.
        assert!(scrub_html(&html, &s) == expected);
    }

    #[test]
    fn text_without_agents_is_unchanged() {
        let text = "Bonjour, écrivez à support@example.com. Merci !";
        assert_eq!(scrub_text(text, &jane()), text);
    }
}
