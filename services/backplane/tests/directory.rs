//! The connection directory, on SQLite and on Postgres.

use muster_backplane::directory::{DirectoryStore, Registration};
use muster_store::outbox::Target;
use muster_store::{Store, StoreError};

/// Whether `edge_id` holds one directed item's target.
async fn holds(
    store: &Store,
    edge_id: &str,
    tenant_id: &str,
    target: &Target,
) -> Result<bool, StoreError> {
    Ok(store.holding(edge_id, &[(tenant_id, target)]).await?[0])
}

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
    async fn one_batch_applies_its_changes_in_order(store: Store) {
        use muster_backplane::directory::Change;
        let mut changes: Vec<Change> = (0..100)
            .map(|n| Change::Register(registration(&format!("c{n}"), &format!("dev_{n}"), "edge-1")))
            .collect();
        // The same connection twice in a row (it moved), an unregistration
        // between registrations, and one of a connection never recorded.
        changes.push(Change::Register(registration("cx", "dev_x", "edge-1")));
        changes.push(Change::Register(registration("cx", "dev_x", "edge-2")));
        changes.push(Change::Unregister { edge_id: "edge-1".into(), connection_id: "c5".into() });
        changes.push(Change::Unregister { edge_id: "edge-1".into(), connection_id: "nowhere".into() });
        changes.push(Change::Register(registration("c5", "dev_5", "edge-2")));
        // Unregistered twice: the first removes it.
        changes.push(Change::Unregister { edge_id: "edge-1".into(), connection_id: "c9".into() });
        changes.push(Change::Unregister { edge_id: "edge-1".into(), connection_id: "c9".into() });
        let changed = store.apply(&changes).await.unwrap();
        assert_eq!(&changed[100..], [true, true, true, false, true, true, false]);
        let mut on_1 = store.heartbeat("edge-1").await.unwrap();
        on_1.sort();
        assert_eq!(on_1.len(), 98, "c0..c99 less c5 and c9");
        assert!(!on_1.contains(&"c5".to_string()));
        let mut on_2 = store.heartbeat("edge-2").await.unwrap();
        on_2.sort();
        assert_eq!(on_2, ["c5", "cx"]);

        // Arrivals alone, few enough for one statement (committed on its
        // own), the same connection twice among them.
        let arrivals = vec![
            Change::Register(registration("a1", "dev_a1", "edge-3")),
            Change::Register(registration("a2", "dev_a2", "edge-3")),
            Change::Register(registration("a1", "dev_a1", "edge-4")),
        ];
        assert_eq!(store.apply(&arrivals).await.unwrap(), [true, true, true]);
        assert_eq!(store.heartbeat("edge-3").await.unwrap(), ["a2"]);
        assert_eq!(store.heartbeat("edge-4").await.unwrap(), ["a1"]);
        // A bad one among them: none is written.
        let bad = vec![
            Change::Register(registration("a3", "dev_a3", "edge-5")),
            Change::Register(Registration { tenant_id: " ".into(), ..registration("a4", "dev_a4", "edge-5") }),
        ];
        assert!(store.apply(&bad).await.is_err());
        assert!(store.heartbeat("edge-5").await.unwrap().is_empty());
    }

    async fn records_route_directed_items_and_expire_without_heartbeats(store: Store) {
        store.register(&registration("c1", "dev_a", "edge-1")).await.unwrap();
        store.register(&registration("c2", "dev_b", "edge-2")).await.unwrap();
        let device_a = Target::Device("dev_a".into());
        assert!(holds(&store, "edge-1", "t1", &device_a).await.unwrap());
        assert!(!holds(&store, "edge-2", "t1", &device_a).await.unwrap());
        // Never across tenants.
        assert!(!holds(&store, "edge-1", "t2", &device_a).await.unwrap());
        assert!(holds(&store, "edge-2", "t1", &Target::Connection("c2".into())).await.unwrap());
        assert!(holds(&store, "edge-2", "t1", &Target::Edge("edge-2".into())).await.unwrap());
        assert!(!holds(&store, "edge-1", "t1", &Target::Edge("edge-2".into())).await.unwrap());

        // A device that moves to another edge is found there.
        store.register(&registration("c1", "dev_a", "edge-2")).await.unwrap();
        assert!(holds(&store, "edge-2", "t1", &device_a).await.unwrap());
        assert!(!holds(&store, "edge-1", "t1", &device_a).await.unwrap());
        assert_eq!(store.heartbeat("edge-2").await.unwrap().len(), 2);
        assert!(store.heartbeat("edge-1").await.unwrap().is_empty());

        // Only the owning edge unregisters a connection.
        assert!(!store.unregister("edge-1", "c2").await.unwrap());
        assert!(store.unregister("edge-2", "c2").await.unwrap());

        // Rows of an edge that stops heartbeating expire; a heartbeat
        // before they are removed keeps them, and until then they route
        // (the edge of a removed row learns of it from its heartbeat).
        sqlx::query("UPDATE connections SET expires_at_ms = 0").execute(store.pool()).await.unwrap();
        assert!(holds(&store, "edge-2", "t1", &device_a).await.unwrap(), "an expired row routes until removed");
        assert_eq!(store.heartbeat("edge-2").await.unwrap(), vec!["c1".to_string()]);
        assert_eq!(store.expire().await.unwrap(), 0);
        sqlx::query("UPDATE connections SET expires_at_ms = 0").execute(store.pool()).await.unwrap();
        assert_eq!(store.expire().await.unwrap(), 1);
        assert!(!holds(&store, "edge-2", "t1", &device_a).await.unwrap(), "a removed row routes nothing");
        assert!(store.heartbeat("edge-2").await.unwrap().is_empty());

        store.register(&registration("c3", "dev_c", "edge-3")).await.unwrap();
        assert_eq!(store.forget_edge("edge-3").await.unwrap(), 1);
    }

    async fn many_targets_are_looked_up_at_once(store: Store) {
        use muster_backplane::directory::Change;
        // 100 devices on edge-1 (more than one statement's worth of ids),
        // one on edge-2, and one on edge-1 in another tenant.
        let mut changes: Vec<Change> = (0..100)
            .map(|n| Change::Register(registration(&format!("c{n}"), &format!("dev_{n}"), "edge-1")))
            .collect();
        changes.push(Change::Register(registration("c-two", "dev_two", "edge-2")));
        changes.push(Change::Register(Registration {
            tenant_id: "t2".into(),
            ..registration("c-other", "dev_other", "edge-1")
        }));
        store.apply(&changes).await.unwrap();

        let mut targets: Vec<(&str, Target)> = (0..120)
            .map(|n| ("t1", Target::Device(format!("dev_{n}"))))
            .collect();
        targets.extend([
            ("t1", Target::Connection("c7".into())),
            ("t1", Target::Connection("c-two".into())),
            ("t1", Target::Device("dev_two".into())),
            ("t1", Target::Device("dev_other".into())),
            ("t2", Target::Device("dev_other".into())),
            ("t2", Target::Device("dev_3".into())),
            ("t1", Target::Edge("edge-1".into())),
            ("t1", Target::Edge("edge-2".into())),
            ("t1", Target::Device("dev_3".into())),
        ]);
        let asked: Vec<(&str, &Target)> = targets.iter().map(|(t, target)| (*t, target)).collect();
        let held = store.holding("edge-1", &asked).await.unwrap();
        assert_eq!(held.len(), asked.len());
        assert!(held[..100].iter().all(|h| *h), "every recorded device is found");
        assert!(held[100..120].iter().all(|h| !*h), "devices never recorded are not");
        // A connection of this edge; one of another edge, by connection and
        // by device; a device of this edge in another tenant, asked for in
        // the wrong tenant and in its own; a device of t1 asked for in t2;
        // edges; a device asked for twice.
        assert_eq!(&held[120..], [true, false, false, false, true, false, true, false, true]);
        // One at a time, the same answers.
        for (n, (tenant, target)) in asked.iter().enumerate() {
            assert_eq!(holds(&store, "edge-1", tenant, target).await.unwrap(), held[n], "{target:?}");
        }
        // A removed record holds nothing.
        sqlx::query("UPDATE connections SET expires_at_ms = 0").execute(store.pool()).await.unwrap();
        assert!(store.holding("edge-1", &asked[..100]).await.unwrap().iter().all(|h| *h));
        store.expire().await.unwrap();
        assert!(store.holding("edge-1", &asked[..100]).await.unwrap().iter().all(|h| !*h));
    }

    async fn bad_registrations_are_refused_and_change_nothing(store: Store) {
        for bad in [
            Registration { connection_id: " ".into(), ..registration("c", "d", "e") },
            Registration { tenant_id: "".into(), ..registration("c", "d", "e") },
            Registration { role: "admin".into(), ..registration("c", "d", "e") },
            // Refused on both stores alike, as Postgres alone would.
            Registration { device_id: "d\0".into(), ..registration("c", "d", "e") },
            Registration { edge_id: "e".repeat(257), ..registration("c", "d", "e") },
        ] {
            assert!(matches!(store.register(&bad).await, Err(StoreError::Invalid { .. })), "{bad:?}");
        }
        assert!(matches!(store.heartbeat("").await, Err(StoreError::Invalid { .. })));
        assert!(store.heartbeat("e").await.unwrap().is_empty());
    }
}
