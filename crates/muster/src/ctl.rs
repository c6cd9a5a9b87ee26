//! The command line as a mesh client: it calls services with the `ctl`
//! certificate, finding them in the running host's `endpoints.json` or in
//! the configured peers.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use muster_mesh::{MeshChannel, channel};
use muster_tls::{MeshTls, ServiceName};

use crate::config::Config;
use crate::serve::Endpoints;

/// A connection to a muster deployment as its operator.
pub struct Ctl {
    tls: Arc<MeshTls>,
    config: Config,
    endpoints: Option<Endpoints>,
}

/// The running host's endpoints file in `config`'s data directory, if
/// its owner could have written it: the tools send the operator's token to
/// the edge it names and trust the certificates of the directory it names,
/// so a file that another user wrote or could change (a data directory in
/// a shared working directory) is ignored, with a word on stderr.
pub fn running_endpoints<T: serde::de::DeserializeOwned>(config: &Config) -> Option<T> {
    let path = config.endpoints_file();
    let file = std::fs::File::open(&path).ok()?;
    let untrusted = |meta: std::io::Result<std::fs::Metadata>, what: &str| {
        use std::os::unix::fs::MetadataExt;
        let meta = meta.ok()?;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            Some(format!(
                "{what} belongs to another user (uid {})",
                meta.uid()
            ))
        } else if crate::config::others_may_write(&meta) {
            Some(format!("{what} may be written by other users"))
        } else {
            None
        }
    };
    let why = untrusted(file.metadata(), "the file").or_else(|| {
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        untrusted(std::fs::metadata(dir), "its directory")
    });
    if let Some(why) = why {
        // Once, though a command may look for the host more than once.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| eprintln!("muster: ignoring {}: {why}", path.display()));
        return None;
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The running host's (or local cluster's) endpoints in `config`'s data
/// directory, with its trust domain and certificates adopted where the
/// command sets neither: a host started with `--trust-domain` or
/// `--tls-dir` is reached, and issued certificates, with `--data-dir`
/// alone.
pub fn adopt_running(config: &Config) -> (Config, Option<Endpoints>) {
    let endpoints: Option<Endpoints> = running_endpoints(config);
    let mut config = config.clone();
    if let Some(running) = &endpoints {
        if config.trust_domain == Config::default().trust_domain {
            config.trust_domain.clone_from(&running.trust_domain);
        }
        if config.tls_dir.is_none() {
            config.tls_dir = Some(running.tls_dir.clone().into());
        }
    }
    (config, endpoints)
}

impl Ctl {
    pub fn new(config: &Config) -> anyhow::Result<Ctl> {
        muster_tls::install_crypto_provider();
        let (config, endpoints) = adopt_running(config);
        let tls = MeshTls::load(config.tls().files(ServiceName::Ctl), &config.trust_domain)
            .with_context(|| {
                format!(
                    "loading the ctl certificate from {} for trust domain {} (is muster running \
                     with this --data-dir? a cluster's: --tls-dir and --trust-domain)",
                    config.tls().path().display(),
                    config.trust_domain
                )
            })?;
        Ok(Ctl {
            tls,
            config,
            endpoints,
        })
    }

    /// Where `name` listens: configured peers first, then the running
    /// single host.
    pub fn address(&self, name: ServiceName) -> anyhow::Result<String> {
        self.config
            .peers
            .get(name.as_str())
            .cloned()
            .or_else(|| {
                self.endpoints
                    .as_ref()
                    .and_then(|e| e.services.get(name.as_str()).cloned())
            })
            .ok_or_else(|| {
                anyhow!("no address for {name}: start muster (`muster serve`) or set peers.{name}")
            })
    }

    pub fn channel(&self, name: ServiceName) -> anyhow::Result<MeshChannel> {
        Ok(channel(self.tls.clone(), name, &self.address(name)?)?)
    }

    pub fn default_tenant(&self) -> &str {
        &self.config.default_tenant
    }
}
