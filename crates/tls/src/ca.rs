use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{ServiceName, TlsError, TlsFiles};

/// Certificates start this long before they are issued, so a peer whose
/// clock runs a little behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The project's certificate authority: it issues every service's
/// certificate (and, later, every paired device's).
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signing key stays out of every Debug output.
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// How to issue a certificate.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Lifetime from now.
    pub validity: Duration,
    /// Overrides the start of validity (tests make expired certificates).
    pub not_before: Option<OffsetDateTime>,
    /// Overrides the end of validity.
    pub not_after: Option<OffsetDateTime>,
    /// DNS names (or IP addresses) besides `muster-<name>`, `<name>`,
    /// `localhost`, `127.0.0.1` and `::1`.
    pub extra_dns_names: Vec<String>,
}

impl IssueOptions {
    pub fn valid_for(validity: Duration) -> Self {
        IssueOptions {
            validity,
            not_before: None,
            not_after: None,
            extra_dns_names: Vec::new(),
        }
    }
}

/// A freshly issued certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed CA with an ECDSA P-256 key.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "muster");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = first_cert(cert_pem.as_bytes(), Path::new("<ca>"))?;
        // A CA whose key is not its certificate's would issue certificates
        // that verify nowhere (a bundle rotated with its certificates out
        // of order, a key from another CA).
        if !key_matches(&key, &cert_der) {
            return Err(TlsError::Identity(
                "the CA key is not the key of the first certificate of the CA file".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate for a mesh principal: URI SAN
    /// `spiffe://<trust_domain>/service/<name>`, with a random serial
    /// (rcgen would otherwise derive one from the key, and re-issues would
    /// collide). A service's is usable as TLS server and client, for
    /// `muster-<name>` and `<name>`; the edge's also for `localhost` and
    /// the loopback addresses, where its `wss://` listener may be reached.
    /// `ctl`, which serves nothing, gets a client certificate with no
    /// names, so that no operator's workstation holds one that a client
    /// would take for a server's.
    pub fn issue(
        &self,
        trust_domain: &str,
        name: ServiceName,
        opts: &IssueOptions,
    ) -> Result<IssuedCert, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let serves = name != ServiceName::Ctl;
        let mut dns = Vec::new();
        if serves {
            dns.extend([name.server_name(), name.as_str().to_owned()]);
        }
        if name == ServiceName::Edge {
            // Loopback addresses as IP names, so that a URL built from a
            // loopback listener's address (`wss://127.0.0.1:8787/ws`)
            // verifies as it is.
            dns.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        }
        dns.extend(opts.extra_dns_names.iter().cloned());
        let mut params = CertificateParams::new(dns)?;
        let spiffe = name.spiffe_id(trust_domain).to_string();
        params
            .subject_alt_names
            .push(SanType::URI(spiffe.as_str().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.server_name());
        dn.push(DnType::OrganizationName, "muster");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if serves {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = opts.not_before.unwrap_or(now - BACKDATE);
        params.not_after = opts.not_after.unwrap_or(now + opts.validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
        })
    }

    /// Issues a device's certificate for the device's own key
    /// (`spki_der`: the DER SubjectPublicKeyInfo it proved at connect, so
    /// the private key never leaves the device): URI SAN
    /// `spiffe://<trust_domain>/tenant/<tenant_id>/device/<device_id>`,
    /// client authentication only. Returns the certificate's PEM.
    pub fn issue_device(
        &self,
        trust_domain: &str,
        tenant_id: &str,
        device_id: &str,
        spki_der: &[u8],
        opts: &IssueOptions,
    ) -> Result<String, TlsError> {
        // SPIFFE path segments: no empty, `.` or `..` segment, no `/`.
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        if !segment_ok(tenant_id) || !segment_ok(device_id) {
            return Err(TlsError::Identity(format!(
                "tenant {tenant_id:?} and device {device_id:?} must be non-empty path segments"
            )));
        }
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let spiffe = format!("spiffe://{trust_domain}/tenant/{tenant_id}/device/{device_id}");
        params
            .subject_alt_names
            .push(SanType::URI(spiffe.as_str().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        dn.push(DnType::OrganizationName, "muster");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = opts.not_before.unwrap_or(now - BACKDATE);
        params.not_after = opts.not_after.unwrap_or(now + opts.validity);
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and never a leading zero byte: a canonical DER INTEGER.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn first_cert(pem: &[u8], path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate".into(),
        })?
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })
}

/// What a certificate says about itself, for `muster certs inspect` and
/// renewal decisions.
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub serial_hex: String,
    pub spiffe_id: Option<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
}

impl CertSummary {
    pub fn of(der: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial_hex: cert.raw_serial_as_string(),
            spiffe_id: crate::peer_spiffe_id(der).map(|id| id.to_string()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            is_ca: cert.is_ca(),
        })
    }
}

