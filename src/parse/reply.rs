//! Reply: what a reply to a notification added, above crmgate's marker.
//!
//! Every comment and work-note notification starts with a marker line
//! ("## Répondez au-dessus de cette ligne ##", "## Reply above this line
//! ##", see [`crate::templates::REPLY_MARKERS`]). A reply quotes the
//! notification below the writer's own words: that marker, everything
//! below it, and the attribution that the client wrote just above it
//! (Gmail's and Thunderbird's "Le … a écrit :", "On … wrote:", Outlook's
//! "De : / Envoyé : / À : / Objet :" block and its rule) are cut, in the
//! text and in the HTML. Without a marker nothing is cut: guessing where a
//! quotation starts would one day cut a person's words.

use super::forward;
use super::html;

/// The reply's own part, text and HTML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cut {
    /// The words above the cut, `\n` line endings; empty when the writer
    /// added nothing.
    pub text: String,
    /// The HTML above the cut, its open elements closed; `None` when there
    /// is no HTML body, when nothing readable is left in it, or when the
    /// marker was found in the text only (the HTML would quote it all).
    pub html: Option<String>,
}

/// The cut of a message whose text or HTML holds the marker; `None`
/// when neither does.
pub(super) fn cut(text: &str, html_body: Option<&str>) -> Option<Cut> {
    let text_cut = cut_text(text);
    let html_cut = html_body.and_then(cut_html);
    if text_cut.is_none() && html_cut.is_none() {
        return None;
    }
    let html_text = html_cut.as_deref().map(html::to_text);
    let text = match (text_cut, &html_text) {
        (Some(t), _) => t,
        (None, Some(h)) if h.trim().is_empty() => String::new(),
        (None, Some(h)) => format!("{}\n", h.trim_end()),
        (None, None) => String::new(),
    };
    let html = html_cut.filter(|_| html_text.as_deref().is_some_and(|t| !t.trim().is_empty()));
    Some(Cut { text, html })
}

