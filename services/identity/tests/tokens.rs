//! Operator tokens on SQLite and on Postgres.

use std::sync::Arc;

use muster_identity::{Role, TokenChange, TokenError, Tokens};
use muster_store::Store;

async fn outbox_text(store: &Store) -> String {
    let items = muster_store::testing::outbox_items(store, "t1")
        .await
        .unwrap();
    serde_json::to_string(
        &items
            .iter()
            .map(|i| (&i.kind, &i.payload))
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

muster_store::backend_suite! {
    async fn minted_tokens_verify_until_revoked(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let (record, secret) = tokens
            .create("t1", Role::Client, vec!["operator.read".into(), "operator.read".into()], "ci", None, None)
            .await
            .unwrap();
        assert_eq!(record.scopes, vec!["operator.read".to_string()]);
        assert!(secret.expose().len() >= 43);
        assert!(!format!("{secret:?}").contains(secret.expose()));

        let verified = tokens.verify(secret.expose()).await.unwrap();
        assert_eq!(verified, record);
        assert!(matches!(tokens.verify("muster_wrong").await, Err(TokenError::Unrecognized)));

        let revoked = tokens.revoke(&record.token_id, None, None).await.unwrap();
        assert!(revoked.revoked_at_ms.is_some());
        assert!(matches!(tokens.verify(secret.expose()).await, Err(TokenError::Unrecognized)));
        assert!(matches!(tokens.revoke(&record.token_id, None, None).await, Err(TokenError::NotFound(_))));

        let events = outbox_text(&store).await;
        assert!(events.contains("token.created") && events.contains("token.revoked"), "{events}");
        // The secret and its digest stay out of the outbox.
        assert!(!events.contains(secret.expose()), "{events}");
        let listed = tokens.list("t1").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(tokens.list("t2").await.unwrap().is_empty());
        // One token, as listed (revoked too), never another tenant's.
        assert_eq!(tokens.list_one("t1", &record.token_id).await.unwrap(), listed);
        assert!(tokens.list_one("t2", &record.token_id).await.unwrap().is_empty());
        assert!(tokens.list_one("t1", "no such token").await.unwrap().is_empty());
        // Ids no token could have name none, on both stores alike.
        for id in ["nul\0", &"x".repeat(10_000)] {
            assert!(tokens.list_one("t1", id).await.unwrap().is_empty());
            assert!(matches!(tokens.revoke(id, None, None).await, Err(TokenError::NotFound(_))));
        }
    }

    async fn revoking_a_token_revokes_the_tokens_issued_on_its_behalf(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let issue = |by: Option<String>, tenant: &'static str| {
            let tokens = tokens.clone();
            async move {
                tokens
                    .create_expiring_by(tenant, Role::Client, vec!["operator.admin".into()], "x", None, None, None, by.as_deref())
                    .await
            }
        };
        let (delegate, _) = issue(None, "t1").await.unwrap();
        let (child, child_secret) = issue(Some(delegate.token_id.clone()), "t1").await.unwrap();
        assert_eq!(child.issued_by.as_deref(), Some(delegate.token_id.as_str()));
        let (grandchild, grandchild_secret) = issue(Some(child.token_id.clone()), "t1").await.unwrap();
        let (bystander, bystander_secret) = issue(None, "t1").await.unwrap();
        // Only on behalf of a live token of the same tenant.
        assert!(matches!(issue(Some(delegate.token_id.clone()), "t2").await, Err(TokenError::Forbidden(_))));
        assert!(matches!(issue(Some("no such token".into()), "t1").await, Err(TokenError::Forbidden(_))));

        tokens.revoke(&delegate.token_id, Some("t1"), None).await.unwrap();
        for secret in [&child_secret, &grandchild_secret] {
            assert!(matches!(tokens.verify(secret.expose()).await, Err(TokenError::Unrecognized)));
        }
        assert_eq!(tokens.verify(bystander_secret.expose()).await.unwrap(), bystander);
        let listed = tokens.list("t1").await.unwrap();
        for id in [&child.token_id, &grandchild.token_id] {
            let record = listed.iter().find(|r| &r.token_id == id).unwrap();
            assert!(record.revoked_at_ms.is_some(), "{record:?}");
        }
        // Each with its own event, for the edges to close its connections.
        let items = muster_store::testing::outbox_items(&store, "t1").await.unwrap();
        for id in [&delegate.token_id, &child.token_id, &grandchild.token_id] {
            assert!(
                items.iter().any(|i| i.kind == "token.revoked" && i.payload["token_id"] == id.as_str()),
                "no token.revoked for {id}"
            );
        }
        assert!(!items.iter().any(|i| i.kind == "token.revoked" && i.payload["token_id"] == bystander.token_id.as_str()));

        // A revoked token issues nothing more, and mints nothing trying.
        let before = tokens.list("t1").await.unwrap().len();
        assert!(matches!(issue(Some(delegate.token_id.clone()), "t1").await, Err(TokenError::Forbidden(_))));
        assert!(matches!(issue(Some(child.token_id.clone()), "t1").await, Err(TokenError::Forbidden(_))));
        assert_eq!(tokens.list("t1").await.unwrap().len(), before);
    }

    async fn bad_requests_change_nothing(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let bad_scope = tokens.create("t1", Role::Client, vec!["root".into()], "x", None, None).await;
        assert!(matches!(bad_scope, Err(TokenError::Invalid(_))));
        let no_tenant = tokens.create("", Role::Admin, vec![], "x", None, None).await;
        assert!(matches!(no_tenant, Err(TokenError::Invalid(_))));
        for tenant in ["t\0", &"t".repeat(257)] {
            let refused = tokens.create(tenant, Role::Client, vec![], "x", None, None).await;
            assert!(matches!(refused, Err(TokenError::Invalid(_))), "{refused:?}");
        }
        let device = format!("dev_{}", "a".repeat(52));
        for (role, scopes, device_id) in [
            (Role::Node, vec![], None),
            (Role::Node, vec![], Some("dev_short")),
            (Role::Node, vec![], Some("node-1")),
            (Role::Node, vec!["operator.read".to_string()], Some(device.as_str())),
            (Role::Client, vec![], Some(device.as_str())),
            (Role::Admin, vec![], Some(device.as_str())),
        ] {
            let refused = tokens.create("t1", role, scopes.clone(), "x", device_id, None).await;
            assert!(
                matches!(refused, Err(TokenError::Invalid(_))),
                "{role:?} {scopes:?} {device_id:?}: {refused:?}"
            );
        }
        for ttl in [0, muster_identity::MAX_TTL_SECONDS + 1] {
            let refused = tokens.create("t1", Role::Client, vec![], "x", None, Some(ttl)).await;
            assert!(matches!(refused, Err(TokenError::Invalid(_))), "{ttl}: {refused:?}");
        }
        assert!(tokens.list("t1").await.unwrap().is_empty());
        assert_eq!(outbox_text(&store).await, "[]");
        assert!("root".parse::<Role>().is_err());
    }

    async fn a_token_issued_for_an_expiring_one_expires_by_it_by_this_clock(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let by = muster_store::now_ms() + 7_200_000;
        for ttl in [None, Some(7_300)] {
            let refused = tokens
                .create_expiring_by("t1", Role::Client, vec![], "x", None, ttl, Some(by), None)
                .await;
            assert!(matches!(refused, Err(TokenError::Forbidden(_))), "{ttl:?}: {refused:?}");
        }
        assert_eq!(outbox_text(&store).await, "[]", "nothing minted");
        assert!(tokens.list("t1").await.unwrap().is_empty());
        let (record, _) = tokens
            .create_expiring_by("t1", Role::Client, vec![], "x", None, Some(3_600), Some(by), None)
            .await
            .unwrap();
        assert!(record.expires_at_ms.unwrap() <= by);
    }

    async fn a_chosen_admin_token_that_could_never_be_presented_mints_nothing(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let long = "x".repeat(4097);
        for bad in ["short", "a-token-from-a-file-with-its-newline-0123\n", "a token with spaces in it, 0123456789", long.as_str()] {
            assert!(matches!(tokens.bootstrap_admin("t1", Some(bad)).await, Err(TokenError::Invalid(_))), "{bad:?}");
        }
        assert!(tokens.list("t1").await.unwrap().is_empty());
        // The first mint is still to come.
        let chosen = "a-token-an-operator-chose-0123456789";
        assert!(tokens.bootstrap_admin("t1", Some(chosen)).await.unwrap().is_some());
        assert!(tokens.verify(chosen).await.is_ok());
        // After it, a value of the old form no longer stops a start.
        assert!(tokens.bootstrap_admin("t1", Some("a-token-from-a-file-with-its-newline-0123\n")).await.unwrap().is_none());
        // Labels with control characters are refused on both stores alike.
        assert!(matches!(tokens.create("t1", Role::Client, vec![], "a\u{0}b", None, None).await, Err(TokenError::Invalid(_))));
    }

    async fn tokens_with_a_lifetime_expire(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let (mut record, secret) =
            tokens.create("t1", Role::Client, vec![], "short", None, Some(3600)).await.unwrap();
        assert_eq!(record.expires_at_ms, Some(record.created_at_ms + 3_600_000));
        assert_eq!(tokens.verify(secret.expose()).await.unwrap(), record);
        // Its hour passes in the store, not in the test's time.
        let past = muster_store::now_ms() - 1;
        sqlx::query("UPDATE operator_tokens SET expires_at_ms = $1")
            .bind(past)
            .execute(store.pool())
            .await
            .unwrap();
        assert!(matches!(tokens.verify(secret.expose()).await, Err(TokenError::Unrecognized)));
        // Listed, with its expiry, until an operator revokes it.
        record.expires_at_ms = Some(past);
        assert_eq!(tokens.list("t1").await.unwrap(), [record]);
    }

    async fn live_tokens_can_be_changed(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let (record, secret) =
            tokens.create("t1", Role::Client, vec!["operator.read".into()], "ci", None, None).await.unwrap();
        let none = tokens.update(&record.token_id, TokenChange::default()).await;
        assert!(matches!(none, Err(TokenError::Invalid(_))), "{none:?}");
        let changed = tokens
            .update(&record.token_id, TokenChange {
                label: Some("ci-2".into()),
                scopes: Some(vec!["operator.write".into(), "operator.read".into()]),
                expires_at_ms: Some(Some(record.created_at_ms + 3_600_000)),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(changed.scopes, ["operator.read", "operator.write"]);
        assert_eq!((changed.label.as_str(), changed.expires_at_ms), ("ci-2", Some(record.created_at_ms + 3_600_000)));
        assert_eq!(tokens.verify(secret.expose()).await.unwrap(), changed);
        // A change that would make an impossible token changes nothing.
        let device = format!("dev_{}", "c".repeat(52));
        for bad in [
            TokenChange { role: Some(Role::Node), ..Default::default() },
            TokenChange { device_id: Some(Some(device.clone())), ..Default::default() },
            TokenChange { scopes: Some(vec!["root".into()]), ..Default::default() },
        ] {
            let refused = tokens.update(&record.token_id, bad.clone()).await;
            assert!(matches!(refused, Err(TokenError::Invalid(_))), "{bad:?}: {refused:?}");
        }
        let node = tokens
            .update(&record.token_id, TokenChange {
                role: Some(Role::Node),
                device_id: Some(Some(device.clone())),
                scopes: Some(vec![]),
                expires_at_ms: Some(None),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!((node.role, node.device_id.as_deref(), node.expires_at_ms), (Role::Node, Some(device.as_str()), None));
        let events = outbox_text(&store).await;
        assert_eq!(events.matches("token.updated").count(), 2, "{events}");
        // Conditions on the token as the caller saw it.
        let label = |l: &str| TokenChange { label: Some(l.into()), ..Default::default() };
        let elsewhere = TokenChange { only_in_tenant: Some("t2".into()), ..label("x") };
        assert!(matches!(tokens.update(&record.token_id, elsewhere).await, Err(TokenError::NotFound(_))));
        let old = TokenChange { only_if_updated_at_ms: Some(changed.updated_at_ms), ..label("x") };
        assert!(matches!(tokens.update(&record.token_id, old).await, Err(TokenError::Changed(_))));
        for at in [-5, node.created_at_ms + 400 * 24 * 3_600_000] {
            let expiry = TokenChange { expires_at_ms: Some(Some(at)), ..Default::default() };
            assert!(matches!(tokens.update(&record.token_id, expiry).await, Err(TokenError::Invalid(_))), "{at}");
        }
        // Edits that race both land, one after the other.
        let (a, b) = tokio::join!(
            tokens.update(&record.token_id, label("a")),
            tokens.update(&record.token_id, label("b")),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.updated_at_ms, b.updated_at_ms);
        assert!(a.updated_at_ms > node.updated_at_ms && b.updated_at_ms > node.updated_at_ms);
        let last = if a.updated_at_ms > b.updated_at_ms { a } else { b };
        assert_eq!(tokens.list("t1").await.unwrap(), [last]);
        tokens.revoke(&record.token_id, None, None).await.unwrap();
        let revoked = tokens.update(&record.token_id, TokenChange { label: Some("x".into()), ..Default::default() }).await;
        assert!(matches!(revoked, Err(TokenError::NotFound(_))), "{revoked:?}");
        assert!(matches!(tokens.update("no-such", TokenChange { label: Some("x".into()), ..Default::default() }).await, Err(TokenError::NotFound(_))));
    }

    async fn a_revoke_applies_only_to_the_token_as_its_caller_checked_it(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let (record, secret) =
            tokens.create("t1", Role::Client, vec!["operator.read".into()], "ci", None, None).await.unwrap();
        // Promoted to admin after the caller looked at it.
        let promoted = tokens
            .update(&record.token_id, TokenChange { role: Some(Role::Admin), scopes: Some(vec!["*".into()]), ..Default::default() })
            .await
            .unwrap();
        let events = outbox_text(&store).await;
        let stale = tokens.revoke(&record.token_id, Some("t1"), Some(record.updated_at_ms)).await;
        assert!(matches!(stale, Err(TokenError::Changed(_))), "{stale:?}");
        let elsewhere = tokens.revoke(&record.token_id, Some("t2"), Some(promoted.updated_at_ms)).await;
        assert!(matches!(elsewhere, Err(TokenError::NotFound(_))), "{elsewhere:?}");
        assert_eq!(tokens.verify(secret.expose()).await.unwrap(), promoted);
        assert_eq!(outbox_text(&store).await, events, "a refused revoke emits nothing");

        let revoked = tokens.revoke(&record.token_id, Some("t1"), Some(promoted.updated_at_ms)).await.unwrap();
        assert_eq!(revoked.role, Role::Admin);
        assert!(matches!(tokens.verify(secret.expose()).await, Err(TokenError::Unrecognized)));
    }

    async fn node_tokens_name_their_device(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let device = format!("dev_{}", "b2".repeat(26));
        let (record, secret) =
            tokens.create("t1", Role::Node, vec![], "node 1", Some(&device), None).await.unwrap();
        // Tyrum's scoped-token shape.
        assert_eq!(secret.expose().len(), 64);
        assert!(secret.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(record.device_id.as_deref(), Some(device.as_str()));
        let claims = tokens.verify(secret.expose()).await.unwrap();
        assert_eq!((claims.role, claims.device_id), (Role::Node, Some(device.clone())));
        assert!(claims.scopes.is_empty());
        let listed = tokens.list("t1").await.unwrap();
        assert_eq!(listed[0].device_id.as_deref(), Some(device.as_str()));
        assert!(outbox_text(&store).await.contains(&device));
    }

    async fn a_database_upgraded_with_an_admin_token_mints_no_other(store: Store) {
        // As before the bootstrap claim existed: its table and migration
        // gone, the admin token minted and since demoted.
        sqlx::query("DROP TABLE identity_bootstrap").execute(store.pool()).await.unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE description = 'identity bootstrap'")
            .execute(store.pool())
            .await
            .unwrap();
        let tokens = Tokens::new(Arc::new(store.clone()));
        let (admin, _) = tokens.create("t1", Role::Admin, vec!["*".into()], "earlier admin", None, None).await.unwrap();
        let demote = TokenChange { role: Some(Role::Client), scopes: Some(vec!["operator.read".into()]), ..Default::default() };
        tokens.update(&admin.token_id, demote).await.unwrap();

        store.migrate().await.unwrap();
        assert!(tokens.bootstrap_admin("t1", None).await.unwrap().is_none());
        assert_eq!(tokens.list("t1").await.unwrap().len(), 1);
    }

    async fn the_first_admin_token_is_minted_once(store: Store) {
        let tokens = Tokens::new(Arc::new(store.clone()));
        let short = tokens.bootstrap_admin("t1", Some("too-short")).await;
        assert!(matches!(short, Err(TokenError::Invalid(_))));
        assert!(tokens.list("t1").await.unwrap().is_empty());

        let chosen = "an-operator-chosen-admin-token-0123456789";
        let minted = tokens.bootstrap_admin("t1", Some(chosen)).await.unwrap().unwrap();
        assert_eq!(minted.expose(), chosen);
        let claims = tokens.verify(chosen).await.unwrap();
        assert_eq!(claims.role, Role::Admin);
        assert_eq!(claims.scopes, vec!["*".to_string()]);

        // A later start mints nothing, with or without a provided value,
        // even once the first admin token is demoted.
        let first = tokens.list("t1").await.unwrap().remove(0);
        let demote = TokenChange { role: Some(Role::Client), scopes: Some(vec!["operator.read".into()]), ..Default::default() };
        tokens.update(&first.token_id, demote).await.unwrap();
        assert!(tokens.bootstrap_admin("t1", None).await.unwrap().is_none());
        assert!(tokens.bootstrap_admin("t1", Some(chosen)).await.unwrap().is_none());
        assert_eq!(tokens.list("t1").await.unwrap().len(), 1);
    }
}

/// Replicas of identity each have their own pool; on an empty database
/// they race to mint the admin token, and only one may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_replicas_on_one_postgres_mint_one_admin_token() {
    let url = muster_store::testing::create_postgres_database().await;
    let mut replicas = Vec::new();
    for _ in 0..4 {
        let store = Store::connect(&url, &muster_store::StoreOptions::default())
            .await
            .unwrap();
        replicas.push(Tokens::new(Arc::new(store)));
    }
    let first = Store::connect(&url, &muster_store::StoreOptions::default())
        .await
        .unwrap();
    first.migrate().await.unwrap();
    let starts = replicas.into_iter().flat_map(|tokens| {
        let tokens = Arc::new(tokens);
        (0..4).map(move |_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.bootstrap_admin("t1", None).await })
        })
    });
    let starts: Vec<_> = starts.collect();
    let mut minted = 0;
    for start in starts {
        if start.await.unwrap().unwrap().is_some() {
            minted += 1;
        }
    }
    assert_eq!(minted, 1);
    let tokens = Tokens::new(Arc::new(first));
    assert_eq!(tokens.list("t1").await.unwrap().len(), 1);
}
