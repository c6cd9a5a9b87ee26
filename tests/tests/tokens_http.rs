//! Operator tokens over HTTP (PROTOCOL.md Part B §9: Tyrum's
//! `/auth/tokens` routes): issue, list, edit and revoke, admin only, with
//! the tokens they mint admitting WebSocket peers until revoked, edited or
//! expired.

use muster_e2e::Host;
use muster_e2e::ws::{TokenVia, Ws, open};
use muster_e2e::{http_get, http_json, http_post, http_send, http_status};
use muster_protocol::device::DeviceKey;
use serde_json::{Value, json};

async fn connected(host: &Host, token: &str) -> Ws {
    let mut ws = open(&host.ws_url(), token, TokenVia::Bearer, None)
        .await
        .unwrap();
    ws.handshake(&DeviceKey::generate(), "client", json!({"mode": "ui"}))
        .await;
    ws
}

fn tokens(host: &Host, bearer: &str) -> Vec<Value> {
    let listed = http_get(&format!("{}/auth/tokens", host.http_base()), Some(bearer));
    assert_eq!(http_status(&listed), 200, "{listed}");
    http_json(&listed)["tokens"].as_array().unwrap().clone()
}

muster_e2e::on_both_stores! {
    async fn an_admin_issues_lists_and_revokes_tokens(store: Option<String>) {
        let host = Host::start(store).await;
        let admin = host.admin_token();
        let issue = format!("{}/auth/tokens/issue", host.http_base());
        let revoke = format!("{}/auth/tokens/revoke", host.http_base());

        let (status, issued) = http_post(
            &issue,
            Some(&admin),
            r#"{"display_name": " ci ", "role": "client", "scopes": ["operator.read"]}"#,
        );
        assert_eq!(status, 201, "{issued}");
        let mut keys: Vec<&str> = issued.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["display_name", "issued_at", "role", "scopes", "tenant_id", "token", "token_id", "updated_at"]
        );
        assert_eq!(issued["display_name"], "ci");
        assert_eq!(issued["scopes"], json!(["operator.read"]));
        assert_eq!(issued["tenant_id"], muster::DEFAULT_TENANT);
        let token = issued["token"].as_str().unwrap().to_owned();
        let token_id = issued["token_id"].as_str().unwrap().to_owned();

        // The new token admits a peer, with its scopes.
        let mut reader = connected(&host, &token).await;
        assert_eq!(reader.call("ping", json!({})).await["ok"], true);

        let listed = tokens(&host, &admin);
        let item = listed.iter().find(|t| t["token_id"] == token_id).unwrap();
        assert_eq!(item["display_name"], "ci");
        assert_eq!((&item["revoked_at"], &item["expires_at"], &item["device_id"]), (&Value::Null, &Value::Null, &Value::Null));
        assert!(!listed.iter().any(|t| t.to_string().contains(&token)), "no secret in a listing");

        // Revoking closes its live connection, on every edge.
        let (status, revoked) = http_post(&revoke, Some(&admin), &json!({"token_id": token_id}).to_string());
        assert_eq!((status, revoked), (200, json!({"revoked": true, "token_id": token_id})));
        assert_eq!(reader.closed().await, (4001, "token revoked".to_owned()));
        let (_, again) = http_post(&revoke, Some(&admin), &json!({"token_id": token_id}).to_string());
        assert_eq!(again, json!({"revoked": false}));
        let (_, unknown) = http_post(&revoke, Some(&admin), r#"{"token_id": "no-such-token"}"#);
        assert_eq!(unknown, json!({"revoked": false}));
        let item = tokens(&host, &admin).into_iter().find(|t| t["token_id"] == token_id).unwrap();
        assert!(item["revoked_at"].is_string(), "{item}");

        // Another tenant's token is not the caller's to revoke.
        let (other_id, other) = host.client_token_in("other-tenant", &["operator.read"]).await;
        let (_, foreign) = http_post(&revoke, Some(&admin), &json!({"token_id": other_id}).to_string());
        assert_eq!(foreign, json!({"revoked": false}));
        connected(&host, &other).await;
        assert!(!tokens(&host, &admin).iter().any(|t| t["token_id"] == other_id));

        // Node tokens name their device.
        let device = DeviceKey::generate().device_id();
        let (status, node) = http_post(
            &issue,
            Some(&admin),
            &json!({"role": "node", "device_id": device}).to_string(),
        );
        assert_eq!(status, 201, "{node}");
        assert_eq!((&node["device_id"], &node["display_name"]), (&json!(device), &json!("node token")));
        host.stop().await;
    }
}

