//! Queueing runs on SQLite and on Postgres.

use std::sync::Arc;

use muster_execution::{Enqueued, RunError, Runs};
use muster_store::Store;
use serde_json::json;

async fn queued_events(store: &Store) -> usize {
    muster_store::testing::outbox_items(store, "t1")
        .await
        .unwrap()
        .iter()
        .filter(|i| i.kind == "run.queued")
        .count()
}

muster_store::backend_suite! {
    async fn a_key_names_one_run(store: Store) {
        let runs = Runs::new(Arc::new(store.clone()));
        let Enqueued::Created(run) = runs.enqueue("t1", "k1", json!({"tool": "echo"})).await.unwrap() else {
            panic!("first enqueue must create");
        };
        let again = runs.enqueue("t1", "k1", json!({"tool": "echo"})).await.unwrap();
        assert_eq!(again, Enqueued::Existing(run.clone()));
        assert_eq!(runs.get("t1", &run.run_id).await.unwrap(), run);
        assert_eq!(queued_events(&store).await, 1);

        let reused = runs.enqueue("t1", "k1", json!({"tool": "rm"})).await;
        assert!(matches!(reused, Err(RunError::KeyReused(_))));
        // The same key in another tenant is another run.
        assert!(matches!(runs.enqueue("t2", "k1", json!({"tool": "echo"})).await.unwrap(), Enqueued::Created(_)));
        assert!(matches!(runs.get("t2", &run.run_id).await, Err(RunError::NotFound(_))));
    }

    async fn a_retry_finds_its_run_whatever_floats_its_spec_holds(store: Store) {
        let runs = Runs::new(Arc::new(store.clone()));
        // A float whose shortest text reads back as another float.
        let x = (1..100_000)
            .map(|i| i as f64 * 1.234_567_890_123_456_7e-21)
            .find(|x| serde_json::from_str::<f64>(&serde_json::to_string(x).unwrap()).unwrap() != *x)
            .expect("a float that does not read back as itself");
        let Enqueued::Created(run) = runs.enqueue("t1", "k", json!({"x": x})).await.unwrap() else {
            panic!("first enqueue must create");
        };
        match runs.enqueue("t1", "k", json!({"x": x})).await {
            Ok(Enqueued::Existing(existing)) => assert_eq!(existing.run_id, run.run_id),
            other => panic!("the same request again: {other:?}"),
        }
        assert_eq!(queued_events(&store).await, 1);
    }

    async fn concurrent_enqueues_of_one_key_make_one_run(store: Store) {
        let runs = Runs::new(Arc::new(store.clone()));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move { runs.enqueue("t1", "same", json!({"n": 1})).await.unwrap().run() }));
        }
        let mut ids = Vec::new();
        for task in tasks {
            ids.push(task.await.unwrap().run_id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(queued_events(&store).await, 1);
    }

    async fn bad_requests_change_nothing(store: Store) {
        let runs = Runs::new(Arc::new(store.clone()));
        for (tenant, key, spec) in [
            ("", "k", json!({})),
            ("t1", "", json!({})),
            ("t1", "k", json!([])),
            ("t1", "k", json!({"x": "y".repeat(70_000)})),
            // What Postgres would refuse and SQLite keep: refused on both
            // before anything is written.
            ("t1", "k\0", json!({})),
            ("t\0", "k", json!({})),
            (&*"t".repeat(257), "k", json!({})),
        ] {
            let refused = runs.enqueue(tenant, key, spec).await;
            assert!(matches!(refused, Err(RunError::Invalid(_))), "{refused:?}");
        }
        assert_eq!(queued_events(&store).await, 0);
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs").fetch_one(store.pool()).await.unwrap();
        assert_eq!(stored, 0);
    }
}
