//! Delivery reports (RFC 3464): which recipients failed, why, and which of
//! our messages came back.
//!
//! A report about mail crmgate sent marks that outbox row failed (SPEC rule
//! 4). The row is found by the VERP bounce address when the remote MTA kept
//! it, else by the `X-Crmgate-Outbox` header or the Message-ID of the
//! returned message, both read here.

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};

use super::{clean_id, header_texts, DeliveryReport};

/// Our header on every outgoing message: the outbox row id.
const OUTBOX_HEADER: &str = "X-Crmgate-Outbox";

/// The report of a `multipart/report; report-type=delivery-status` message;
/// `None` for other reports (read receipts, abuse feedback).
pub(super) fn delivery_report(message: &Message<'_>) -> Option<DeliveryReport> {
    let is_delivery_status = message
        .root_part()
        .content_type()
        .and_then(|ct| ct.attribute("report-type"))
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("delivery-status"));
    if !is_delivery_status {
        return None;
    }
    let mut report = DeliveryReport::default();
    let mut found_status = false;
    for part in &message.parts {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let ctype = ct.ctype().to_ascii_lowercase();
        let subtype = ct.subtype().unwrap_or_default().to_ascii_lowercase();
        match (ctype.as_str(), subtype.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => {
                found_status = true;
                read_status_fields(&String::from_utf8_lossy(part.contents()), &mut report);
            }
            ("message", "rfc822" | "global") => {
                if let PartType::Message(returned) = &part.body {
                    read_returned_headers(returned, &mut report);
                }
            }
            ("text", "rfc822-headers") | ("message", "global-headers") => {
                if let Some(returned) = MessageParser::default().parse_headers(part.contents()) {
                    read_returned_headers(&returned, &mut report);
                }
            }
            _ => {}
        }
    }
    if !found_status {
        // A report whose MIME structure is broken: the status fields are
        // still in the raw text, one per line.
        read_status_fields(&String::from_utf8_lossy(message.raw_message()), &mut report);
    }
    Some(report)
}

/// The Message-ID and `X-Crmgate-Outbox` of the returned message; the first
/// returned copy wins.
fn read_returned_headers(returned: &Message<'_>, report: &mut DeliveryReport) {
    if report.original_message_id.is_none() {
        report.original_message_id = returned.message_id().and_then(clean_id);
    }
    if report.outbox_id.is_none() {
        report.outbox_id = header_texts(returned.headers(), OUTBOX_HEADER)
            .find_map(|v| v.trim().trim_matches(['<', '>']).trim().parse::<i64>().ok());
    }
}

/// The per-recipient fields of a `message/delivery-status` body: every
/// group of fields whose `Action` is `failed` adds its recipients and its
/// diagnostic.
fn read_status_fields(body: &str, report: &mut DeliveryReport) {
    let mut diagnostics: Vec<String> = Vec::new();
    for group in field_groups(body) {
        let field = |name: &str| {
            group
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let failed = field("Action").is_some_and(|a| {
            a.split_whitespace()
                .next()
                .is_some_and(|a| a.eq_ignore_ascii_case("failed"))
        });
        if !failed {
            continue;
        }
        for name in ["Final-Recipient", "Original-Recipient"] {
            if let Some(address) = field(name).and_then(recipient_address) {
                if !report.failed_recipients.contains(&address) {
                    report.failed_recipients.push(address);
                }
            }
        }
        let diagnostic = field("Diagnostic-Code")
            .map(|d| strip_type(d).to_string())
            .or_else(|| field("Status").map(str::to_string))
            .filter(|d| !d.is_empty());
        if let Some(d) = diagnostic {
            if !diagnostics.contains(&d) {
                diagnostics.push(d);
            }
        }
    }
    if report.diagnostic.is_empty() {
        report.diagnostic = diagnostics.join("; ");
    }
}

/// The fields of a delivery-status body, grouped at blank lines, folded
/// lines joined.
fn field_groups(body: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut group: Vec<(String, String)> = Vec::new();
    for line in body.lines() {
        if line.trim().is_empty() {
            if !group.is_empty() {
                groups.push(std::mem::take(&mut group));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = group.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            if !name.contains(' ') {
                group.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

/// `rfc822; Jane@Example.org` → `jane@example.org`; `None` when no address.
fn recipient_address(value: &str) -> Option<String> {
    let address = strip_type(value)
        .trim_matches(['<', '>', ' '])
        .to_ascii_lowercase();
    address.contains('@').then_some(address)
}

/// The value without its `type;` prefix (`rfc822;`, `smtp;`, `x-postfix;`).
fn strip_type(value: &str) -> &str {
    match value.split_once(';') {
        Some((kind, rest)) if !kind.contains(' ') && !kind.contains('@') => rest.trim(),
        _ => value.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failed_recipients_count() {
        let body = "Reporting-MTA: dns; mx.example.net\n\n\
                    Final-Recipient: rfc822; Gone@Example.COM\n\
                    Action: failed\n\
                    Status: 5.1.1\n\
                    Diagnostic-Code: smtp; 550 5.1.1 <gone@example.com>:\n  user unknown\n\n\
                    Final-Recipient: rfc822;later@example.com\n\
                    Action: delayed\n\
                    Status: 4.4.1\n";
        let mut report = DeliveryReport::default();
        read_status_fields(body, &mut report);
        assert_eq!(report.failed_recipients, vec!["gone@example.com"]);
        assert_eq!(
            report.diagnostic,
            "550 5.1.1 <gone@example.com>: user unknown"
        );
    }

    #[test]
    fn status_stands_in_for_a_missing_diagnostic() {
        let body = "Final-Recipient: rfc822; a@example.com\nAction: Failed\nStatus: 5.2.2\n";
        let mut report = DeliveryReport::default();
        read_status_fields(body, &mut report);
        assert_eq!(report.failed_recipients, vec!["a@example.com"]);
        assert_eq!(report.diagnostic, "5.2.2");
    }
}
