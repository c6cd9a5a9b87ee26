//! The outbox append primitive, on SQLite and on Postgres.

use muster_store::outbox::{self, NewItem, Target};
use muster_store::testing::outbox_items;
use muster_store::{Store, StoreError};
use serde_json::json;

async fn count(store: &Store) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM outbox")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

muster_store::backend_suite! {
    async fn committed_items_are_read_back_in_order(store: Store) {
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t1", "a.happened", json!({"n": 1}))).await.unwrap();
        let mut directed = NewItem::event("t1", "task.execute", json!({"n": 2}));
        directed.target = Some(Target::Device("dev_x".into()));
        directed.audience_roles = vec!["node".into()];
        outbox::append(&mut tx, &directed).await.unwrap();
        tx.commit().await.unwrap();
        // Readable once positioned (at insert on SQLite, by the sequencer
        // on Postgres).
        outbox::sequence(&store, 100).await.unwrap();

        let items = outbox::read_after(&store, "t1", 0, 10).await.unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].kind, "a.happened");
        assert_eq!(items[0].payload, json!({"n": 1}));
        assert_eq!(items[0].target, None);
        assert_eq!(items[1].target, Some(Target::Device("dev_x".into())));
        assert_eq!(items[1].audience_roles, vec!["node".to_string()]);
        assert!(items[0].occurred_at_ms > 0);
        assert!(items[1].position > items[0].position);
        let rest = outbox::read_after(&store, "t1", items[0].position, 10).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].position, items[1].position);
    }

    async fn an_item_whose_audience_does_not_read_back_goes_to_no_one(store: Store) {
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t1", "token.created", json!({}))).await.unwrap();
        tx.commit().await.unwrap();
        // Damaged by hand: an empty audience would mean every peer.
        sqlx::query("UPDATE outbox SET audience_roles = 'client', audience_scopes = '{'")
            .execute(store.pool())
            .await
            .unwrap();
        let items = outbox_items(&store, "t1").await.unwrap();
        assert_eq!(items[0].audience_roles, vec![outbox::UNREADABLE_AUDIENCE.to_string()]);
        assert_eq!(items[0].audience_scopes, vec![outbox::UNREADABLE_AUDIENCE.to_string()]);
    }

    async fn a_read_stops_past_its_bytes_and_says_more_follows(store: Store) {
        // Six items of 900 000 bytes: the fifth passes the bound.
        muster_store::testing::append_large(&store, 6).await.unwrap();
        let first = outbox::read_all_after(&store, 0, 1000).await.unwrap();
        assert_eq!(first.items.len(), 5);
        assert!(first.more);
        let last = first.items.last().unwrap().position;
        let rest = outbox::read_all_after(&store, last, 1000).await.unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(rest.items[0].payload["n"], 5);
        assert!(!rest.more);
        // By count as well.
        let counted = outbox::read_all_after(&store, 0, 2).await.unwrap();
        assert_eq!((counted.items.len(), counted.more), (2, true));
        // A tenant's read is bounded alike.
        assert_eq!(outbox::read_after(&store, "t1", 0, 1000).await.unwrap().len(), 5);
    }

    async fn an_append_rolls_back_with_its_transaction(store: Store) {
        let mut tx = store.begin().await.unwrap();
        sqlx::query("INSERT INTO runs (run_id, tenant_id, idempotency_key, spec, status, created_at_ms) VALUES ('r1', 't1', 'k', '{}', 'queued', 1)")
            .execute(&mut *tx).await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t1", "run.queued", json!({"run_id": "r1"}))).await.unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(count(&store).await, 0);
        let runs: i64 = sqlx::Row::try_get(&sqlx::query("SELECT COUNT(*) FROM runs").fetch_one(store.pool()).await.unwrap(), 0).unwrap();
        assert_eq!(runs, 0);

        // Dropping an uncommitted transaction rolls back too.
        {
            let mut tx = store.begin().await.unwrap();
            outbox::append(&mut tx, &NewItem::event("t1", "x", json!({}))).await.unwrap();
        }
        assert_eq!(count(&store).await, 0);
    }

    async fn tenants_never_read_each_others_items(store: Store) {
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t1", "x", json!({}))).await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t2", "x", json!({}))).await.unwrap();
        tx.commit().await.unwrap();
        outbox::sequence(&store, 100).await.unwrap();
        let t1 = outbox::read_after(&store, "t1", 0, 10).await.unwrap();
        assert_eq!(t1.len(), 1);
        assert!(t1.iter().all(|i| i.tenant_id == "t1"));
        assert!(outbox::read_after(&store, "t3", 0, 10).await.unwrap().is_empty());
    }

    async fn bad_items_are_refused_and_change_nothing(store: Store) {
        let mut tx = store.begin().await.unwrap();
        let secret = NewItem::event("t1", "pairing.updated", json!({"pairing": {"scoped_token": "abc"}}));
        assert!(matches!(outbox::append(&mut tx, &secret).await, Err(StoreError::SecretInPayload { key }) if key == "scoped_token"));
        let no_tenant = NewItem::event(" ", "x", json!({}));
        assert!(matches!(outbox::append(&mut tx, &no_tenant).await, Err(StoreError::Invalid { field: "tenant_id", .. })));
        let not_object = NewItem::event("t1", "x", json!([1]));
        assert!(matches!(outbox::append(&mut tx, &not_object).await, Err(StoreError::Invalid { field: "payload", .. })));
        // An item too large to travel to the edges as one message: a
        // control character takes six bytes as JSON.
        let escaped = "\u{1}".repeat(outbox::MAX_PAYLOAD_BYTES / 6 + 1);
        let too_large = NewItem::event("t1", "x", json!({"by": escaped}));
        assert!(matches!(outbox::append(&mut tx, &too_large).await, Err(StoreError::Invalid { field: "payload", .. })));
        for (tenant, kind) in [("t\0a", "x"), ("t1", "x\0"), (&*"t".repeat(257), "x")] {
            let bad = NewItem::event(tenant, kind, json!({}));
            assert!(matches!(outbox::append(&mut tx, &bad).await, Err(StoreError::Invalid { .. })), "{tenant:?} {kind:?}");
        }
        for target in [outbox::Target::Device("dev\0a".into()), outbox::Target::Connection("c".repeat(257))] {
            let bad = NewItem { target: Some(target.clone()), ..NewItem::event("t1", "x", json!({})) };
            assert!(matches!(outbox::append(&mut tx, &bad).await, Err(StoreError::Invalid { field: "target_id", .. })), "{target:?}");
        }
        tx.commit().await.unwrap();
        // Up to the limit, it goes (rolled back here).
        let fits = NewItem::event("t1", "x", json!({"by": "x".repeat(outbox::MAX_PAYLOAD_BYTES - 20)}));
        let mut fitting = store.begin().await.unwrap();
        outbox::append(&mut fitting, &fits).await.unwrap();
        drop(fitting);
        assert_eq!(count(&store).await, 0);
    }

    async fn many_items_append_in_order_in_multi_row_statements(store: Store) {
        let items: Vec<NewItem> = (0..250)
            .map(|n| NewItem::event("t1", "n", json!({"n": n})))
            .collect();
        let mut tx = store.begin().await.unwrap();
        outbox::append_all(&mut tx, &items).await.unwrap();
        store.commit(tx).await.unwrap();
        let read = outbox_items(&store, "t1").await.unwrap();
        let ns: Vec<i64> = read.iter().map(|i| i.payload["n"].as_i64().unwrap()).collect();
        assert_eq!(ns, (0..250).collect::<Vec<i64>>());
        let ids: Vec<&str> = read.iter().map(|i| i.event_id.as_str()).collect();
        assert_eq!(ids, items.iter().map(|i| i.event_id.as_str()).collect::<Vec<_>>());

        // One bad item among good ones: nothing of the call is written.
        let mut mixed: Vec<NewItem> = (0..150)
            .map(|n| NewItem::event("t2", "n", json!({"n": n})))
            .collect();
        mixed[120] = NewItem::event("t2", "n", json!({"token_secret": "x"}));
        let mut tx = store.begin().await.unwrap();
        assert!(matches!(
            outbox::append_all(&mut tx, &mixed).await,
            Err(StoreError::SecretInPayload { .. })
        ));
        store.commit(tx).await.unwrap();
        assert!(outbox_items(&store, "t2").await.unwrap().is_empty());
    }

    async fn event_ids_are_unique(store: Store) {
        let item = NewItem::event("t1", "x", json!({}));
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &item).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let err = outbox::append(&mut tx, &item).await.unwrap_err();
        assert!(err.is_constraint_violation(), "{err}");
        drop(tx);
        assert_eq!(count(&store).await, 1);
    }

    async fn consumer_progress_is_durable_and_never_moves_back(store: Store) {
        let mut tx = store.begin().await.unwrap();
        for _ in 0..12 {
            outbox::append(&mut tx, &NewItem::event("t1", "x", json!({}))).await.unwrap();
        }
        tx.commit().await.unwrap();
        outbox::sequence(&store, 100).await.unwrap();
        assert_eq!(outbox::head(&store).await.unwrap(), 12);
        assert_eq!(outbox::progress(&store, "edge-a").await.unwrap(), None);
        outbox::ack(&store, "edge-a", 7).await.unwrap();
        outbox::ack(&store, "edge-a", 5).await.unwrap();
        assert_eq!(outbox::progress(&store, "edge-a").await.unwrap(), Some(7));
        outbox::ack(&store, "edge-a", 9).await.unwrap();
        assert_eq!(outbox::progress(&store, "edge-a").await.unwrap(), Some(9));
        for consumer in [" ", "edge\0b", &"e".repeat(257)] {
            assert!(matches!(outbox::ack(&store, consumer, 1).await, Err(StoreError::Invalid { field: "consumer_id", .. })), "{consumer:?}");
        }
        let consumers = outbox::consumers(&store).await.unwrap();
        assert_eq!(consumers.len(), 1);
        assert_eq!(consumers[0].position, 9);
    }

    async fn consumer_progress_stops_at_the_head(store: Store) {
        let mut tx = store.begin().await.unwrap();
        for _ in 0..3 {
            outbox::append(&mut tx, &NewItem::event("t1", "x", json!({}))).await.unwrap();
        }
        tx.commit().await.unwrap();
        outbox::sequence(&store, 100).await.unwrap();
        let head = outbox::head(&store).await.unwrap();
        // A position the store never gave (an edge that read a history a
        // failover lost), new or over progress kept.
        outbox::ack(&store, "edge-a", head + 40).await.unwrap();
        assert_eq!(outbox::progress(&store, "edge-a").await.unwrap(), Some(head));
        outbox::ack(&store, "edge-b", 1).await.unwrap();
        sqlx::query("UPDATE outbox_consumers SET position = $1 WHERE consumer_id = 'edge-b'")
            .bind(head + 40)
            .execute(store.pool())
            .await
            .unwrap();
        outbox::ack(&store, "edge-b", 2).await.unwrap();
        assert_eq!(outbox::progress(&store, "edge-b").await.unwrap(), Some(head));
    }

    async fn compaction_keeps_the_window_the_cap_and_unacknowledged_items(store: Store) {
        let mut tx = store.begin().await.unwrap();
        for n in 0..10 {
            outbox::append(&mut tx, &NewItem::event("t1", "x", json!({"n": n}))).await.unwrap();
        }
        tx.commit().await.unwrap();
        outbox::sequence(&store, 100).await.unwrap();
        let items = outbox::read_after(&store, "t1", 0, 100).await.unwrap();
        assert_eq!(items.len(), 10);
        // Make the first three a day old.
        sqlx::query("UPDATE outbox SET occurred_at_ms = occurred_at_ms - 86400000 WHERE position <= $1")
            .bind(items[2].position)
            .execute(store.pool()).await.unwrap();
        let keep_all = outbox::Retention { ttl_ms: i64::MAX / 4, max_items: 1000, consumer_idle_ms: 60_000, min_age_ms: 3_600_000 };
        assert_eq!(outbox::compact(&store, &keep_all).await.unwrap(), 0);

        // The TTL takes the old ones.
        let day = outbox::Retention { ttl_ms: 3_600_000, ..keep_all };
        assert_eq!(outbox::compact(&store, &day).await.unwrap(), 3);
        // The cap keeps the newest.
        let five = outbox::Retention { max_items: 5, ..day };
        assert_eq!(outbox::compact(&store, &five).await.unwrap(), 2);
        let left = outbox::read_after(&store, "t1", 0, 100).await.unwrap();
        assert_eq!(left.iter().map(|i| i.payload["n"].as_i64().unwrap()).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);

        // Acknowledged items go once old enough; unacknowledged ones stay.
        outbox::ack(&store, "edge-a", left[1].position).await.unwrap();
        let acked = outbox::Retention { min_age_ms: 0, ..five };
        assert_eq!(outbox::compact(&store, &acked).await.unwrap(), 2);
        let depth = outbox::depth(&store).await.unwrap();
        assert_eq!(depth.items, 3);
        assert_eq!(depth.head, left[4].position);
        assert!(depth.oldest_unacked_ms.is_some());

        // A silent consumer stops holding items back.
        sqlx::query("UPDATE outbox_consumers SET updated_at_ms = 0").execute(store.pool()).await.unwrap();
        outbox::compact(&store, &acked).await.unwrap();
        assert!(outbox::consumers(&store).await.unwrap().is_empty());
    }

    async fn a_backlog_larger_than_a_compaction_statement_goes_whole(store: Store) {
        let items: Vec<NewItem> = (0..4_500).map(|n| NewItem::event("t1", "x", json!({"n": n}))).collect();
        let mut tx = store.begin().await.unwrap();
        outbox::append_all(&mut tx, &items).await.unwrap();
        tx.commit().await.unwrap();
        outbox::sequence(&store, 10_000).await.unwrap();
        let cap = outbox::Retention { ttl_ms: i64::MAX / 4, max_items: 100, consumer_idle_ms: 60_000, min_age_ms: 3_600_000 };
        assert_eq!(outbox::compact(&store, &cap).await.unwrap(), 4_400);
        let left = outbox::read_after(&store, "t1", 0, 10_000).await.unwrap();
        assert_eq!(left.len(), 100);
        assert_eq!(left[0].payload["n"], 4_400);
    }

    async fn the_ttl_takes_a_backlog_whole_in_position_order(store: Store) {
        let items: Vec<NewItem> = (0..4_500).map(|n| NewItem::event("t1", "x", json!({"n": n}))).collect();
        let mut tx = store.begin().await.unwrap();
        outbox::append_all(&mut tx, &items).await.unwrap();
        tx.commit().await.unwrap();
        outbox::sequence(&store, 10_000).await.unwrap();
        let positions: Vec<i64> = outbox::read_after(&store, "t1", 0, 10_000).await.unwrap().iter().map(|i| i.position).collect();
        // The oldest 2 100 are a day old, and so is one far behind them
        // whose producer's clock was behind.
        let day_ago = "UPDATE outbox SET occurred_at_ms = occurred_at_ms - 86400000 \
                       WHERE position <= $1 AND position > $2";
        sqlx::query(day_ago).bind(positions[2_099]).bind(0_i64).execute(store.pool()).await.unwrap();
        sqlx::query(day_ago).bind(positions[4_400]).bind(positions[4_399]).execute(store.pool()).await.unwrap();
        let ttl = outbox::Retention { ttl_ms: 3_600_000, max_items: 1_000_000, consumer_idle_ms: 60_000, min_age_ms: 3_600_000 };
        // More than one statement's chunk goes; the straggler, beyond the
        // oldest chunk of what is left, waits for the items before it.
        assert_eq!(outbox::compact(&store, &ttl).await.unwrap(), 2_100);
        let left = outbox::read_after(&store, "t1", 0, 10_000).await.unwrap();
        assert_eq!(left.len(), 2_400);
        assert_eq!(left[0].payload["n"], 2_100);
        assert_eq!(outbox::compact(&store, &ttl).await.unwrap(), 0);
        // Once those have expired too, it goes with them.
        sqlx::query(day_ago).bind(positions[4_399]).bind(positions[2_099]).execute(store.pool()).await.unwrap();
        assert_eq!(outbox::compact(&store, &ttl).await.unwrap(), 2_301);
    }

    async fn compaction_leaves_one_run_of_positions(store: Store) {
        let items: Vec<NewItem> = (0..10).map(|n| NewItem::event("t1", "x", json!({"n": n}))).collect();
        let mut tx = store.begin().await.unwrap();
        outbox::append_all(&mut tx, &items).await.unwrap();
        tx.commit().await.unwrap();
        outbox::sequence(&store, 10_000).await.unwrap();
        let positions: Vec<i64> = outbox::read_after(&store, "t1", 0, 100).await.unwrap().iter().map(|i| i.position).collect();
        // All a day old but the third, appended later than its position
        // says (or by a producer whose clock was ahead).
        sqlx::query("UPDATE outbox SET occurred_at_ms = occurred_at_ms - 86400000 WHERE position <> $1")
            .bind(positions[2]).execute(store.pool()).await.unwrap();
        let held = |left: &[outbox::Item]| left.iter().map(|i| i.position).collect::<Vec<_>>();
        // The TTL takes the two before it; the expired ones after it wait,
        // so that a peer resuming from the third misses nothing.
        let ttl = outbox::Retention { ttl_ms: 3_600_000, max_items: 1_000_000, consumer_idle_ms: 60_000, min_age_ms: 3_600_000 };
        assert_eq!(outbox::compact(&store, &ttl).await.unwrap(), 2);
        assert_eq!(held(&outbox::read_after(&store, "t1", 0, 100).await.unwrap()), positions[2..]);
        // So does the rule for old items every consumer has.
        outbox::ack(&store, "edge-a", positions[9]).await.unwrap();
        let acked = outbox::Retention { ttl_ms: i64::MAX / 2, ..ttl };
        assert_eq!(outbox::compact(&store, &acked).await.unwrap(), 0);
        sqlx::query("UPDATE outbox SET occurred_at_ms = occurred_at_ms - 86400000 WHERE position = $1")
            .bind(positions[2]).execute(store.pool()).await.unwrap();
        assert_eq!(outbox::compact(&store, &acked).await.unwrap(), 8);
    }

    async fn a_lease_has_one_holder_until_it_expires(store: Store) {
        assert!(muster_store::lease::acquire(&store, "job", "a", 60_000).await.unwrap());
        assert!(!muster_store::lease::acquire(&store, "job", "b", 60_000).await.unwrap());
        // The holder renews.
        assert!(muster_store::lease::acquire(&store, "job", "a", 60_000).await.unwrap());
        assert!(muster_store::lease::acquire(&store, "other", "b", 60_000).await.unwrap());
        sqlx::query("UPDATE leases SET expires_at_ms = 0 WHERE name = 'job'").execute(store.pool()).await.unwrap();
        assert!(muster_store::lease::acquire(&store, "job", "b", 60_000).await.unwrap());
        assert!(!muster_store::lease::acquire(&store, "job", "a", 60_000).await.unwrap());
        // Given up, by its holder only, it passes on at once.
        muster_store::lease::release(&store, "job", "a").await.unwrap();
        assert!(!muster_store::lease::acquire(&store, "job", "a", 60_000).await.unwrap());
        muster_store::lease::release(&store, "job", "b").await.unwrap();
        assert!(muster_store::lease::acquire(&store, "job", "a", 60_000).await.unwrap());
    }

    async fn migrations_are_idempotent(store: Store) {
        store.migrate().await.unwrap();
        store.ping().await.unwrap();
    }
}

