//! Instance presence on SQLite and on Postgres.

use std::sync::Arc;

use muster_presence::{InstanceEntry, InstanceRole, Instances, PresenceError, Retention, Touched};
use muster_store::Store;
use serde_json::json;

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
        metadata: json!({"capabilities": ["tyrum.fs.read"]}),
        edge_id: String::new(),
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

        let events = muster_store::testing::outbox_items(&store, "t1").await.unwrap();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.kind == "presence.upserted" && e.audience_roles == vec!["client".to_string()]));
        // The event carries the Tyrum entry shape: reported host and ip as
        // the peer sent them, the observed address labelled in metadata.
        let entry = &events[1].payload["entry"];
        assert_eq!(entry["instance_id"], "dev_a");
        assert_eq!(entry["host"], "lab-2");
        assert_eq!(entry["ip"], "10.0.0.9");
        assert_eq!(entry["metadata"]["observed_ip"], "127.0.0.1");
        // "beacon" is no Tyrum reason: it is left out rather than sent.
        assert!(entry.get("reason").is_none());
        let wire: muster_protocol::presence::PresenceEntry = serde_json::from_value(entry.clone()).unwrap();
        assert!(wire.last_seen_at.ends_with('Z'));
    }

    async fn only_the_edge_that_wrote_an_entry_last_removes_it(store: Store) {
        let presence = Instances::new(Arc::new(store.clone()));
        let through = |edge: &str| InstanceEntry { edge_id: edge.into(), ..node("dev_a", "h") };
        presence.upsert("t1", through("edge-a")).await.unwrap();
        // The device reconnected through edge-b; edge-a then finds its old
        // connection gone.
        presence.upsert("t1", through("edge-b")).await.unwrap();
        assert!(!presence.remove("t1", "dev_a", "edge-a").await.unwrap());
        let listed = presence.list("t1").await.unwrap();
        assert_eq!(listed.iter().map(|e| e.edge_id.as_str()).collect::<Vec<_>>(), ["edge-b"]);
        let kinds = |events: Vec<muster_store::outbox::Item>| events.into_iter().map(|e| e.kind).collect::<Vec<_>>();
        let events = muster_store::testing::outbox_items(&store, "t1").await.unwrap();
        assert_eq!(kinds(events), ["presence.upserted", "presence.upserted"]);
        // Its connection to edge-b closes: the entry goes.
        assert!(presence.remove("t1", "dev_a", "edge-b").await.unwrap());
        assert!(presence.list("t1").await.unwrap().is_empty());
        let events = muster_store::testing::outbox_items(&store, "t1").await.unwrap();
        assert_eq!(kinds(events).last().map(String::as_str), Some("presence.pruned"));
        // An entry no edge owns (written by an earlier release) is the
        // refreshing edge's from its next touch.
        presence.upsert("t1", node("dev_old", "h")).await.unwrap();
        presence.touch("t1", &["dev_old".to_string()], Some("edge-a")).await.unwrap();
        assert!(presence.remove("t1", "dev_old", "edge-a").await.unwrap());
        // A removal that could not be stored changes nothing.
        presence.upsert("t1", through("edge-a")).await.unwrap();
        for (instance, edge) in [("dev_a", "edge\0a"), ("", "edge-a"), ("dev_a", &"e".repeat(300))] {
            assert!(matches!(presence.remove("t1", instance, edge).await, Err(PresenceError::Invalid(_))), "{instance:?} {edge:?}");
        }
        assert_eq!(presence.list("t1").await.unwrap().len(), 1);
    }

    async fn a_full_tenant_keeps_its_gateways(store: Store) {
        let presence = Instances::new(Arc::new(store.clone()));
        let gateway = InstanceEntry { role: InstanceRole::Gateway, ..node("edge-1", "h") };
        presence.upsert("t1", gateway).await.unwrap();
        for id in ["dev_1", "dev_2"] {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            presence.upsert("t1", node(id, "h")).await.unwrap();
        }
        // The gateway is the oldest, but a peer goes: its edge would
        // announce the gateway again at once, and the cap prune it again.
        let pruned = presence.prune(Retention { ttl: std::time::Duration::from_secs(60), cap: 2 }).await.unwrap();
        assert_eq!(pruned, vec![("t1".to_string(), "dev_1".to_string())]);
        let mut left: Vec<_> = presence.list("t1").await.unwrap().into_iter().map(|e| e.instance_id).collect();
        left.sort();
        assert_eq!(left, ["dev_2", "edge-1"]);
    }

    async fn one_batch_applies_its_writes_in_order(store: Store) {
        use muster_presence::{InstanceWrite, PresenceStore};
        use muster_store::outbox::NewItem;
        let upsert = |id: &str, host: &str| InstanceWrite::Upsert {
            tenant_id: "t1".into(),
            entry: Box::new(InstanceEntry { last_seen_at_ms: 1, ..node(id, host) }),
            event: NewItem::event("t1", "presence.upserted", json!({"id": id, "host": host})),
        };
        let remove = |id: &str| InstanceWrite::Remove {
            tenant_id: "t1".into(),
            instance_id: id.into(),
            edge_id: String::new(),
            event: NewItem::event("t1", "presence.pruned", json!({"id": id})),
        };
        // More entries than one statement carries, the same instance
        // upserted twice in a row (one statement may not touch a row twice
        // on Postgres), and removals between upserts.
        let mut writes: Vec<InstanceWrite> = (0..100).map(|n| upsert(&format!("dev_{n}"), "h")).collect();
        writes.push(upsert("dev_x", "first"));
        writes.push(upsert("dev_x", "second"));
        writes.push(remove("dev_5"));
        writes.push(remove("dev_gone"));
        writes.push(upsert("dev_5", "back"));
        writes.push(remove("dev_7"));
        writes.push(remove("dev_9"));
        writes.push(remove("dev_9"));
        let changed = store.write_instances(&writes).await.unwrap();
        assert_eq!(changed.len(), writes.len());
        // Of an instance removed twice, the first removal removed it.
        assert_eq!(&changed[100..], [true, true, true, false, true, true, true, false]);

        let listed = Instances::new(Arc::new(store.clone())).list("t1").await.unwrap();
        assert_eq!(listed.len(), 99, "dev_0..99 less dev_7 and dev_9, plus dev_x");
        let host = |id: &str| listed.iter().find(|e| e.instance_id == id).map(|e| e.reported_host.clone());
        assert_eq!(host("dev_x").as_deref(), Some("second"));
        assert_eq!(host("dev_5").as_deref(), Some("back"));
        assert_eq!(host("dev_7"), None);
        // One event per applied write, in order; none for the removals that
        // found nothing.
        let events = muster_store::testing::outbox_items(&store, "t1").await.unwrap();
        assert_eq!(events.len(), writes.len() - 2);
        let tail: Vec<String> = events[100..].iter().map(|e| format!("{} {}", e.kind, e.payload)).collect();
        assert_eq!(tail, [
            r#"presence.upserted {"host":"first","id":"dev_x"}"#,
            r#"presence.upserted {"host":"second","id":"dev_x"}"#,
            r#"presence.pruned {"id":"dev_5"}"#,
            r#"presence.upserted {"host":"back","id":"dev_5"}"#,
            r#"presence.pruned {"id":"dev_7"}"#,
            r#"presence.pruned {"id":"dev_9"}"#,
        ]);
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
        let not_object = presence.upsert("t1", InstanceEntry { metadata: json!([1]), ..node("dev_a", "h") }).await;
        assert!(matches!(not_object, Err(PresenceError::Invalid(_))));
        // Refused as the caller's mistake on both stores, not failing at
        // Postgres or at the outbox's append.
        let nul = presence.upsert("t1", node("dev_a", "a\0b")).await;
        assert!(matches!(nul, Err(PresenceError::Invalid(_))), "{nul:?}");
        let secret = presence.upsert("t1", InstanceEntry { metadata: json!({"nested": {"api_key": "x"}}), ..node("dev_a", "h") }).await;
        assert!(matches!(&secret, Err(PresenceError::Invalid(m)) if m.contains("api_key")), "{secret:?}");
        assert!(presence.list("t1").await.unwrap().is_empty());
        assert!(muster_store::testing::outbox_items(&store, "t1").await.unwrap().is_empty());
    }
}

