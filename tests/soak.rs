//! Soak: connections opening and closing (cleanly, abruptly, mid-frame and
//! mid-handshake), subscribe/unsubscribe churn, a plugin that panics
//! periodically, and a reload in the middle. Clients that keep up lose
//! nothing, and at the end no connection, subscription or task is left
//! over and memory grew by less than a stated bound.
//!
//! Runs for `SOAK_SECS` seconds (default 20; `.ci/run` runs it for 120 in
//! release mode: `SOAK_SECS=120 cargo test --release --test soak`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// Stated bound: resident memory may grow by at most this much between the
/// warmed-up start and the end.
const RSS_GROWTH_BOUND_KIB: u64 = 8 * 1024;
/// Stated bound: tasks alive at the end, beyond those of the start (the
/// reload adds one channel: its publisher and supervisor).
const TASK_GROWTH_BOUND: usize = 2 + 2;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ticker_spec(name: &str) -> String {
    format!(
        "channel: {name}\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {{rate: 200, pad: 16}}\nendpoints:\n  - path: /{name}\n"
    )
}

fn flaky_spec(panic_every: u32) -> String {
    format!(
        "channel: flaky\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  config: {{panic_every: {panic_every}}}\nendpoints:\n  - path: /flaky\n"
    )
}

fn seq(v: &serde_json::Value) -> Option<i64> {
    v["seq"].as_i64()
}

/// A client that keeps up: reads until `stop`, checking every `steady`
/// message follows the one before. Returns how many it read.
async fn keeper(mut ws: Ws, stop: Arc<AtomicBool>) -> u64 {
    let mut prev: Option<i64> = None;
    let mut n = 0;
    while !stop.load(Relaxed) {
        let v = next_json(&mut ws).await;
        // Control replies (mux keepers) carry no seq.
        let Some(s) = seq(&v) else { continue };
        if let Some(p) = prev {
            assert_eq!(
                s,
                p + 1,
                "a client that kept up lost or reordered messages after {p}"
            );
        }
        prev = Some(s);
        n += 1;
    }
    n
}