/// The text above the cut (trailing blank lines dropped), `None` without
/// a marker.
pub(super) fn cut_text(text: &str) -> Option<String> {
    if !text.contains("##") {
        return None;
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let at = cut_line(&lines)?;
    let kept = lines[..at].join("\n");
    let kept = kept.trim_end();
    Some(if kept.is_empty() {
        String::new()
    } else {
        format!("{kept}\n")
    })
}

/// The index of the first line to cut: the attribution just above the
/// first marker line, or the marker itself.
fn cut_line(lines: &[&str]) -> Option<usize> {
    let marker = lines.iter().position(|l| is_marker(l))?;
    let mut end = marker;
    while end > 0 && unquoted(lines[end - 1]).is_empty() {
        end -= 1;
    }
    if end == 0 {
        return Some(marker);
    }
    let last = end - 1;
    Some(
        header_block_start(lines, last)
            .or_else(|| attribution_start(lines, last))
            .unwrap_or(marker),
    )
}

/// The line without the quote marks a client put before it (`> `, `>>`,
/// `| `), nor surrounding white space; non-breaking spaces are spaces.
fn unquoted(line: &str) -> String {
    let line = line.trim_start_matches(|c: char| c.is_whitespace() || c == '>' || c == '|');
    line.replace(['\u{a0}', '\u{202f}'], " ").trim().to_string()
}

/// `line` with its white space collapsed to single spaces, lower-cased.
fn normalised(line: &str) -> String {
    line.replace(['\u{a0}', '\u{202f}'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Whether the line holds one of crmgate's markers, quoted or decorated
/// (`> ## Reply above this line ##`, `*## … ##*`) as clients render it.
fn is_marker(line: &str) -> bool {
    if !line.contains("##") {
        return false;
    }
    let line = normalised(line);
    crate::templates::REPLY_MARKERS
        .iter()
        .any(|m| line.contains(&normalised(m)))
}

/// Outlook's header block ending at `last`: contiguous lines from a
/// `From:` / `De :` line, each a header field (or a To/Cc list wrapped onto
/// the next line), with at least one field besides From; the rule or the
/// "-----Original Message-----" line above it goes too.
fn header_block_start(lines: &[&str], last: usize) -> Option<usize> {
    const MOST_LINES: usize = 16;
    let first = last.saturating_sub(MOST_LINES);
    let mut from = None;
    for i in (first..=last).rev() {
        let line = unquoted(lines[i]);
        if line.is_empty() {
            break;
        }
        if matches!(forward::header_line(&line), Some((forward::Field::From, _))) {
            from = Some(i);
            break;
        }
    }
    let from = from?;
    let mut fields = 0;
    let mut previous = None;
    for line in &lines[from..=last] {
        match forward::header_line(&unquoted(line)) {
            Some((field, _)) => {
                fields += 1;
                previous = Some(field);
            }
            None if matches!(previous, Some(forward::Field::To | forward::Field::Cc)) => {}
            None => return None,
        }
    }
    if fields < 2 {
        return None;
    }
    let mut above = from;
    while above > 0 && unquoted(lines[above - 1]).is_empty() {
        above -= 1;
    }
    match above.checked_sub(1) {
        Some(rule) if forward::is_separator(&unquoted(lines[rule])) => Some(rule),
        _ => Some(from),
    }
}

/// The endings of a reply attribution, lower-case, in the languages the
/// helpdesk meets ("a écrit :" may be wrapped to "a" / "écrit :").
const ATTRIBUTION_ENDS: &[&str] = &[
    "wrote:",
    "écrit :",
    "écrit:",
    "schrieb:",
    "escribió:",
    "ha scritto:",
    "skrev:",
    "schreef:",
];

/// How an attribution starts ("On Mon, …", "Le lun. …", "Am …").
const ATTRIBUTION_STARTS: &[&str] = &["on ", "le ", "am ", "el ", "il ", "op ", "den ", "em "];

/// The first line of the attribution ending at `last` (Gmail wraps a long
/// one over two or three lines), if `last` ends like one.
fn attribution_start(lines: &[&str], last: usize) -> Option<usize> {
    let end = unquoted(lines[last]).to_lowercase();
    if !ATTRIBUTION_ENDS.iter().any(|e| end.ends_with(e)) {
        return None;
    }
    let mut start = last;
    for i in (last.saturating_sub(2)..=last).rev() {
        let line = unquoted(lines[i]).to_lowercase();
        if line.is_empty() {
            break;
        }
        if ATTRIBUTION_STARTS.iter().any(|s| line.starts_with(s)) {
            start = i;
        }
    }
    Some(start)
}

/// Elements that have no end tag.
const VOID: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
    "track", "wbr",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Text,
    Open(String),
    Close(String),
    /// A void or self-closed element, a comment, a doctype, or a hidden
    /// element (`<style>…</style>`) taken whole.
    Other,
}

#[derive(Debug)]
struct Token {
    start: usize,
    end: usize,
    kind: Kind,
    /// A `<br>` or a block element: a new line in the rendering.
    breaks: bool,
}

/// The HTML cut where its text rendering is cut (see [`cut_line`]): before
/// the elements that open the attribution (`<div class="gmail_quote">`,
/// `<div class="moz-cite-prefix">`, Outlook's rule and header `<div>`),
/// with the elements still open closed. `None` without a marker.
pub(super) fn cut_html(source: &str) -> Option<String> {
    if !source.contains("##") {
        return None;
    }
    let tokens = tokenize(source);
    // The text rendering, line by line, and the first text token of each.
    let mut lines: Vec<String> = vec![String::new()];
    let mut firsts: Vec<Option<usize>> = vec![None];
    for (i, token) in tokens.iter().enumerate() {
        if token.kind == Kind::Text {
            // As written: a tag inside a word (`Rep<b>ly</b>`) splits
            // nothing; the line's white space is collapsed when it is read.
            let text = html::decode_entities(&source[token.start..token.end]);
            lines.last_mut()?.push_str(&text.replace(['\r', '\n'], " "));
            if !text.trim().is_empty() {
                firsts.last_mut()?.get_or_insert(i);
            }
        } else if token.breaks {
            lines.push(String::new());
            firsts.push(None);
        }
    }
    let line_refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let at = cut_line(&line_refs)?;
    let first = firsts.get(at).copied().flatten()?;
    // Back over the elements that open the cut line: they are the quote's.
    let mut from = first;
    while from > 0 {
        let previous = &tokens[from - 1];
        let blank =
            previous.kind == Kind::Text && source[previous.start..previous.end].trim().is_empty();
        if matches!(previous.kind, Kind::Open(_) | Kind::Other) || blank {
            from -= 1;
        } else {
            break;
        }
    }
    let mut open: Vec<&str> = Vec::new();
    for token in &tokens[..from] {
        match &token.kind {
            Kind::Open(name) => open.push(name),
            Kind::Close(name) => {
                if let Some(at) = open.iter().rposition(|o| o == name) {
                    open.truncate(at);
                }
            }
            _ => {}
        }
    }
    let mut out = source[..tokens[from].start].trim_end().to_string();
    for name in open.iter().rev() {
        out.push_str("</");
        out.push_str(name);
        out.push('>');
    }
    Some(out)
}

/// The HTML as tags and text runs, with their byte ranges.
fn tokenize(source: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < source.len() {
        let rest = &source[at..];
        let Some(lt) = rest.find('<') else {
            tokens.push(text_token(at, source.len()));
            break;
        };
        if lt > 0 {
            tokens.push(text_token(at, at + lt));
            at += lt;
            continue;
        }
        if let Some(after) = rest.strip_prefix("<!--") {
            let end = after.find("-->").map_or(source.len(), |e| at + 4 + e + 3);
            tokens.push(Token {
                start: at,
                end,
                kind: Kind::Other,
                breaks: false,
            });
            at = end;
            continue;
        }
        let Some(gt) = html::tag_end(rest) else {
            // A lone '<' in text.
            tokens.push(text_token(at, at + 1));
            at += 1;
            continue;
        };
        let tag = &rest[1..gt];
        let end = at + gt + 1;
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == ':')
            .collect::<String>()
            .to_ascii_lowercase();
        let breaks = name == "br" || html::BLOCKS.contains(&name.as_str());
        if !closing && html::HIDDEN.contains(&name.as_str()) && !tag.ends_with('/') {
            let skipped = html::skip_element(&source[end..], &name);
            let hidden_end = source.len() - skipped.len();
            tokens.push(Token {
                start: at,
                end: hidden_end,
                kind: Kind::Other,
                breaks: false,
            });
            at = hidden_end;
            continue;
        }
        let kind = if name.is_empty() || VOID.contains(&name.as_str()) || tag.ends_with('/') {
            Kind::Other
        } else if closing {
            Kind::Close(name)
        } else {
            Kind::Open(name)
        };
        tokens.push(Token {
            start: at,
            end,
            kind,
            breaks,
        });
        at = end;
    }
    tokens
}

fn text_token(start: usize, end: usize) -> Token {
    Token {
        start,
        end,
        kind: Kind::Text,
        breaks: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Languages;

    fn cut_of(text: &str) -> Option<String> {
        cut_text(text)
    }

    #[test]
    fn no_marker_no_cut() {
        for text in [
            "Bonjour,\n\nMerci.\n",
            "Merci.\n\nOn Mon, 4 Mar 2024 at 10:12, Soutien TI wrote:\n> Earlier mail\n",
            "Merci.\n\nDe : Soutien TI\nEnvoyé : lundi\nÀ : Alice\nObjet : Panne\n\nAncien texte\n",
            "## Reply below this line ##\nwords\n",
        ] {
            assert_eq!(cut_of(text), None, "{text}");
        }
        assert_eq!(cut_html("<p>Merci</p><blockquote>old</blockquote>"), None);
    }

    #[test]
    fn the_marker_and_below_are_cut() {
        assert_eq!(
            cut_of("Merci, ça marche.\n\n## Reply above this line ##\n\nold\n").as_deref(),
            Some("Merci, ça marche.\n")
        );
        // Both languages (fr+en, en+fr), each written by the template
        // module: the first marker cuts, whichever it is.
        for languages in [Languages::FrEn, Languages::EnFr] {
            let markers = crate::templates::reply_marker_lines(languages).join("\n");
            assert_eq!(
                cut_of(&format!("Ok\n{markers}\nx")).as_deref(),
                Some("Ok\n"),
                "{languages:?}"
            );
            assert_eq!(
                cut_of(&format!(
                    "Ok\n\nOn Mon, 4 Mar 2024, Soutien TI wrote:\n> {}\n> old\n",
                    markers.replace('\n', "\n> ")
                ))
                .as_deref(),
                Some("Ok\n"),
                "{languages:?}"
            );
        }
        // Either marker alone, as a single-language helpdesk writes it.
        for marker in crate::templates::REPLY_MARKERS {
            assert_eq!(cut_of(&format!("Ok\n{marker}\nx")).as_deref(), Some("Ok\n"));
        }
        // Quoted, with odd spacing and a non-breaking space.
        assert_eq!(
            cut_of("Ok\n\n>  ##\u{a0}REPLY above   this line ##\n> x\n").as_deref(),
            Some("Ok\n")
        );
    }

    #[test]
    fn attributions_just_above_the_marker_go_too() {
        for (text, kept) in [
            (
                "Merci !\n\nOn Mon, Mar 04, 2024 at 10:12:00AM +0100, Soutien TI wrote:\n> ## Reply above this line ##\n> \n> old\n",
                "Merci !\n",
            ),
            (
                "Merci !\n\nLe lun. 4 mars 2024 à 10:12, Soutien TI <support@example.org> a\nécrit :\n\n> ## Répondez au-dessus de cette ligne ##\n",
                "Merci !\n",
            ),
            (
                "Merci !\n\nLe 04/03/2024 à 10:12, Soutien TI a écrit :\n> ## Répondez au-dessus de cette ligne ##\n",
                "Merci !\n",
            ),
            (
                "Thanks\n\n> On 4 Mar 2024, at 10:12, Soutien TI <support@example.org> wrote:\n> \n> ## Reply above this line ##\n",
                "Thanks\n",
            ),
            (
                "Merci\n\n-----Original Message-----\nFrom: Soutien TI <support@example.org>\nSent: Monday, March 4, 2024 10:12 AM\nTo: Alice Martin <alice@u.example>; Carol\n <carol@u.example>\nSubject: RE: [TKT0000042] Imprimante\n\n## Reply above this line ##\n",
                "Merci\n",
            ),
            (
                "Merci\r\n\r\n________________________________\r\nDe\u{a0}: Soutien TI <support@example.org>\r\nEnvoyé\u{a0}: lundi 4 mars 2024 10:12\r\nÀ\u{a0}: Alice Martin\r\nObjet\u{a0}: [TKT0000042] Imprimante\r\n\r\n## Répondez au-dessus de cette ligne ##\r\n",
                "Merci\n",
            ),
            (
                "Merci\n\n*From:* Soutien TI <support@example.org>\n*Sent:* Monday\n*To:* Alice\n*Subject:* RE: x\n## Reply above this line ##\n",
                "Merci\n",
            ),
        ] {
            let got = cut_of(&text.replace("\r\n", "\n"));
            assert_eq!(got.as_deref(), Some(kept), "{text}");
        }
    }

    #[test]
    fn words_that_only_look_like_an_attribution_higher_up_stay() {
        // The attribution must be just above the marker; a "wrote:" of the
        // writer's own higher up is theirs.
        let text = "As Bob wrote:\nthe printer is fine.\n\nOn Mon, Soutien TI wrote:\n> ## Reply above this line ##\n";
        assert_eq!(
            cut_of(text).as_deref(),
            Some("As Bob wrote:\nthe printer is fine.\n")
        );
        // A lone From: line is no header block: only the marker goes.
        let text = "From: the 2nd floor\n## Reply above this line ##\n";
        assert_eq!(cut_of(text).as_deref(), Some("From: the 2nd floor\n"));
    }

    #[test]
    fn nothing_above_the_marker_leaves_nothing() {
        assert_eq!(
            cut_of("\n\nOn Mon, X wrote:\n> ## Reply above this line ##\n").as_deref(),
            Some("")
        );
        let c = cut("On Mon, X wrote:\n> ## Reply above this line ##\n", Some("<div class=\"gmail_quote\">On Mon, X wrote:<blockquote><p>## Reply above this line ##</p></blockquote></div>"));
        assert_eq!(
            c,
            Some(Cut {
                text: String::new(),
                html: None
            })
        );
    }

    #[test]
    fn gmail_html_is_cut_before_its_quote_and_closed() {
        let html = "<div dir=\"ltr\">Merci, c&#39;est réparé.<div><br></div><div>Alice</div></div><br>\
                    <div class=\"gmail_quote\"><div dir=\"ltr\" class=\"gmail_attr\">Le&nbsp;lun. 4 mars 2024 à 10:12, \
                    Soutien TI &lt;<a href=\"mailto:support@example.org\">support@example.org</a>&gt; a écrit&nbsp;:<br></div>\
                    <blockquote class=\"gmail_quote\" style=\"margin:0px\"><div><p>## Répondez au-dessus de cette ligne ##</p>\
                    <p>Old text</p></div></blockquote></div>";
        assert_eq!(
            cut_html(html).as_deref(),
            Some("<div dir=\"ltr\">Merci, c&#39;est réparé.<div><br></div><div>Alice</div></div>")
        );
    }

    #[test]
    fn outlook_html_is_cut_before_its_rule_and_header_block() {
        let html = "<html><head><style>p{margin:0}</style></head><body><div>\
                    <p class=\"MsoNormal\">Merci<o:p></o:p></p>\
                    <div id=\"appendonsend\"></div><hr style=\"display:inline-block;width:98%\" tabindex=\"-1\">\
                    <div id=\"divRplyFwdMsg\" dir=\"ltr\"><font face=\"Calibri\"><b>De&nbsp;:</b> Soutien TI &lt;support@example.org&gt;<br>\
                    <b>Envoyé&nbsp;:</b> lundi 4 mars 2024 10:12<br><b>À&nbsp;:</b> Alice<br>\
                    <b>Objet&nbsp;:</b> [TKT0000042] Imprimante</font><div>&nbsp;</div></div>\
                    <div><p>## Répondez au-dessus de cette ligne ##</p><p>old</p></div></div></body></html>";
        assert_eq!(
            cut_html(html).as_deref(),
            Some("<html><head><style>p{margin:0}</style></head><body><div><p class=\"MsoNormal\">Merci<o:p></o:p></p><div id=\"appendonsend\"></div></div></body></html>")
        );
    }

    #[test]
    fn thunderbird_and_apple_mail_html() {
        let tb = "<html><body><p>Merci</p><div class=\"moz-cite-prefix\">Le 04/03/2024 à 10:12, Soutien TI a écrit&nbsp;:<br></div>\
                  <blockquote type=\"cite\"><p>## Répondez au-dessus de cette ligne ##</p></blockquote></body></html>";
        assert_eq!(
            cut_html(tb).as_deref(),
            Some("<html><body><p>Merci</p></body></html>")
        );
        let apple = "<html><body><div>Thanks</div><div><br><blockquote type=\"cite\"><div>On 4 Mar 2024, at 10:12, Soutien TI \
                     &lt;support@example.org&gt; wrote:</div><br class=\"Apple-interchange-newline\"><div><p>## Reply above this line ##</p></div></blockquote></div></body></html>";
        assert_eq!(
            cut_html(apple).as_deref(),
            Some("<html><body><div>Thanks</div></body></html>")
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_or_html_cuts_without_panic(
            body in "(## Reply above this line ##|On x wrote:|De : a|Objet : b|<[/a-z]{0,6}[^>]{0,8}>?|&[a-z]{0,4};?|[^<&]{0,12}|\n|> ){0,40}",
        ) {
            let _ = cut(&body, Some(&body));
        }
    }
}
