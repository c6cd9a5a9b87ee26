//! The edge's batched calls to presence and the backplane, over real mTLS:
//! each change of a batch succeeds or fails alone, in order.

use muster_e2e::Host;
use muster_proto::v1 as pb;
use muster_proto::v1::backplane_client::BackplaneClient;
use muster_proto::v1::presence_client::PresenceClient;
use muster_tls::ServiceName;
use tonic::Code;

fn upsert(tenant: &str, id: &str) -> pb::InstanceChange {
    pb::InstanceChange {
        change: Some(pb::instance_change::Change::Upsert(pb::UpsertInstance {
            tenant_id: tenant.into(),
            entry: Some(pb::InstanceEntry {
                instance_id: id.into(),
                role: "node".into(),
                mode: "node".into(),
                last_input_seconds: -1,
                reason: "connect".into(),
                metadata_json: "{}".into(),
                ..Default::default()
            }),
        })),
    }
}

fn remove(tenant: &str, id: &str) -> pb::InstanceChange {
    pb::InstanceChange {
        change: Some(pb::instance_change::Change::Remove(pb::RemoveInstance {
            tenant_id: tenant.into(),
            instance_id: id.into(),
            ..Default::default()
        })),
    }
}

fn code(outcome: &pb::ItemOutcome) -> Code {
    Code::from_i32(outcome.code)
}

muster_e2e::on_both_stores! {
    async fn each_change_of_a_batch_succeeds_or_fails_alone(store: Option<String>) {
        let host = Host::start(store).await;
        let mut presence = PresenceClient::new(host.channel(ServiceName::Presence, ServiceName::Edge));
        let changes = vec![
            upsert("t-batch", "dev_a"),
            upsert("t-batch", " "),
            remove("t-batch", "dev_never"),
            pb::InstanceChange { change: None },
            upsert("", "dev_c"),
            upsert("t-batch", "dev_b"),
            remove("t-batch", "dev_a"),
        ];
        let outcomes = presence
            .update_instances(pb::UpdateInstancesRequest { changes })
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        let codes: Vec<(Code, bool, bool)> = outcomes
            .iter()
            .map(|o| {
                let outcome = o.outcome.as_ref().unwrap();
                (code(outcome), outcome.changed, o.entry.is_some())
            })
            .collect();
        assert_eq!(
            codes,
            [
                (Code::Ok, true, true),
                (Code::InvalidArgument, false, false),
                (Code::Ok, false, false),
                (Code::InvalidArgument, false, false),
                (Code::InvalidArgument, false, false),
                (Code::Ok, true, true),
                (Code::Ok, true, false),
            ]
        );
        assert!(outcomes[0].entry.as_ref().unwrap().last_seen_at_ms > 0);
        let listed = presence
            .list_instances(pb::ListInstancesRequest {
                tenant_id: "t-batch".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        let ids: Vec<&str> = listed.iter().map(|e| e.instance_id.as_str()).collect();
        assert_eq!(ids, ["dev_b"]);

        // Too many changes: the whole call is refused and nothing is written.
        let changes = (0..=muster_proto::MAX_BATCH_ITEMS)
            .map(|n| upsert("t-big", &format!("dev_{n}")))
            .collect();
        let refused = presence
            .update_instances(pb::UpdateInstancesRequest { changes })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        let listed = presence
            .list_instances(pb::ListInstancesRequest {
                tenant_id: "t-big".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert!(listed.is_empty());

        let mut backplane =
            BackplaneClient::new(host.channel(ServiceName::Backplane, ServiceName::Edge));
        let register = |connection: &str, tenant: &str| pb::ConnectionChange {
            change: Some(pb::connection_change::Change::Register(
                pb::RegisterConnection {
                    connection_id: connection.into(),
                    tenant_id: tenant.into(),
                    device_id: "dev_a".into(),
                    edge_id: "edge-x".into(),
                    role: "node".into(),
                },
            )),
        };
        let unregister = |connection: &str| pb::ConnectionChange {
            change: Some(pb::connection_change::Change::Unregister(
                pb::UnregisterConnection {
                    edge_id: "edge-x".into(),
                    connection_id: connection.into(),
                },
            )),
        };
        let changes = vec![
            register("c1", "t-batch"),
            register("c2", ""),
            unregister("c-never"),
            register("c3", "t-batch"),
            unregister("c1"),
        ];
        let outcomes = backplane
            .update_connections(pb::UpdateConnectionsRequest { changes })
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        let codes: Vec<(Code, bool)> = outcomes.iter().map(|o| (code(o), o.changed)).collect();
        assert_eq!(
            codes,
            [
                (Code::Ok, true),
                (Code::InvalidArgument, false),
                (Code::Ok, false),
                (Code::Ok, true),
                (Code::Ok, true),
            ]
        );
        let held = backplane
            .heartbeat_edge(pb::HeartbeatEdgeRequest {
                edge_id: "edge-x".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .connection_ids;
        assert_eq!(held, ["c3"]);

        // Only the edge may send these.
        let mut as_ctl = PresenceClient::new(host.channel(ServiceName::Presence, ServiceName::Ctl));
        let denied = as_ctl
            .update_instances(pb::UpdateInstancesRequest { changes: vec![] })
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        host.stop().await;
    }
}
