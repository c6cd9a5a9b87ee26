use muster_tls::ServiceName;
use tonic::Status;

use crate::PeerInfo;

/// Who may call one RPC, by its full gRPC path
/// (`/muster.v1.Identity/VerifyToken`).
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub method: &'static str,
    pub callers: &'static [ServiceName],
}

impl Rule {
    pub const fn new(method: &'static str, callers: &'static [ServiceName]) -> Rule {
        Rule { method, callers }
    }
}

/// Open to every principal of the trust domain: probing and discovery.
/// Whole methods, not prefixes: any other path is refused, so that no
/// caller can make up paths that pass.
const OPEN_METHODS: [&str; 3] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// The metadata key of a refusal by the mesh itself (not by a service's
/// own rule): a caller acting for a client reports it as its own fault,
/// without the identities and paths it names.
pub const REFUSED_BY_MESH: &str = "muster-refused-by-mesh";

/// Decides whether `peer` may call `path` under `rules`, before any handler
/// runs. Returns the caller's identity when it may.
pub fn authorize(
    rules: &[Rule],
    trust_domain: &str,
    path: &str,
    peer: Option<&PeerInfo>,
) -> Result<ServiceName, Status> {
    let id = peer
        .and_then(|p| p.spiffe_id.as_ref())
        .ok_or_else(|| Status::unauthenticated("client certificate carries no spiffe id"))?;
    // The handshake checked the certificate; a long-lived connection may
    // outlast it (there is no revocation list, so expiry is the cut-off).
    if peer.is_some_and(PeerInfo::certificate_expired) {
        return Err(Status::unauthenticated(format!(
            "{id}'s certificate expired after this connection began"
        )));
    }
    if id.trust_domain != trust_domain {
        return Err(Status::unauthenticated(format!(
            "{id} is not of trust domain {trust_domain}"
        )));
    }
    let caller = id
        .service()
        .ok_or_else(|| Status::permission_denied(format!("{id} names no muster service")))?;
    let allowed = OPEN_METHODS.contains(&path)
        || rules
            .iter()
            .any(|rule| rule.method == path && rule.callers.contains(&caller));
    if allowed {
        Ok(caller)
    } else {
        Err(Status::permission_denied(format!(
            "{id} may not call {path}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use muster_tls::SpiffeId;

    use super::*;

    const RULES: &[Rule] = &[Rule::new(
        "/muster.v1.Identity/VerifyToken",
        &[ServiceName::Edge],
    )];

    fn peer(id: &str) -> PeerInfo {
        PeerInfo {
            remote_addr: None,
            spiffe_id: Some(id.parse::<SpiffeId>().unwrap()),
            not_after: None,
        }
    }

    #[test]
    fn only_listed_callers_reach_listed_methods() {
        let verify = "/muster.v1.Identity/VerifyToken";
        let edge = peer("spiffe://td/service/edge");
        let presence = peer("spiffe://td/service/presence");
        assert_eq!(
            authorize(RULES, "td", verify, Some(&edge)).unwrap(),
            ServiceName::Edge
        );
        let denied = authorize(RULES, "td", verify, Some(&presence)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        // Not in the table: denied to everyone.
        let unlisted = authorize(RULES, "td", "/muster.v1.Identity/CreateToken", Some(&edge));
        assert_eq!(unlisted.unwrap_err().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn calls_on_a_connection_whose_certificate_expired_since_are_refused() {
        let verify = "/muster.v1.Identity/VerifyToken";
        let mut edge = peer("spiffe://td/service/edge");
        edge.not_after = Some(1);
        let refused = authorize(RULES, "td", verify, Some(&edge)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        edge.not_after = Some(i64::MAX);
        assert!(authorize(RULES, "td", verify, Some(&edge)).is_ok());
    }

    #[test]
    fn health_is_open_to_the_trust_domain_only() {
        let check = "/grpc.health.v1.Health/Check";
        assert!(authorize(RULES, "td", check, Some(&peer("spiffe://td/service/ctl"))).is_ok());
        // Its methods, not any path under its name.
        for made_up in [
            "/grpc.health.v1.Health/Nope",
            "/grpc.health.v1.Health/Check/x",
            "/grpc.reflection.v1.ServerReflection/Other",
        ] {
            let denied = authorize(RULES, "td", made_up, Some(&peer("spiffe://td/service/ctl")));
            assert_eq!(
                denied.unwrap_err().code(),
                tonic::Code::PermissionDenied,
                "{made_up}"
            );
        }
        let foreign = authorize(
            RULES,
            "td",
            check,
            Some(&peer("spiffe://other/service/edge")),
        );
        assert_eq!(foreign.unwrap_err().code(), tonic::Code::Unauthenticated);
        let device = authorize(
            RULES,
            "td",
            check,
            Some(&peer("spiffe://td/tenant/t/device/d")),
        );
        assert_eq!(device.unwrap_err().code(), tonic::Code::PermissionDenied);
        let anonymous = authorize(RULES, "td", check, None);
        assert_eq!(anonymous.unwrap_err().code(), tonic::Code::Unauthenticated);
    }
}
