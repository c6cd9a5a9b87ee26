//! Topic presence on SQLite and on Postgres.

use std::sync::Arc;

use muster_presence::{DIFF_EVENT, TopicError, TopicSession, Topics};
use muster_store::{Store, now_ms};
use serde_json::Value;

fn session(topic: &str, id: &str, connection: &str) -> TopicSession {
    TopicSession {
        tenant_id: "t1".into(),
        topic: topic.into(),
        session_id: id.into(),
        principal: "alice".into(),
        kind: "human".into(),
        agent_id: None,
        since_ms: 0,
        state: String::new(),
        note: String::new(),
        until_ms: None,
        edge_id: "edge-a".into(),
        connection_id: connection.into(),
        device_id: "dev-1".into(),
    }
}

async fn diffs(store: &Store) -> Vec<Value> {
    muster_store::testing::outbox_items(store, "t1")
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.kind == DIFF_EVENT)
        .map(|i| i.payload)
        .collect()
}

muster_store::backend_suite! {
    async fn sessions_of_an_edge_that_stops_refreshing_leave(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        let instances = muster_presence::Instances::new(Arc::new(store.clone()));
        topics.track(session("room", "s1", "c1")).await.unwrap();
        topics.track(TopicSession { edge_id: "edge-b".into(), ..session("room", "s2", "c2") }).await.unwrap();
        // Both edges refresh; then only edge-b goes on refreshing.
        instances.touch("t1", &[], Some("edge-a")).await.unwrap();
        instances.touch("t1", &[], Some("edge-b")).await.unwrap();
        assert_eq!(topics.expire_edges(std::time::Duration::from_secs(60)).await.unwrap(), 0);
        sqlx::query("UPDATE presence_edges SET refreshed_at_ms = 0 WHERE edge_id = 'edge-a'")
            .execute(store.pool()).await.unwrap();
        assert_eq!(topics.expire_edges(std::time::Duration::from_secs(60)).await.unwrap(), 1);
        let left: Vec<_> = topics.list("t1", "room", None).await.unwrap().into_iter().map(|s| s.session_id).collect();
        assert_eq!(left, vec!["s2".to_string()]);
        let d = diffs(&store).await;
        assert_eq!(d.last().unwrap()["kind"], "leave");
        assert_eq!(d.last().unwrap()["session"], "s1");
        // The dead edge is forgotten: nothing more leaves.
        assert_eq!(topics.expire_edges(std::time::Duration::from_secs(60)).await.unwrap(), 0);
    }

    async fn tracking_is_idempotent_and_diffs_join_status_leave(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        let tracked = topics.track(session("room", "s1", "c1")).await.unwrap();
        assert_eq!(tracked.state, "available");
        let again = topics.track(session("room", "s1", "c2")).await.unwrap();
        assert_eq!(again.since_ms, tracked.since_ms);
        assert_eq!(again.connection_id, "c2");
        topics.track(TopicSession { principal: "bot".into(), kind: "agent_for".into(), agent_id: Some("agent-7".into()), ..session("room", "s2", "c3") }).await.unwrap();

        let busy = topics.set_status("t1", "room", "s1", "dev-1", "busy", &"n".repeat(200), None).await.unwrap();
        assert_eq!(busy.note.chars().count(), 140);
        assert!(topics.untrack("t1", "room", "s2", "dev-1").await.unwrap());
        assert!(!topics.untrack("t1", "room", "s2", "dev-1").await.unwrap());

        let d = diffs(&store).await;
        let kinds: Vec<_> = d.iter().map(|p| p["kind"].as_str().unwrap().to_owned()).collect();
        assert_eq!(kinds, vec!["join", "join", "status", "leave"]);
        assert_eq!(d[1]["ekind"], "agent_for");
        assert_eq!(d[1]["agent_id"], "agent-7");
        assert_eq!(d[2]["state"], "busy");
        for key in ["kind", "topic", "principal", "ekind", "agent_id", "session", "since", "state", "note", "until_ts"] {
            assert!(d[0].get(key).is_some(), "diff lacks {key}");
        }
        let listed = topics.list("t1", "room", None).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, "busy");
    }

    async fn a_closed_connection_leaves_every_topic(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("a", "s1", "c1")).await.unwrap();
        topics.track(session("b", "s1", "c1")).await.unwrap();
        topics.track(TopicSession { edge_id: "edge-b".into(), ..session("a", "s2", "c2") }).await.unwrap();
        assert_eq!(topics.list("t1", "a", Some("edge-a")).await.unwrap().len(), 1);
        assert_eq!(topics.list("t1", "a", None).await.unwrap().len(), 2);
        assert_eq!(topics.untrack_connection("t1", "c1").await.unwrap(), 2);
        assert!(topics.list("t1", "b", None).await.unwrap().is_empty());
        assert_eq!(topics.list("t1", "a", None).await.unwrap().len(), 1);
        let leaves = diffs(&store).await.into_iter().filter(|d| d["kind"] == "leave").count();
        assert_eq!(leaves, 2);
    }

    async fn expired_statuses_return_to_available(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("room", "s1", "c1")).await.unwrap();
        let until = now_ms() + 30;
        let blocked = topics.set_status("t1", "room", "s1", "dev-1", "blocked", "on a call", Some(until)).await.unwrap();
        assert_eq!(blocked.until_ms, Some(until));
        assert_eq!(topics.expire().await.unwrap(), 0);
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        assert_eq!(topics.expire().await.unwrap(), 1);
        let listed = topics.list("t1", "room", None).await.unwrap();
        assert_eq!((listed[0].state.as_str(), listed[0].note.as_str(), listed[0].until_ms), ("available", "", None));
        let last = diffs(&store).await.pop().unwrap();
        assert_eq!((last["kind"].as_str(), last["state"].as_str()), (Some("status"), Some("available")));
    }

    async fn bad_requests_change_nothing(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        for bad in [
            session("", "s1", "c1"),
            session("room", "", "c1"),
            TopicSession { kind: "robot".into(), ..session("room", "s1", "c1") },
            TopicSession { kind: "agent_for".into(), ..session("room", "s1", "c1") },
            TopicSession { agent_id: Some("a".into()), ..session("room", "s1", "c1") },
        ] {
            assert!(matches!(topics.track(bad).await, Err(TopicError::Invalid(_))));
        }
        topics.track(session("room", "s1", "c1")).await.unwrap();
        assert!(matches!(topics.set_status("t1", "room", "s1", "dev-1", "asleep", "", None).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.set_status("t1", "room", "s1", "dev-1", "busy", "", Some(1)).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.set_status("t1", "room", "nobody", "dev-1", "busy", "", None).await, Err(TopicError::NotFound { .. })));
        assert!(matches!(topics.set_status("t2", "room", "s1", "dev-1", "busy", "", None).await, Err(TopicError::NotFound { .. })));
        assert_eq!(diffs(&store).await.len(), 1);
        assert_eq!(topics.list("t1", "room", None).await.unwrap()[0].state, "available");
    }

    async fn a_session_is_its_devices_alone(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("room", "s1", "c1")).await.unwrap();
        let other = |s: TopicSession| TopicSession { device_id: "dev-2".into(), connection_id: "c9".into(), ..s };
        // Another device can neither take the session over, nor set its
        // status, nor untrack it; and nothing is emitted for trying.
        assert!(matches!(topics.track(other(session("room", "s1", "c1"))).await, Err(TopicError::Held { .. })));
        assert!(matches!(topics.set_status("t1", "room", "s1", "dev-2", "busy", "", None).await, Err(TopicError::NotFound { .. })));
        assert!(!topics.untrack("t1", "room", "s1", "dev-2").await.unwrap());
        let listed = topics.list("t1", "room", None).await.unwrap();
        assert_eq!((listed[0].connection_id.as_str(), listed[0].state.as_str()), ("c1", "available"));
        assert_eq!(diffs(&store).await.len(), 1);
        // The same device, reconnected, takes it over without a diff.
        let moved = topics.track(session("room", "s1", "c2")).await.unwrap();
        assert_eq!(moved.connection_id, "c2");
        assert_eq!(diffs(&store).await.len(), 1);
        // A session tracked before sessions had devices is anyone's.
        sqlx::query("UPDATE topic_sessions SET device_id = ''").execute(store.pool()).await.unwrap();
        let taken = topics.track(other(session("room", "s1", "c1"))).await.unwrap();
        assert_eq!(taken.device_id, "dev-2");
        assert!(matches!(topics.track(session("room", "s1", "c1")).await, Err(TopicError::Held { .. })));
    }

    async fn an_edge_learns_which_connections_its_sessions_belong_to(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("room", "s1", "c1")).await.unwrap();
        topics.track(session("hall", "s2", "c1")).await.unwrap();
        topics.track(TopicSession { tenant_id: "t2".into(), ..session("room", "s3", "c2") }).await.unwrap();
        topics.track(TopicSession { edge_id: "edge-b".into(), ..session("room", "s4", "c3") }).await.unwrap();
        let mut held = topics.edge_session_connections("edge-a").await.unwrap();
        held.sort();
        assert_eq!(held, [("t1".to_owned(), "c1".to_owned()), ("t2".to_owned(), "c2".to_owned())]);
        assert!(topics.edge_session_connections("edge-c").await.unwrap().is_empty());
        assert!(matches!(topics.edge_session_connections(" ").await, Err(TopicError::Invalid(_))));
        // What the edge then does with a connection it no longer holds.
        assert_eq!(topics.untrack_connection("t1", "c1").await.unwrap(), 2);
        assert_eq!(topics.edge_session_connections("edge-a").await.unwrap(), [("t2".to_owned(), "c2".to_owned())]);
    }

    async fn an_edge_back_under_its_name_forgets_its_earlier_sessions(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("room", "s1", "c1")).await.unwrap();
        topics.track(session("room", "s2", "c2")).await.unwrap();
        topics.track(TopicSession { edge_id: "edge-b".into(), ..session("room", "s3", "c3") }).await.unwrap();
        assert_eq!(topics.forget_edge_sessions("edge-a").await.unwrap(), 2);
        let left: Vec<_> = topics.list("t1", "room", None).await.unwrap().into_iter().map(|s| s.session_id).collect();
        assert_eq!(left, ["s3"]);
        let leaves = diffs(&store).await.into_iter().filter(|d| d["kind"] == "leave").count();
        assert_eq!(leaves, 2);
        assert!(matches!(topics.forget_edge_sessions(" ").await, Err(TopicError::Invalid(_))));
    }
}
