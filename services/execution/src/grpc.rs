use muster_mesh::{Rule, ServiceSpec, to_status};
use muster_proto::v1 as pb;
use muster_proto::v1::execution_server::{Execution, ExecutionServer};
use muster_tls::ServiceName::{Ctl, Edge};
use tonic::{Request, Response, Status};

use crate::{Run, RunError, Runs};

/// Who may call what on execution; everything else is denied.
pub const RULES: &[Rule] = &[
    Rule::new("/muster.v1.Execution/EnqueueRun", &[Edge, Ctl]),
    Rule::new("/muster.v1.Execution/GetRun", &[Edge, Ctl]),
];

/// The gRPC face of [`Runs`].
pub struct ExecutionService {
    runs: Runs,
}

/// Execution as the mesh serves it.
pub fn spec(runs: Runs) -> ServiceSpec {
    ServiceSpec {
        name: muster_tls::ServiceName::Execution,
        grpc_service: "muster.v1.Execution",
        routes: tonic::service::Routes::new(ExecutionServer::new(ExecutionService { runs })),
        rules: RULES,
    }
}

fn to_pb(r: Run) -> pb::Run {
    pb::Run {
        run_id: r.run_id,
        tenant_id: r.tenant_id,
        idempotency_key: r.idempotency_key,
        spec_json: r.spec.to_string(),
        status: r.status,
        created_at_ms: r.created_at_ms,
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    async fn enqueue_run(
        &self,
        request: Request<pb::EnqueueRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = request.into_inner();
        let spec = serde_json::from_str(&r.spec_json)
            .map_err(|e| to_status(&RunError::Invalid(format!("spec_json: {e}"))))?;
        let run = self
            .runs
            .enqueue(&r.tenant_id, &r.idempotency_key, spec)
            .await
            .map_err(|e| to_status(&e))?
            .run();
        Ok(Response::new(to_pb(run)))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = request.into_inner();
        let run = self
            .runs
            .get(&r.tenant_id, &r.run_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(to_pb(run)))
    }
}
