//! Topic presence on SQLite and on Postgres.

use std::sync::Arc;

use muster_presence::{DIFF_EVENT, TopicError, TopicSession, Topics};
use muster_store::{Store, now_ms};
use serde_json::Value;
use sqlx::Row;

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

/// Every session of a topic, as one page.
async fn listed(
    topics: &Topics,
    topic: &str,
    edge: Option<&str>,
) -> Result<Vec<TopicSession>, TopicError> {
    let (sessions, more) = topics.list("t1", topic, edge, "", 10_000).await?;
    assert!(!more);
    Ok(sessions)
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
        let left: Vec<_> = listed(&topics, "room", None).await.unwrap().into_iter().map(|s| s.session_id).collect();
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
        let listed = listed(&topics, "room", None).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, "busy");
    }

    async fn a_topic_is_listed_in_pages_and_counted_in_the_store(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        for i in 0..7 {
            let mut s = session("room", &format!("s{i}"), &format!("c{i}"));
            if i % 3 == 0 {
                (s.kind, s.agent_id) = ("agent_for".into(), Some("agent-1".into()));
            }
            if i >= 5 {
                s.edge_id = "edge-b".into();
            }
            topics.track(s).await.unwrap();
        }
        topics.track(session("hall", "s9", "c9")).await.unwrap();
        let mut pages = Vec::new();
        let mut after = String::new();
        loop {
            let (page, more) = topics.list("t1", "room", None, &after, 3).await.unwrap();
            after = page.last().map(|s| s.session_id.clone()).unwrap_or_default();
            pages.push(page.into_iter().map(|s| s.session_id).collect::<Vec<_>>());
            if !more {
                break;
            }
        }
        assert_eq!(pages, [vec!["s0", "s1", "s2"], vec!["s3", "s4", "s5"], vec!["s6"]]);
        let (edge_a, more) = topics.list("t1", "room", Some("edge-a"), "s2", 10).await.unwrap();
        assert_eq!((edge_a.len(), more), (2, false));
        // s0, s3 and s6 are agents'; s5 and s6 are on edge-b.
        assert_eq!(topics.count("t1", "room", None).await.unwrap(), (7, 4));
        assert_eq!(topics.count("t1", "room", Some("edge-b")).await.unwrap(), (2, 1));
        assert_eq!(topics.count("t1", "empty", None).await.unwrap(), (0, 0));
        assert_eq!(topics.count("t2", "room", None).await.unwrap(), (0, 0));
    }

    async fn a_closed_connection_leaves_every_topic(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("a", "s1", "c1")).await.unwrap();
        topics.track(session("b", "s1", "c1")).await.unwrap();
        topics.track(TopicSession { edge_id: "edge-b".into(), ..session("a", "s2", "c2") }).await.unwrap();
        assert_eq!(listed(&topics, "a", Some("edge-a")).await.unwrap().len(), 1);
        assert_eq!(listed(&topics, "a", None).await.unwrap().len(), 2);
        assert_eq!(topics.untrack_connection("t1", "c1").await.unwrap(), 2);
        assert!(listed(&topics, "b", None).await.unwrap().is_empty());
        assert_eq!(listed(&topics, "a", None).await.unwrap().len(), 1);
        let leaves = diffs(&store).await.into_iter().filter(|d| d["kind"] == "leave").count();
        assert_eq!(leaves, 2);
    }

    async fn expired_statuses_return_to_available(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("room", "s1", "c1")).await.unwrap();
        // An hour ahead, then moved into the past in the store: no delay
        // of a loaded machine decides the outcome.
        let until = now_ms() + 3_600_000;
        let blocked = topics.set_status("t1", "room", "s1", "dev-1", "blocked", "on a call", Some(until)).await.unwrap();
        assert_eq!(blocked.until_ms, Some(until));
        assert_eq!(topics.expire().await.unwrap(), 0);
        sqlx::query("UPDATE topic_sessions SET until_ms = $1").bind(now_ms() - 1).execute(store.pool()).await.unwrap();
        assert_eq!(topics.expire().await.unwrap(), 1);
        let listed = listed(&topics, "room", None).await.unwrap();
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
            // What Postgres would refuse (NUL; an index entry of kilobytes)
            // and SQLite keep.
            TopicSession { edge_id: "edge\0a".into(), ..session("room", "s1", "c1") },
            TopicSession { edge_id: "e".repeat(3000), ..session("room", "s1", "c1") },
            TopicSession { edge_id: String::new(), ..session("room", "s1", "c1") },
            TopicSession { device_id: "dev-\0".into(), ..session("room", "s1", "c1") },
        ] {
            assert!(matches!(topics.track(bad).await, Err(TopicError::Invalid(_))));
        }
        topics.track(session("room", "s1", "c1")).await.unwrap();
        assert!(matches!(topics.set_status("t1", "room", "s1", "dev-1", "asleep", "", None).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.set_status("t1", "room", "s1", "dev-1", "busy", "", Some(1)).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.set_status("t1", "room", "s1", "dev-1", "busy", "", Some(muster_protocol::MAX_DATETIME_MS + 1)).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.set_status("t1", "room", "s1", "dev-1", "busy", "a\0", None).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.set_status("t1", "room", "nobody", "dev-1", "busy", "", None).await, Err(TopicError::NotFound { .. })));
        assert!(matches!(topics.set_status("t2", "room", "s1", "dev-1", "busy", "", None).await, Err(TopicError::NotFound { .. })));
        // Every call checks the keys it names as a track does, whoever
        // calls (the command line reaches presence too).
        let long = "r".repeat(300);
        assert!(matches!(topics.set_status("", "room", "s1", "dev-1", "busy", "", None).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.set_status("t1", &long, "s1", "dev-1", "busy", "", None).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.untrack("t1", "room", "s\0", "dev-1").await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.list("t1", &long, None, "", 10).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.list("t1", "room", None, " ", 10).await, Err(TopicError::Invalid(_))));
        assert!(matches!(topics.count(" ", "room", None).await, Err(TopicError::Invalid(_))));
        assert_eq!(diffs(&store).await.len(), 1);
        assert_eq!(listed(&topics, "room", None).await.unwrap()[0].state, "available");
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
        let first = listed(&topics, "room", None).await.unwrap();
        assert_eq!((first[0].connection_id.as_str(), first[0].state.as_str()), ("c1", "available"));
        assert_eq!(diffs(&store).await.len(), 1);
        // The same device, reconnected, takes it over without a diff.
        let moved = topics.track(session("room", "s1", "c2")).await.unwrap();
        assert_eq!(moved.connection_id, "c2");
        assert_eq!(diffs(&store).await.len(), 1);
        // Not as someone else: a changed principal, kind or agent would
        // reach no subscriber, so it is refused and changes nothing.
        for differs in [
            TopicSession { principal: "bob".into(), ..session("room", "s1", "c3") },
            TopicSession { kind: "agent_for".into(), agent_id: Some("a-1".into()), ..session("room", "s1", "c3") },
        ] {
            assert!(matches!(topics.track(differs).await, Err(TopicError::Differs { .. })));
        }
        let now = listed(&topics, "room", None).await.unwrap();
        assert_eq!((now[0].connection_id.as_str(), now[0].principal.as_str()), ("c2", "alice"));
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
        topics.track(TopicSession { tenant_id: "t2".into(), ..session("room", "s5", "c0") }).await.unwrap();
        let pair = |t: &str, c: &str| (t.to_owned(), c.to_owned());
        let held = topics.edge_session_connections("edge-a", ("", ""), 10).await.unwrap();
        assert_eq!(held, (vec![pair("t1", "c1"), pair("t2", "c0"), pair("t2", "c2")], false));
        // In pages, each after the last pair of the one before.
        let first = topics.edge_session_connections("edge-a", ("", ""), 2).await.unwrap();
        assert_eq!(first, (vec![pair("t1", "c1"), pair("t2", "c0")], true));
        let second = topics.edge_session_connections("edge-a", ("t2", "c0"), 2).await.unwrap();
        assert_eq!(second, (vec![pair("t2", "c2")], false));
        assert!(topics.edge_session_connections("edge-c", ("", ""), 10).await.unwrap().0.is_empty());
        assert!(matches!(topics.edge_session_connections(" ", ("", ""), 10).await, Err(TopicError::Invalid(_))));
        // What the edge then does with a connection it no longer holds.
        assert_eq!(topics.untrack_connection("t1", "c1").await.unwrap(), 2);
        let held = topics.edge_session_connections("edge-a", ("", ""), 10).await.unwrap();
        assert_eq!(held, (vec![pair("t2", "c0"), pair("t2", "c2")], false));
    }

    async fn an_edge_back_under_its_name_forgets_its_earlier_sessions(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        topics.track(session("room", "s1", "c1")).await.unwrap();
        topics.track(session("room", "s2", "c2")).await.unwrap();
        topics.track(TopicSession { edge_id: "edge-b".into(), ..session("room", "s3", "c3") }).await.unwrap();
        assert_eq!(topics.forget_edge_sessions("edge-a").await.unwrap(), 2);
        let left: Vec<_> = listed(&topics, "room", None).await.unwrap().into_iter().map(|s| s.session_id).collect();
        assert_eq!(left, ["s3"]);
        let leaves = diffs(&store).await.into_iter().filter(|d| d["kind"] == "leave").count();
        assert_eq!(leaves, 2);
        assert!(matches!(topics.forget_edge_sessions(" ").await, Err(TopicError::Invalid(_))));
    }
}

