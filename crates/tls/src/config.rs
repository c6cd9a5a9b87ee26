use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::ca::read_string;
use crate::{SpiffeId, TlsError, crypto_provider, peer_spiffe_id};

/// Where a principal's certificate, key and trusted CA bundle live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// One or more CA certificates; several while a CA is being rotated.
    pub ca: PathBuf,
}

struct Loaded {
    fingerprint: [u8; 32],
    identity: SpiffeId,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// A principal's TLS identity for the mesh: server and client configurations
/// built from one set of files, swapped atomically when the files change.
/// Connections already open keep the configuration they started with.
pub struct MeshTls {
    files: TlsFiles,
    trust_domain: String,
    current: ArcSwap<Loaded>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("identity", &self.identity().to_string())
            .field("files", &self.files)
            .finish()
    }
}

impl MeshTls {
    /// Loads the files; the certificate must carry a SPIFFE id of
    /// `trust_domain`.
    pub fn load(files: TlsFiles, trust_domain: &str) -> Result<Arc<Self>, TlsError> {
        let loaded = build(&files, trust_domain)?;
        Ok(Arc::new(MeshTls {
            files,
            trust_domain: trust_domain.to_owned(),
            current: ArcSwap::from_pointee(loaded),
        }))
    }

    pub fn identity(&self) -> SpiffeId {
        self.current.load().identity.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for the next accepted connection: client
    /// certificate required, no session resumption (a resumed session would
    /// skip the certificate check), ALPN h2.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().server.clone()
    }

    /// The configuration for the next outgoing connection.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current.load().client.clone()
    }

    /// Rebuilds from the files when their content changed. A broken set of
    /// files is reported and the running configuration kept: files that do
    /// not parse, a certificate outside its validity or not signed by a CA
    /// of the bundle (every handshake would fail), or one that names
    /// another principal (the process would take on its rights).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let fingerprint = fingerprint(&self.files)?;
        if fingerprint == self.current.load().fingerprint {
            return Ok(false);
        }
        let loaded = build(&self.files, &self.trust_domain)?;
        let running = self.identity();
        if loaded.identity != running {
            return Err(TlsError::Identity(format!(
                "{} names {}, not {running}",
                self.files.cert.display(),
                loaded.identity
            )));
        }
        usable(
            &certs(&self.files.cert)?[0],
            Some(&certs(&self.files.ca)?),
            &self.files.cert,
        )?;
        self.current.store(Arc::new(loaded));
        Ok(true)
    }

    /// Re-reads the files every `interval` until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl Future<Output = ()>) {
        let identity = self.identity().to_string();
        watch(|| self.reload(), &identity, interval, shutdown).await;
    }
}

/// Calls `reload` every `interval` until `shutdown` resolves, and says
/// what it did for `what`.
async fn watch(
    reload: impl Fn() -> Result<bool, TlsError>,
    what: &str,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        match reload() {
            Ok(true) => tracing::info!(certificate = what, "reloaded tls certificates"),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(certificate = what, %error, "tls certificates not reloaded; keeping the current ones")
            }
        }
    }
}

/// Whether `cert` is within its validity now and, with `cas`, signed by
/// one of them.
fn usable(
    cert: &CertificateDer<'_>,
    cas: Option<&[CertificateDer<'_>]>,
    path: &Path,
) -> Result<(), TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let unusable = |why: String| TlsError::Identity(format!("{}: {why}", path.display()));
    let (_, parsed) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| unusable(e.to_string()))?;
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(unusable(format!(
            "not valid now (from {} to {})",
            validity.not_before, validity.not_after
        )));
    }
    let Some(cas) = cas else {
        return Ok(());
    };
    let signed = cas.iter().any(|ca| {
        X509Certificate::from_der(ca.as_ref())
            .is_ok_and(|(_, ca)| parsed.verify_signature(Some(ca.public_key())).is_ok())
    });
    if !signed {
        return Err(unusable("not signed by a CA of the bundle".into()));
    }
    Ok(())
}

fn fingerprint(files: &TlsFiles) -> Result<[u8; 32], TlsError> {
    let mut hash = Sha256::new();
    for path in [&files.cert, &files.key, &files.ca] {
        let bytes = std::fs::read(path).map_err(|cause| TlsError::Read {
            path: path.clone(),
            cause,
        })?;
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(&bytes);
    }
    Ok(hash.finalize().into())
}

fn pem_err(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::Pem {
        path: path.to_owned(),
        what: e.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_string(path)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate".into(),
        });
    }
    Ok(certs)
}

/// The edge's public listener's TLS, rebuilt when its files change (a
/// renewed certificate, a rotated CA bundle) as the mesh's is. Connections
/// already open keep the configuration they started with.
pub struct EdgeTls {
    files: TlsFiles,
    /// The trust domain a device certificate must name.
    trust_domain: String,
    current: ArcSwap<([u8; 32], Arc<ServerConfig>)>,
}

impl std::fmt::Debug for EdgeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeTls")
            .field("files", &self.files)
            .finish()
    }
}

