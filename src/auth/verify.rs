//! Verify: SPF (RFC 7208), DKIM (RFC 6376) and the DMARC alignment test
//! (RFC 7489 §3.1, relaxed), through Stalwart's `mail-auth` and hickory's
//! resolver.
//!
//! The result is believed when a valid DKIM signature's `d=` or the domain
//! SPF passed for is aligned with the From domain: the DMARC test, whatever
//! policy the domain publishes (a domain with `p=none` still proves who
//! sent when its mail passes). A DNS failure that leaves the answer open
//! is an error, never a refusal: the sender retries (`451 4.4.3`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::system_conf::read_system_conf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimResult, DnsError, Error as AuthError, MessageAuthenticator, SpfResult,
};

/// Why no answer could be had.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No resolver to ask: `/etc/resolv.conf` unreadable and no
    /// `[auth] dns_servers`.
    #[error("no DNS resolver: {0}")]
    Resolver(String),
    /// A lookup timed out or failed (SERVFAIL): the answer is unknown.
    #[error("DNS lookup failed: {0}")]
    Dns(String),
}

/// An SPF result, as RFC 8601 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spf {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl Spf {
    pub fn as_str(self) -> &'static str {
        match self {
            Spf::Pass => "pass",
            Spf::Fail => "fail",
            Spf::SoftFail => "softfail",
            Spf::Neutral => "neutral",
            Spf::None => "none",
            Spf::TempError => "temperror",
            Spf::PermError => "permerror",
        }
    }

    fn of(result: SpfResult) -> Self {
        match result {
            SpfResult::Pass => Spf::Pass,
            SpfResult::Fail => Spf::Fail,
            SpfResult::SoftFail => Spf::SoftFail,
            SpfResult::Neutral => Spf::Neutral,
            SpfResult::TempError => Spf::TempError,
            SpfResult::PermError => Spf::PermError,
            SpfResult::None => Spf::None,
        }
    }
}

/// The DKIM signatures of a message, summed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dkim {
    /// At least one valid signature; the lower-cased `d=` of each.
    Pass(Vec<String>),
    /// Signatures, none valid.
    Fail,
    /// No signature at all.
    None,
}

/// crmgate's own check of one message: plain data for decide and for the
/// `Authentication-Results` the stored message gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub spf: Spf,
    /// The domain SPF was evaluated for: the envelope sender's, or the
    /// HELO name's for the null reverse-path.
    pub spf_domain: String,
    /// Whether `spf_domain` came from the HELO name.
    pub spf_by_helo: bool,
    pub dkim: Dkim,
    /// The lower-cased From domain the alignment was tested against.
    pub from_domain: String,
}

impl Verification {
    /// The DMARC test: an aligned DKIM pass or an aligned SPF pass.
    pub fn dmarc_pass(&self) -> bool {
        let dkim = match &self.dkim {
            Dkim::Pass(domains) => domains.iter().any(|d| aligned(d, &self.from_domain)),
            Dkim::Fail | Dkim::None => false,
        };
        dkim || (self.spf == Spf::Pass && aligned(&self.spf_domain, &self.from_domain))
    }

    /// The header crmgate adds to the stored message (RFC 8601), without
    /// its line end.
    pub fn header(&self, hostname: &str) -> String {
        let spf_property = if self.spf_by_helo {
            "smtp.helo"
        } else {
            "smtp.mailfrom"
        };
        let dkim = match &self.dkim {
            Dkim::Pass(domains) => domains
                .iter()
                .map(|d| format!("dkim=pass header.d={d}"))
                .collect::<Vec<_>>()
                .join("; "),
            Dkim::Fail => "dkim=fail".into(),
            Dkim::None => "dkim=none".into(),
        };
        let dmarc = if self.dmarc_pass() { "pass" } else { "fail" };
        format!(
            "Authentication-Results: {hostname}; spf={} {spf_property}={}; {dkim}; dmarc={dmarc} header.from={}",
            self.spf.as_str(),
            self.spf_domain,
            self.from_domain,
        )
    }
}

