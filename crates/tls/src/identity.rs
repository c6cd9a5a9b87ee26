use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

/// A principal of the mesh: one of the services, or `ctl`, the operator's
/// command line (`muster health`, `muster token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceName {
    Edge,
    Presence,
    Backplane,
    Identity,
    Approvals,
    Execution,
    Ctl,
}

impl ServiceName {
    /// The six services, in start order (the edge last: it calls the rest).
    pub const SERVICES: [ServiceName; 6] = [
        ServiceName::Backplane,
        ServiceName::Identity,
        ServiceName::Approvals,
        ServiceName::Presence,
        ServiceName::Execution,
        ServiceName::Edge,
    ];

    /// Every principal a CA issues for, services and `ctl`.
    pub const ALL: [ServiceName; 7] = [
        ServiceName::Backplane,
        ServiceName::Identity,
        ServiceName::Approvals,
        ServiceName::Presence,
        ServiceName::Execution,
        ServiceName::Edge,
        ServiceName::Ctl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Edge => "edge",
            ServiceName::Presence => "presence",
            ServiceName::Backplane => "backplane",
            ServiceName::Identity => "identity",
            ServiceName::Approvals => "approvals",
            ServiceName::Execution => "execution",
            ServiceName::Ctl => "ctl",
        }
    }

    /// The DNS name clients verify the server certificate against, whatever
    /// address they dial (it is also the Kubernetes Service name).
    pub fn server_name(self) -> String {
        format!("muster-{}", self.as_str())
    }

    pub fn spiffe_id(self, trust_domain: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_owned(),
            path: format!("/service/{}", self.as_str()),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceName {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| TlsError::Identity(format!("unknown service name {s:?}")))
    }
}

/// A SPIFFE id, `spiffe://<trust_domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub path: String,
}

impl SpiffeId {
    /// The service this id names, if it is `/service/<name>`.
    pub fn service(&self) -> Option<ServiceName> {
        self.path.strip_prefix("/service/")?.parse().ok()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TlsError::Identity(format!("not a spiffe id: {s:?}"));
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let slash = rest.find('/').ok_or_else(bad)?;
        let (trust_domain, path) = rest.split_at(slash);
        if trust_domain.is_empty() || path.len() < 2 || path.contains("//") {
            return Err(bad());
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// The SPIFFE id in a (TLS-verified) peer certificate's URI SANs. A
/// certificate with none, or with more than one, has no identity.
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => uri.parse::<SpiffeId>().ok(),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// When `cert` stops being valid, in seconds since the epoch.
pub fn cert_not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_name_services() {
        let id: SpiffeId = "spiffe://muster.local/service/identity".parse().unwrap();
        assert_eq!(id.service(), Some(ServiceName::Identity));
        assert_eq!(id.to_string(), "spiffe://muster.local/service/identity");
        let tenant: SpiffeId = "spiffe://td/tenant/t1/device/dev_x".parse().unwrap();
        assert_eq!(tenant.service(), None);
        for bad in [
            "https://td/service/edge",
            "spiffe://",
            "spiffe://td",
            "spiffe:///service/x",
            "spiffe://td/",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
        assert!(
            "spiffe://td/service/nosuch"
                .parse::<SpiffeId>()
                .unwrap()
                .service()
                .is_none()
        );
    }
}
