//! Instance presence on SQLite and on Postgres.

use std::sync::Arc;

use muster_presence::{InstanceEntry, InstanceRole, Instances, PresenceError};
use muster_store::{Store, outbox};

fn node(id: &str, host: &str) -> InstanceEntry {
    InstanceEntry {
        instance_id: id.into(),
        role: InstanceRole::Node,
        reported_host: host.into(),
        reported_ip: "10.0.0.9".into(),
        observed_ip: "127.0.0.1".into(),
        version: "1.2.3".into(),
        mode: "ui".into(),
        last_seen_at_ms: 0,
        last_input_seconds: Some(3),
        reason: "connect".into(),
    }
}

muster_store::backend_suite! {
    async fn a_reconnect_updates_the_same_entry(store: Store) {
        let presence = Instances::new(Arc::new(store.clone()));
        let first = presence.upsert("t1", node("dev_a", "lab-1")).await.unwrap();
        assert!(first.last_seen_at_ms > 0);
        let second = presence.upsert("t1", InstanceEntry { reason: "beacon".into(), ..node("dev_a", "lab-2") }).await.unwrap();
        let listed = presence.list("t1").await.unwrap();
        assert_eq!(listed, vec![second]);
        assert_eq!(listed[0].reported_host, "lab-2");
        assert!(presence.list("t2").await.unwrap().is_empty());

        let events = outbox::read_after(&store, "t1", 0, 10).await.unwrap();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.kind == "presence.upserted" && e.audience_roles == vec!["client".to_string()]));
        assert_eq!(events[1].payload["reported"]["host"], "lab-2");
    }

    async fn bad_entries_change_nothing(store: Store) {
        let presence = Instances::new(Arc::new(store.clone()));
        let empty = presence.upsert("t1", node(" ", "h")).await;
        assert!(matches!(empty, Err(PresenceError::Invalid(_))));
        let long = presence.upsert("t1", node("dev_a", &"h".repeat(300))).await;
        assert!(matches!(long, Err(PresenceError::Invalid(_))));
        let negative = presence.upsert("t1", InstanceEntry { last_input_seconds: Some(-5), ..node("dev_a", "h") }).await;
        assert!(matches!(negative, Err(PresenceError::Invalid(_))));
        assert!("ghost".parse::<InstanceRole>().is_err());
        assert!(presence.list("t1").await.unwrap().is_empty());
        assert!(outbox::read_after(&store, "t1", 0, 10).await.unwrap().is_empty());
    }
}
