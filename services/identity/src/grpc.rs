use muster_mesh::{Rule, ServiceSpec, to_status};
use muster_proto::v1::identity_server::{Identity, IdentityServer};
use muster_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, TokenClaims, TokenInfo, UpdateTokenRequest, VerifyTokenRequest,
};
use muster_tls::ServiceName::{Ctl, Edge};
use tonic::{Request, Response, Status};

use crate::{TokenChange, TokenRecord, Tokens};

/// Who may call what on identity; everything else is denied.
pub const RULES: &[Rule] = &[
    Rule::new("/muster.v1.Identity/VerifyToken", &[Edge]),
    Rule::new("/muster.v1.Identity/CreateToken", &[Edge, Ctl]),
    Rule::new("/muster.v1.Identity/RevokeToken", &[Edge, Ctl]),
    Rule::new("/muster.v1.Identity/UpdateToken", &[Edge, Ctl]),
    Rule::new("/muster.v1.Identity/ListTokens", &[Edge, Ctl]),
];

/// The gRPC face of [`Tokens`].
pub struct IdentityService {
    tokens: Tokens,
}

/// Identity as the mesh serves it.
pub fn spec(tokens: Tokens) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Identity,
        grpc_service: "muster.v1.Identity",
        routes: tonic::service::Routes::new(IdentityServer::new(IdentityService { tokens })),
        rules: RULES,
    }
}

fn info(record: TokenRecord) -> TokenInfo {
    TokenInfo {
        token_id: record.token_id,
        tenant_id: record.tenant_id,
        role: record.role.as_str().into(),
        scopes: record.scopes,
        label: record.label,
        created_at_ms: record.created_at_ms,
        revoked_at_ms: record.revoked_at_ms.unwrap_or(0),
        device_id: record.device_id.unwrap_or_default(),
        expires_at_ms: record.expires_at_ms.unwrap_or(0),
        updated_at_ms: record.updated_at_ms,
        issued_by: record.issued_by.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let r = request.into_inner();
        let role = r.role.parse().map_err(|e| to_status(&e))?;
        let (record, secret) = self
            .tokens
            .create_expiring_by(
                &r.tenant_id,
                role,
                r.scopes,
                &r.label,
                Some(r.device_id.as_str()).filter(|d| !d.is_empty()),
                Some(r.ttl_seconds).filter(|ttl| *ttl != 0),
                Some(r.expires_by_ms).filter(|at| *at != 0),
                Some(r.issued_by.as_str()).filter(|id| !id.is_empty()),
            )
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(CreateTokenResponse {
            info: Some(info(record)),
            token: secret.expose().to_owned(),
        }))
    }

    async fn verify_token(
        &self,
        request: Request<VerifyTokenRequest>,
    ) -> Result<Response<TokenClaims>, Status> {
        let record = self
            .tokens
            .verify(&request.into_inner().token)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(TokenClaims {
            token_id: record.token_id,
            tenant_id: record.tenant_id,
            role: record.role.as_str().into(),
            scopes: record.scopes,
            device_id: record.device_id.unwrap_or_default(),
            expires_at_ms: record.expires_at_ms.unwrap_or(0),
            updated_at_ms: record.updated_at_ms,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let r = request.into_inner();
        let record = self
            .tokens
            .revoke(
                &r.token_id,
                Some(r.tenant_id.as_str()).filter(|t| !t.is_empty()),
                r.if_updated_at_ms,
            )
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(info(record)))
    }

    async fn update_token(
        &self,
        request: Request<UpdateTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let r = request.into_inner();
        let role = match r.role {
            Some(role) => Some(role.parse().map_err(|e| to_status(&e))?),
            None => None,
        };
        let change = TokenChange {
            label: r.label,
            role,
            device_id: r.device_id.map(|d| Some(d).filter(|d| !d.is_empty())),
            scopes: r.scopes.map(|s| s.scopes),
            expires_at_ms: r.expires_at_ms.map(|at| Some(at).filter(|at| *at != 0)),
            only_in_tenant: Some(r.tenant_id).filter(|t| !t.is_empty()),
            only_if_updated_at_ms: r.if_updated_at_ms,
        };
        let record = self
            .tokens
            .update(&r.token_id, change)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(info(record)))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let r = request.into_inner();
        let records = if r.token_id.is_empty() {
            self.tokens.list(&r.tenant_id).await
        } else {
            self.tokens.list_one(&r.tenant_id, &r.token_id).await
        }
        .map_err(|e| to_status(&e))?;
        Ok(Response::new(ListTokensResponse {
            tokens: records.into_iter().map(info).collect(),
        }))
    }
}
