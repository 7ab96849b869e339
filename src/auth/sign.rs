//! Sign: the `DKIM-Signature` on every message crmgate sends (RFC 6376,
//! RFC 8463 for Ed25519), so that the helpdesk's mail passes DMARC at the
//! requesters' providers.
//!
//! The relay signs each message just before it goes out, after the last
//! change made to it, with `d=` the domain of its From address.

use std::collections::HashMap;
use std::path::Path;

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner as Signer, Done};
use rustls_pemfile::Item;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;

/// The address of a message's From header, as the signature's `d=` needs it.
pub fn from_address(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let address = parsed.from()?.first()?.address()?.to_string();
    Some(address)
}

/// RSA keys shorter than this are refused: RFC 8301 requires 1024 bits,
/// the large providers 2048.
pub const MIN_RSA_BITS: usize = 2048;

/// The headers every signature covers; those a message lacks are signed
/// as absent, so they cannot be added on the way.
pub const SIGNED_HEADERS: [&str; 14] = [
    "From",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Auto-Submitted",
    "X-Crmgate-Loop",
];

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} holds no PEM private key (RSA or Ed25519)")]
    NoKey(String),
    #[error("{path}: {reason}")]
    BadKey { path: String, reason: String },
    #[error("{path}: an RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed")]
    Weak { path: String, bits: usize },
    #[error("the From address {0:?} has no domain to sign for")]
    NoDomain(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The private key as read, kept to build a signer per From domain.
#[derive(Clone)]
enum KeyBytes {
    /// PKCS#1 or PKCS#8 DER, and the public key as DKIM publishes it
    /// (SubjectPublicKeyInfo).
    Rsa { der: Vec<u8>, pkcs8: bool },
    /// PKCS#8 DER.
    Ed25519(Vec<u8>),
}

/// The key, selector and public record; signs for any From domain.
pub struct DkimSigner {
    selector: String,
    key: KeyBytes,
    /// `p=` of the TXT record, base64.
    public: String,
    /// A ready signer per domain, built at load for the CRM addresses'
    /// domains: every message crmgate sends is From one of them.
    signers: HashMap<String, Signer<DkimKey, Done>>,
}

impl std::fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimSigner")
            .field("selector", &self.selector)
            .field("domains", &self.signers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DkimSigner {
    /// Reads the PEM key at `path` and prepares signers for `domains`.
    ///
    /// # Errors
    ///
    /// The file cannot be read, holds no private key, the key is neither
    /// RSA nor Ed25519, or it is an RSA key under [`MIN_RSA_BITS`].
    pub fn load(path: &Path, selector: &str, domains: &[&str]) -> Result<Self, SignError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| SignError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_pem(&pem, &shown, selector, domains)
    }

    /// As [`DkimSigner::load`], from the PEM text; `shown` names it in errors.
    ///
    /// # Errors
    ///
    /// As [`DkimSigner::load`], but for reading.
    pub fn from_pem(
        pem: &[u8],
        shown: &str,
        selector: &str,
        domains: &[&str],
    ) -> Result<Self, SignError> {
        let bad = |reason: String| SignError::BadKey {
            path: shown.to_string(),
            reason,
        };
        let mut reader = pem;
        let mut found = None;
        for item in rustls_pemfile::read_all(&mut reader) {
            match item {
                Ok(Item::Pkcs1Key(key)) => {
                    found = Some(KeyBytes::Rsa {
                        der: key.secret_pkcs1_der().to_vec(),
                        pkcs8: false,
                    });
                    break;
                }
                Ok(Item::Pkcs8Key(key)) => {
                    let der = key.secret_pkcs8_der().to_vec();
                    found = Some(if is_ed25519_pkcs8(&der) {
                        KeyBytes::Ed25519(der)
                    } else {
                        KeyBytes::Rsa { der, pkcs8: true }
                    });
                    break;
                }
                Ok(_) => {}
                Err(error) => return Err(bad(format!("not PEM: {error:?}"))),
            }
        }
        let key = found.ok_or_else(|| SignError::NoKey(shown.to_string()))?;
        let public = match &key {
            KeyBytes::Rsa { der, pkcs8 } => {
                // Measured before the key is parsed: ring refuses short
                // keys with an error that does not say how short.
                let bits = rsa_private_modulus_bits(der, *pkcs8)
                    .ok_or_else(|| bad("unreadable RSA private key".into()))?;
                if bits < MIN_RSA_BITS {
                    return Err(SignError::Weak {
                        path: shown.to_string(),
                        bits,
                    });
                }
                base64(&rsa_spki(&rsa_key(&key).map_err(bad)?.public_key()))
            }
            KeyBytes::Ed25519(der) => {
                let ed = Ed25519Key::from_pkcs8_maybe_unchecked_der(der)
                    .map_err(|e| bad(e.to_string()))?;
                base64(&ed.public_key())
            }
        };
        let mut signer = Self {
            selector: selector.to_string(),
            key,
            public,
            signers: HashMap::new(),
        };
        for domain in domains {
            let domain = domain.to_ascii_lowercase();
            let built = signer.build(&domain).map_err(bad)?;
            signer.signers.insert(domain, built);
        }
        Ok(signer)
    }

    fn build(&self, domain: &str) -> Result<Signer<DkimKey, Done>, String> {
        let key: DkimKey = match &self.key {
            KeyBytes::Rsa { .. } => rsa_key(&self.key)?.into(),
            KeyBytes::Ed25519(der) => Ed25519Key::from_pkcs8_maybe_unchecked_der(der)
                .map_err(|e| e.to_string())?
                .into(),
        };
        Ok(Signer::from_key(key)
            .domain(domain)
            .selector(&self.selector)
            .headers(SIGNED_HEADERS)
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed))
    }

    /// `message` with a `DKIM-Signature` on top, `d=` the domain of
    /// `from` (the message's From address).
    ///
    /// # Errors
    ///
    /// `from` has no domain, or the signature cannot be computed.
    pub fn sign(&self, message: &[u8], from: &str) -> Result<Vec<u8>, SignError> {
        let domain = from
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .ok_or_else(|| SignError::NoDomain(from.to_string()))?;
        let built;
        let signer = match self.signers.get(&domain) {
            Some(signer) => signer,
            None => {
                built = self.build(&domain).map_err(SignError::Sign)?;
                &built
            }
        };
        let signature = signer
            .sign(message)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        let header = signature.to_header();
        let mut signed = Vec::with_capacity(header.len() + message.len());
        signed.extend_from_slice(header.as_bytes());
        signed.extend_from_slice(message);
        Ok(signed)
    }

    /// The DNS name of the record for `domain`: `<selector>._domainkey.<domain>`.
    pub fn record_name(&self, domain: &str) -> String {
        format!("{}._domainkey.{domain}", self.selector)
    }

    /// The TXT record to publish (`v=DKIM1; k=…; p=…`).
    pub fn record(&self) -> String {
        let k = match self.key {
            KeyBytes::Rsa { .. } => "rsa",
            KeyBytes::Ed25519(_) => "ed25519",
        };
        format!("v=DKIM1; k={k}; p={}", self.public)
    }
}

