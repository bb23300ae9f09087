//! A new plugin version must read the events older versions stored: every command runs
//! the newest version and replays older aggregates through it. An upload that cannot
//! is refused, naming the aggregate and the event, unless forced.

use serde_json::json;

use crate::harness::{
    Host, HostOptions, TestDb, eventually, metric, plus_custom_section, store_events, wasm_bytes,
    with_custom_section,
};

/// Waits until `host` logs, past byte `mark` of its log, that an upload is replaying a
/// long history; fails should `upload` end first, or after three minutes (a JavaScript
/// component compiles first: seconds, more on a busy machine).
async fn wait_for_long_replay<T>(host: &Host, mark: usize, upload: &tokio::task::JoinHandle<T>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while !std::fs::read_to_string(&host.log).unwrap()[mark..].contains("checking a long history") {
        assert!(
            !upload.is_finished() && std::time::Instant::now() < deadline,
            "the upload never started replaying: {}",
            host.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_that_cannot_replay_stored_histories_is_refused_unless_forced() {
    let db = TestDb::new("upgrades").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    // Nothing stored yet: nothing to replay.
    assert_eq!(body["history_checked"]["aggregates"], 0, "{body}");
    for id in ["acc-1", "acc-2", "acc-3"] {
        let (status, body) = api
            .command(
                "bank-account",
                id,
                json!({"command": {"type": "Open", "owner": id}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = api
            .command(
                "bank-account",
                id,
                json!({"command": {"type": "Deposit", "amount": 5}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    // The same account in JavaScript reads every stored event: accepted, and it says
    // what it replayed.
    let (status, body) = api
        .upload("bank-account", wasm_bytes("bank-account-js"))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    assert_eq!(
        body["history_checked"],
        json!({"aggregates": 3, "events": 6, "complete": true}),
        "{body}"
    );

    // Renamed events: refused, with the aggregate, the event and what to do.
    let (status, body) = api
        .upload("bank-account", wasm_bytes("renamed-events"))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "incompatible_with_history", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for says in ["bank-account/acc-1", "event 1 (`Opened`)", "?force=true"] {
        assert!(message.contains(says), "no `{says}` in: {message}");
    }
    // Nothing changed: version 2 still runs every command.
    let (_, plugin) = api.get("/v1/plugins/bank-account").await;
    assert_eq!(plugin["active_version"], 2, "{plugin}");
    let retried =
        json!({"command": {"type": "Deposit", "amount": 1}, "command_id": uuid::Uuid::new_v4()});
    let (status, first) = api.command("bank-account", "acc-1", retried.clone()).await;
    assert_eq!(status, 200, "{first}");

    // Forced, it becomes the active version, and the stored aggregates no longer load:
    // what the check is there to prevent.
    let (status, body) = api
        .put_raw(
            "/v1/plugins/bank-account?force=true",
            wasm_bytes("renamed-events"),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 3, "{body}");
    assert!(body["history_checked"].is_null(), "{body}");
    let (status, body) = api
        .command(
            "bank-account",
            "acc-2",
            json!({"command": {"type": "Open", "owner": "x"}}),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "plugin_apply_failed", "{body}");
    // A command that ran before, sent again (its answer lost): its first result, not
    // the failure of running it again on a version that cannot load the aggregate.
    let (status, again) = api.command("bank-account", "acc-1", retried).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["events"], first["events"], "{again}");
}

/// Two uploads of one type at once: the one that would be stored second was checked
/// against the histories of a version that is no longer the newest, so it is refused
/// (409 `plugin_changed`) rather than stored unchecked. Here a JavaScript version
/// replays 100,000 stored events (seconds), and while it does, a forced upload lands.
/// Likewise an upload and a change of limits: each is checked against what the other
/// replaces, so the one stored second is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_checked_against_a_version_no_longer_newest_is_refused() {
    use meridian::store;

    let db = TestDb::new("upload_race").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("bank-account", wasm_bytes("bank-account")).await;
    assert_eq!(status, 201, "{body}");
    // Ten accounts of 10,000 events each, written straight to the store.
    let pool = db.pool().await;
    for account in 0..10 {
        for page in 0..10i64 {
            let mut events = vec![("Deposited", r#"{"amount":1}"#); 1_000];
            if page == 0 {
                events[0] = ("Opened", r#"{"owner":"x"}"#);
            }
            let id = format!("long-{account}");
            store_events(&pool, "bank-account", &id, page * 1_000, &events).await;
        }
    }

    let checked = tokio::spawn({
        let api = api.clone();
        async move {
            api.upload("bank-account", wasm_bytes("bank-account-js"))
                .await
        }
    });
    // Once it is replaying, another version lands, stored straight into the plugins
    // table as an upload through another host would store it (no compile or check to
    // race with).
    wait_for_long_replay(&host, 0, &checked).await;
    let other = with_custom_section(b"another build");
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&other))
    };
    let (stored, created) = store::plugins::store(
        &pool,
        "bank-account",
        &sha256,
        1,
        &other,
        None,
        &meridian::runtime::SandboxLimits::default(),
    )
    .await
    .unwrap();
    assert!(created);
    assert_eq!(stored.version, 2);

    let (status, body) = checked.await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("plugin_changed")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("version 2 of `bank-account` was stored")
            && message.contains("checked against version 1")
            && message.contains("upload again"),
        "{body}"
    );
    let (_, plugin) = api.get("/v1/plugins/bank-account").await;
    assert_eq!(plugin["active_version"], 2, "{plugin}");

    // Limits checked against version 1 are not set over version 2: it may not start
    // under them.
    let outdated = store::plugins::set_limits(
        &pool,
        "bank-account",
        &meridian::runtime::SandboxLimits::default(),
        Some(1),
    )
    .await
    .expect_err("limits checked against a version no longer newest");
    assert!(
        outdated
            .to_string()
            .contains("version 2 of `bank-account` was stored"),
        "{outdated}"
    );

    // Sent again, it is checked against version 2, under the limits in force when it
    // began. While it replays, other limits are set through another host (checked
    // against version 2, which they suit): it was never checked under them, so it is
    // refused. (Through the same host, the limits would wait for the upload to be
    // stored and be checked against it.)
    let other = Host::start(&db, HostOptions::default()).await;
    let mark = std::fs::metadata(&host.log).unwrap().len() as usize;
    let checked = tokio::spawn({
        let api = api.clone();
        async move {
            api.upload("bank-account", wasm_bytes("bank-account-js"))
                .await
        }
    });
    wait_for_long_replay(&host, mark, &checked).await;
    assert_eq!(
        other
            .client()
            .put_limits("bank-account", json!({"deadline_ms": 250}))
            .await,
        200
    );
    let (status, body) = checked.await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("limits_changed")),
        "{body}"
    );
    let (_, plugin) = api.get("/v1/plugins/bank-account").await;
    assert_eq!(plugin["active_version"], 2, "{plugin}");

    // Sent once more, it is checked under the new limits and stored. Limits set
    // through the same host meanwhile wait for it, and are checked against it.
    let mark = std::fs::metadata(&host.log).unwrap().len() as usize;
    let stored = tokio::spawn({
        let api = api.clone();
        async move {
            api.upload("bank-account", wasm_bytes("bank-account-js"))
                .await
        }
    });
    wait_for_long_replay(&host, mark, &stored).await;
    assert_eq!(
        api.put_limits("bank-account", json!({"deadline_ms": 300}))
            .await,
        200
    );
    let (status, body) = stored.await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 3, "{body}");
    let (_, limits) = api.get("/v1/plugins/bank-account/limits").await;
    assert_eq!(limits["deadline_ms"], 300, "{limits}");
}

/// A command that waits for its aggregate behind a slow one runs the version that is
/// current when its turn comes. It took its version when it arrived, so after an
/// upload was answered ("every host runs it") it could still decide, and store events
/// tagged, with the version before — after events of the new one, which the old one
/// may not even know.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_queued_during_an_upload_runs_the_new_version() {
    let db = TestDb::new("queued_upgrade").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    let (status, body) = api.upload("sleeper", wasm_bytes("sleeper")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        api.put_limits("sleeper", json!({"deadline_ms": 20_000}))
            .await,
        200
    );
    // `Go` runs until its deadline, holding the aggregate meanwhile: long enough for
    // the upload below to be answered first on a loaded machine (a version compiled,
    // its history checked and rolled out), else `Nap` runs before it and proves
    // nothing. Each request below is sent once the one before holds or waits for the
    // aggregate: sent at fixed intervals, one could overtake another on a loaded machine
    // (`Nap` run by the version before the upload, ahead of `Go`).
    let loads = metric(&host, "meridian_aggregate_loads_total").await;
    let slow = tokio::spawn({
        let api = api.clone();
        async move {
            api.command("sleeper", "q", json!({"command": {"type": "Go"}}))
                .await
        }
    });
    // `q` is loaded once, by `Go`, under its lock.
    eventually(|| async {
        (metric(&host, "meridian_aggregate_loads_total").await > loads).then_some(())
    })
    .await;
    let queued = tokio::spawn({
        let api = api.clone();
        async move {
            api.command("sleeper", "q", json!({"command": {"type": "Nap"}}))
                .await
        }
    });
    let waiters = async |n: f64| {
        eventually(|| async {
            (metric(&host, "meridian_aggregate_waiters").await >= n).then_some(())
        })
        .await
    };
    waiters(1.0).await;
    // A read waits its turn behind both, and must read with the version current then.
    let read = tokio::spawn({
        let api = api.clone();
        async move { api.get("/v1/aggregates/sleeper/q").await }
    });
    waiters(2.0).await;
    let (status, body) = api
        .upload("sleeper", plus_custom_section(wasm_bytes("sleeper"), b"v2"))
        .await;
    assert_eq!((status, body["version"].as_i64()), (201, Some(2)), "{body}");
    assert!(
        !slow.is_finished(),
        "the slow command ended before the upload was answered: nothing was queued"
    );
    assert_eq!(slow.await.unwrap().0, 500);
    let (status, body) = queued.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, events) = api.get("/v1/aggregates/sleeper/q/events").await;
    let versions: Vec<_> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["plugin_version"].clone())
        .collect();
    assert_eq!(versions, [json!(2)], "{events}");
    let (status, state) = read.await.unwrap();
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["version"], 1, "{state}");
    assert_eq!(state["plugin_version"], 2, "{state}");
}

