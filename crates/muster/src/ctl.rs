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

/// The running host's (or local cluster's) endpoints in `config`'s data
/// directory, with its trust domain and certificates adopted where the
/// command sets neither: a host started with `--trust-domain` or
/// `--tls-dir` is reached, and issued certificates, with `--data-dir`
/// alone.
pub fn adopt_running(config: &Config) -> (Config, Option<Endpoints>) {
    let endpoints: Option<Endpoints> = std::fs::read(config.endpoints_file())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
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
