//! HTML → readable text, for HTML-only mail.
//!
//! The ticket log, the duplicate hash and the forward detector all work on
//! text. mail-parser's own `html_to_text` only breaks lines at `<br>` and
//! `</p>`, which glues Gmail's `<div>` lines and Thunderbird's header table
//! into one line; this renderer keeps the line structure of block elements
//! and table rows and borrows mail-parser's entity table for the rest.

use mail_parser::decoders::html::add_html_token;

/// Elements after which a new line starts.
pub(super) const BLOCKS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "center",
    "dd",
    "div",
    "dl",
    "dt",
    "fieldset",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "table",
    "tbody",
    "thead",
    "tfoot",
    "tr",
    "ul",
];

/// Elements whose content is not text a reader sees.
pub(super) const HIDDEN: &[&str] = &["head", "script", "style", "template", "title"];

/// Render an HTML body as plain text with `\n` line endings.
pub(super) fn to_text(html: &str) -> String {
    let mut out = Renderer::default();
    let mut rest = html;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            out.text(rest);
            break;
        };
        out.text(&rest[..lt]);
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |end| &after[end + 3..]);
            continue;
        }
        let Some(gt) = tag_end(rest) else {
            // A lone '<' in text ("a < b"): keep it as text.
            out.text("<");
            rest = &rest[1..];
            continue;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if name.is_empty() {
            // `<!DOCTYPE …>`, `<?xml …>`: nothing to show.
            continue;
        }
        if !closing && HIDDEN.contains(&name.as_str()) && !tag.ends_with('/') {
            rest = skip_element(rest, &name);
            continue;
        }
        match name.as_str() {
            "br" => out.hard_break(),
            "td" | "th" if !closing => out.cell(),
            "pre" => {
                out.block();
                out.pre = !closing;
            }
            "li" if !closing => {
                out.block();
                out.line.push_str("- ");
            }
            n if BLOCKS.contains(&n) => out.block(),
            _ => {}
        }
    }
    out.finish()
}

/// The index of the `>` that ends the tag at the start of `s`, quotes
/// respected; `None` when `s` does not start a tag.
pub(super) fn tag_end(s: &str) -> Option<usize> {
    let second = s[1..].chars().next()?;
    if !(second.is_ascii_alphabetic() || matches!(second, '/' | '!' | '?')) {
        return None;
    }
    let mut quote = None;
    for (i, c) in s.char_indices().skip(1) {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            _ => {}
        }
    }
    None
}

/// The input after the closing tag of `name`, or nothing when it never closes.
pub(super) fn skip_element<'a>(rest: &'a str, name: &str) -> &'a str {
    let lower = rest.to_ascii_lowercase();
    let close = format!("</{name}");
    match lower.find(&close) {
        Some(pos) => {
            let after = &rest[pos..];
            after.find('>').map_or("", |gt| &after[gt + 1..])
        }
        None => "",
    }
}

/// Accumulates lines; whitespace in text collapses as a browser does.
#[derive(Default)]
struct Renderer {
    lines: Vec<String>,
    line: String,
    /// Inside `<pre>`: whitespace and line breaks are kept.
    pre: bool,
}

impl Renderer {
    fn text(&mut self, raw: &str) {
        if raw.is_empty() {
            return;
        }
        let decoded = decode_entities(raw);
        if self.pre {
            let mut parts = decoded.split('\n');
            if let Some(first) = parts.next() {
                self.line.push_str(first.trim_end_matches('\r'));
            }
            for part in parts {
                self.hard_break();
                self.line.push_str(part.trim_end_matches('\r'));
            }
            return;
        }
        for (i, word) in decoded
            .split(|c: char| c.is_whitespace() && c != '\u{a0}')
            .enumerate()
        {
            if word.is_empty() {
                if i == 0 && !self.line.is_empty() && !self.line.ends_with(' ') {
                    self.line.push(' ');
                }
                continue;
            }
            if i > 0 && !self.line.is_empty() && !self.line.ends_with(' ') {
                self.line.push(' ');
            }
            self.line.push_str(&word.replace('\u{a0}', " "));
        }
        if decoded.ends_with(|c: char| c.is_whitespace() && c != '\u{a0}')
            && !self.line.is_empty()
            && !self.line.ends_with(' ')
        {
            self.line.push(' ');
        }
    }

