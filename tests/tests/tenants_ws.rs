//! Randomized multi-tenant delivery: peers of several tenants with
//! different scopes, items of random tenants, audiences and targets
//! (devices and connections of other tenants, and one device key connected
//! in every tenant) from concurrent producers. Every peer gets exactly the
//! items of its own tenant that its role, scopes, device and connection
//! admit: zero cross-tenant deliveries, nothing missing. On SQLite and on
//! Postgres.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use muster_e2e::Host;
use muster_e2e::ws::{Next, TokenVia, Ws, open};
use muster_protocol::device::DeviceKey;
use muster_store::outbox::{self, NewItem, Target};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::json;

const KIND: &str = "muster.test.random";
const SENTINEL: &str = "muster.test.sentinel";
const TENANTS: [&str; 3] = ["tenant-a", "tenant-b", "tenant-c"];
const SCOPES: [&[&str]; 3] = [
    &["operator.read"],
    &["operator.write"],
    &["operator.read", "operator.write"],
];

struct Peer {
    tenant: &'static str,
    scopes: &'static [&'static str],
    device: String,
    connection: String,
    ws: Ws,
}

impl Peer {
    fn admits(&self, item: &NewItem) -> bool {
        item.tenant_id == self.tenant
            && (item.audience_roles.is_empty() || item.audience_roles.iter().any(|r| r == "client"))
            && (item.audience_scopes.is_empty()
                || item
                    .audience_scopes
                    .iter()
                    .any(|s| self.scopes.contains(&s.as_str())))
            && match &item.target {
                None => true,
                Some(Target::Device(device)) => *device == self.device,
                Some(Target::Connection(connection)) => *connection == self.connection,
                Some(Target::Edge(_)) => false,
            }
    }
}

async fn tenants_flow(host: &Host) {
    let mut peers = Vec::new();
    // The same device in every tenant: an item for it in one tenant is not
    // for it in another.
    let everywhere = DeviceKey::generate();
    for tenant in TENANTS {
        for (n, scopes) in SCOPES.into_iter().enumerate() {
            let (_, token) = host.client_token_in(tenant, scopes).await;
            let key = if n == 0 {
                DeviceKey::from_seed(everywhere.seed())
            } else {
                DeviceKey::generate()
            };
            let mut ws = open(&host.ws_url(), &token, TokenVia::Bearer, None)
                .await
                .unwrap();
            let connected = ws.handshake(&key, "client", json!({"mode": "cli"})).await;
            peers.push(Peer {
                tenant,
                scopes,
                device: key.device_id(),
                connection: connected["client_id"].as_str().unwrap().to_owned(),
                ws,
            });
        }
    }
    let devices: Vec<String> = peers.iter().map(|p| p.device.clone()).collect();
    let connections: Vec<String> = peers.iter().map(|p| p.connection.clone()).collect();

    // Every peer reads all along (pongs keep flowing) until its tenant's
    // sentinel, committed after every item, arrives: a peer's items come
    // in commit order, so nothing of the run is still on its way then.
    let readers: Vec<_> = peers
        .into_iter()
        .map(|mut peer| {
            tokio::spawn(async move {
                let mut received = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
                loop {
                    match peer.ws.next(Duration::from_secs(2)).await {
                        Next::Json(frame) if frame["type"] == KIND => received.push(frame),
                        Next::Json(frame) if frame["type"] == SENTINEL => {
                            assert_eq!(frame["payload"]["tenant"], peer.tenant, "{frame}");
                            break;
                        }
                        Next::Json(_) => {}
                        Next::Silent if tokio::time::Instant::now() > deadline => {
                            panic!("no sentinel for a peer of {}", peer.tenant)
                        }
                        Next::Silent => {}
                        other => panic!("{other:?}"),
                    }
                }
                (peer, received)
            })
        })
        .collect();

    let store = host.store().await;
    // Three producers at once, 50 items each.
    let producers = (0..3).map(|producer| {
        let (store, devices, connections) = (store.clone(), devices.clone(), connections.clone());
        tokio::spawn(async move {
            let mut items = Vec::new();
            for n in 0..50 {
                let item = {
                    let mut rng = rand::rng();
                    let tenant = *TENANTS.choose(&mut rng).unwrap();
                    let mut item = NewItem::event(
                        tenant,
                        KIND,
                        json!({"tenant": tenant, "producer": producer, "n": n}),
                    );
                    item.audience_roles = match rng.random_range(0..4) {
                        0 => vec!["node".into()],
                        1 => vec!["client".into()],
                        _ => vec![],
                    };
                    item.audience_scopes = match rng.random_range(0..3) {
                        0 => vec![],
                        1 => vec!["operator.read".into()],
                        _ => vec!["operator.write".into()],
                    };
                    item.target = match rng.random_range(0..10) {
                        0..=2 => Some(Target::Device(devices.choose(&mut rng).unwrap().clone())),
                        3 => Some(Target::Connection(
                            connections.choose(&mut rng).unwrap().clone(),
                        )),
                        _ => None,
                    };
                    item
                };
                let mut tx = store.begin().await.unwrap();
                outbox::append(&mut tx, &item).await.unwrap();
                store.commit(tx).await.unwrap();
                items.push(item);
            }
            items
        })
    });
    let mut items = Vec::new();
    for produced in futures::future::join_all(producers).await {
        items.extend(produced.unwrap());
    }
    for tenant in TENANTS {
        let mut tx = store.begin().await.unwrap();
        outbox::append(
            &mut tx,
            &NewItem::event(tenant, SENTINEL, json!({"tenant": tenant})),
        )
        .await
        .unwrap();
        store.commit(tx).await.unwrap();
    }

    let by_id: HashMap<&str, &NewItem> = items.iter().map(|i| (i.event_id.as_str(), i)).collect();
    let mut delivered_anything = false;
    for reader in readers {
        let (peer, frames) = reader.await.unwrap();
        let expected: HashSet<&str> = items
            .iter()
            .filter(|i| peer.admits(i))
            .map(|i| i.event_id.as_str())
            .collect();
        let mut received = HashSet::new();
        for frame in &frames {
            let id = frame["event_id"].as_str().unwrap();
            let item = by_id[id];
            assert_eq!(
                item.tenant_id, peer.tenant,
                "cross-tenant delivery: {frame}"
            );
            assert_eq!(frame["payload"]["tenant"], peer.tenant, "{frame}");
            assert!(
                peer.admits(item),
                "{frame} reached a peer it does not admit"
            );
            received.insert(id);
        }
        assert_eq!(
            received, expected,
            "peer of {} with {:?}",
            peer.tenant, peer.scopes
        );
        delivered_anything |= !received.is_empty();
    }
    assert!(delivered_anything);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_cross_tenant_deliveries_on_sqlite() {
    let host = Host::start(None).await;
    tenants_flow(&host).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_cross_tenant_deliveries_on_postgres() {
    let url = muster_store::testing::create_postgres_database().await;
    let host = Host::start(Some(url)).await;
    tenants_flow(&host).await;
    host.stop().await;
}