muster_e2e::on_both_stores! {
    async fn only_admins_manage_tokens_and_bad_requests_mint_nothing(store: Option<String>) {
        let host = Host::start(store).await;
        let admin = host.admin_token();
        let base = host.http_base();
        let issue = format!("{base}/auth/tokens/issue");
        let (_, reader) = host.client_token(&["operator.read", "operator.write"]).await;
        let (_, token_admin) = host.client_token(&["operator.admin"]).await;
        let before = tokens(&host, &admin).len();

        let forbidden = json!({"error": "forbidden", "message": "admin token required"});
        let body = r#"{"role": "client"}"#;
        assert_eq!(http_post(&issue, Some(&reader), body), (403, forbidden.clone()));
        assert_eq!(http_post(&format!("{base}/auth/tokens/revoke"), Some(&reader), r#"{"token_id": "x"}"#), (403, forbidden.clone()));
        let listed = http_get(&format!("{base}/auth/tokens"), Some(&reader));
        assert_eq!((http_status(&listed), http_json(&listed)), (403, forbidden));
        assert_eq!(http_post(&issue, None, body).0, 401);
        // Answers are kept by no cache; a refused bearer is told the scheme.
        let headers = |response: &str| response.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        for path in ["/auth/tokens", "/status", "/presence"] {
            let unauthorized = http_get(&format!("{base}{path}"), None);
            assert_eq!(http_status(&unauthorized), 401, "{path}");
            assert!(headers(&unauthorized).contains("\r\nwww-authenticate: bearer"), "{unauthorized}");
            let answered = http_get(&format!("{base}{path}"), Some(&admin));
            assert_eq!(http_status(&answered), 200, "{path}");
            assert!(headers(&answered).contains("\r\ncache-control: no-store"), "{answered}");
            assert!(!headers(&answered).contains("www-authenticate"), "{answered}");
        }
        assert_eq!(http_post(&issue, Some("muster_not-a-token"), body).0, 401);

        for bad in [
            "not json",
            r#"{"role": "client", "tenant_id": "other"}"#,
            r#"{"role": "root"}"#,
            r#"{"role": "client", "scopes": ["root"]}"#,
            r#"{"role": "client", "scopes": [" "]}"#,
            r#"{"role": "client", "display_name": ""}"#,
            r#"{"role": "client", "ttl_seconds": 0}"#,
            r#"{"role": "client", "ttl_seconds": -5}"#,
            r#"{"role": "client", "ttl_seconds": 31536001}"#,
            r#"{"role": "node"}"#,
            r#"{"role": "client", "device_id": "dev_x"}"#,
        ] {
            let (status, refused) = http_post(&issue, Some(&admin), bad);
            assert_eq!(status, 400, "{bad}: {refused}");
            assert_eq!(refused["error"], "invalid_request", "{bad}");
            assert!(refused["message"].as_str().is_some_and(|m| !m.is_empty()), "{bad}");
        }
        assert_eq!(http_post(&issue, Some(&admin), "not json").1["message"], "invalid json");
        assert_eq!(tokens(&host, &admin).len(), before, "nothing minted");

        // A token with operator.admin manages tokens, but gives no more
        // than it holds: no admin tokens, no scopes it lacks, and it
        // cannot revoke an admin token.
        let (status, _) = http_post(&issue, Some(&token_admin), body);
        assert_eq!(status, 201);
        let (status, _) = http_post(&issue, Some(&token_admin), r#"{"role": "client", "scopes": ["operator.admin"]}"#);
        assert_eq!(status, 201);
        for beyond in [r#"{"role": "admin"}"#, r#"{"role": "client", "scopes": ["operator.write"]}"#, r#"{"role": "client", "scopes": ["*"]}"#] {
            let (status, refused) = http_post(&issue, Some(&token_admin), beyond);
            assert_eq!((status, &refused["error"]), (403, &json!("forbidden")), "{beyond}: {refused}");
        }
        // Nor node tokens without pairing's scope: issued, or made of a
        // client token by an edit.
        let device = DeviceKey::generate().device_id();
        let node = json!({"role": "node", "device_id": device}).to_string();
        let (status, refused) = http_post(&issue, Some(&token_admin), &node);
        assert_eq!((status, &refused["message"]), (403, &json!("node tokens need operator.pairing")), "{refused}");
        let (_, client) = http_post(&issue, Some(&admin), body);
        let (status, refused) = http_send(
            "PATCH",
            &format!("{base}/auth/tokens/{}", client["token_id"].as_str().unwrap()),
            Some(&token_admin),
            &node,
        );
        assert_eq!((status, &refused["error"]), (403, &json!("forbidden")), "{refused}");
        let (_, pairing_admin) = host.client_token(&["operator.admin", "operator.pairing"]).await;
        let (status, issued) = http_post(&issue, Some(&pairing_admin), &node);
        assert_eq!(status, 201, "{issued}");

        let listed = tokens(&host, &token_admin);
        assert_eq!(listed.len(), before + 5);
        let initial = listed.iter().find(|t| t["role"] == "admin").unwrap()["token_id"].clone();
        let (status, _) = http_post(&format!("{base}/auth/tokens/revoke"), Some(&token_admin), &json!({"token_id": initial}).to_string());
        assert_eq!(status, 403);
        assert!(tokens(&host, &admin).iter().all(|t| t["revoked_at"].is_null()));
        host.stop().await;
    }
}

// Revoking a delegate takes back what it issued: the tokens issued on
// its behalf, and on theirs, are revoked with it and their connections
// close, on every edge. Tokens made otherwise stay. A delegate revokes
// only tokens it could have issued.
muster_e2e::on_both_stores! {
    async fn revoking_a_delegate_revokes_what_it_issued(store: Option<String>) {
        let host = Host::start(store).await;
        let admin = host.admin_token();
        let base = host.http_base();
        let issue = format!("{base}/auth/tokens/issue");
        let revoke = format!("{base}/auth/tokens/revoke");
        let minted = |bearer: &str, body: &str| {
            let (status, issued) = http_post(&issue, Some(bearer), body);
            assert_eq!(status, 201, "{issued}");
            (issued["token_id"].as_str().unwrap().to_owned(), issued["token"].as_str().unwrap().to_owned())
        };
        let (delegate_id, delegate) = minted(&admin, r#"{"role": "client", "scopes": ["operator.admin", "operator.read"]}"#);
        let (reader_id, reader) = minted(&delegate, r#"{"role": "client", "scopes": ["operator.read"]}"#);
        let (sub_id, sub) = minted(&delegate, r#"{"role": "client", "scopes": ["operator.admin", "operator.read"]}"#);
        let (_, sub_reader) = minted(&sub, r#"{"role": "client", "scopes": ["operator.read"]}"#);
        let (_, bystander) = host.client_token(&["operator.read"]).await;

        // A delegate revokes no token it could not have issued: not a node
        // token without pairing's scope, not one with scopes it lacks.
        let node_id = host.node_token_id(&DeviceKey::generate().device_id()).await;
        let (wide_id, _) = host.client_token(&["*"]).await;
        for target in [&node_id, &wide_id] {
            let (status, refused) = http_post(&revoke, Some(&delegate), &json!({"token_id": target}).to_string());
            assert_eq!((status, &refused["error"]), (403, &json!("forbidden")), "{refused}");
            // Nor edits them: an edit closes a token's connections too.
            let (status, refused) = http_send("PATCH", &format!("{base}/auth/tokens/{target}"), Some(&delegate), r#"{"display_name": "mine now"}"#);
            assert_eq!((status, &refused["error"]), (403, &json!("forbidden")), "{refused}");
        }
        // What an admin token issues is the tenant's: replacing the admin
        // token takes none of it back.
        let (admin_two_id, admin_two) = minted(&admin, r#"{"role": "admin"}"#);
        let (_, kept) = minted(&admin_two, r#"{"role": "client", "scopes": ["operator.read"]}"#);
        let (status, _) = http_post(&revoke, Some(&admin), &json!({"token_id": admin_two_id}).to_string());
        assert_eq!(status, 200);
        assert_eq!(connected(&host, &kept).await.call("ping", json!({})).await["ok"], true);

        let mut peers = Vec::new();
        for token in [&reader, &sub_reader, &bystander] {
            peers.push(connected(&host, token).await);
        }
        let (status, revoked) = http_post(&revoke, Some(&admin), &json!({"token_id": delegate_id}).to_string());
        assert_eq!((status, revoked), (200, json!({"revoked": true, "token_id": delegate_id})));
        let mut bystander_ws = peers.pop().unwrap();
        for mut ws in peers {
            assert_eq!(ws.closed().await, (4001, "token revoked".to_owned()));
        }
        assert_eq!(bystander_ws.call("ping", json!({})).await["ok"], true);
        let listed = tokens(&host, &admin);
        for id in [&delegate_id, &reader_id, &sub_id] {
            let item = listed.iter().find(|t| t["token_id"] == id.as_str()).unwrap();
            assert!(item["revoked_at"].is_string(), "{item}");
        }
        for token in [&reader, &sub_reader] {
            let mut refused = open(&host.ws_url(), token, TokenVia::Bearer, None).await.unwrap();
            assert_eq!(refused.closed().await, (4001, "unauthorized".to_owned()));
        }
        for id in [&node_id, &wide_id] {
            let item = listed.iter().find(|t| t["token_id"] == id.as_str()).unwrap();
            assert!(item["revoked_at"].is_null(), "{item}");
        }
        host.stop().await;
    }
}

// A time limit on a delegated operator.admin token holds: what it issues
// or edits may not outlive it.
muster_e2e::on_both_stores! {
    async fn a_time_limited_token_admin_makes_no_token_that_outlives_it(store: Option<String>) {
        let host = Host::start(store).await;
        let admin = host.admin_token();
        let base = host.http_base();
        let issue = format!("{base}/auth/tokens/issue");
        let (status, limited) = http_post(&issue, Some(&admin), r#"{"role": "client", "scopes": ["operator.admin"], "ttl_seconds": 3600}"#);
        assert_eq!(status, 201, "{limited}");
        let (limited_id, limited) = (limited["token_id"].as_str().unwrap().to_owned(), limited["token"].as_str().unwrap().to_owned());
        let before = tokens(&host, &admin);

        for beyond in [
            r#"{"role": "client", "scopes": ["operator.admin"]}"#,
            r#"{"role": "client", "ttl_seconds": 7200}"#,
        ] {
            let (status, refused) = http_post(&issue, Some(&limited), beyond);
            assert_eq!((status, &refused["error"]), (403, &json!("forbidden")), "{beyond}: {refused}");
        }
        let (status, within) = http_post(&issue, Some(&limited), r#"{"role": "client", "ttl_seconds": 60}"#);
        assert_eq!(status, 201, "{within}");
        let within_id = within["token_id"].as_str().unwrap();

        // Nor may it lift its own limit, or another token's.
        for (id, body) in [(limited_id.as_str(), r#"{"expires_at": null}"#), (within_id, r#"{"expires_at": null}"#), (within_id, r#"{"expires_at": "2999-01-01T00:00:00Z"}"#)] {
            let (status, refused) = http_send("PATCH", &format!("{base}/auth/tokens/{id}"), Some(&limited), body);
            assert_eq!((status, &refused["error"]), (403, &json!("forbidden")), "{id} {body}: {refused}");
        }
        let (status, renamed) = http_send("PATCH", &format!("{base}/auth/tokens/{within_id}"), Some(&limited), r#"{"display_name": "short"}"#);
        assert_eq!(status, 200, "{renamed}");
        let after = tokens(&host, &admin);
        assert_eq!(after.len(), before.len() + 1, "only the token within reach was minted");
        let own = after.iter().find(|t| t["token_id"] == limited_id.as_str()).unwrap();
        assert!(own["expires_at"].is_string(), "{own}");
        host.stop().await;
    }
}

// A token issued with a lifetime admits peers until it expires; then its
// live connections close with 4001 `token invalidated` (within a ping
// interval) and it is refused everywhere.
muster_e2e::on_both_stores! {
    async fn an_expired_token_is_refused_and_its_connections_close(store: Option<String>) {
        let host = Host::start(store).await;
        let admin = host.admin_token();
        let (status, issued) = http_post(
            &format!("{}/auth/tokens/issue", host.http_base()),
            Some(&admin),
            r#"{"role": "client", "scopes": ["operator.read"], "ttl_seconds": 5}"#,
        );
        assert_eq!(status, 201, "{issued}");
        let expires_at = issued["expires_at"].as_str().unwrap();
        let expires = muster_protocol::parse_datetime(expires_at).unwrap();
        let issued_at = muster_protocol::parse_datetime(issued["issued_at"].as_str().unwrap()).unwrap();
        assert_eq!(expires - issued_at, 5000);
        let token = issued["token"].as_str().unwrap().to_owned();
        let listed = tokens(&host, &admin);
        let item = listed.iter().find(|t| t["token_id"] == issued["token_id"]).unwrap();
        assert_eq!(item["expires_at"], expires_at);

        let mut ws = connected(&host, &token).await;
        assert_eq!(ws.closed().await, (4001, "token invalidated".to_owned()));
        // At its expiry, by the wall clock the expiry is stated in; not
        // before it, and not only at some much later sweep.
        let late_by = muster_store::now_ms() - expires;
        assert!((0..20_000).contains(&late_by), "closed {late_by} ms after the expiry");

        let mut refused = open(&host.ws_url(), &token, TokenVia::Bearer, None).await.unwrap();
        assert_eq!(refused.closed().await, (4001, "unauthorized".to_owned()));
        let status = http_get(&format!("{}/status", host.http_base()), Some(&token));
        assert_eq!(http_status(&status), 401);
        host.stop().await;
    }
}

// Editing a token closes its live connections with 4001 `token updated`;
// they come back with the new claims. A bad edit changes nothing.
muster_e2e::on_both_stores! {
    async fn an_edit_closes_the_tokens_connections_and_takes_effect(store: Option<String>) {
        let host = Host::start(store).await;
        let admin = host.admin_token();
        let base = host.http_base();
        let (token_id, token) = host.client_token(&["operator.read"]).await;
        let edit = format!("{base}/auth/tokens/{token_id}");
        let mut reader = connected(&host, &token).await;

        let (status, edited) = http_send(
            "PATCH",
            &edit,
            Some(&admin),
            r#"{"display_name": "ci-2", "scopes": ["operator.write", "operator.read"]}"#,
        );
        assert_eq!(status, 200, "{edited}");
        assert_eq!(edited["token"]["display_name"], "ci-2");
        assert_eq!(edited["token"]["scopes"], json!(["operator.read", "operator.write"]));
        assert_eq!(reader.closed().await, (4001, "token updated".to_owned()));
        // Back with the new claims.
        let mut again = connected(&host, &token).await;
        assert_eq!(again.call("ping", json!({})).await["ok"], true);
        // A new name changes no claims: the connection stays.
        let (status, renamed) = http_send("PATCH", &edit, Some(&admin), r#"{"display_name": "ci-3"}"#);
        assert_eq!((status, &renamed["token"]["display_name"]), (200, &json!("ci-3")));
        // As long as Tyrum lets a display name be: 120 characters, of four
        // bytes each here.
        let longest = "😀".repeat(120);
        let body = json!({"display_name": longest}).to_string();
        let (status, renamed) = http_send("PATCH", &edit, Some(&admin), &body);
        assert_eq!((status, &renamed["token"]["display_name"]), (200, &json!(longest)), "{renamed}");

        let before = tokens(&host, &admin);
        for (body, status, error) in [
            ("{}", 400, "invalid_request"),
            (r#"{"expires_at": "soon"}"#, 400, "invalid_request"),
            (r#"{"expires_at": "1970-01-01T00:00:00.000Z"}"#, 400, "invalid_request"),
            (r#"{"expires_at": "2999-01-01T00:00:00.000Z"}"#, 400, "invalid_request"),
            (r#"{"device_id": "dev_x"}"#, 400, "invalid_request"),
            (r#"{"role": "node"}"#, 400, "invalid_request"),
            (r#"{"scopes": ["root"]}"#, 400, "invalid_request"),
            (r#"{"label": "x"}"#, 400, "invalid_request"),
        ] {
            let (got, refused) = http_send("PATCH", &edit, Some(&admin), body);
            assert_eq!((got, refused["error"].as_str()), (status, Some(error)), "{body}: {refused}");
        }
        let (status, missing) = http_send("PATCH", &format!("{base}/auth/tokens/no-such"), Some(&admin), r#"{"display_name": "x"}"#);
        assert_eq!((status, missing), (404, json!({"error": "not_found", "message": "token not found"})));
        assert_eq!(tokens(&host, &admin), before, "bad edits change nothing");
        assert_eq!(again.call("ping", json!({})).await["ok"], true, "nor close anything");

        // An expiry in the past ends the token at once; null lifts it.
        let (status, _) = http_send("PATCH", &edit, Some(&admin), r#"{"expires_at": "2020-01-01T00:00:00.000Z"}"#);
        assert_eq!(status, 200);
        assert_eq!(again.closed().await, (4001, "token updated".to_owned()));
        let mut refused = open(&host.ws_url(), &token, TokenVia::Bearer, None).await.unwrap();
        assert_eq!(refused.closed().await, (4001, "unauthorized".to_owned()));
        let (status, lifted) = http_send("PATCH", &edit, Some(&admin), r#"{"expires_at": null}"#);
        assert_eq!((status, &lifted["token"]["expires_at"]), (200, &Value::Null));
        connected(&host, &token).await;

        // A token that is not an admin token edits no admin token and gives
        // no more than it holds; nobody edits a revoked token.
        let (_, token_admin) = host.client_token(&["operator.admin"]).await;
        let initial = before.iter().find(|t| t["role"] == "admin").unwrap()["token_id"].as_str().unwrap().to_owned();
        for (url, body) in [
            (format!("{base}/auth/tokens/{initial}"), r#"{"display_name": "mine"}"#),
            (edit.clone(), r#"{"role": "admin"}"#),
            (edit.clone(), r#"{"scopes": ["operator.write"]}"#),
            // The token holds operator.write: no edit of it is within reach.
            (edit.clone(), r#"{"expires_at": null}"#),
        ] {
            let (status, refused) = http_send("PATCH", &url, Some(&token_admin), body);
            assert_eq!((status, &refused["error"]), (403, &json!("forbidden")), "{body}");
        }
        http_post(&format!("{base}/auth/tokens/revoke"), Some(&admin), &json!({"token_id": token_id}).to_string());
        let (status, conflict) = http_send("PATCH", &edit, Some(&admin), r#"{"display_name": "late"}"#);
        assert_eq!((status, conflict), (409, json!({"error": "conflict", "message": "revoked tokens cannot be edited"})));
        host.stop().await;
    }
}
