//! A private PKI made in the test: a self-signed CA, as an operator's
//! internal CA would be, and a server certificate it signs for the names a
//! test relay is reached by (`127.0.0.1` and `localhost`). Nothing is read
//! from disk; [`TestPki::write_ca`] writes the CA where a configuration can
//! name it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

pub struct TestPki {
    /// The CA certificate, PEM: what goes in `relay.ca_file`.
    pub ca_pem: String,
    /// The server's chain (its certificate, then the CA) and key, ready for
    /// a TLS listener.
    pub server: Arc<ServerConfig>,
}

impl TestPki {
    /// A CA named "crmgate test CA" and a server certificate it signed.
    pub fn new() -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "crmgate test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let server_cert =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap()
                .signed_by(&server_key, &ca)
                .unwrap();
        let chain: Vec<CertificateDer<'static>> = vec![server_cert.der().clone(), ca.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let server =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        TestPki {
            ca_pem: ca.pem(),
            server: Arc::new(server),
        }
    }

    /// Write the CA certificate as `ca.pem` in `dir`; returns its path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}
