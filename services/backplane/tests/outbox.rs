//! Reading the outbox through the backplane, on SQLite and on Postgres.

use std::sync::Arc;

use muster_backplane::{Followed, MAX_READ, Outbox};
use muster_store::outbox::{self, Item, NewItem};
use muster_store::{Store, StoreError};
use serde_json::json;

/// An item a follower sent; a gap or an error fails the test.
fn item(followed: Result<Followed, StoreError>) -> Item {
    match followed.unwrap() {
        Followed::Item(item) => item,
        gap => panic!("an item was expected, not {gap:?}"),
    }
}

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
        // The head as a subscriber names it, read before anything new
        // commits: however late the follower starts, it starts there.
        let head = outbox::head(&store).await.unwrap();
        let follower = tokio::spawn(async move { reader.follow(Some(head), sink).await });
        for (tenant, n) in [("t1", 1), ("t2", 2), ("t1", 3)] {
            let mut tx = store.begin().await.unwrap();
            outbox::append(&mut tx, &NewItem::event(tenant, "new", json!({"n": n}))).await.unwrap();
            store.commit(tx).await.unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), items.recv())
                .await
                .expect("item delivered")
                .map(item)
                .unwrap();
            seen.push((got.tenant_id, got.payload["n"].as_i64().unwrap()));
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
            Some(followed) = items.recv() => received.push(item(followed)),
        }
    }
    while received.len() < committed.len() {
        match tokio::time::timeout(Duration::from_secs(10), items.recv()).await {
            Ok(Some(followed)) => received.push(item(followed)),
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

/// Appends one item per transaction and makes them readable; their
/// positions.
async fn append_each(store: &Store, count: usize) -> Vec<i64> {
    for n in 0..count {
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t1", "n", json!({"n": n})))
            .await
            .unwrap();
        store.commit(tx).await.unwrap();
    }
    outbox::sequence(store, 1000).await.unwrap();
    let head = outbox::head(store).await.unwrap();
    ((head - count as i64 + 1)..=head).collect()
}

/// The next thing a follower sends, within 5 s.
async fn next(
    received: &mut tokio::sync::mpsc::Receiver<Result<Followed, StoreError>>,
) -> Followed {
    tokio::time::timeout(std::time::Duration::from_secs(5), received.recv())
        .await
        .expect("the follower sends")
        .expect("the follower runs")
        .unwrap()
}

muster_store::backend_suite! {
    async fn a_follower_is_told_what_compaction_took_before_it_read(store: Store) {
        let positions = append_each(&store, 5).await;
        let keep = |max_items| outbox::Retention {
            ttl_ms: i64::MAX / 4,
            max_items,
            consumer_idle_ms: 60_000,
            min_age_ms: 3_600_000,
        };
        // The cap takes the oldest three.
        assert_eq!(outbox::compact(&store, &keep(2)).await.unwrap(), 3);
        let reader = Outbox::new(Arc::new(store.clone()));

        // A follower that had read the first item: the second and third
        // are gone, and it is told so before the fourth.
        let (sink, mut received) = tokio::sync::mpsc::channel(16);
        let (follower, first) = (reader.clone(), positions[0]);
        tokio::spawn(async move { follower.follow(Some(first), sink).await });
        assert_eq!(next(&mut received).await, Followed::Gap { through: positions[2] });
        assert_eq!(next(&mut received).await.position(), positions[3]);
        assert_eq!(next(&mut received).await.position(), positions[4]);

        // An outbox compacted empty: a follower that had read the fourth
        // is told the fifth is gone; one that had read everything, or
        // starts from the head, is told nothing. New items follow, with
        // no gap before them.
        assert_eq!(outbox::compact(&store, &keep(0)).await.unwrap(), 2);
        let mut followers = Vec::new();
        for after in [Some(positions[3]), Some(positions[4]), None] {
            let (sink, received) = tokio::sync::mpsc::channel(16);
            let follower = reader.clone();
            tokio::spawn(async move { follower.follow(after, sink).await });
            followers.push(received);
        }
        let newer = append_each(&store, 1).await[0];
        assert_eq!(newer, positions[4] + 1, "positions go on after an emptied outbox");
        assert_eq!(next(&mut followers[0]).await, Followed::Gap { through: positions[4] });
        for received in &mut followers[..2] {
            assert_eq!(next(received).await, Followed::Item(outbox::read_after(&store, "t1", newer - 1, 1).await.unwrap().remove(0)));
        }
        // The one from the head may have settled before or after that
        // item: its first is an item, never a gap.
        let mut from_head = followers.pop().unwrap();
        let mut first = None;
        for _ in 0..50 {
            let waited = tokio::time::timeout(std::time::Duration::from_millis(200), from_head.recv()).await;
            match waited {
                Ok(received) => {
                    first = Some(received.expect("the follower runs").unwrap());
                    break;
                }
                Err(_) => {
                    append_each(&store, 1).await;
                }
            }
        }
        let first = first.expect("the follower from the head gets the items after it");
        assert!(matches!(first, Followed::Item(_)), "{first:?}");
    }
}

/// Puts the outbox back to how it stood when its head was `head`, as a
/// store restored from a backup (or a Postgres failover that lost
/// commits) would: later items are gone, and their positions will be
/// given again.
async fn rewind(store: &Store, head: i64) {
    rewind_and_refill(store, head, 0).await;
}

/// [`rewind`] to `head` and `count` new items in one transaction, as a
/// failover that lost commits and took new ones before the tail read
/// again, committed without the store's own signal (the tail finds it by
/// polling, all at once).
async fn rewind_and_refill(store: &Store, head: i64, count: usize) {
    let mut tx = store.begin().await.unwrap();
    sqlx::query("DELETE FROM outbox WHERE position > $1")
        .bind(head)
        .execute(&mut *tx)
        .await
        .unwrap();
    let counter = match store.backend() {
        muster_store::Backend::Postgres => "UPDATE outbox_sequence SET last_position = $1",
        muster_store::Backend::Sqlite => {
            "UPDATE sqlite_sequence SET seq = $1 WHERE name = 'outbox'"
        }
    };
    sqlx::query(counter)
        .bind(head)
        .execute(&mut *tx)
        .await
        .unwrap();
    for n in 0..count {
        outbox::append(&mut tx, &NewItem::event("t1", "again", json!({"n": n})))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    outbox::sequence(store, 1000).await.unwrap();
}

/// A follower of a new reader, at the head, once it was sent five new
/// items; their positions.
async fn following_five(
    store: &Store,
) -> (
    Vec<i64>,
    tokio::sync::mpsc::Receiver<Result<Followed, StoreError>>,
) {
    let reader = Outbox::new(Arc::new(store.clone()));
    let head = outbox::head(store).await.unwrap();
    let (sink, mut live) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move { reader.follow(Some(head), sink).await });
    let positions = append_each(store, 5).await;
    for position in &positions {
        assert_eq!(next(&mut live).await.position(), *position);
    }
    // The follower may have read them from the store itself: the tail
    // reads them too within its polling interval, and only what the tail
    // read is what a rewind is measured against. (Several intervals: the
    // machine may be loaded.)
    tokio::time::sleep(muster_backplane::POLL_INTERVAL * 8).await;
    (positions, live)
}

/// The next `count` items, which must be new ones: their positions.
async fn refilled(
    live: &mut tokio::sync::mpsc::Receiver<Result<Followed, StoreError>>,
    count: usize,
) -> Vec<i64> {
    let mut positions = Vec::new();
    for _ in 0..count {
        match next(live).await {
            Followed::Item(item) => {
                assert_eq!(item.kind, "again");
                positions.push(item.position);
            }
            gap => panic!("an item was expected, not {gap:?}"),
        }
    }
    positions
}

muster_store::backend_suite! {
    async fn a_follower_catches_up_through_reads_cut_by_their_bytes(store: Store) {
        // More payload than one read holds, committed before the reader
        // starts: the tail starts at the head, the follower reads it all.
        muster_store::testing::append_large(&store, 6).await.unwrap();
        let head = outbox::head(&store).await.unwrap();
        let reader = Outbox::new(Arc::new(store.clone()));
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move { reader.follow(Some(head - 6), sink).await });
        for n in 0..6 {
            match next(&mut live).await {
                Followed::Item(item) => assert_eq!((item.position, item.payload["n"].as_i64()), (head - 5 + n, Some(n))),
                gap => panic!("an item was expected, not {gap:?}"),
            }
        }
    }

    async fn a_tail_that_has_read_nothing_yet_finds_where_a_rewound_history_parted(store: Store) {
        let positions = append_each(&store, 5).await;
        // The tail starts at the head, having read none of the five.
        let reader = Outbox::new(Arc::new(store.clone()));
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        let at = positions[4];
        tokio::spawn(async move { reader.follow(Some(at), sink).await });
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        rewind_and_refill(&store, positions[1], 1).await;
        assert_eq!(next(&mut live).await, Followed::Gap { through: positions[1] });
        assert_eq!(refilled(&mut live, 1).await, vec![positions[2]]);
    }

    async fn a_history_given_its_positions_again_below_what_was_read_is_read_from_where_it_parted(store: Store) {
        let (positions, mut live) = following_five(&store).await;
        // The head falls below what the tail read, but not as far as where
        // the history parted: the new item at the head is read too.
        rewind_and_refill(&store, positions[1], 1).await;
        assert_eq!(next(&mut live).await, Followed::Gap { through: positions[1] });
        assert_eq!(refilled(&mut live, 1).await, vec![positions[2]]);
    }

    async fn a_history_given_its_positions_again_past_what_was_read_is_read_from_where_it_parted(store: Store) {
        let (positions, mut live) = following_five(&store).await;
        // The head never falls below what the tail read, and new items
        // stand at the positions it read.
        rewind_and_refill(&store, positions[1], 4).await;
        assert_eq!(outbox::head(&store).await.unwrap(), positions[4] + 1);
        assert_eq!(next(&mut live).await, Followed::Gap { through: positions[1] });
        assert_eq!(
            refilled(&mut live, 4).await,
            vec![positions[2], positions[3], positions[4], positions[4] + 1]
        );
    }

    async fn a_history_given_its_positions_again_up_to_what_was_read_is_read_from_where_it_parted(store: Store) {
        let (positions, mut live) = following_five(&store).await;
        // The head stands where it stood, and nothing follows it: only the
        // item at the tail's position tells the histories apart.
        rewind_and_refill(&store, positions[1], 3).await;
        assert_eq!(outbox::head(&store).await.unwrap(), positions[4]);
        assert_eq!(next(&mut live).await, Followed::Gap { through: positions[1] });
        assert_eq!(refilled(&mut live, 3).await, positions[2..].to_vec());
    }

    async fn a_subscriber_that_names_what_it_was_sent_learns_of_a_rewind_no_tail_read(store: Store) {
        let positions = append_each(&store, 5).await;
        let sent = outbox::event_ids_between(&store, positions[0], positions[4]).await.unwrap();
        assert_eq!(sent.len(), 5);
        // Restored while no backplane followed the outbox: the head stands
        // where it stood, new items at the positions that were sent.
        rewind_and_refill(&store, positions[1], 3).await;
        assert_eq!(outbox::head(&store).await.unwrap(), positions[4]);
        let reader = Outbox::new(Arc::new(store.clone()));
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        // Only some of what came before was for this subscriber (an edge
        // is not sent others' commands).
        let named = vec![sent[0].clone(), sent[1].clone(), sent[3].clone()];
        let (follower, at) = (reader.clone(), positions[4]);
        tokio::spawn(async move { follower.follow_seen(Some(at), named, sink).await });
        assert_eq!(next(&mut live).await, Followed::Gap { through: positions[1] });
        assert_eq!(refilled(&mut live, 3).await, positions[2..].to_vec());

        // The same history named again: nothing to tell, what comes next
        // follows.
        let named = outbox::event_ids_between(&store, positions[0], positions[4]).await.unwrap();
        let (sink, mut again) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move { reader.follow_seen(Some(at), named, sink).await });
        let newer = append_each(&store, 1).await[0];
        assert_eq!(next(&mut again).await.position(), newer);
    }

    async fn what_compaction_took_from_what_a_subscriber_names_is_no_rewind(store: Store) {
        let positions = append_each(&store, 5).await;
        let named = outbox::event_ids_between(&store, positions[0], positions[4]).await.unwrap();
        sqlx::query("DELETE FROM outbox WHERE position <= $1")
            .bind(positions[3])
            .execute(store.pool())
            .await
            .unwrap();
        let reader = Outbox::new(Arc::new(store.clone()));
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        let at = positions[4];
        tokio::spawn(async move { reader.follow_seen(Some(at), named, sink).await });
        let newer = append_each(&store, 1).await[0];
        assert_eq!(next(&mut live).await.position(), newer);
    }

    async fn a_follower_past_a_rewound_head_is_told_and_goes_on_from_it(store: Store) {
        let positions = append_each(&store, 5).await;
        let reader = Outbox::new(Arc::new(store.clone()));
        // A follower at the head, fed by the tail. It is told of the
        // rewind whether it first reads before it or after.
        let (sink, mut live) = tokio::sync::mpsc::channel(16);
        let follower = reader.clone();
        let at = positions[4];
        tokio::spawn(async move { follower.follow(Some(at), sink).await });

        // It had read through the fifth; the outbox now ends at the second.
        rewind(&store, positions[1]).await;
        assert_eq!(next(&mut live).await, Followed::Gap { through: positions[1] });
        // The tail notices too (within a second when its reads find
        // nothing), before anything is given those positions again: it
        // would otherwise send the followers back to where the histories
        // parted once more, to read the new items again.
        tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
        let again = append_each(&store, 1).await[0];
        assert_eq!(again, positions[2], "the position is given again");
        assert_eq!(next(&mut live).await.position(), again);

        // One that starts past the head, as an edge that kept its position
        // across the restore subscribes again: told first, then what comes.
        let (sink, mut resumed) = tokio::sync::mpsc::channel(16);
        let follower = reader.clone();
        let (past, head) = (positions[4], again);
        tokio::spawn(async move { follower.follow(Some(past), sink).await });
        assert_eq!(next(&mut resumed).await, Followed::Gap { through: head });
        let newer = append_each(&store, 1).await[0];
        assert_eq!(newer, positions[3]);
        assert_eq!(next(&mut resumed).await.position(), newer);
        assert_eq!(next(&mut live).await.position(), newer);
    }
}