/// A snapshot is only replaced by a newer one: of a newer plugin version, or of the
/// same at a later aggregate version. A save from a host still on the previous
/// version during a rollout (or one delayed past an upload) used to replace the
/// running version's snapshot, and every load of the aggregate replayed its whole
/// history until the next snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_previous_plugin_versions_snapshot_does_not_replace_the_current_ones() {
    use meridian::store::{
        self, AggregateKey,
        read::{Snapshot, save_snapshot},
    };

    let db = TestDb::new("snapshots").await;
    let pool = db.pool().await;
    store::migrate(&pool).await.unwrap();
    let key = AggregateKey {
        aggregate_type: "bank-account".into(),
        aggregate_id: "s1".into(),
    };
    let save = |version: i64, plugin_version: i32| {
        let (pool, key) = (pool.clone(), key.clone());
        async move {
            save_snapshot(
                &pool,
                &key,
                &Snapshot {
                    version,
                    plugin_version,
                    state: format!("{{\"v\":{version}}}").into_bytes(),
                },
            )
            .await
            .unwrap()
        }
    };
    let held = || async {
        let row: (i64, i32) = sqlx::query_as(
            "SELECT version, plugin_version FROM snapshots WHERE aggregate_id = 's1'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        row
    };
    save(300, 2).await;
    // The previous version, behind or ahead: the current version's snapshot stays.
    save(200, 1).await;
    assert_eq!(held().await, (300, 2));
    save(400, 1).await;
    assert_eq!(held().await, (300, 2));
    // The same version further on, or a newer version anywhere: replaced.
    save(350, 2).await;
    assert_eq!(held().await, (350, 2));
    save(100, 3).await;
    assert_eq!(held().await, (100, 3));
}

