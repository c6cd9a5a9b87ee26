//! The connection directory, on SQLite and on Postgres.

use muster_backplane::directory::{DirectoryStore, Registration};
use muster_store::outbox::Target;
use muster_store::{Store, StoreError};

fn registration(connection: &str, device: &str, edge: &str) -> Registration {
    Registration {
        connection_id: connection.into(),
        tenant_id: "t1".into(),
        device_id: device.into(),
        edge_id: edge.into(),
        role: "node".into(),
    }
}

muster_store::backend_suite! {
    async fn records_route_directed_items_and_expire_without_heartbeats(store: Store) {
        store.register(&registration("c1", "dev_a", "edge-1")).await.unwrap();
        store.register(&registration("c2", "dev_b", "edge-2")).await.unwrap();
        let device_a = Target::Device("dev_a".into());
        assert!(store.holds("edge-1", "t1", &device_a).await.unwrap());
        assert!(!store.holds("edge-2", "t1", &device_a).await.unwrap());
        // Never across tenants.
        assert!(!store.holds("edge-1", "t2", &device_a).await.unwrap());
        assert!(store.holds("edge-2", "t1", &Target::Connection("c2".into())).await.unwrap());
        assert!(store.holds("edge-2", "t1", &Target::Edge("edge-2".into())).await.unwrap());
        assert!(!store.holds("edge-1", "t1", &Target::Edge("edge-2".into())).await.unwrap());

        // A device that moves to another edge is found there.
        store.register(&registration("c1", "dev_a", "edge-2")).await.unwrap();
        assert!(store.holds("edge-2", "t1", &device_a).await.unwrap());
        assert!(!store.holds("edge-1", "t1", &device_a).await.unwrap());
        assert_eq!(store.heartbeat("edge-2").await.unwrap().len(), 2);
        assert!(store.heartbeat("edge-1").await.unwrap().is_empty());

        // Only the owning edge unregisters a connection.
        assert!(!store.unregister("edge-1", "c2").await.unwrap());
        assert!(store.unregister("edge-2", "c2").await.unwrap());

        // Rows of an edge that stops heartbeating expire; a heartbeat
        // before that keeps them.
        sqlx::query("UPDATE connections SET expires_at_ms = 0").execute(store.pool()).await.unwrap();
        assert!(!store.holds("edge-2", "t1", &device_a).await.unwrap(), "an expired row routes nothing");
        assert_eq!(store.heartbeat("edge-2").await.unwrap(), vec!["c1".to_string()]);
        assert_eq!(store.expire().await.unwrap(), 0);
        sqlx::query("UPDATE connections SET expires_at_ms = 0").execute(store.pool()).await.unwrap();
        assert_eq!(store.expire().await.unwrap(), 1);
        assert!(store.heartbeat("edge-2").await.unwrap().is_empty());

        store.register(&registration("c3", "dev_c", "edge-3")).await.unwrap();
        assert_eq!(store.forget_edge("edge-3").await.unwrap(), 1);
    }

    async fn bad_registrations_are_refused_and_change_nothing(store: Store) {
        for bad in [
            Registration { connection_id: " ".into(), ..registration("c", "d", "e") },
            Registration { tenant_id: "".into(), ..registration("c", "d", "e") },
            Registration { role: "admin".into(), ..registration("c", "d", "e") },
        ] {
            assert!(matches!(store.register(&bad).await, Err(StoreError::Invalid { .. })), "{bad:?}");
        }
        assert!(matches!(store.heartbeat("").await, Err(StoreError::Invalid { .. })));
        assert!(store.heartbeat("e").await.unwrap().is_empty());
    }
}
