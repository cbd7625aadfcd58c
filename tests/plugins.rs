//! Real plugins from real `.so` files: the ABI handshake, panics and errors
//! contained and restarted, commands.

mod common;

use std::sync::Arc;

use common::*;
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
    assert_eq!(
        v,
        serde_json::json!({"status": "starting", "waiting_for": ["broken"]})
    );
    // The other channel is unaffected.
    let mut ws = connect(addr, "/steady").await;
    let a = seq(&next_json(&mut ws).await);
    assert_eq!(seq(&next_json(&mut ws).await), a + 1);
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_up{channel=\"steady\",plugin=\"ticker\"}"
        )
        .await,
        Some(1.0)
    );
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
    assert_eq!(body, r#"{"status":"ready"}"#);
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