/// Makes presence take `edge_id` for gone, as if it had not refreshed for
/// longer than the TTL.
async fn stale(store: &Store, edge_id: &str) {
    sqlx::query("UPDATE presence_edges SET refreshed_at_ms = 0 WHERE edge_id = $1")
        .bind(edge_id)
        .execute(store.pool())
        .await
        .unwrap();
}

/// How many sessions presence keeps aside for edges it took for gone.
async fn kept(store: &Store) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM topic_sessions_gone")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

muster_store::backend_suite! {
    async fn an_edge_taken_for_gone_revives_the_sessions_of_its_live_connections(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        let instances = muster_presence::Instances::new(Arc::new(store.clone()));
        let ttl = std::time::Duration::from_secs(60);
        assert!(!instances.touch("t1", &[], Some("edge-a")).await.unwrap().sessions_kept);
        topics.track(session("room", "s1", "c1")).await.unwrap();
        topics.set_status("t1", "room", "s1", "dev-1", "busy", "on a call", None).await.unwrap();
        topics.track(session("room", "s2", "c2")).await.unwrap();
        topics.track(session("hall", "s3", "c3")).await.unwrap();
        topics.track(session("hall", "s4", "c4")).await.unwrap();
        topics.track(session("yard", "s5", "c5")).await.unwrap();
        topics.set_status("t1", "yard", "s5", "dev-1", "blocked", "lunch", Some(now_ms() + 60_000)).await.unwrap();
        let before = listed(&topics, "room", None).await.unwrap();

        // Cut off for longer than the TTL: every session leaves.
        stale(&store, "edge-a").await;
        assert_eq!(topics.expire_edges(ttl).await.unwrap(), 5);
        assert!(listed(&topics, "room", None).await.unwrap().is_empty());
        assert_eq!(kept(&store).await, 5);
        // Meanwhile: s3's peer tracks it again through another edge; s4's
        // peer untracks it (it left, as far as it knows); s5's status
        // expires.
        topics.track(TopicSession { edge_id: "edge-b".into(), ..session("hall", "s3", "c9") }).await.unwrap();
        // (Its kept row went with that track; one left next to the live
        // row, as a sweep committing between the track's statements would,
        // must not come back either.)
        sqlx::query(
            "INSERT INTO topic_sessions_gone (tenant_id, topic, session_id, principal, kind, agent_id, since_ms, state, note, until_ms, edge_id, connection_id, device_id, gone_at_ms) \
             SELECT tenant_id, topic, session_id, principal, kind, agent_id, since_ms, state, note, until_ms, 'edge-a', 'c3', device_id, $1 FROM topic_sessions WHERE session_id = 's3'",
        )
        .bind(now_ms())
        .execute(store.pool()).await.unwrap();
        assert!(!topics.untrack("t1", "hall", "s4", "dev-1").await.unwrap());
        sqlx::query("UPDATE topic_sessions_gone SET until_ms = 1 WHERE session_id = 's5'")
            .execute(store.pool()).await.unwrap();

        // Back: every refresh says so until the edge revives.
        for _ in 0..2 {
            assert!(instances.touch("t1", &[], Some("edge-a")).await.unwrap().sessions_kept);
        }
        let joins = diffs(&store).await.into_iter().filter(|d| d["kind"] == "join").count();
        // c2 closed while the edge was cut off; the others are held. Two
        // calls, the way an edge with many connections makes them.
        assert_eq!(topics.revive_edge_sessions("edge-a", &["c1".into(), "c3".into()], false).await.unwrap(), 1);
        assert!(instances.touch("t1", &[], Some("edge-a")).await.unwrap().sessions_kept);
        assert_eq!(topics.revive_edge_sessions("edge-a", &["c4".into(), "c5".into()], true).await.unwrap(), 1);
        assert!(!instances.touch("t1", &[], Some("edge-a")).await.unwrap().sessions_kept);
        assert_eq!(kept(&store).await, 0, "the last call forgets the rest");

        let after = listed(&topics, "room", None).await.unwrap();
        assert_eq!(after, before[..1], "s1 as it was: since, status, note, connection");
        let hall = listed(&topics, "hall", None).await.unwrap();
        assert_eq!((hall.len(), hall[0].edge_id.as_str()), (1, "edge-b"), "the newer s3 stands, s4 stays out");
        let yard = listed(&topics, "yard", None).await.unwrap();
        assert_eq!((yard[0].state.as_str(), yard[0].note.as_str(), yard[0].until_ms), ("available", "", None));
        let d = diffs(&store).await;
        let new_joins: Vec<_> = d.iter().filter(|d| d["kind"] == "join").skip(joins).collect();
        let states: Vec<_> = new_joins.iter().map(|j| (j["session"].as_str().unwrap(), j["state"].as_str().unwrap())).collect();
        assert_eq!(states, [("s1", "busy"), ("s5", "available")]);
        // Nothing comes back twice, and bad requests change nothing.
        assert_eq!(topics.revive_edge_sessions("edge-a", &["c1".into(), "c2".into()], true).await.unwrap(), 0);
        assert!(matches!(topics.revive_edge_sessions(" ", &[], true).await, Err(TopicError::Invalid(_))));
        let too_many: Vec<String> = (0..=muster_presence::REVIVE_CONNECTIONS).map(|n| format!("c{n}")).collect();
        assert!(matches!(topics.revive_edge_sessions("edge-a", &too_many, true).await, Err(TopicError::Invalid(_))));
        assert_eq!(listed(&topics, "room", None).await.unwrap().len(), 1);
    }

    async fn a_peer_that_decides_for_a_kept_session_is_not_overruled(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        let instances = muster_presence::Instances::new(Arc::new(store.clone()));
        instances.touch("t1", &[], Some("edge-a")).await.unwrap();
        topics.track(session("room", "s1", "c1")).await.unwrap();
        topics.track(session("room", "s2", "c2")).await.unwrap();
        topics.track(TopicSession { device_id: "dev-2".into(), ..session("room", "s3", "c3") }).await.unwrap();
        stale(&store, "edge-a").await;
        topics.expire_edges(std::time::Duration::from_secs(60)).await.unwrap();
        // s1's peer untracks it: it is done with it. c2 closes. Another
        // device cannot drop s3.
        assert!(!topics.untrack("t1", "room", "s1", "dev-1").await.unwrap());
        assert_eq!(topics.untrack_connection("t1", "c2").await.unwrap(), 0);
        assert!(!topics.untrack("t1", "room", "s3", "dev-1").await.unwrap());
        // Nor take it over through another edge while it is kept aside.
        let taker = TopicSession { edge_id: "edge-b".into(), ..session("room", "s3", "c8") };
        assert!(matches!(topics.track(taker).await, Err(TopicError::Held { .. })));
        assert_eq!(kept(&store).await, 1);
        assert_eq!(topics.revive_edge_sessions("edge-a", &["c1".into(), "c2".into(), "c3".into()], true).await.unwrap(), 1);
        let left: Vec<_> = listed(&topics, "room", None).await.unwrap().into_iter().map(|s| s.session_id).collect();
        assert_eq!(left, ["s3"]);
    }

    async fn what_an_edge_taken_for_gone_left_goes_with_its_next_start_or_its_age(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        let instances = muster_presence::Instances::new(Arc::new(store.clone()));
        let ttl = std::time::Duration::from_secs(60);
        instances.touch("t1", &[], Some("edge-a")).await.unwrap();
        topics.track(session("room", "s1", "c1")).await.unwrap();
        stale(&store, "edge-a").await;
        topics.expire_edges(ttl).await.unwrap();
        assert_eq!(kept(&store).await, 1);
        // A new run of the edge holds none of the old connections.
        topics.forget_edge_sessions("edge-a").await.unwrap();
        assert_eq!(kept(&store).await, 0);
        assert_eq!(topics.revive_edge_sessions("edge-a", &["c1".into()], true).await.unwrap(), 0);

        // An edge that never comes back: its sessions are kept an hour.
        instances.touch("t1", &[], Some("edge-a")).await.unwrap();
        topics.track(session("room", "s1", "c1")).await.unwrap();
        stale(&store, "edge-a").await;
        topics.expire_edges(ttl).await.unwrap();
        let aged = now_ms() - muster_presence::GONE_KEPT.as_millis() as i64 - 1_000;
        sqlx::query("UPDATE topic_sessions_gone SET gone_at_ms = $1").bind(aged).execute(store.pool()).await.unwrap();
        topics.expire_edges(ttl).await.unwrap();
        assert_eq!(kept(&store).await, 0);
    }
}

