//! Shutdown: every client gets Close 1001 and the process exits within its
//! deadline. Also the process's runtime size, which `TOKIO_WORKER_THREADS` sets.

use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

fn ticker_deployment() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("shutdown:\n  deadline: 5s\n")
        .shipped_schema("ticker.json")
        .write(
            "specs/ticker.yaml",
            "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 200}\nendpoints:\n  - path: /ticker\n",
        );
    dep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_client_with_1001() {
    let dep = ticker_deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(addr, "/ticker").await;
        next_json(&mut ws).await;
        clients.push(ws);
    }
    let state = gw.state().clone();
    let done = tokio::spawn(gw.shutdown());
    for ws in &mut clients {
        assert_eq!(close_code(ws).await, Some(1001));
    }
    assert!(
        done.await.unwrap(),
        "every task finished before the deadline"
    );
    assert_eq!(
        state
            .metrics
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// The sources stop first: every message a plugin handed over before it
/// stopped reaches the connected clients, then their Close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_sources_handed_over_reaches_the_clients_before_their_close() {
    let dep = ticker_deployment();
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 5000}\nendpoints:\n  - path: /ticker\n",
    );
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/ticker").await;
    let first = next_json(&mut ws).await["seq"].as_u64().expect("seq");
    // The ticker numbers its messages from 1, so the last one published is
    // number `published`.
    let reader = tokio::spawn(async move {
        let mut last = first;
        loop {
            match tokio::time::timeout(PATIENCE, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    last = v["seq"].as_u64().expect("seq");
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return last,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("no Close in time"),
            }
        }
    });
    let state = gw.state().clone();
    assert!(gw.shutdown().await);
    let last = reader.await.unwrap();
    let published = state.live().channels["ticker"]
        .metrics
        .published
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        last, published,
        "the client's last message was {last} of the {published} published"
    );
}

/// Shutdown stops taking sessions at once: while a source is still stopping
/// (here a poll held inside the plugin), a new WebSocket connection gets
/// 503 and `/readyz` says `stopping` (the admin routes still answer), and
/// the clients already connected still get what the source hands over,
/// then their Close 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_refused_while_the_sources_stop() {
    let dep = Deployment::new();
    // Half the deadline (what the sources get) outlasts `eventually`.
    dep.gateway_yaml("shutdown:\n  deadline: 60s\n")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        .write("specs/slow.yaml", SLOW_POLL_SPEC);
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/slow").await;
    next_json(&mut ws).await;
    let slow = gw.state().live().channels["slow"].clone();
    let held_seq = hold_a_poll(&slow).await["seq"].as_i64().unwrap();
    let done = tokio::spawn(gw.shutdown());
    then_release(&slow, async {
        eventually("new sessions refused", || async {
            match try_connect(addr, "/slow", &[]).await {
                Err((503, body)) => Some(body),
                _ => None,
            }
        })
        .await;
        // Load balancers are told, and the admin routes still answer.
        let (status, _, body) = http(addr, "GET", "/readyz", &[]).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("stopping"), "{body}");
        let (status, _, _) = http(addr, "GET", "/metrics", &[]).await;
        assert_eq!(status, 200);
    })
    .await;
    let mut last = 0;
    let code = loop {
        match next_json_or_close(&mut ws).await {
            Ok(v) => last = v["seq"].as_i64().unwrap(),
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1001));
    assert_eq!(
        last,
        held_seq + 1,
        "the held poll's message came before the Close"
    );
    assert!(
        done.await.unwrap(),
        "every task finished before the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001_and_the_process_exits() {
    let dep = ticker_deployment();
    let mut gw = GatewayProcess::spawn(&dep.path("gateway.yaml"), &[]);
    let addr = gw.addr;
    let mut ws = connect(addr, "/ticker").await;
    next_json(&mut ws).await;
    let started = Instant::now();
    gw.signal("TERM");
    assert_eq!(close_code(&mut ws).await, Some(1001));
    let code = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5) + PATIENCE,
            "process did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code.code(), Some(0), "clean shutdown exits 0");
    // Everything it wrote: the reader thread may still be behind its exit;
    // it ends at the pipe's end.
    let mut logs = Vec::new();
    while let Ok(line) = gw.logs.recv_timeout(PATIENCE) {
        logs.push(line);
    }
    assert!(
        logs.iter().any(|l| l.contains("shutting down")),
        "shutdown is logged: {logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_worker_threads_sets_the_number_of_async_workers() {
    let dep = ticker_deployment();
    // 3 is more than the 2 cores of the CI machine; 1 is fewer than any.
    for workers in [1, 3] {
        let n = workers.to_string();
        let gw = GatewayProcess::spawn(&dep.path("gateway.yaml"), &[("TOKIO_WORKER_THREADS", &n)]);
        let started = gw.wait_log("started");
        assert_eq!(started["workers"], workers, "{started}");
        let mut ws = connect(gw.addr, "/ticker").await;
        next_json(&mut ws).await;
    }
}

#[test]
fn a_bad_tokio_worker_threads_is_refused_with_a_clear_error() {
    let dep = ticker_deployment();
    for bad in ["0", "two", " 2", "-1"] {
        let out = std::process::Command::new(target_dir().join("gateway"))
            .args(["--config", dep.path("gateway.yaml").to_str().unwrap()])
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .expect("run the gateway binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(
            stderr.contains(&format!("TOKIO_WORKER_THREADS={bad:?}"))
                && stderr.contains("whole number of at least 1")
                && !stderr.contains("panicked"),
            "{bad:?}: {stderr}"
        );
    }
}