/// A directory of PEM files: `ca.pem`, `ca.key`, and `<name>.pem` /
/// `<name>.key` per principal. Single-host muster keeps one under its data
/// directory; `muster certs` writes one for a cluster.
#[derive(Debug, Clone)]
pub struct TlsDir {
    dir: PathBuf,
}

impl TlsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TlsDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The files a principal serves and calls with.
    pub fn files(&self, name: ServiceName) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            ca: self.ca_cert_path(),
        }
    }

    /// The trust domains of the principals' certificates already here: a
    /// directory's certificates issued again keep theirs unless told
    /// otherwise.
    pub fn trust_domains_in_use(&self) -> std::collections::BTreeSet<String> {
        let mut found = std::collections::BTreeSet::new();
        for name in ServiceName::ALL {
            let path = self.files(name).cert;
            let Some(id) = std::fs::read(&path)
                .ok()
                .and_then(|pem| first_cert(&pem, &path).ok())
                .and_then(|der| crate::peer_spiffe_id(&der))
            else {
                continue;
            };
            found.insert(id.trust_domain);
        }
        found
    }

    pub fn load_ca(&self) -> Result<CertificateAuthority, TlsError> {
        let cert = read_string(&self.ca_cert_path())?;
        let key = read_string(&self.ca_key_path())?;
        CertificateAuthority::from_pem(&cert, &key)
    }

    /// Loads the CA, or makes and writes one when there is none. Returns
    /// whether it was created.
    pub fn ensure_ca(&self, validity: Duration) -> Result<(CertificateAuthority, bool), TlsError> {
        if self.ca_cert_path().exists() {
            return Ok((self.load_ca()?, false));
        }
        let ca = CertificateAuthority::generate("muster development CA", validity)?;
        self.write_ca(&ca)?;
        Ok((ca, true))
    }

    pub fn write_ca(&self, ca: &CertificateAuthority) -> Result<(), TlsError> {
        write_atomic(&self.ca_key_path(), ca.key_pem().as_bytes(), true)?;
        write_atomic(&self.ca_cert_path(), ca.cert_pem().as_bytes(), false)
    }

    pub fn write_issued(&self, name: ServiceName, cert: &IssuedCert) -> Result<(), TlsError> {
        let files = self.files(name);
        // Key first: a reloader that sees the new certificate must find the
        // key that goes with it.
        write_atomic(&files.key, cert.key_pem.as_bytes(), true)?;
        write_atomic(&files.cert, cert.cert_pem.as_bytes(), false)
    }

    /// Issues a certificate for `name` unless a current one from this CA
    /// exists with more than a third of its lifetime left. Returns whether
    /// it issued.
    pub fn ensure_issued(
        &self,
        ca: &CertificateAuthority,
        trust_domain: &str,
        name: ServiceName,
        opts: &IssueOptions,
    ) -> Result<bool, TlsError> {
        let files = self.files(name);
        if files.cert.exists() && files.key.exists() {
            let pem = read_string(&files.cert)?;
            let der = first_cert(pem.as_bytes(), &files.cert)?;
            let summary = CertSummary::of(&der)?;
            let ca_subject = CertSummary::of(ca.cert_der())?.subject;
            let renew_at = OffsetDateTime::now_utc() + opts.validity / 3;
            let wanted = name.spiffe_id(trust_domain).to_string();
            // The key is checked too: a write cut short between the key
            // and the certificate (or a reissue racing a renewal) leaves a
            // new key beside the old certificate, which no TLS
            // configuration takes, until issued again.
            let key_fits = KeyPair::from_pem(&read_string(&files.key)?)
                .is_ok_and(|key| key_matches(&key, &der));
            if summary.issuer == ca_subject
                && summary.not_after > renew_at
                && summary.spiffe_id.as_deref() == Some(wanted.as_str())
                && verifies_against(&der, ca)
                && key_fits
            {
                return Ok(false);
            }
        }
        let issued = ca.issue(trust_domain, name, opts)?;
        self.write_issued(name, &issued)?;
        Ok(true)
    }
}

