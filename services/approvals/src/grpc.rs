use muster_mesh::{Rule, ServiceSpec, to_status};
use muster_proto::v1 as pb;
use muster_proto::v1::approvals_server::{Approvals as ApprovalsRpc, ApprovalsServer};
use muster_tls::ServiceName::{Ctl, Edge, Execution, Identity};
use tonic::{Request, Response, Status as GrpcStatus};

use crate::{Approval, ApprovalError, Approvals, Decision, Status};

/// Who may call what on approvals; everything else is denied.
pub const RULES: &[Rule] = &[
    Rule::new(
        "/muster.v1.Approvals/CreateApproval",
        &[Identity, Execution, Edge],
    ),
    Rule::new(
        "/muster.v1.Approvals/GetApproval",
        &[Identity, Execution, Edge, Ctl],
    ),
    Rule::new("/muster.v1.Approvals/ListApprovals", &[Edge, Ctl]),
    Rule::new("/muster.v1.Approvals/DecideApproval", &[Edge, Ctl]),
];

/// The gRPC face of [`Approvals`].
pub struct ApprovalsService {
    approvals: Approvals,
}

/// Approvals as the mesh serves it.
pub fn spec(approvals: Approvals) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Approvals,
        grpc_service: "muster.v1.Approvals",
        routes: tonic::service::Routes::new(ApprovalsServer::new(ApprovalsService { approvals })),
        rules: RULES,
    }
}

fn to_pb(a: Approval) -> pb::Approval {
    pb::Approval {
        approval_id: a.approval_id,
        tenant_id: a.tenant_id,
        kind: a.kind,
        context_json: a.context.to_string(),
        status: a.status.as_str().into(),
        created_at_ms: a.created_at_ms,
        expires_at_ms: a.expires_at_ms,
        decided_at_ms: a.decided_at_ms.unwrap_or(0),
        decided_by: a.decided_by.unwrap_or_default(),
        reason: a.reason.unwrap_or_default(),
    }
}

fn status(e: ApprovalError) -> GrpcStatus {
    to_status(&e)
}

#[tonic::async_trait]
impl ApprovalsRpc for ApprovalsService {
    async fn create_approval(
        &self,
        request: Request<pb::CreateApprovalRequest>,
    ) -> Result<Response<pb::Approval>, GrpcStatus> {
        let r = request.into_inner();
        let context = if r.context_json.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_str(&r.context_json)
                .map_err(|e| status(ApprovalError::Invalid(format!("context_json: {e}"))))?
        };
        let ttl = (r.ttl_ms != 0).then_some(r.ttl_ms);
        let created = self
            .approvals
            .create(&r.tenant_id, &r.kind, context, ttl)
            .await
            .map_err(status)?;
        Ok(Response::new(to_pb(created)))
    }

    async fn get_approval(
        &self,
        request: Request<pb::GetApprovalRequest>,
    ) -> Result<Response<pb::Approval>, GrpcStatus> {
        let r = request.into_inner();
        let found = self
            .approvals
            .get(&r.tenant_id, &r.approval_id)
            .await
            .map_err(status)?;
        Ok(Response::new(to_pb(found)))
    }

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, GrpcStatus> {
        let r = request.into_inner();
        let wanted =
            match r.status.as_str() {
                "" => None,
                s => Some(Status::parse(s).ok_or_else(|| {
                    status(ApprovalError::Invalid(format!("unknown status {s:?}")))
                })?),
            };
        let (found, next) = self
            .approvals
            .list(&r.tenant_id, wanted, &r.cursor, r.limit)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: found.into_iter().map(to_pb).collect(),
            next_cursor: next.unwrap_or_default(),
        }))
    }

    async fn decide_approval(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::Approval>, GrpcStatus> {
        let r = request.into_inner();
        let approve = match pb::Verdict::try_from(r.verdict) {
            Ok(pb::Verdict::Approve) => true,
            Ok(pb::Verdict::Deny) => false,
            _ => {
                return Err(status(ApprovalError::Invalid(
                    "verdict is required: VERDICT_APPROVE or VERDICT_DENY".into(),
                )));
            }
        };
        let decided = self
            .approvals
            .decide(
                &r.tenant_id,
                &r.approval_id,
                Decision {
                    approve,
                    decided_by: r.decided_by,
                    reason: r.reason,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(to_pb(decided)))
    }
}
