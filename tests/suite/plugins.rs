//! Real plugins from real `.so` files: the ABI handshake, panics and errors
//! contained and restarted, commands.

use std::sync::Arc;

use crate::common::*;
use gateway::plugin::{Instance, InstanceParams, PluginRegistry};

fn seq(v: &serde_json::Value) -> i64 {
    v["seq"]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer seq in {v}"))
}

#[tokio::test]
async fn an_abi_mismatched_plugin_is_refused_naming_both_versions() {
    let dir = build_plugins();
    let err = PluginRegistry::global()
        .find("test-abi-mismatch", std::slice::from_ref(&dir))
        .expect_err("an ABI v2 plugin must be refused");
    let path = dir.join("libtest_abi_mismatch.so").canonicalize().unwrap();
    assert_eq!(
        err,
        format!(
            "plugin {} speaks plugin ABI v2; this gateway speaks v1: rebuild the plugin against plugin-api for ABI v1",
            path.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_plugin_is_restarted_while_another_channel_keeps_flowing() {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .shipped_schema("ticker.json")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write(
            "specs/faulty.yaml",
            "channel: faulty\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 5ms\n  config: {panic_every: 3}\nendpoints:\n  - path: /faulty\n",
        )
        .write(
            "specs/steady.yaml",
            "channel: steady\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 500}\nendpoints:\n  - path: /steady\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut steady = connect(addr, "/steady").await;
    let mut faulty = connect(addr, "/faulty").await;

    let restarts = "gateway_plugin_restarts_total{channel=\"faulty\",plugin=\"test-faults\"}";
    let mut prev = seq(&next_json(&mut steady).await);
    let mut steady_count = 0;
    // Keep reading the steady channel until the faulty plugin has been
    // restarted three times: not one steady message may go missing meanwhile.
    loop {
        for _ in 0..50 {
            let s = seq(&next_json(&mut steady).await);
            assert_eq!(
                s,
                prev + 1,
                "steady channel lost a message while the other plugin panicked"
            );
            prev = s;
            steady_count += 1;
        }
        if metric(addr, restarts).await.unwrap_or(0.0) >= 3.0 {
            break;
        }
        assert!(
            steady_count < 500_000,
            "the faulty plugin was never restarted"
        );
    }
    let failures = metric(
        addr,
        "gateway_plugin_failures_total{channel=\"faulty\",plugin=\"test-faults\"}",
    )
    .await
    .unwrap();
    assert!(failures >= 3.0);
    // The restarted plugin delivers again: each instance emits seq 1 and 2 before its third poll panics.
    let mut seen_one = 0;
    while seen_one < 2 {
        if seq(&next_json(&mut faulty).await) == 1 {
            seen_one += 1;
        }
    }
    // The gateway itself is fine.
    let (status, _, _) = http(addr, "GET", "/healthz", &[]).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_plugin_whose_thread_panics_is_restarted() {
    let dep = Deployment::new();
    dep.gateway_yaml("").write("specs/schemas/seq.json", SEQ_SCHEMA).write(
        "specs/pushy.yaml",
        "channel: pushy\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: push\n  config: {panic_every: 5, interval_ms: 2}\nendpoints:\n  - path: /pushy\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/pushy").await;
    // Each instance emits 1..=5 then panics; after a restart numbering starts again.
    let mut restarts_seen = 0;
    let mut prev = seq(&next_json(&mut ws).await);
    while restarts_seen < 2 {
        let s = seq(&next_json(&mut ws).await);
        if s == 1 {
            restarts_seen += 1;
        } else {
            assert_eq!(s, prev + 1);
        }
        assert!(
            s <= 5,
            "the run thread should have panicked after 5 messages"
        );
        prev = s;
    }
    let restarts = metric(
        addr,
        "gateway_plugin_restarts_total{channel=\"pushy\",plugin=\"test-faults\"}",
    )
    .await
    .unwrap();
    assert!(restarts >= 2.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_start_keeps_readyz_at_503_and_is_retried() {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .shipped_schema("ticker.json")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write(
            "specs/broken.yaml",
            "channel: broken\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 1s\n  config: {fail_create: upstream unreachable}\nendpoints:\n  - path: /broken\n",
        )
        .write(
            "specs/steady.yaml",
            "channel: steady\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 100}\nendpoints:\n  - path: /steady\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let fails = "gateway_plugin_failures_total{channel=\"broken\",plugin=\"test-faults\"}";
    eventually("repeated start failures", || async {
        metric(addr, fails).await.filter(|v| *v >= 2.0)
    })
    .await;
    let (status, _, body) = http(addr, "GET", "/readyz", &[]).await;
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "starting");
    assert_eq!(v["waiting_for"], serde_json::json!(["broken"]));
    let broken = &v["channels"]["broken"];
    assert_eq!(broken["plugin"], "test-faults");
    assert_eq!(broken["state"], "starting");
    assert_eq!(broken["last_error"], "upstream unreachable");
    assert!(broken["consecutive_failures"].as_u64().unwrap() >= 2, "{v}");
    assert!(broken["last_failure"].is_string(), "{v}");
    assert!(broken["retry_in_ms"].as_u64().unwrap() <= 30_000, "{v}");
    // The other channel is unaffected.
    let mut ws = connect(addr, "/steady").await;
    let a = seq(&next_json(&mut ws).await);
    assert_eq!(seq(&next_json(&mut ws).await), a + 1);
    // Up once its `start` returned, which a push plugin's first messages
    // may come before.
    metric_becomes(
        addr,
        "gateway_plugin_up{channel=\"steady\",plugin=\"ticker\"}",
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_up{channel=\"broken\",plugin=\"test-faults\"}"
        )
        .await,
        Some(0.0)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_once_every_plugin_started() {
    let dep = Deployment::new();
    dep.gateway_yaml("").shipped_schema("ticker.json").write(
        "specs/steady.yaml",
        "channel: steady\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /steady\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let body = eventually("readyz 200", || async {
        let (status, _, body) = http(addr, "GET", "/readyz", &[]).await;
        (status == 200).then_some(body)
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"status": "ready", "channels": {"steady": {
            "plugin": "ticker", "state": "up", "consecutive_failures": 0,
            "last_error": null, "last_failure": null, "retry_in_ms": null,
            "call": null, "abandoned_calls": 0,
        }}})
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_round_trip_and_a_panicking_command_is_contained() {
    let dir = build_plugins();
    let plugin = PluginRegistry::global()
        .find("test-faults", &[dir])
        .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let params = InstanceParams {
        channel: Arc::from("cmd"),
        config: b"{}".to_vec(),
        tx,
        max_message: 1 << 20,
        metrics: Arc::default(),
        rt: tokio::runtime::Handle::current(),
    };
    let inst = tokio::task::spawn_blocking(move || {
        let (inst, _exited) = Instance::create(plugin, params).expect("create");
        let reply = inst.command(br#"{"op":"echo","n":7}"#).expect("echo");
        let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(v["n"], 7);
        let failed = inst
            .command(br#"{"op":"fail"}"#)
            .expect_err("planned failure");
        assert!(!failed.panicked());
        assert_eq!(failed.message, "test-faults: planned command failure");
        let panicked = inst
            .command(br#"{"op":"panic"}"#)
            .expect_err("planned panic");
        assert!(panicked.panicked(), "{panicked:?}");
        // Still usable after a contained panic.
        let reply = inst.command(br#"{"op":"echo"}"#).expect("echo after panic");
        assert!(!reply.is_empty());
        inst
    })
    .await
    .unwrap();
    tokio::task::spawn_blocking(move || inst.shutdown())
        .await
        .unwrap();
}

/// `/readyz` as (status code, body).
async fn readyz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, _, body) = http(addr, "GET", "/readyz", &[]).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, v)
}

/// Wait until `/readyz` answers 200 `ready`.
async fn until_ready(addr: std::net::SocketAddr) {
    eventually("ready", || async {
        let (status, v) = readyz(addr).await;
        (status == 200 && v["status"] == "ready").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plugin_makes_readyz_degraded_naming_its_error_and_ready_again_after() {
    let dep = Deployment::new();
    // test-faults fails every poll while this file exists.
    let down = dep.path("upstream-down");
    dep.gateway_yaml("")
        .shipped_schema("ticker.json")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write(
            "specs/flaky.yaml",
            &format!(
                "channel: flaky\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  config: {{error_while_exists: '{}'}}\nendpoints:\n  - path: /flaky\n",
                down.display()
            ),
        )
        .write(
            "specs/steady.yaml",
            "channel: steady\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 200}\nendpoints:\n  - path: /steady\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    until_ready(addr).await;
    let mut steady = connect(addr, "/steady").await;
    let mut prev = seq(&next_json(&mut steady).await);

    std::fs::write(&down, "").unwrap();
    let failing_since = std::time::Instant::now();
    let expected_error = format!("test-faults: {} exists", down.display());
    // Degraded, not unready: the other channel is still served.
    let v = eventually("readyz degraded after 3 failures in a row", || async {
        let (status, v) = readyz(addr).await;
        let failures = v["channels"]["flaky"]["consecutive_failures"].as_u64()?;
        (status == 200 && v["status"] == "degraded" && failures >= 3).then_some(v)
    })
    .await;
    let flaky = &v["channels"]["flaky"];
    assert_eq!(flaky["plugin"], "test-faults");
    assert_eq!(flaky["state"], "restarting", "{v}");
    assert_eq!(flaky["last_error"], expected_error.as_str());
    assert!(flaky["last_failure"].is_string(), "{v}");
    assert!(flaky["retry_in_ms"].as_u64().unwrap() <= 30_000, "{v}");
    assert_eq!(
        v["channels"]["steady"],
        serde_json::json!({
            "plugin": "ticker", "state": "up", "consecutive_failures": 0,
            "last_error": null, "last_failure": null, "retry_in_ms": null,
            "call": null, "abandoned_calls": 0,
        })
    );
    // Not retried at full speed (a poll every 20 ms): the wait before
    // restart n (from 0) is at least 50 ms × 2ⁿ, so n failures in a row
    // take at least 50 ms × (2ⁿ⁻¹ − 1). (A slow machine only makes the
    // elapsed time longer.)
    let failures = flaky["consecutive_failures"].as_u64().unwrap() as u32;
    let least =
        std::time::Duration::from_millis(50).saturating_mul(2u32.saturating_pow(failures - 1) - 1);
    assert!(
        failing_since.elapsed() >= least,
        "{failures} failures in a row within {:?}",
        failing_since.elapsed()
    );
    // The gauge says the same (read between two readyz answers).
    let gauge = "gateway_plugin_consecutive_failures{channel=\"flaky\",plugin=\"test-faults\"}";
    let low = readyz(addr).await.1["channels"]["flaky"]["consecutive_failures"]
        .as_u64()
        .unwrap() as f64;
    let g = metric(addr, gauge).await.unwrap();
    let high = readyz(addr).await.1["channels"]["flaky"]["consecutive_failures"]
        .as_u64()
        .unwrap() as f64;
    assert!(low <= g && g <= high, "{low} <= {g} <= {high}");
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_consecutive_failures{channel=\"steady\",plugin=\"ticker\"}"
        )
        .await,
        Some(0.0)
    );
    assert!(
        metric(
            addr,
            "gateway_plugin_last_failure_timestamp_seconds{channel=\"flaky\",plugin=\"test-faults\"}"
        )
        .await
        .unwrap()
            > 1.7e9
    );
    // The steady channel lost nothing meanwhile.
    for _ in 0..20 {
        let s = seq(&next_json(&mut steady).await);
        assert_eq!(s, prev + 1, "the steady channel lost a message");
        prev = s;
    }

    // The upstream is back: the next restart sticks.
    std::fs::remove_file(&down).unwrap();
    let v = eventually("readyz ready again", || async {
        let (status, v) = readyz(addr).await;
        (status == 200 && v["status"] == "ready").then_some(v)
    })
    .await;
    let flaky = &v["channels"]["flaky"];
    assert_eq!(flaky["state"], "up");
    assert_eq!(flaky["retry_in_ms"], serde_json::Value::Null);
    // The last error stays on record; the count starts over only once an
    // instance has run 30 s without failing.
    assert_eq!(flaky["last_error"], expected_error.as_str());
    assert!(flaky["consecutive_failures"].as_u64().unwrap() >= 3);
    // It delivers again: two messages in a row.
    let mut ws = connect(addr, "/flaky").await;
    let until = deadline();
    let mut prev = seq(&next_json(&mut ws).await);
    loop {
        before(until, "two consecutive messages from the recovered channel");
        let s = seq(&next_json(&mut ws).await);
        if s == prev + 1 {
            break;
        }
        prev = s;
    }
    metric_becomes(
        addr,
        "gateway_plugin_up{channel=\"flaky\",plugin=\"test-faults\"}",
        1.0,
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_plugin_that_finished_by_itself_is_finished_and_ready() {
    let dep = Deployment::new();
    dep.gateway_yaml("").shipped_schema("ticker.json").write(
        "specs/once.yaml",
        "channel: once\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 1000, limit: 3}\nendpoints:\n  - path: /once\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let (status, v) = eventually("the ticker finished", || async {
        let (status, v) = readyz(addr).await;
        (v["channels"]["once"]["state"] == "finished").then_some((status, v))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ready");
    assert_eq!(v["channels"]["once"]["consecutive_failures"], 0);
    // Its instance stays (commands still answered) and is not restarted.
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_up{channel=\"once\",plugin=\"ticker\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_restarts_total{channel=\"once\",plugin=\"ticker\"}"
        )
        .await,
        Some(0.0)
    );
    gw.shutdown().await;
}

/// A channel runs at most `MAX_CHANNEL_COMMANDS` plugin commands at once,
/// counting those that timed out but still run in the plugin: a command
/// that hangs, asked again and again, cannot take every blocking thread
/// (which polls share). One more is refused as busy at once; the slots
/// come back when the plugin returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_still_running_in_the_plugin_are_bounded_per_channel() {
    use gateway::channel::{CommandError, MAX_CHANNEL_COMMANDS};
    use std::time::Duration;
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write("specs/slow.yaml", SLOW_POLL_SPEC);
    let gw = dep.start().await;
    let slow = gw.state().live().channels["slow"].clone();
    hold_a_poll(&slow).await;
    let short = Duration::from_millis(50);
    for i in 0..MAX_CHANNEL_COMMANDS {
        let r = slow.command(br#"{"op":"wait"}"#.to_vec(), short).await;
        assert!(
            matches!(r, Err(CommandError::Timeout)),
            "command {i}: {r:?}"
        );
    }
    let r = slow.command(br#"{"op":"wait"}"#.to_vec(), PATIENCE).await;
    assert!(matches!(r, Err(CommandError::Busy)), "one more: {r:?}");
    // The release cannot run either: the plugin is asked directly.
    gw.state().live().channels["slow"]
        .current_instance()
        .expect("the plugin runs")
        .command(br#"{"op":"release"}"#)
        .expect("release");
    let status = eventually("the slots back", || async {
        slow.command(br#"{"op":"status"}"#.to_vec(), PATIENCE)
            .await
            .ok()
    })
    .await;
    assert!(!status.is_empty());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_that_overruns_its_interval_neither_piles_up_nor_blocks_other_channels() {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .shipped_schema("ticker.json")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write(
            "specs/slow.yaml",
            SLOW_POLL_SPEC,
        )
        .write(
            "specs/steady.yaml",
            "channel: steady\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 200}\nendpoints:\n  - path: /steady\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let slow = gw.state().live().channels["slow"].clone();
    let status = || async {
        let reply = slow
            .command(br#"{"op":"status"}"#.to_vec(), PATIENCE)
            .await
            .expect("status");
        serde_json::from_slice::<serde_json::Value>(&reply).unwrap()
    };
    eventually("the slow channel's plugin", || async {
        slow.command(br#"{"op":"hold"}"#.to_vec(), PATIENCE)
            .await
            .ok()
    })
    .await;
    // A poll is now held inside the plugin, far beyond its 20 ms interval.
    let polls = eventually("a held poll", || async {
        let v = status().await;
        (v["in_poll"] == 1).then(|| v["polls"].as_u64().unwrap())
    })
    .await;
    let mut steady = connect(addr, "/steady").await;
    let mut prev = seq(&next_json(&mut steady).await);
    // 100 messages at 200/s: at least 25 of the slow channel's intervals.
    for _ in 0..100 {
        let s = seq(&next_json(&mut steady).await);
        assert_eq!(s, prev + 1, "the steady channel lost a message");
        prev = s;
    }
    // Still the same poll: none started beside it or queued behind it.
    let v = status().await;
    assert_eq!(v["in_poll"], 1, "{v}");
    assert_eq!(v["polls"], polls, "{v}");
    let released = std::time::Instant::now();
    slow.command(br#"{"op":"release"}"#.to_vec(), PATIENCE)
        .await
        .expect("release");
    // The missed intervals are not made up in a burst: one poll follows the
    // held one at once, the next ones an interval apart, so three more take
    // at least 40 ms (a slow machine only makes them take longer).
    eventually("polls again", || async {
        (status().await["polls"].as_u64().unwrap() >= polls + 4).then_some(())
    })
    .await;
    let took = released.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(40),
        "3 polls after the held one within {took:?}: missed intervals made up in a burst"
    );
    assert_eq!(status().await["most_in_poll"], 1, "polls never overlap");
    let mut ws = connect(addr, "/slow").await;
    let a = seq(&next_json(&mut ws).await);
    assert_eq!(seq(&next_json(&mut ws).await), a + 1);
    gw.shutdown().await;
}

/// Keyed streams opened and closed while the plugin waits out its restart
/// backoff change only what the next instance opens: the keys still
/// followed, once each. Before, every open and close waited in a queue
/// without bound (a client reconnecting all through a 30 s backoff grew it
/// by two each time) and was replayed at the next instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_opened_and_closed_during_a_backoff_are_not_replayed_at_the_next_instance() {
    let dep = Deployment::new();
    // While this file exists, test-faults' polls and creates fail.
    let down = dep.path("upstream-down");
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_SCHEMA)
        .write(
            "specs/jobs.yaml",
            &format!(
                "channel: jobs\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  config: {{steps: 1000000, error_while_exists: '{}'}}\nendpoints:\n  - path: /jobs/{{id}}\n",
                down.display()
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut a = connect(addr, "/jobs/a").await;
    next_json(&mut a).await;

    std::fs::write(&down, "").unwrap();
    // The second failure in a row is a create's: no instance runs from
    // now until the file goes.
    eventually("a create failed", || async {
        let v = readyz(addr).await.1;
        (v["channels"]["jobs"]["consecutive_failures"].as_u64()? >= 2).then_some(())
    })
    .await;
    for _ in 0..50 {
        drop(connect(addr, "/jobs/b").await);
    }
    // Every one of them has subscribed and gone.
    metric_becomes(addr, "gateway_connections_total", 51.0).await;
    metric_becomes(addr, "gateway_connections", 1.0).await;

    std::fs::remove_file(&down).unwrap();
    let jobs = gw.state().live().channels["jobs"].clone();
    let status = eventually("the next instance polled", || async {
        // Refused while no instance runs.
        let v = jobs
            .command(br#"{"op":"status"}"#.to_vec(), PATIENCE)
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
        (v["polls"].as_u64()? >= 3).then_some(v)
    })
    .await;
    assert_eq!(status["open_keys"], serde_json::json!(["a"]), "{status}");
    assert_eq!(status["opens"], 1, "{status}");
    gw.shutdown().await;
}

/// `source.call_timeout`: a poll that hangs past it fails the instance,
/// which is given up (what its poll emits when it does return is refused)
/// and restarted. Calls given up on run on in the plugin, each on a thread:
/// at `MAX_ABANDONED_CALLS` (4) of them no new instance is created (the
/// channel is `stalled`) until one returns. Before, a hung poll stalled its
/// channel for as long as it hung, and nothing said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_that_hangs_past_call_timeout_restarts_the_instance_and_stalls_at_four() {
    let dep = Deployment::new();
    // While this file exists, test-faults' polls hang.
    let block = dep.path("upstream-hangs");
    dep.gateway_yaml("")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write(
            "specs/hangs.yaml",
            &format!(
                "channel: hangs\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  call_timeout: 200ms\n  config: {{block_while_exists: '{}'}}\nendpoints:\n  - path: /hangs\n",
                block.display()
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/hangs").await;
    let mut last = seq(&next_json(&mut ws).await);
    assert!(last >= 1);

    std::fs::write(&block, "").unwrap();
    let v = eventually("four calls given up on: stalled", || async {
        let v = readyz(addr).await.1;
        (v["channels"]["hangs"]["state"] == "stalled").then_some(v)
    })
    .await;
    let hangs = &v["channels"]["hangs"];
    assert_eq!(hangs["abandoned_calls"], 4, "{v}");
    // The first instance's poll, then the next three instances' creates.
    assert_eq!(
        hangs["last_error"],
        "create did not return within 200ms (source.call_timeout): the instance was given up; the call runs on in the plugin",
        "{v}"
    );
    let series = |name: &str| format!("{name}{{channel=\"hangs\",plugin=\"test-faults\"}}");
    assert_eq!(
        metric(addr, &series("gateway_plugin_calls_abandoned")).await,
        Some(4.0)
    );
    assert_eq!(
        metric(addr, &series("gateway_plugin_call_timeouts_total")).await,
        Some(4.0)
    );
    // No fifth instance while four calls are stuck: no more timeouts.
    let restarts = metric(addr, &series("gateway_plugin_restarts_total")).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        metric(addr, &series("gateway_plugin_call_timeouts_total")).await,
        Some(4.0)
    );
    assert_eq!(
        metric(addr, &series("gateway_plugin_restarts_total")).await,
        restarts
    );
    // The subscriber got what came before the hang, and nothing since.
    while let Ok(m) =
        tokio::time::timeout(std::time::Duration::from_millis(100), next_json(&mut ws)).await
    {
        let s = seq(&m);
        assert_eq!(s, last + 1);
        last = s;
    }

    // The hung polls return: each is refused what it emits (its instance was
    // given up); they are counted out and a new instance runs, from seq 1.
    std::fs::remove_file(&block).unwrap();
    assert_eq!(
        seq(&next_json(&mut ws).await),
        1,
        "the first message after the stall is the new instance's"
    );
    assert_eq!(seq(&next_json(&mut ws).await), 2);
    metric_becomes(addr, &series("gateway_plugin_calls_abandoned"), 0.0).await;
    let v = eventually("up again", || async {
        let v = readyz(addr).await.1;
        (v["channels"]["hangs"]["state"] == "up").then_some(v)
    })
    .await;
    assert_eq!(v["channels"]["hangs"]["abandoned_calls"], 0, "{v}");
    gw.shutdown().await;
}

/// A channel whose plugin never got to run (its `create` hangs past
/// `call_timeout`, four times) keeps `/readyz` at 503 `starting` while it
/// is stalled, and turns ready once the calls return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_stalled_before_it_ever_ran_keeps_readyz_starting() {
    let dep = Deployment::new();
    let block = dep.path("upstream-hangs");
    std::fs::write(&block, "").unwrap();
    dep.gateway_yaml("")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write(
            "specs/hangs.yaml",
            &format!(
                "channel: hangs\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  call_timeout: 100ms\n  config: {{block_while_exists: '{}'}}\nendpoints:\n  - path: /hangs\n",
                block.display()
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // Four given up on, and the backoff after the fourth over: no next
    // instance is due (`retry_in_ms` null), it waits for the calls.
    let v = eventually("four creates given up on, and a stall", || async {
        let (status, v) = readyz(addr).await;
        let hangs = &v["channels"]["hangs"];
        (hangs["abandoned_calls"] == 4 && hangs["retry_in_ms"].is_null()).then_some((status, v))
    })
    .await;
    let (status, v) = v;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["status"], "starting", "{v}");
    assert_eq!(v["waiting_for"], serde_json::json!(["hangs"]), "{v}");
    assert_eq!(v["channels"]["hangs"]["state"], "starting", "{v}");
    std::fs::remove_file(&block).unwrap();
    until_ready(addr).await;
    let mut ws = connect(addr, "/hangs").await;
    assert!(seq(&next_json(&mut ws).await) >= 1);
    gw.shutdown().await;
}

/// While a call into the plugin hangs (here an `open_key`, with no
/// `call_timeout`), `/readyz` and a gauge say which call and for how long,
/// and the keyed opens and closes that come meanwhile are kept per key:
/// when it returns, the plugin is told only of the keys still followed.
/// Before, every subscribe and unsubscribe queued without bound behind the
/// call and was replayed at the plugin one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_opened_and_closed_while_a_call_hangs_are_folded() {
    let dep = Deployment::new();
    // While this file exists, test-faults' open_key and polls hang.
    let block = dep.path("upstream-hangs");
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_SCHEMA)
        .write(
            "specs/jobs.yaml",
            &format!(
                "channel: jobs\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 1h\n  config: {{steps: 1000000, block_while_exists: '{}'}}\nendpoints:\n  - path: /jobs/{{id}}\n",
                block.display()
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // Created (creates wait while the file exists too).
    until_ready(addr).await;
    std::fs::write(&block, "").unwrap();
    let mut first = connect(addr, "/jobs/first").await;
    let v = eventually("the open_key call shows", || async {
        let v = readyz(addr).await.1;
        (v["channels"]["jobs"]["call"]["name"] == "open_key").then_some(v)
    })
    .await;
    assert!(v["channels"]["jobs"]["call"]["running_ms"].is_u64(), "{v}");
    // Still up: nothing failed, a call is just slow.
    assert_eq!(v["channels"]["jobs"]["state"], "up", "{v}");
    let running = "gateway_plugin_call_running_seconds{channel=\"jobs\",plugin=\"test-faults\"}";
    eventually("the gauge counts the seconds", || async {
        (metric(addr, running).await? >= 1.0).then_some(())
    })
    .await;
    for i in 0..50 {
        drop(connect(addr, &format!("/jobs/k{i}")).await);
    }
    let mut kept = connect(addr, "/jobs/kept").await;
    // Every one of them has subscribed, and the 50 have gone.
    metric_becomes(addr, "gateway_connections_total", 52.0).await;
    metric_becomes(addr, "gateway_connections", 2.0).await;

    std::fs::remove_file(&block).unwrap();
    assert_eq!(next_json(&mut first).await["key"], "first");
    assert_eq!(next_json(&mut kept).await["key"], "kept");
    let jobs = gw.state().live().channels["jobs"].clone();
    let status = plugin_command(&jobs, serde_json::json!({"op": "status"})).await;
    assert_eq!(status["opens"], 2, "{status}");
    assert_eq!(
        status["open_keys"],
        serde_json::json!(["first", "kept"]),
        "{status}"
    );
    // The call that delivered `kept`'s first message may still be returning.
    eventually("no call runs", || async {
        let v = readyz(addr).await.1;
        v["channels"]["jobs"]["call"].is_null().then_some(())
    })
    .await;
    assert_eq!(metric(addr, running).await, Some(0.0));
    gw.shutdown().await;
}

/// A keyed stream that ends before its subscriber got anything is opened
/// again for it once; if that opening ends the same way too, the subscriber
/// is closed (1000) like any whose stream ended. Before, it was opened again
/// and again for as long as the client stayed (here every message fails
/// the schema), a plugin call each time, and the client was never told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_stream_that_keeps_ending_with_nothing_delivered_is_closed() {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        // test-faults' keyed messages have no `seq`: each fails the schema.
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write(
            "specs/jobs.yaml",
            "channel: jobs\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 1h\n  config: {steps: 1}\nendpoints:\n  - path: /jobs/{id}\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/jobs/a").await;
    assert_eq!(close_code(&mut ws).await, Some(1000));
    let jobs = gw.state().live().channels["jobs"].clone();
    // The key is closed at the plugin by the channel's own task, which may
    // run a little after the client got its Close.
    let status = eventually("the key closed at the plugin", || async {
        let v = plugin_command(&jobs, serde_json::json!({"op": "status"})).await;
        (v["open_keys"] == serde_json::json!([])).then_some(v)
    })
    .await;
    assert_eq!(status["opens"], 2, "{status}");
    gw.shutdown().await;
}