/// One churning client; `i` picks what it does.
async fn churn_once(addr: std::net::SocketAddr, i: u64) {
    let quick = Duration::from_secs(5);
    match i % 5 {
        // Connect, read a little, close cleanly.
        0 => {
            let mut ws = connect(addr, "/steady").await;
            for _ in 0..3 {
                next_json(&mut ws).await;
            }
            let _ = ws.close(None).await;
        }
        // Subscribe/unsubscribe churn, then vanish without a Close.
        1 => {
            let mut ws = connect(addr, "/mux").await;
            for ch in ["steady", "flaky"] {
                send_json(&mut ws, &json!({"type": "subscribe", "channel": ch})).await;
            }
            next_json(&mut ws).await;
            send_json(
                &mut ws,
                &json!({"type": "unsubscribe", "channel": "steady"}),
            )
            .await;
            send_json(&mut ws, &json!({"type": "subscribe", "channel": "steady"})).await;
            send_json(&mut ws, &json!({"type": "nonsense", "channel": 7})).await;
            next_json(&mut ws).await;
            drop(ws);
        }
        // Abrupt disconnect in the middle of a frame.
        2 => {
            let mut ws = connect(addr, "/mux").await;
            send_json(&mut ws, &json!({"type": "subscribe", "channel": "steady"})).await;
            next_json(&mut ws).await;
            let tcp = ws.get_mut();
            if let tokio_tungstenite::MaybeTlsStream::Plain(s) = tcp {
                // A masked text frame header announcing 100 bytes, and 3 of them.
                let _ = s
                    .write_all(&[0x81, 0xE4, 1, 2, 3, 4, b'{', b'"', b't'])
                    .await;
            }
            drop(ws);
        }
        // Half a handshake, then gone.
        3 => {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = s
                .write_all(b"GET /steady HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
                .await;
            drop(s);
        }
        // The panicking channel: whatever arrives before the plugin fails again.
        _ => {
            let mut ws = connect(addr, "/flaky").await;
            let _ = tokio::time::timeout(quick, ws.next()).await;
            let _ = ws.send(Message::Close(None)).await;
        }
    }
}

/// Eight clients churning for `d`; returns how many connections they made.
async fn churn_for(addr: std::net::SocketAddr, d: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + d;
    let made = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let made = made.clone();
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while tokio::time::Instant::now() < deadline {
                churn_once(addr, i).await;
                made.fetch_add(1, Relaxed);
                i += 1;
            }
        }));
    }
    for w in workers {
        w.await.expect("a churning client failed");
    }
    made.load(Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_panics_and_a_reload_leave_nothing_behind() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dep = Deployment::new();
    dep.gateway_yaml(
        "reload:\n  watch: false\nlimits:\n  ping_interval: 1s\nprotocols:\n  mux: {}\nendpoints:\n  - path: /mux\n    protocol: mux\n    channels: all\n",
    )
    .shipped_schema("ticker.json")
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/steady.yaml", &ticker_spec("steady"))
    .write("specs/flaky.yaml", &flaky_spec(25));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();

    // Clients that keep up for the whole run: four on the stream endpoint,
    // two subscribed over the protocol.
    let stop = Arc::new(AtomicBool::new(false));
    let mut keepers = Vec::new();
    for _ in 0..4 {
        let ws = connect(addr, "/steady").await;
        keepers.push(tokio::spawn(keeper(ws, stop.clone())));
    }
    for _ in 0..2 {
        let mut ws = connect(addr, "/mux").await;
        send_json(&mut ws, &json!({"type": "subscribe", "channel": "steady"})).await;
        keepers.push(tokio::spawn(keeper(ws, stop.clone())));
    }
    let subs = "gateway_subscribers{channel=\"steady\",plugin=\"ticker\"}";
    metric_becomes(addr, subs, 6.0).await;
    // Warm up with the same churn, so the allocator has reached its working
    // set, then take the baseline.
    churn_for(addr, Duration::from_secs(secs / 4)).await;
    metric_becomes(addr, "gateway_connections", 6.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let rss_before = rss_kib();

    // Churn, with a reload halfway.
    let measured = Duration::from_secs(secs - secs / 4);
    let churn = tokio::spawn(churn_for(addr, measured));
    tokio::time::sleep(measured / 2).await;
    dep.write("specs/extra.yaml", &ticker_spec("extra"))
        .write("specs/flaky.yaml", &flaky_spec(30));
    let report = gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.added, ["extra"]);
    assert_eq!(report.changed, ["flaky"]);
    assert_eq!(report.closed, 0);
    let churned = churn.await.expect("a churning client failed");

    // Nothing is left over: connections, sessions, subscriptions, tasks.
    metric_becomes(addr, "gateway_connections", 6.0).await;
    assert_eq!(gw.state().clients().len(), 6);
    assert_eq!(metric(addr, subs).await, Some(6.0));
    metric_becomes(
        addr,
        "gateway_subscribers{channel=\"flaky\",plugin=\"test-faults\"}",
        0.0,
    )
    .await;
    let tasks_after = eventually("tasks back to the baseline", || async {
        let n = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        (n <= tasks_before + TASK_GROWTH_BOUND).then_some(n)
    })
    .await;
    let rss_after = rss_kib();
    let failures = metric(
        addr,
        "gateway_plugin_failures_total{channel=\"flaky\",plugin=\"test-faults\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(failures >= 1.0, "the flaky plugin panicked during the run");
    // The restarted plugin still delivers.
    let mut ws = connect(addr, "/flaky").await;
    next_json(&mut ws).await;
    drop(ws);

    stop.store(true, Relaxed);
    let mut read = Vec::new();
    for k in keepers {
        read.push(k.await.expect("a keeper lost messages"));
    }
    // 200 msg/s for the whole run: a keeper that kept up read most of them.
    let least = *read.iter().min().unwrap();
    assert!(
        least >= 100 * secs,
        "keepers read {read:?} messages in {secs} s"
    );
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "soak: {secs} s, {churned} churned connections, {failures} plugin failures, tasks {tasks_before} -> {tasks_after}, RSS {rss_before} -> {rss_after} KiB (+{growth} KiB), keepers read {read:?}"
    );
    assert!(
        growth <= RSS_GROWTH_BOUND_KIB,
        "RSS grew by {growth} KiB (bound {RSS_GROWTH_BOUND_KIB} KiB) over {churned} churned connections"
    );
    gw.shutdown().await;
}
