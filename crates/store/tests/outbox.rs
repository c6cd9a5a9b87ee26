//! The outbox append primitive, on SQLite and on Postgres.

use muster_store::outbox::{self, NewItem, Target};
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
        let first = outbox::append(&mut tx, &NewItem::event("t1", "a.happened", json!({"n": 1}))).await.unwrap();
        let mut directed = NewItem::event("t1", "task.execute", json!({"n": 2}));
        directed.target = Some(Target::Device("dev_x".into()));
        directed.audience_roles = vec!["node".into()];
        let second = outbox::append(&mut tx, &directed).await.unwrap();
        tx.commit().await.unwrap();
        assert!(second > first);

        let items = outbox::read_after(&store, "t1", 0, 10).await.unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].kind, "a.happened");
        assert_eq!(items[0].payload, json!({"n": 1}));
        assert_eq!(items[0].target, None);
        assert_eq!(items[1].target, Some(Target::Device("dev_x".into())));
        assert_eq!(items[1].audience_roles, vec!["node".to_string()]);
        assert!(items[0].occurred_at_ms > 0);
        let rest = outbox::read_after(&store, "t1", first, 10).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].position, second);
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
        tx.commit().await.unwrap();
        assert_eq!(count(&store).await, 0);
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

    async fn migrations_are_idempotent(store: Store) {
        store.migrate().await.unwrap();
        store.ping().await.unwrap();
    }
}