/// Whether `key` is the key `cert` certifies.
fn key_matches(key: &KeyPair, cert: &CertificateDer<'_>) -> bool {
    use rcgen::PublicKeyData;
    X509Certificate::from_der(cert.as_ref())
        .is_ok_and(|(_, parsed)| parsed.public_key().raw == key.subject_public_key_info())
}

fn verifies_against(der: &CertificateDer<'_>, ca: &CertificateAuthority) -> bool {
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return false;
    };
    let Ok((_, ca_cert)) = X509Certificate::from_der(ca.cert_der().as_ref()) else {
        return false;
    };
    cert.verify_signature(Some(ca_cert.public_key())).is_ok()
}

pub(crate) fn read_string(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })
}

/// Writes through a temporary file and a rename, so a reader never sees half
/// a file (nor one written through a link left in its place); private
/// files (keys) are created readable by the owner only, the rest
/// writable by the owner only whatever the umask.
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |cause| TlsError::Write {
        path: path.to_owned(),
        cause,
    };
    if let Some(parent) = path.parent() {
        // Owner only, as `serve` makes the data directory: a directory
        // made here first (`muster certs init`) holds the store next.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err)?;
    }
    // Each target has its own temporary file, created afresh: a leftover
    // one (a write cut short) would keep its mode, and a key written into
    // a certificate's readable leftover would be readable too.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use rcgen::PublicKeyData;

    use super::*;

    #[test]
    fn keys_are_written_readable_by_their_owner_only_whatever_was_left_over() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsDir::new(dir.path());
        // Leftovers of writes cut short, readable by all.
        for name in ["ca.tmp", "ca.key.tmp", "ca.pem.tmp"] {
            let leftover = dir.path().join(format!("{name}{}", std::process::id()));
            std::fs::write(&leftover, b"old").unwrap();
            std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        tls.write_ca(
            &CertificateAuthority::generate("muster.test", Duration::from_secs(3600)).unwrap(),
        )
        .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tls.ca_key_path()), 0o600);
        assert!(tls.load_ca().is_ok());

        // Directories made for them are their owner's only.
        let nested = TlsDir::new(dir.path().join("data").join("tls"));
        nested
            .write_ca(
                &CertificateAuthority::generate("muster.test", Duration::from_secs(3600)).unwrap(),
            )
            .unwrap();
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        assert_eq!(mode(&dir.path().join("data").join("tls")), 0o700);
    }

    #[test]
    fn only_servers_get_names_and_only_the_edge_the_loopback_ones() {
        use x509_parser::extensions::GeneralName;
        let ca = CertificateAuthority::generate("test ca", Duration::from_secs(3600)).unwrap();
        let mut opts = IssueOptions::valid_for(Duration::from_secs(3600));
        opts.extra_dns_names = vec!["gw.example".into()];
        // (DNS and IP names, serves, is a client) of each principal's.
        let described = |name: ServiceName, opts: &IssueOptions| {
            let issued = ca.issue("td", name, opts).unwrap();
            let der = first_cert(issued.cert_pem.as_bytes(), Path::new("issued")).unwrap();
            let (_, parsed) = X509Certificate::from_der(der.as_ref()).unwrap();
            let names: Vec<String> = parsed
                .subject_alternative_name()
                .unwrap()
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .filter_map(|name| match name {
                            GeneralName::DNSName(dns) => Some(dns.to_string()),
                            GeneralName::IPAddress(ip) => Some(format!("ip {ip:?}")),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let usage = parsed.extended_key_usage().unwrap().unwrap().value;
            (names, usage.server_auth, usage.client_auth)
        };
        let (edge, serves, client) = described(ServiceName::Edge, &opts);
        assert!(serves && client);
        assert_eq!(
            edge,
            ["muster-edge", "edge", "localhost", "ip [127, 0, 0, 1]"]
                .into_iter()
                .map(String::from)
                .chain([
                    format!("ip {:?}", std::net::Ipv6Addr::LOCALHOST.octets()),
                    "gw.example".into()
                ])
                .collect::<Vec<_>>()
        );
        let none = IssueOptions::valid_for(Duration::from_secs(3600));
        let (presence, serves, client) = described(ServiceName::Presence, &none);
        assert!(serves && client);
        assert_eq!(presence, ["muster-presence", "presence"]);
        let (ctl, serves, client) = described(ServiceName::Ctl, &none);
        assert!(!serves && client);
        assert!(ctl.is_empty(), "{ctl:?}");
    }

    #[test]
    fn a_key_that_is_not_its_certificates_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsDir::new(dir.path());
        let (ca, _) = tls.ensure_ca(Duration::from_secs(3600)).unwrap();
        let opts = IssueOptions::valid_for(Duration::from_secs(3600));
        assert!(
            tls.ensure_issued(&ca, "td", ServiceName::Edge, &opts)
                .unwrap()
        );
        assert!(
            !tls.ensure_issued(&ca, "td", ServiceName::Edge, &opts)
                .unwrap()
        );
        // A new key beside the current certificate: issued again.
        let files = tls.files(ServiceName::Edge);
        let other = ca.issue("td", ServiceName::Edge, &opts).unwrap();
        std::fs::write(&files.key, other.key_pem).unwrap();
        assert!(
            tls.ensure_issued(&ca, "td", ServiceName::Edge, &opts)
                .unwrap()
        );
        crate::install_crypto_provider();
        assert!(crate::MeshTls::load(files, "td").is_ok());

        // A CA file whose key is another CA's.
        let stranger = CertificateAuthority::generate("td", Duration::from_secs(3600)).unwrap();
        let mixed = CertificateAuthority::from_pem(ca.cert_pem(), &stranger.key_pem());
        assert!(matches!(mixed.err(), Some(TlsError::Identity(_))));
    }

    #[test]
    fn a_device_certificate_names_the_device_and_carries_its_key() {
        let ca = CertificateAuthority::generate("test ca", Duration::from_secs(3600)).unwrap();
        let device_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let spki = device_key.subject_public_key_info();
        let opts = IssueOptions::valid_for(Duration::from_secs(3600));
        let pem = ca
            .issue_device("td", "t1", "dev_abc", &spki, &opts)
            .unwrap();
        let der = first_cert(pem.as_bytes(), Path::new("device")).unwrap();
        let id = crate::peer_spiffe_id(&der).unwrap();
        assert_eq!(id.to_string(), "spiffe://td/tenant/t1/device/dev_abc");
        let (_, parsed) = X509Certificate::from_der(der.as_ref()).unwrap();
        assert_eq!(parsed.public_key().raw, spki.as_slice());

        for (tenant, device) in [
            ("", "dev_abc"),
            ("t/1", "dev_abc"),
            ("t1", "../x"),
            ("..", "d"),
        ] {
            assert!(
                ca.issue_device("td", tenant, device, &spki, &opts).is_err(),
                "{tenant:?} {device:?}"
            );
        }
        assert!(
            ca.issue_device("td", "t1", "dev_abc", b"not a key", &opts)
                .is_err()
        );
    }
}
