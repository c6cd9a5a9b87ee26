//! Reading the outbox through the backplane, on SQLite and on Postgres.

use std::sync::Arc;

use muster_backplane::{MAX_READ, Outbox};
use muster_store::outbox::{self, NewItem};
use muster_store::{Store, StoreError};
use serde_json::json;

muster_store::backend_suite! {
    async fn reads_are_capped_paged_and_per_tenant(store: Store) {
        let mut tx = store.begin().await.unwrap();
        for n in 0..(MAX_READ + 5) {
            outbox::append(&mut tx, &NewItem::event("t1", "n", json!({"n": n}))).await.unwrap();
        }
        outbox::append(&mut tx, &NewItem::event("t2", "other", json!({}))).await.unwrap();
        tx.commit().await.unwrap();

        let reader = Outbox::new(Arc::new(store.clone()));
        let page = reader.read("t1", 0, 0).await.unwrap();
        assert_eq!(page.len() as u32, MAX_READ);
        assert_eq!(reader.read("t1", 0, 5_000).await.unwrap().len() as u32, MAX_READ);
        let rest = reader.read("t1", page.last().unwrap().position, 0).await.unwrap();
        assert_eq!(rest.len(), 5);
        assert_eq!(rest[4].payload["n"], json!(MAX_READ + 4));
        assert!(page.iter().chain(&rest).all(|i| i.tenant_id == "t1"));
        assert!(matches!(reader.read(" ", 0, 1).await, Err(StoreError::Invalid { .. })));
    }
}

muster_store::backend_suite! {
    async fn a_follower_from_head_sees_only_new_items_in_commit_order(store: Store) {
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t1", "old", json!({}))).await.unwrap();
        store.commit(tx).await.unwrap();

        let reader = Outbox::new(Arc::new(store.clone()));
        let (sink, mut items) = tokio::sync::mpsc::channel(16);
        let follower = tokio::spawn(async move { reader.follow(None, sink).await });
        // Let the follower settle on the head before anything new commits.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        for (tenant, n) in [("t1", 1), ("t2", 2), ("t1", 3)] {
            let mut tx = store.begin().await.unwrap();
            outbox::append(&mut tx, &NewItem::event(tenant, "new", json!({"n": n}))).await.unwrap();
            store.commit(tx).await.unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            let item = tokio::time::timeout(std::time::Duration::from_secs(5), items.recv())
                .await
                .expect("item delivered")
                .unwrap()
                .unwrap();
            seen.push((item.tenant_id, item.payload["n"].as_i64().unwrap()));
        }
        assert_eq!(seen, vec![("t1".into(), 1), ("t2".into(), 2), ("t1".into(), 3)]);
        drop(items);
        tokio::time::timeout(std::time::Duration::from_secs(5), follower).await.expect("follower stops").unwrap();
    }
}
