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
        outbox::sequence(&store, 10_000).await.unwrap();

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
        outbox::sequence(&store, 10).await.unwrap();

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

/// Producers whose transactions commit in another order than they
/// inserted (random delays between insert and commit), read by a follower
/// that tails by position: every committed item arrives, once, in
/// increasing position order. A reader that tailed insertion order would
/// pass items that commit late and never see them. Twelve producers run
/// `rounds` transactions each, all at once, so that commits overlap the
/// sequencer's rounds and each other in every order.
async fn producers_race_a_follower(store: &Store, rounds: usize) {
    use rand::Rng;
    use std::collections::HashSet;
    use std::time::Duration;

    const PRODUCERS: usize = 12;
    let reader = Outbox::new(Arc::new(store.clone()));
    let (sink, mut items) = tokio::sync::mpsc::channel(1024);
    let head = outbox::head(store).await.unwrap();
    let follower = tokio::spawn(async move { reader.follow(Some(head), sink).await });

    let producers = (0..PRODUCERS).map(|p| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..rounds {
                let (count, delay_ms) = {
                    let mut rng = rand::rng();
                    (rng.random_range(1..=3), rng.random_range(0..6))
                };
                let mut tx = store.begin().await.unwrap();
                for n in 0..count {
                    let item = NewItem::event(
                        "t1",
                        "raced",
                        json!({"round": round, "producer": p, "n": n}),
                    );
                    ids.push(item.event_id.clone());
                    outbox::append(&mut tx, &item).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                store.commit(tx).await.unwrap();
            }
            ids
        })
    });
    let mut committed = HashSet::new();
    let mut received = Vec::new();
    let mut producers = futures::future::join_all(producers);
    // The follower's channel is bounded: read while the producers run.
    loop {
        tokio::select! {
            done = &mut producers => {
                for ids in done {
                    committed.extend(ids.unwrap());
                }
                break;
            }
            Some(item) = items.recv() => received.push(item.unwrap()),
        }
    }
    while received.len() < committed.len() {
        match tokio::time::timeout(Duration::from_secs(10), items.recv()).await {
            Ok(Some(item)) => received.push(item.unwrap()),
            _ => break,
        }
    }
    let ids: Vec<&str> = received.iter().map(|i| i.event_id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an item arrived twice");
    let missing = committed
        .iter()
        .filter(|id| !unique.contains(id.as_str()))
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} committed items were skipped",
        committed.len()
    );
    assert_eq!(received.len(), committed.len());
    assert!(
        received.windows(2).all(|w| w[0].position < w[1].position),
        "positions out of order"
    );
    drop(items);
    follower.await.unwrap();
}

muster_store::backend_suite! {
    async fn concurrent_producers_never_make_a_follower_skip_100_rounds(store: Store) {
        producers_race_a_follower(&store, 100).await;
    }
}
