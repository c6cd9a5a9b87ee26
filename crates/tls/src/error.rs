use std::path::PathBuf;

/// What can go wrong making, loading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The cause is part of the message and not a `source`: a chain of
    // errors printed whole would name it twice.
    #[error("reading {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("writing {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid identity: {0}")]
    Identity(String),
}