/// Relaxed alignment (RFC 7489 §3.1): the same domain, or one a subdomain
/// of the other. Without the public suffix list this is stricter than
/// DMARC's organizational domain for siblings (`a.example.org` and
/// `b.example.org` are not aligned here), never looser: a parent taken
/// for an organizational domain would have to publish the key or SPF
/// record itself.
pub fn aligned(domain: &str, from_domain: &str) -> bool {
    let (a, b) = (
        domain.trim_end_matches('.'),
        from_domain.trim_end_matches('.'),
    );
    if a.is_empty() || b.is_empty() {
        return false;
    }
    a.eq_ignore_ascii_case(b) || is_subdomain(a, b) || is_subdomain(b, a)
}

fn is_subdomain(child: &str, parent: &str) -> bool {
    child.len() > parent.len() + 1
        && child[child.len() - parent.len()..].eq_ignore_ascii_case(parent)
        && child.as_bytes()[child.len() - parent.len() - 1] == b'.'
}

/// The resolver and our name, for the life of the daemon.
#[derive(Clone)]
pub struct Verifier {
    authenticator: MessageAuthenticator,
    /// Our own name, given to SPF as the checking host (`%{r}`).
    hostname: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier asking `servers` (`ip:port`; none: those of
    /// `/etc/resolv.conf`), each query bounded by `timeout`.
    ///
    /// # Errors
    ///
    /// No servers given and `/etc/resolv.conf` cannot be read, or the
    /// resolver cannot be built.
    pub fn new(
        servers: &[SocketAddr],
        timeout: Duration,
        hostname: &str,
    ) -> Result<Self, VerifyError> {
        let (config, mut options) = if servers.is_empty() {
            read_system_conf().map_err(|e| VerifyError::Resolver(e.to_string()))?
        } else {
            let name_servers = servers
                .iter()
                .map(|server| {
                    let mut config = NameServerConfig::udp_and_tcp(server.ip());
                    for connection in &mut config.connections {
                        connection.port = server.port();
                    }
                    config
                })
                .collect();
            (
                ResolverConfig::from_name_servers(name_servers),
                ResolverOpts::default(),
            )
        };
        options.timeout = timeout;
        options.attempts = 1;
        let authenticator = MessageAuthenticator::new(config, options)
            .map_err(|e| VerifyError::Resolver(e.to_string()))?;
        Ok(Self {
            authenticator,
            hostname: hostname.to_string(),
        })
    }

    /// Checks `raw` as received from `peer` with `helo` and `mail_from`
    /// (`None`: the null reverse-path, HELO stands in) against the domain
    /// of its From address.
    ///
    /// # Errors
    ///
    /// [`VerifyError::Dns`] when a lookup failed and nothing aligned
    /// passed: the answer is unknown, not negative.
    pub async fn check(
        &self,
        raw: &[u8],
        peer: IpAddr,
        helo: &str,
        mail_from: Option<&str>,
        from_domain: &str,
    ) -> Result<Verification, VerifyError> {
        let mut unknown: Option<String> = None;
        let dkim = match AuthenticatedMessage::parse(raw) {
            Some(message) => {
                let outputs = self.authenticator.verify_dkim(&message).await;
                let mut passed = Vec::new();
                for output in &outputs {
                    match output.result() {
                        DkimResult::Pass => {
                            if let Some(signature) = output.signature() {
                                passed.push(signature.d.to_ascii_lowercase());
                            }
                        }
                        DkimResult::TempError(error) => {
                            unknown.get_or_insert_with(|| format!("DKIM key: {error}"));
                        }
                        DkimResult::PermError(error) if is_server_failure(error) => {
                            unknown.get_or_insert_with(|| format!("DKIM key: {error}"));
                        }
                        _ => {}
                    }
                }
                if !passed.is_empty() {
                    Dkim::Pass(passed)
                } else if outputs.is_empty() {
                    Dkim::None
                } else {
                    Dkim::Fail
                }
            }
            None => Dkim::None,
        };

        let (spf, spf_domain, spf_by_helo) = self.spf(peer, helo, mail_from).await;
        if spf == Spf::TempError {
            unknown.get_or_insert_with(|| format!("SPF of {spf_domain}"));
        }
        let verification = Verification {
            spf,
            spf_domain,
            spf_by_helo,
            dkim,
            from_domain: from_domain.to_ascii_lowercase(),
        };
        match unknown {
            Some(what) if !verification.dmarc_pass() => Err(VerifyError::Dns(what)),
            _ => Ok(verification),
        }
    }

    /// SPF alone, for the envelope sender (or the HELO name for the null
    /// reverse-path): the check before a receipt, against backscatter.
    /// Returns the result, the domain it is for, and whether that is the
    /// HELO name.
    pub async fn spf(
        &self,
        peer: IpAddr,
        helo: &str,
        mail_from: Option<&str>,
    ) -> (Spf, String, bool) {
        let helo = helo.trim_start_matches('[').trim_end_matches(']');
        let parameters = match mail_from {
            Some(sender) if sender.contains('@') => {
                SpfParameters::verify_mail_from(peer, helo, &self.hostname, sender)
            }
            _ => SpfParameters::verify_ehlo(peer, helo, &self.hostname),
        };
        let by_helo = !mail_from.is_some_and(|s| s.contains('@'));
        let output = self.authenticator.verify_spf(parameters).await;
        (
            Spf::of(output.result()),
            output.domain().to_ascii_lowercase(),
            by_helo,
        )
    }
}

/// A SERVFAIL or REFUSED answer: the record may exist, we could not learn it.
fn is_server_failure(error: &AuthError) -> bool {
    match error {
        AuthError::Dns(DnsError::Resolver(_)) => true,
        AuthError::Dns(DnsError::RecordNotFound(code)) => {
            let code = u16::from(*code);
            code == 2 || code == 5
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relaxed_alignment_takes_subdomains_either_way_and_nothing_else() {
        assert!(aligned("example.org", "example.org"));
        assert!(aligned("Mail.Example.org", "example.org"));
        assert!(aligned("example.org", "eu.example.org"));
        assert!(!aligned("badexample.org", "example.org"));
        assert!(!aligned("example.org.evil.test", "example.org"));
        assert!(!aligned("", "example.org"));
        assert!(!aligned("a.example.org", "b.example.org"));
    }

    fn verification(spf: Spf, spf_domain: &str, dkim: Dkim) -> Verification {
        Verification {
            spf,
            spf_domain: spf_domain.into(),
            spf_by_helo: false,
            dkim,
            from_domain: "example.org".into(),
        }
    }

    #[test]
    fn an_aligned_pass_of_either_makes_the_dmarc_test_pass() {
        let dkim_only = verification(
            Spf::Fail,
            "example.org",
            Dkim::Pass(vec!["example.org".into()]),
        );
        assert!(dkim_only.dmarc_pass());
        let spf_only = verification(Spf::Pass, "bounces.example.org", Dkim::None);
        assert!(spf_only.dmarc_pass());
        let unaligned_spf = verification(Spf::Pass, "provider.test", Dkim::Fail);
        assert!(!unaligned_spf.dmarc_pass());
        let other_signer = verification(
            Spf::None,
            "example.org",
            Dkim::Pass(vec!["provider.test".into()]),
        );
        assert!(!other_signer.dmarc_pass());
    }

    #[test]
    fn the_header_names_each_method_and_our_host() {
        let v = verification(
            Spf::Pass,
            "example.org",
            Dkim::Pass(vec!["example.org".into()]),
        );
        assert_eq!(
            v.header("mx.test"),
            "Authentication-Results: mx.test; spf=pass smtp.mailfrom=example.org; \
             dkim=pass header.d=example.org; dmarc=pass header.from=example.org"
        );
    }
}