fn rsa_key(key: &KeyBytes) -> Result<RsaKey<Sha256>, String> {
    let KeyBytes::Rsa { der, pkcs8 } = key else {
        return Err("not an RSA key".into());
    };
    let der = if *pkcs8 {
        PrivateKeyDer::Pkcs8(der.clone().into())
    } else {
        PrivateKeyDer::Pkcs1(der.clone().into())
    };
    RsaKey::<Sha256>::from_key_der(der).map_err(|e| e.to_string())
}

/// The Ed25519 OID (1.3.101.112) in a PKCS#8 AlgorithmIdentifier.
fn is_ed25519_pkcs8(der: &[u8]) -> bool {
    der.windows(5).any(|w| w == [0x06, 0x03, 0x2b, 0x65, 0x70])
}

/// Reads one DER length at the start of `bytes`: (length, rest).
fn der_length(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let (&first, rest) = bytes.split_first()?;
    if first < 0x80 {
        return Some((usize::from(first), rest));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 || rest.len() < count {
        return None;
    }
    let length = rest[..count]
        .iter()
        .fold(0usize, |n, &b| (n << 8) | usize::from(b));
    Some((length, &rest[count..]))
}

/// One DER element at the start of `bytes`: (tag, content, rest).
fn der_element(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (length, rest) = der_length(rest)?;
    let content = rest.get(..length)?;
    Some((tag, content, &rest[length..]))
}

/// The modulus size of an RSA private key: PKCS#1 `RSAPrivateKey`
/// (`SEQUENCE { version, n, … }`), or that inside PKCS#8's OCTET STRING.
fn rsa_private_modulus_bits(der: &[u8], pkcs8: bool) -> Option<usize> {
    let (tag, sequence, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_version_tag, _, rest) = der_element(sequence)?;
    if pkcs8 {
        let (_algorithm, _, rest) = der_element(rest)?;
        let (tag, inner, _) = der_element(rest)?;
        if tag != 0x04 {
            return None;
        }
        return rsa_private_modulus_bits(inner, false);
    }
    let (tag, modulus, _) = der_element(rest)?;
    if tag != 0x02 {
        return None;
    }
    integer_bits(modulus)
}

/// The bits of a DER INTEGER's magnitude.
fn integer_bits(modulus: &[u8]) -> Option<usize> {
    let significant: &[u8] = match modulus.iter().position(|&b| b != 0) {
        Some(start) => &modulus[start..],
        None => &[],
    };
    let first = *significant.first()?;
    Some(significant.len() * 8 - first.leading_zeros() as usize)
}

fn der_with_length(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = content.len();
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes: Vec<u8> = length
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A PKCS#1 RSAPublicKey wrapped as the SubjectPublicKeyInfo that DKIM
/// records carry (what `openssl rsa -pubout` prints).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut content = RSA_ALGORITHM.to_vec();
    content.extend(der_with_length(0x03, &bits));
    der_with_length(0x30, &content)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_as_rfc_4648_says() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn modulus_bits_skip_the_sign_byte() {
        // SEQUENCE { INTEGER 0 (version), INTEGER 0x00 0x80 0x01 (16 bits), INTEGER 3 }
        let key = [
            0x30, 0x0b, 0x02, 0x01, 0x00, 0x02, 0x03, 0x00, 0x80, 0x01, 0x02, 0x01, 0x03,
        ];
        assert_eq!(rsa_private_modulus_bits(&key, false), Some(16));
        assert_eq!(integer_bits(&[0x01, 0x00]), Some(9));
    }
}