/// A host checks one upload at a time: each compiles its component on every core (a
/// JavaScript one for seconds) and replays histories through it, and several at once
/// would take the CPU that commands' wall-clock deadlines are measured on. The others
/// wait their turn, and `/metrics` says how many do.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_are_checked_one_at_a_time() {
    let db = TestDb::new("upload_queue").await;
    let host = Host::start(&db, HostOptions::default()).await;
    let api = host.client();
    // Other bytes each, so each compiles.
    let uploads: Vec<_> = (0..3u8)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                api.put_raw(
                    "/v1/plugins/bank-account?dry_run=true",
                    plus_custom_section(wasm_bytes("bank-account-js"), &[b'q', i]),
                )
                .await
            })
        })
        .collect();
    let (mut most_checking, mut most_waiting) = (0.0f64, 0.0f64);
    while !uploads.iter().all(|u| u.is_finished()) {
        most_checking = most_checking.max(metric(&host, "meridian_plugin_uploads_checking").await);
        most_waiting = most_waiting.max(metric(&host, "meridian_plugin_uploads_waiting").await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for upload in uploads {
        let (status, body) = upload.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dry_run"], true, "{body}");
    }
    assert_eq!(most_checking, 1.0, "uploads checked at once");
    assert!(most_waiting >= 1.0, "no upload waited for another's check");
}