muster_store::backend_suite! {
    async fn a_connection_holds_a_bounded_number_of_sessions(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        let limit = muster_presence::store::CONNECTION_SESSIONS as usize;
        for n in 0..limit {
            topics.track(session("room", &format!("s{n}"), "c1")).await.unwrap();
        }
        topics.track(session("room", "elsewhere", "c2")).await.unwrap();
        let theirs = TopicSession { device_id: "dev-2".into(), ..session("room", "theirs", "c3") };
        topics.track(theirs).await.unwrap();
        let joins = diffs(&store).await.len();
        assert!(matches!(topics.track(session("room", "one-more", "c1")).await, Err(TopicError::Full)));
        // Nor may a session move onto the full connection.
        assert!(matches!(topics.track(session("room", "elsewhere", "c1")).await, Err(TopicError::Full)));
        // Another device's session is refused as such, room or not.
        assert!(matches!(topics.track(session("room", "theirs", "c1")).await, Err(TopicError::Held { .. })));
        assert_eq!(diffs(&store).await.len(), joins, "a refused track changes nothing");
        // Tracking one it holds again is no new session.
        topics.track(session("room", "s7", "c1")).await.unwrap();
        topics.untrack("t1", "room", "s0", "dev-1").await.unwrap();
        topics.track(session("room", "one-more", "c1")).await.unwrap();

        // Sessions kept aside for an edge taken for gone come back only as
        // far as their connection has room: c2 filled up meanwhile.
        let instances = muster_presence::Instances::new(Arc::new(store.clone()));
        instances.touch("t1", &[], Some("edge-a")).await.unwrap();
        topics.track(session("hall", "kept-1", "c2")).await.unwrap();
        topics.track(session("hall", "kept-2", "c2")).await.unwrap();
        stale(&store, "edge-a").await;
        topics.expire_edges(std::time::Duration::from_secs(60)).await.unwrap();
        for n in 0..limit - 1 {
            topics.track(session("yard", &format!("y{n}"), "c2")).await.unwrap();
        }
        instances.touch("t1", &[], Some("edge-a")).await.unwrap();
        assert_eq!(topics.revive_edge_sessions("edge-a", &["c2".into()], true).await.unwrap(), 1);
        let held: i64 = sqlx::query("SELECT COUNT(*) FROM topic_sessions WHERE connection_id = 'c2'")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(held, limit as i64);
    }
}

muster_store::backend_suite! {
    async fn sessions_of_an_edge_that_never_refreshed_expire_too(store: Store) {
        let topics = Topics::new(Arc::new(store.clone()));
        // Tracked before the edge's first refresh, and the edge is gone.
        topics.track(TopicSession { edge_id: "edge-z".into(), ..session("room", "s1", "c1") }).await.unwrap();
        assert_eq!(topics.expire_edges(std::time::Duration::from_secs(60)).await.unwrap(), 0);
        sqlx::query("UPDATE presence_edges SET refreshed_at_ms = 0 WHERE edge_id = 'edge-z'")
            .execute(store.pool()).await.unwrap();
        assert_eq!(topics.expire_edges(std::time::Duration::from_secs(60)).await.unwrap(), 1);
        assert!(listed(&topics, "room", None).await.unwrap().is_empty());
    }
}
