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