/// Appends `item` in `tx` and returns the id it took, seen from inside
/// the transaction (nothing else sees it before the commit).
async fn append_for_its_id(tx: &mut muster_store::Tx, item: &NewItem) -> i64 {
    use sqlx::Row;
    outbox::append(tx, item).await.unwrap();
    sqlx::query("SELECT id FROM outbox WHERE event_id = $1")
        .bind(&item.event_id)
        .fetch_one(&mut **tx)
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

/// Postgres: the sequencer's floor (migrations/postgres/0011) rises past
/// positioned items, and never past an item whose transaction is still
/// open, however long it stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequencers_floor_never_passes_an_open_transaction() {
    use sqlx::Row;
    let store = muster_store::testing::postgres().await;
    let floor = || async {
        let row = sqlx::query("SELECT floor_id FROM outbox_sequence")
            .fetch_one(store.pool())
            .await
            .unwrap();
        row.try_get::<i64, _>(0).unwrap()
    };
    let position_of = |event_id: String| {
        let store = store.clone();
        async move {
            let row = sqlx::query("SELECT position FROM outbox WHERE event_id = $1")
                .bind(event_id)
                .fetch_one(store.pool())
                .await
                .unwrap();
            row.try_get::<Option<i64>, _>(0).unwrap()
        }
    };
    let commit_one = || async {
        let mut tx = store.begin().await.unwrap();
        outbox::append(&mut tx, &NewItem::event("t1", "short", json!({})))
            .await
            .unwrap();
        store.commit(tx).await.unwrap();
        outbox::sequence(&store, 100).await.unwrap();
    };

    // The append is the open transaction's first statement: it takes its
    // item id and its transaction id in that statement.
    let long = NewItem::event("t1", "long", json!({}));
    let mut open = store.begin().await.unwrap();
    let long_id = append_for_its_id(&mut open, &long).await;
    for _ in 0..8 {
        commit_one().await;
    }
    // Invisible to the rounds meanwhile, but it holds the floor below it.
    let held = floor().await;
    assert!(
        held < long_id,
        "floor {held} passed the open item {long_id}"
    );

    store.commit(open).await.unwrap();
    outbox::sequence(&store, 100).await.unwrap();
    let position = position_of(long.event_id.clone()).await;
    assert!(position.is_some(), "the item is positioned once it commits");
    // The floor rises once no transaction on the server is older than a
    // round's horizon. Other tests' transactions on the same server can
    // hold it a while, so rounds go on until it has risen.
    let mut committed = 9;
    let mut rise_to = async |at_least: i64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            commit_one().await;
            committed += 1;
            let now = floor().await;
            if now >= at_least {
                return now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "floor {now} stays below {at_least}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let risen = rise_to(long_id).await;
    // A rolled-back item does not hold the floor.
    let mut rolled_back = store.begin().await.unwrap();
    let gone = NewItem::event("t1", "gone", json!({}));
    let gone_id = append_for_its_id(&mut rolled_back, &gone).await;
    drop(rolled_back);
    assert!(rise_to(gone_id).await > risen);
    // A round inside a transaction that already has an id is refused: its
    // horizon would come before it looks.
    let mut tx = store.begin().await.unwrap();
    outbox::append(&mut tx, &NewItem::event("t1", "inside", json!({})))
        .await
        .unwrap();
    let inside = sqlx::query("SELECT muster_sequence_outbox(10)")
        .execute(&mut *tx)
        .await;
    assert!(inside.is_err(), "{inside:?}");
    drop(tx);
    let items = outbox::read_all_after(&store, 0, 1000).await.unwrap().items;
    assert_eq!(items.len(), committed);
    assert!(items.windows(2).all(|w| w[1].position == w[0].position + 1));
    store.close().await;
}