impl EdgeTls {
    /// `files.cert` and `files.key`: the listener's own certificate (from
    /// any CA its clients trust); `files.ca`: the CA bundle that device
    /// certificates are verified against, which belong to `trust_domain`.
    pub fn load(files: TlsFiles, trust_domain: &str) -> Result<Arc<EdgeTls>, TlsError> {
        let fingerprint = fingerprint(&files)?;
        let config = edge_server_config(&files.cert, &files.key, &files.ca)?;
        Ok(Arc::new(EdgeTls {
            files,
            trust_domain: trust_domain.to_owned(),
            current: ArcSwap::from_pointee((fingerprint, config)),
        }))
    }

    /// The trust domain a device certificate must name: the CA bundle may
    /// hold the CAs of other trust domains (a rotation, a CA shared with
    /// staging), whose device certificates are not this one's.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The configuration for the next accepted connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().1.clone()
    }

    /// Rebuilds from the files when their content changed; files that do
    /// not parse, or a certificate outside its validity, are reported and
    /// the running configuration kept.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let fingerprint = fingerprint(&self.files)?;
        if fingerprint == self.current.load().0 {
            return Ok(false);
        }
        let config = edge_server_config(&self.files.cert, &self.files.key, &self.files.ca)?;
        usable(&certs(&self.files.cert)?[0], None, &self.files.cert)?;
        self.current.store(Arc::new((fingerprint, config)));
        Ok(true)
    }

    /// Re-reads the files every `interval` until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl Future<Output = ()>) {
        watch(|| self.reload(), "edge listener", interval, shutdown).await;
    }
}

/// The edge's public listener: its own certificate, and client
/// certificates optional but, when presented, verified against `ca`. No
/// session resumption (it would skip that check); HTTP/1.1 only, as the
/// WebSocket upgrade needs.
fn edge_server_config(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_slice(read_string(key)?.as_bytes()).map_err(pem_err(key))?;
    let mut roots = RootCertStore::empty();
    for root in certs(ca)? {
        roots.add(root)?;
    }
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

fn build(files: &TlsFiles, trust_domain: &str) -> Result<Loaded, TlsError> {
    // Fingerprint first: if the files change while we read them, the next
    // reload sees a different fingerprint and reads them again.
    let fingerprint = fingerprint(files)?;
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(read_string(&files.key)?.as_bytes())
        .map_err(pem_err(&files.key))?;
    let identity = peer_spiffe_id(&chain[0])
        .filter(|id| id.trust_domain == trust_domain)
        .ok_or_else(|| {
            TlsError::Identity(format!(
                "{} has no spiffe id in trust domain {trust_domain}",
                files.cert.display()
            ))
        })?;
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca)?;
    }
    let roots = Arc::new(roots);
    let provider = crypto_provider();

    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;

    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.resumption = Resumption::disabled();

    Ok(Loaded {
        fingerprint,
        identity,
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, IssueOptions, ServiceName, TlsDir};

    const TD: &str = "muster.test";

    #[test]
    fn a_reload_keeps_the_running_certificate_over_an_unusable_one() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = TlsDir::new(dir.path());
        let (ca, _) = tls_dir.ensure_ca(Duration::from_secs(3600)).unwrap();
        let day = IssueOptions::valid_for(Duration::from_secs(86_400));
        tls_dir
            .write_issued(
                ServiceName::Presence,
                &ca.issue(TD, ServiceName::Presence, &day).unwrap(),
            )
            .unwrap();
        let tls = MeshTls::load(tls_dir.files(ServiceName::Presence), TD).unwrap();
        let running = tls.server_config();

        let now = time::OffsetDateTime::now_utc();
        let mut expired = day.clone();
        expired.not_before = Some(now - time::Duration::days(2));
        expired.not_after = Some(now - time::Duration::days(1));
        let other_ca = CertificateAuthority::generate("other", Duration::from_secs(3600)).unwrap();
        for (why, cert) in [
            (
                "expired",
                ca.issue(TD, ServiceName::Presence, &expired).unwrap(),
            ),
            (
                "another principal's",
                ca.issue(TD, ServiceName::Ctl, &day).unwrap(),
            ),
            (
                "another CA's",
                other_ca.issue(TD, ServiceName::Presence, &day).unwrap(),
            ),
        ] {
            tls_dir.write_issued(ServiceName::Presence, &cert).unwrap();
            assert!(tls.reload().is_err(), "{why}");
            assert!(Arc::ptr_eq(&tls.server_config(), &running), "{why}");
            assert_eq!(
                tls.identity().service(),
                Some(ServiceName::Presence),
                "{why}"
            );
        }
        // A good one is taken.
        tls_dir
            .write_issued(
                ServiceName::Presence,
                &ca.issue(TD, ServiceName::Presence, &day).unwrap(),
            )
            .unwrap();
        assert!(tls.reload().unwrap());
        assert!(!Arc::ptr_eq(&tls.server_config(), &running));
    }
}
