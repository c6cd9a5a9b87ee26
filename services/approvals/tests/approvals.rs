//! Approval requests on SQLite and on Postgres.

use std::sync::Arc;

use muster_approvals::{ApprovalError, Approvals, Decision, Status};
use muster_store::Store;
use serde_json::json;

fn approve(by: &str) -> Decision {
    Decision {
        approve: true,
        decided_by: by.into(),
        reason: String::new(),
    }
}

async fn event_kinds(store: &Store) -> Vec<String> {
    muster_store::testing::outbox_items(store, "t1")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.kind)
        .collect()
}

muster_store::backend_suite! {
    async fn a_request_is_decided_once(store: Store) {
        let approvals = Approvals::new(Arc::new(store.clone()));
        let created = approvals.create("t1", "pairing", json!({"device_id": "dev_a"}), None).await.unwrap();
        assert_eq!(created.status, Status::Pending);
        assert_eq!(approvals.list("t1", Some(Status::Pending), "", 0).await.unwrap().0.len(), 1);

        let decided = approvals.decide("t1", &created.approval_id, approve("alice")).await.unwrap();
        assert_eq!(decided.status, Status::Approved);
        assert_eq!(approvals.get("t1", &created.approval_id).await.unwrap(), decided);

        let again = approvals.decide("t1", &created.approval_id, Decision { approve: false, ..approve("bob") }).await;
        assert!(matches!(again, Err(ApprovalError::NotPending { status: "approved", .. })));
        // Alice's decision again (a retry after a lost reply) answers as
        // the first did; any other of hers is refused.
        assert_eq!(approvals.decide("t1", &created.approval_id, approve("alice")).await.unwrap(), decided);
        for other in [Decision { approve: false, ..approve("alice") }, Decision { reason: "later".into(), ..approve("alice") }] {
            let refused = approvals.decide("t1", &created.approval_id, other).await;
            assert!(matches!(refused, Err(ApprovalError::NotPending { status: "approved", .. })), "{refused:?}");
        }
        assert_eq!(event_kinds(&store).await, vec!["approval.requested", "approval.resolved"]);
    }

    async fn listings_come_a_page_at_a_time_with_statuses_in_the_store(store: Store) {
        let approvals = Approvals::new(Arc::new(store.clone()));
        let mut created = Vec::new();
        for n in 0..7 {
            // Some share a millisecond: the id orders them then.
            if n % 2 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            let ttl = (n == 6).then_some(1);
            created.push(approvals.create("t1", "capability", json!({"n": n}), ttl).await.unwrap());
        }
        approvals.create("t2", "capability", json!({}), None).await.unwrap();
        approvals.decide("t1", &created[0].approval_id, approve("alice")).await.unwrap();
        approvals.decide("t1", &created[1].approval_id, Decision { approve: false, ..approve("alice") }).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;

        let mut listed = Vec::new();
        let mut cursor = String::new();
        loop {
            let (page, next) = approvals.list("t1", None, &cursor, 3).await.unwrap();
            assert!(page.len() <= 3);
            listed.extend(page);
            match next {
                Some(next) => cursor = next,
                None => break,
            }
        }
        let mut expected = created.clone();
        expected.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.approval_id.cmp(&b.approval_id)));
        let ids = |list: &[muster_approvals::Approval]| list.iter().map(|a| a.approval_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&listed), ids(&expected));

        let count = |status| {
            let approvals = approvals.clone();
            async move { approvals.list("t1", Some(status), "", 0).await.unwrap().0.len() }
        };
        assert_eq!((count(Status::Pending).await, count(Status::Expired).await), (4, 1));
        assert_eq!((count(Status::Approved).await, count(Status::Denied).await), (1, 1));
        let (expired, _) = approvals.list("t1", Some(Status::Expired), "", 0).await.unwrap();
        assert_eq!((expired[0].approval_id.as_str(), expired[0].status), (created[6].approval_id.as_str(), Status::Expired));

        for (cursor, limit) in [("", muster_approvals::LIST_MAX + 1), ("not a cursor", 1), ("x:y", 1)] {
            let refused = approvals.list("t1", None, cursor, limit).await;
            assert!(matches!(refused, Err(ApprovalError::Invalid(_))), "{cursor:?} {limit}");
        }
    }

    async fn the_store_refuses_a_decision_past_expiry_itself(store: Store) {
        use muster_approvals::ApprovalStore;
        // Past the service's own check (a request that expired between
        // its read and the write): the store's condition refuses it.
        let approvals = Approvals::new(Arc::new(store.clone()));
        let created = approvals.create("t1", "capability", json!({}), Some(1)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let decided = muster_approvals::Approval {
            status: Status::Approved,
            decided_at_ms: Some(muster_store::now_ms()),
            decided_by: Some("alice".into()),
            ..created.clone()
        };
        let event = muster_store::outbox::NewItem::event("t1", "approval.resolved", json!({}));
        assert!(!store.decide_approval(&decided, &event).await.unwrap());
        assert_eq!(event_kinds(&store).await, vec!["approval.requested"]);
        assert_eq!(approvals.get("t1", &created.approval_id).await.unwrap().status, Status::Expired);
    }

    async fn other_tenants_cannot_see_or_decide(store: Store) {
        let approvals = Approvals::new(Arc::new(store.clone()));
        let created = approvals.create("t1", "pairing", json!({}), None).await.unwrap();
        assert!(matches!(approvals.get("t2", &created.approval_id).await, Err(ApprovalError::NotFound(_))));
        assert!(matches!(approvals.decide("t2", &created.approval_id, approve("eve")).await, Err(ApprovalError::NotFound(_))));
        assert!(approvals.list("t2", None, "", 0).await.unwrap().0.is_empty());
        assert_eq!(approvals.get("t1", &created.approval_id).await.unwrap().status, Status::Pending);
    }

    async fn an_expired_request_cannot_be_decided(store: Store) {
        let approvals = Approvals::new(Arc::new(store.clone()));
        let created = approvals.create("t1", "capability", json!({}), Some(1)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(approvals.get("t1", &created.approval_id).await.unwrap().status, Status::Expired);
        let late = approvals.decide("t1", &created.approval_id, approve("alice")).await;
        assert!(matches!(late, Err(ApprovalError::NotPending { status: "expired", .. })));
        assert_eq!(event_kinds(&store).await, vec!["approval.requested"]);
    }

    async fn racing_approvers_cannot_both_win(store: Store) {
        let approvals = Approvals::new(Arc::new(store.clone()));
        let created = approvals.create("t1", "pairing", json!({}), None).await.unwrap();
        let mut tasks = Vec::new();
        for n in 0..8 {
            let approvals = approvals.clone();
            let id = created.approval_id.clone();
            tasks.push(tokio::spawn(async move { approvals.decide("t1", &id, approve(&format!("op{n}"))).await }));
        }
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(ApprovalError::NotPending { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(event_kinds(&store).await.iter().filter(|k| *k == "approval.resolved").count(), 1);
    }

    async fn bad_requests_change_nothing(store: Store) {
        let approvals = Approvals::new(Arc::new(store.clone()));
        for (tenant, kind, context, ttl) in [
            ("", "pairing", json!({}), None),
            ("t1", "", json!({}), None),
            ("t1", "pairing", json!("not an object"), None),
            ("t1", "pairing", json!({"blob": "x".repeat(20_000)}), None),
            ("t1", "pairing", json!({}), Some(0)),
            ("t1", "pairing", json!({}), Some(i64::MAX)),
            (&*"t".repeat(257), "pairing", json!({}), None),
        ] {
            let result = approvals.create(tenant, kind, context, ttl).await;
            assert!(matches!(result, Err(ApprovalError::Invalid(_))), "{result:?}");
        }
        // A secret-named field is the caller's mistake, not the service's.
        let secret = approvals.create("t1", "pairing", json!({"api_key": "x"}), None).await;
        assert_eq!(secret.as_ref().map_err(muster_mesh::ServiceError::code).err(), Some(muster_mesh::ErrorCode::InvalidArgument), "{secret:?}");
        // A value Postgres cannot store is the caller's bad input too.
        for (tenant, kind) in [("t\0a", "pairing"), ("t1", "pair\0ing")] {
            let nul = approvals.create(tenant, kind, json!({}), None).await;
            assert_eq!(nul.as_ref().map_err(muster_mesh::ServiceError::code).err(), Some(muster_mesh::ErrorCode::InvalidArgument), "{nul:?}");
        }
        let created = approvals.create("t1", "pairing", json!({}), None).await.unwrap();
        let long = approvals.decide("t1", &created.approval_id, approve(&"x".repeat(257))).await;
        assert!(matches!(long, Err(ApprovalError::Invalid(_))), "{long:?}");
        let anonymous = approvals.decide("t1", &created.approval_id, approve(" ")).await;
        assert!(matches!(anonymous, Err(ApprovalError::Invalid(_))));
        // NUL, which SQLite would keep and Postgres refuse, in who decided
        // and why.
        let nul_by = approvals.decide("t1", &created.approval_id, approve("al\0ice")).await;
        assert!(matches!(nul_by, Err(ApprovalError::Invalid(_))), "{nul_by:?}");
        let nul_reason = approvals
            .decide("t1", &created.approval_id, Decision { reason: "because\0".into(), ..approve("alice") })
            .await;
        assert!(matches!(nul_reason, Err(ApprovalError::Invalid(_))), "{nul_reason:?}");
        assert_eq!(approvals.get("t1", &created.approval_id).await.unwrap().status, Status::Pending);
        assert_eq!(event_kinds(&store).await, vec!["approval.requested"]);
    }
}
