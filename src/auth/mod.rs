//! Auth: crmgate's own SPF, DKIM and DMARC, in and out.
//!
//! Inbound ([`verify`]), between receive and decide: for an agent's From
//! that neither a trusted relay nor our `authserv_id` vouches for, crmgate
//! checks the message itself, as the MX it is, and hands decide the answer
//! as plain data (a [`Verification`]). The DNS queries happen here, at
//! the edge; decide stays pure.
//!
//! Outbound ([`sign`]), in the relay: every message is DKIM-signed at send
//! time, after its last change, so the signature verifies at the other end.

pub mod sign;
pub mod verify;

pub use sign::{DkimSigner, SignError};
pub use verify::{aligned, Dkim, Spf, Verification, Verifier, VerifyError};

/// The message as crmgate stores it: without the top-level
/// `Authentication-Results` that claim `hostname` as their authserv-id
/// (RFC 8601 §5: only we may speak under our name; an inbound one is a
/// forgery), and with `own` (crmgate's own result, without line end) on
/// top. `None` when there is nothing to change, so a large message is not
/// copied for nothing.
pub fn restamp(raw: &[u8], hostname: &str, own: Option<&str>) -> Option<Vec<u8>> {
    let end = header_end(raw);
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < end {
        let mut next = raw[at..end]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(end, |p| at + p + 1);
        while next < end && matches!(raw[next], b' ' | b'\t') {
            next = raw[next..end]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(end, |p| next + p + 1);
        }
        fields.push((at, next));
        at = next;
    }
    let forged: Vec<(usize, usize)> = fields
        .into_iter()
        .filter(|&(start, stop)| claims(&raw[start..stop], hostname))
        .collect();
    if forged.is_empty() && own.is_none() {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len() + 200);
    if let Some(own) = own {
        out.extend_from_slice(own.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut from = 0;
    for (start, stop) in forged {
        out.extend_from_slice(&raw[from..start]);
        from = stop;
    }
    out.extend_from_slice(&raw[from..]);
    Some(out)
}

/// Where the header block ends: after the first empty line, or the end.
fn header_end(raw: &[u8]) -> usize {
    let mut at = 0;
    while at < raw.len() {
        if raw[at] == b'\n' {
            return at + 1;
        }
        if raw[at..].starts_with(b"\r\n") {
            return at + 2;
        }
        at = raw[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |p| at + p + 1);
    }
    raw.len()
}

/// Is this header field an `Authentication-Results` of `hostname`?
fn claims(field: &[u8], hostname: &str) -> bool {
    let text = String::from_utf8_lossy(field);
    let Some((name, value)) = text.split_once(':') else {
        return false;
    };
    if !name.trim().eq_ignore_ascii_case("authentication-results") {
        return false;
    }
    // The authserv-id, before the first `;`, comments `(…)` and any
    // version number aside.
    let id: String = value.split(';').next().unwrap_or_default().to_string();
    let mut depth = 0usize;
    let mut bare = String::new();
    for c in id.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            c if depth == 0 => bare.push(c),
            _ => {}
        }
    }
    bare.split_whitespace()
        .next()
        .is_some_and(|id| id.trim_end_matches('.').eq_ignore_ascii_case(hostname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restamp_drops_what_claims_our_name_folded_or_not_and_puts_ours_on_top() {
        let raw =
            b"Authentication-Results: CRM.example.org;\r\n\tdkim=pass header.d=example.org\r\n\
Authentication-Results: mx.provider.test; spf=pass\r\n\
Authentication-Results: (forged) crm.example.org 1; dmarc=pass\r\n\
From: a@example.org\r\n\r\nAuthentication-Results: crm.example.org; in the body\r\n";
        let out = restamp(
            raw,
            "crm.example.org",
            Some("Authentication-Results: crm.example.org; spf=none"),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Authentication-Results: crm.example.org; spf=none\r\n\
Authentication-Results: mx.provider.test; spf=pass\r\n\
From: a@example.org\r\n\r\nAuthentication-Results: crm.example.org; in the body\r\n"
        );
        assert!(restamp(b"From: a@b\r\n\r\nx", "crm.example.org", None).is_none());
    }
}
