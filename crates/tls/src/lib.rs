//! Certificate authority, SPIFFE identities and rustls configuration for
//! muster's internal mesh.
//!
//! Every service presents a certificate from the project's CA whose URI SAN
//! names it (`spiffe://<trust-domain>/service/<name>`); every server demands
//! one. Configurations are swapped at run time when the files change, so
//! certificates rotate without a restart.
#![forbid(unsafe_code)]

mod ca;
mod config;
mod error;
mod identity;

pub use ca::{CertSummary, CertificateAuthority, IssueOptions, IssuedCert, TlsDir, write_atomic};
pub use config::{EdgeTls, MeshTls, TlsFiles};
pub use error::TlsError;
pub use identity::{ServiceName, SpiffeId, cert_not_after, peer_spiffe_id};

/// The crypto provider muster uses everywhere: ring, never aws-lc.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider; harmless when already
/// installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