/// The consumer-lag gauge of a consumer whose progress was dropped (an
/// edge gone for longer than progress is kept) reads 0 from the next
/// round, rather than its last lag for as long as the process runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_of_a_consumer_whose_progress_was_dropped_reads_zero() {
    let (store, _dir) = muster_store::testing::sqlite().await;
    let metrics = muster_telemetry::metrics();
    append_each(&store, 3).await;
    outbox::ack(&store, "edge-gone", 1).await.unwrap();
    let reader = Outbox::new(Arc::new(store.clone()));
    let directory: Arc<dyn muster_backplane::directory::DirectoryStore> = Arc::new(store.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let maintain = tokio::spawn(reader.maintain(
        directory,
        muster_backplane::default_retention(),
        std::time::Duration::from_millis(50),
        async {
            let _ = stopped.await;
        },
    ));
    let shows = |line: &'static str| {
        let metrics = metrics.clone();
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while !metrics.render().lines().any(|l| l == line) {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{line} within 10 s:\n{}", metrics.render()));
        }
    };
    shows("muster_outbox_consumer_lag{consumer=\"edge-gone\"} 2").await;
    sqlx::query("DELETE FROM outbox_consumers WHERE consumer_id = 'edge-gone'")
        .execute(store.pool())
        .await
        .unwrap();
    shows("muster_outbox_consumer_lag{consumer=\"edge-gone\"} 0").await;
    stop.send(()).unwrap();
    maintain.await.unwrap();
}
