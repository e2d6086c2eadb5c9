//! TLS for the share links (rustls on ring): each share travels on its own TLS 1.3 connection,
//! so an eavesdropper on the client's network sees neither share.
//!
//! Server identity: a certificate chain and key from PEM files, or one made at start-up
//! ([`ServerIdentity::generate`]: a private CA and a leaf for the given names, with rcgen). The
//! client trusts a server either through CA certificates (`--share-ca`, WebPKI path and name
//! validation) or by pinning the SHA-256 of the server's leaf certificate (`--share-pin`, the
//! handshake signature is still verified against the pinned certificate's key).
use crate::error::{Result, ShareError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// ring's provider with AES-128-GCM preferred (every share crosses TLS once each way; 128-bit
/// keys cost 10 AES rounds instead of 14, at a security level above the rest of the system).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

fn tls(e: impl std::fmt::Display) -> ShareError {
    ShareError::Tls(e.to_string())
}

/// SHA-256 of a DER certificate, lowercase hex (what `--share-pin` takes).
pub fn pin_of(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// A server's certificate chain (leaf first) and private key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// PEM of the CA that signed the leaf, when [`ServerIdentity::generate`] made it.
    pub ca_pem: Option<String>,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca_pem: self.ca_pem.clone(),
        }
    }
}

impl ServerIdentity {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| ShareError::Tls(format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(ShareError::Tls(format!(
                "{}: no certificate",
                cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| ShareError::Tls(format!("{}: {e}", key.display())))?;
        Ok(Self {
            chain,
            key,
            ca_pem: None,
        })
    }

    /// A fresh private CA and a leaf for `names` (DNS names or IP addresses) signed by it.
    pub fn generate(names: &[String]) -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().map_err(tls)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "umbra share server CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).map_err(tls)?;
        let leaf_key = KeyPair::generate().map_err(tls)?;
        let mut leaf_params = CertificateParams::new(names.to_vec()).map_err(tls)?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "umbra share server");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .map_err(tls)?;
        Ok(Self {
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            ca_pem: Some(ca.pem()),
        })
    }

    /// The pin of the leaf certificate.
    pub fn pin(&self) -> String {
        pin_of(&self.chain[0])
    }

    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        Ok(Arc::new(cfg))
    }
}

/// How the client authenticates one server.
#[derive(Debug, Clone)]
pub enum Trust {
    /// CA certificates (PEM file contents, DER each).
    Ca(Vec<CertificateDer<'static>>),
    /// SHA-256 of the server's leaf certificate (hex).
    Pin(String),
}

impl Trust {
    /// The certificates of a PEM file.
    pub fn ca_file(path: &Path) -> Result<Self> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| ShareError::Tls(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ShareError::Tls(format!(
                "{}: no certificate",
                path.display()
            )));
        }
        Ok(Trust::Ca(certs))
    }

    /// CA certificates from PEM text.
    pub fn ca_pem(pem: &str) -> Result<Self> {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(tls)?;
        Ok(Trust::Ca(certs))
    }

    /// A pin (64 hex digits, `:` separators allowed).
    pub fn pin(hex_pin: &str) -> Result<Self> {
        let p: String = hex_pin
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_lowercase();
        if p.len() != 64 || !p.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ShareError::Config(format!(
                "certificate pin `{hex_pin}` is not a SHA-256 in hex (64 digits)"
            )));
        }
        Ok(Trust::Pin(p))
    }

    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let b = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?;
        let cfg = match self {
            Trust::Ca(certs) => {
                let mut roots = RootCertStore::empty();
                for c in certs {
                    roots.add(c.clone()).map_err(tls)?;
                }
                b.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::Pin(p) => b
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: p.clone(),
                    provider: provider(),
                }))
                .with_no_client_auth(),
        };
        Ok(Arc::new(cfg))
    }
}

/// Accepts exactly the leaf certificate whose SHA-256 is `pin`; the handshake signature is
/// verified with that certificate's key (so only its private key holder gets through).
#[derive(Debug)]
struct PinVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = pin_of(end_entity);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate pin mismatch: the server presents {got}, expected {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_generated_identities_build_configs() {
        let id = ServerIdentity::generate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(id.pin().len(), 64);
        id.server_config().unwrap();
        Trust::pin(&id.pin()).unwrap().client_config().unwrap();
        Trust::ca_pem(id.ca_pem.as_deref().unwrap())
            .unwrap()
            .client_config()
            .unwrap();
        assert!(Trust::pin("abc").is_err());
        let colons: String = id
            .pin()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert!(matches!(Trust::pin(&colons).unwrap(), Trust::Pin(p) if p == id.pin()));
    }
}