    /// `<br>`: always a new line, so `<div><br></div>` gives a blank one.
    fn hard_break(&mut self) {
        self.lines.push(std::mem::take(&mut self.line));
    }

    /// A block boundary: a new line unless already at the start of one.
    fn block(&mut self) {
        if !self.line.trim().is_empty() {
            self.hard_break();
        } else {
            self.line.clear();
        }
    }

    /// A table cell: separated from the previous one on the same row.
    fn cell(&mut self) {
        if !self.line.trim().is_empty() && !self.line.ends_with(' ') {
            self.line.push(' ');
        }
    }

    fn finish(mut self) -> String {
        self.hard_break();
        let mut out = String::new();
        let mut blank_run = 0;
        for line in &self.lines {
            let line = line.trim_end();
            if line.trim().is_empty() {
                blank_run += 1;
                if blank_run > 1 || out.is_empty() {
                    continue;
                }
                out.push('\n');
            } else {
                blank_run = 0;
                out.push_str(line.trim_start_matches(' '));
                out.push('\n');
            }
        }
        out.trim_end().to_string()
    }
}

/// Character references (`&eacute;`, `&#233;`, `&#xE9;`) decoded with
/// mail-parser's table; an unknown or unterminated `&` stays as written.
pub(super) fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest
            .char_indices()
            .skip(1)
            .take(32)
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '#'))
            .filter(|&(_, c)| c == ';')
            .map(|(i, _)| i);
        match end {
            Some(end) if end > 1 => {
                add_html_token(&mut out, &rest.as_bytes()[..=end], false);
                rest = &rest[end + 1..];
            }
            _ => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gmail_div_lines_stay_lines() {
        let html = "<div dir=\"ltr\"><div>Bonjour,</div><div><br></div><div>L&#39;imprimante \
                    du 2<sup>e</sup> est en panne.</div><div>Merci</div></div>";
        assert_eq!(
            to_text(html),
            "Bonjour,\n\nL'imprimante du 2e est en panne.\nMerci"
        );
    }

    #[test]
    fn head_style_and_comments_are_hidden_and_entities_decoded() {
        let html = "<html><head><title>T</title><style>p{color:red}</style></head>\
                    <body><!-- hidden --><p>Caf&eacute; &amp; th&#xE9; &lt;ok&gt;&nbsp;!</p>\
                    <script>alert(1)</script></body></html>";
        assert_eq!(to_text(html), "Café & thé <ok> !");
    }

    #[test]
    fn table_rows_become_lines_and_cells_are_spaced() {
        let html = "<table><tr><th>Subject: </th><td>Panne</td></tr>\
                    <tr><th>From:</th><td>Jane <a href=\"mailto:j@x.org\">&lt;j@x.org&gt;</a></td></tr></table>";
        assert_eq!(to_text(html), "Subject: Panne\nFrom: Jane <j@x.org>");
    }

    #[test]
    fn lone_angle_bracket_and_ampersand_are_text() {
        assert_eq!(to_text("a < b && c"), "a < b && c");
    }

    #[test]
    fn unterminated_tag_or_comment_does_not_loop() {
        assert_eq!(to_text("text <!-- never closed"), "text");
        assert_eq!(to_text("text <div class=\"x"), "text <div class=\"x");
    }

    proptest::proptest! {
        #[test]
        fn any_text_renders_without_panic(html in "(<[/!a-z]{0,6}[^>]{0,8}>?|&[#a-z0-9]{0,6};?|[^<&]{0,12}|\\PC{0,4}){0,40}") {
            // At most one blank line in a row, no trailing whitespace.
            let text = to_text(&html);
            proptest::prop_assert!(!text.contains("\n\n\n"));
            proptest::prop_assert!(!text.ends_with(char::is_whitespace));
        }
    }
}