muster_store::backend_suite! {
    async fn touching_refreshes_without_events(store: Store) {
        let presence = Instances::new(Arc::new(store.clone()));
        let first = presence.upsert("t1", node("dev_a", "h")).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let touched = presence.touch("t1", &["dev_a".into(), "dev_unknown".into()], None).await.unwrap();
        // An unknown id is not created, but named for its edge to announce.
        assert_eq!(touched, Touched { touched: 1, missing: vec!["dev_unknown".into()], sessions_kept: false });
        assert!(presence.list("t1").await.unwrap()[0].last_seen_at_ms > first.last_seen_at_ms);
        assert_eq!(presence.list("t1").await.unwrap().len(), 1);
        assert_eq!(presence.touch("t2", &["dev_a".into()], None).await.unwrap().touched, 0);
        // Names Postgres would refuse (NUL, an index entry of kilobytes)
        // and SQLite keep, refused on both before any write.
        let long: String = (0..3000).map(|n| char::from(b'a' + (n * 7 % 26) as u8)).collect();
        for (tenant, edge) in [("t\0", None), (long.as_str(), None), ("t1", Some("edge\0")), ("t1", Some(long.as_str()))] {
            let refused = presence.touch(tenant, &["dev_a".into()], edge).await;
            assert!(matches!(refused, Err(PresenceError::Invalid(_))), "{refused:?}");
        }
        let refused = presence.upsert(&"t".repeat(257), node("dev_b", "h")).await;
        assert!(matches!(refused, Err(PresenceError::Invalid(_))), "{refused:?}");
        assert!(presence.list(&"t".repeat(257)).await.unwrap().is_empty());
        // Many ids, more than one statement takes, with the known one last.
        let mut many: Vec<String> = (0..1_200).map(|n| format!("dev_unknown_{n}")).collect();
        many.push("dev_a".into());
        let touched = presence.touch("t1", &many, None).await.unwrap();
        assert_eq!(touched.touched, 1);
        // Only as many missing as fit under the cap (500, one taken).
        assert_eq!(touched.missing.len(), 499);
        assert_eq!(touched.missing[0], "dev_unknown_0");
        assert_eq!(muster_store::testing::outbox_items(&store, "t1").await.unwrap().len(), 1);

        // A full tenant has no room: nothing is named.
        let full = Instances::with_retention(Arc::new(store.clone()), Retention { ttl: std::time::Duration::from_secs(60), cap: 1 });
        assert!(full.touch("t1", &many, None).await.unwrap().missing.is_empty());
    }

    async fn pruning_drops_the_stale_and_the_oldest_beyond_the_cap(store: Store) {
        let presence = Instances::new(Arc::new(store.clone()));
        for id in ["dev_1", "dev_2", "dev_3"] {
            presence.upsert("t1", node(id, "h")).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
        presence.upsert("t2", node("dev_other", "h")).await.unwrap();
        let kept = Retention { ttl: std::time::Duration::from_secs(60), cap: 2 };
        // Limits too large for the store's integers keep everything.
        let unbounded = Retention { ttl: std::time::Duration::from_secs(u64::MAX), cap: usize::MAX };
        assert!(presence.prune(unbounded).await.unwrap().is_empty());
        let pruned = presence.prune(kept).await.unwrap();
        assert_eq!(pruned, vec![("t1".to_string(), "dev_1".to_string())]);
        let left: Vec<_> = presence.list("t1").await.unwrap().into_iter().map(|e| e.instance_id).collect();
        assert_eq!(left, vec!["dev_3", "dev_2"]);
        assert_eq!(presence.list("t2").await.unwrap().len(), 1);

        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let expired = presence.prune(Retention { ttl: std::time::Duration::from_millis(10), cap: 500 }).await.unwrap();
        assert_eq!(expired.len(), 3);
        assert!(presence.list("t1").await.unwrap().is_empty());
        let events = muster_store::testing::outbox_items(&store, "t1").await.unwrap();
        let pruned_ids: Vec<_> = events.iter().filter(|e| e.kind == "presence.pruned").map(|e| e.payload["instance_id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(pruned_ids.len(), 3);
        assert!(pruned_ids.contains(&"dev_1".to_string()));
        assert!(events.iter().filter(|e| e.kind == "presence.pruned").all(|e| e.audience_roles == vec!["client".to_string()]));
    }

    async fn a_sweep_larger_than_one_transaction_prunes_every_entry_once(store: Store) {
        // More than two of the sweep's transactions' worth, in two tenants.
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1201) \
             INSERT INTO instance_presence (tenant_id, instance_id, role, reported_host, reported_ip, \
             observed_ip, version, mode, last_seen_at_ms, last_input_seconds, reason) \
             SELECT CASE WHEN i % 3 = 0 THEN 't2' ELSE 't1' END, 'dev_' || i, 'node', 'h', '', '', '', '', i, -1, 'connect' FROM n",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let presence = Instances::new(Arc::new(store.clone()));
        presence.upsert("t1", node("dev_fresh", "h")).await.unwrap();
        let pruned = presence.prune(Retention { ttl: std::time::Duration::from_secs(60), cap: 500 }).await.unwrap();
        assert_eq!(pruned.len(), 1201);
        let unique: std::collections::HashSet<_> = pruned.iter().collect();
        assert_eq!(unique.len(), 1201);
        let left: Vec<_> = presence.list("t1").await.unwrap().into_iter().map(|e| e.instance_id).collect();
        assert_eq!(left, vec!["dev_fresh"]);
        assert!(presence.list("t2").await.unwrap().is_empty());
        for (tenant, count) in [("t1", 801), ("t2", 400)] {
            let events = muster_store::testing::outbox_items(&store, tenant).await.unwrap();
            assert_eq!(events.iter().filter(|e| e.kind == "presence.pruned").count(), count, "{tenant}");
        }
        assert!(presence.prune(Retention { ttl: std::time::Duration::from_secs(60), cap: 500 }).await.unwrap().is_empty());
    }
}

// A sweep reads what to prune, then deletes it: on Postgres an entry may
// be refreshed in between, and is then not the sweep's to prune.
#[tokio::test]
async fn a_prune_spares_an_entry_refreshed_since_it_read_it() {
    let store = muster_store::testing::postgres().await;
    let presence = Instances::new(Arc::new(store.clone()));
    presence.upsert("t1", node("dev_x", "h")).await.unwrap();
    sqlx::query("UPDATE instance_presence SET last_seen_at_ms = 1 WHERE instance_id = 'dev_x'")
        .execute(store.pool())
        .await
        .unwrap();
    let mut refresh = store.pool().begin().await.unwrap();
    sqlx::query("UPDATE instance_presence SET last_seen_at_ms = $1 WHERE instance_id = 'dev_x'")
        .bind(muster_store::now_ms())
        .execute(&mut *refresh)
        .await
        .unwrap();
    let sweeping = presence.clone();
    let sweep = tokio::spawn(async move {
        sweeping
            .prune(Retention {
                ttl: std::time::Duration::from_secs(60),
                cap: 500,
            })
            .await
    });
    // The sweep has read the stale entry and waits on its row.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep never waited on the row"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    refresh.commit().await.unwrap();
    assert_eq!(sweep.await.unwrap().unwrap(), vec![]);
    assert_eq!(
        presence.list("t1").await.unwrap().len(),
        1,
        "the refreshed entry stays"
    );
    let events = muster_store::testing::outbox_items(&store, "t1")
        .await
        .unwrap();
    assert!(
        events.iter().all(|e| e.kind != "presence.pruned"),
        "nothing was pruned"
    );
}

muster_store::backend_suite! {
    async fn a_capability_report_is_broadcast_to_operators_and_a_bad_one_changes_nothing(store: Store) {
        let presence = Instances::new(Arc::new(store.clone()));
        let big = format!("[{}]", vec!["1"; 40_000].join(","));
        for (node_id, capabilities, states) in [
            ("", "[]", "[]"),
            ("dev\0a", "[]", "[]"),
            ("dev_a", "{}", "[]"),
            ("dev_a", "[]", "not json"),
            ("dev_a", big.as_str(), "[]"),
        ] {
            let refused = presence.report_capabilities("t1", node_id, capabilities, states).await;
            assert!(matches!(refused, Err(PresenceError::Invalid(_))), "{node_id:?} {refused:?}");
        }
        assert!(muster_store::testing::outbox_items(&store, "t1").await.unwrap().is_empty());

        presence
            .report_capabilities("t1", "dev_a", r#"[{"id":"tyrum.fs.read","version":"1.0.0"}]"#, "[]")
            .await
            .unwrap();
        let events = muster_store::testing::outbox_items(&store, "t1").await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, "capability.ready");
        assert_eq!(events[0].audience_roles, vec!["client".to_string()]);
        assert_eq!(
            events[0].payload,
            json!({"node_id": "dev_a", "capabilities": [{"id": "tyrum.fs.read", "version": "1.0.0"}],
                   "capability_states": []})
        );
    }
}
