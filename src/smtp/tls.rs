//! STARTTLS: loading the certificate and key that make the listener offer it.
//!
//! Loading happens once at start-up (and is a separate step from
//! [`super::Settings::from_config`]) so that a missing or unreadable file is
//! reported before the listener binds, naming the file to fix.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::{self, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("the certificate and key cannot be used together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the TLS configuration STARTTLS uses from a PEM certificate chain
/// and a PEM private key.
///
/// # Errors
///
/// A file cannot be read or parsed ([`TlsError::Read`]), holds no
/// certificate or no key, or rustls refuses the pair (e.g. the key does not
/// match the certificate).
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Read { path, source }
    };

    let mut reader = BufReader::new(File::open(cert).map_err(read_error(cert))?);
    let chain = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error(cert))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }

    let mut reader = BufReader::new(File::open(key).map_err(read_error(key))?);
    let private_key = rustls_pemfile::private_key(&mut reader)
        .map_err(read_error(key))?
        .ok_or_else(|| TlsError::NoKey {
            path: key.to_path_buf(),
        })?;

    // tokio-rustls is built with the ring provider only: name it rather
    // than rely on a process-wide default that may not be installed.
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let error = load_tls(Path::new("/nonexistent/cert.pem"), Path::new("/x"))
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("/nonexistent/cert.pem")));
    }

    #[test]
    fn a_file_without_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not pem\n").unwrap();
        assert!(matches!(
            load_tls(&path, &path),
            Err(TlsError::NoCertificate { .. })
        ));
    }
}
