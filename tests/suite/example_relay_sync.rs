//! examples/relay-sync, as a client written from
//! /work/shared/reference-apis.md §5 sees it: a handshake on `/` of the
//! WebSocket port answered by `handshake_response`, then sync, notification
//! and health messages with Unix-second timestamps and real health figures;
//! the REST API on the other port with its routes and error statuses.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use serde_json::{Value, json};

const EXAMPLE: &str = "relay-sync";
const LISTENERS: [&str; 2] = ["ws", "rest"];

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A Unix-seconds timestamp within a minute of now.
fn assert_unix(v: &Value, what: &str) {
    let t = v
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: {v} is not integer seconds"));
    assert!((t - unix_now()).abs() <= 60, "{what}: {t} is not now");
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

/// The host's memory in use, percent, as the test reads it.
fn host_memory_percent() -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |n: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(n)?.strip_prefix(':'))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("MemTotal") - field("MemAvailable")) / field("MemTotal") * 100.0
}

fn handshake() -> Value {
    json!({"type": "handshake", "client_id": "cli-7", "version": "1.0",
           "capabilities": ["sync", "notifications", "health"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_then_sync_notification_and_health_messages() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let ws_addr = gw.addr("ws").unwrap();
    let err_schema = example_schema(EXAMPLE, "schemas/error.json");
    let mut ws = connect(ws_addr, "/").await;

    // Before the handshake: errors, and no data.
    send_json(&mut ws, &json!({"type": "subscribe", "channel": "sync"})).await;
    let e = next_json(&mut ws).await;
    assert_schema(&err_schema, "an error reply", &e);
    assert_eq!(e["code"], "not_authenticated");
    send_json(
        &mut ws,
        &json!({"type": "handshake", "client_id": "cli-7", "version": "1.0"}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_schema(&err_schema, "an error reply", &e);
    assert_eq!(e["code"], "invalid_handshake");
    assert!(
        e["message"].as_str().unwrap().contains("capabilities"),
        "{e}"
    );
    assert_unix(&e["timestamp"], "error timestamp");

    send_json(&mut ws, &handshake()).await;
    let r = next_json(&mut ws).await;
    assert_schema(
        &example_schema(EXAMPLE, "schemas/handshake-response.json"),
        "the handshake reply",
        &r,
    );
    assert_eq!(r["type"], "handshake_response");
    assert_eq!(r["client_id"], "cli-7");
    let caps: BTreeSet<&str> = r["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(caps, BTreeSet::from(["sync", "notifications", "health"]));
    assert_unix(&r["timestamp"], "handshake_response timestamp");

    let sync = example_schema(EXAMPLE, "schemas/sync.json");
    let notification = example_schema(EXAMPLE, "schemas/notification.json");
    let health = example_schema(EXAMPLE, "schemas/health.json");
    let mut seen = BTreeSet::new();
    let mut sync_types = BTreeSet::new();
    let mut message_ids = BTreeSet::new();
    let mut live_health = false;
    let mut n = 0;
    let until = deadline();
    while seen.len() < 3 || !live_health || sync_types.len() < 2 {
        before(
            until,
            &format!(
                "every message type; seen {seen:?}, sync types {sync_types:?}, live health {live_health}"
            ),
        );
        let m = next_json(&mut ws).await;
        n += 1;
        assert_unix(&m["timestamp"], "message timestamp");
        match m["type"].as_str().expect("a type") {
            "sync" => {
                assert_schema(&sync, "a sync message", &m);
                assert_eq!(
                    keys(&m),
                    BTreeSet::from([
                        "type",
                        "sync_type",
                        "relay_id",
                        "payload",
                        "timestamp",
                        "message_id"
                    ])
                );
                assert!(m["payload"].is_object());
                assert!(
                    message_ids.insert(m["message_id"].as_str().unwrap().to_owned()),
                    "unique message_id"
                );
                sync_types.insert(m["sync_type"].as_str().unwrap().to_owned());
            }
            "notification" => {
                assert_schema(&notification, "a notification", &m);
                assert_eq!(
                    keys(&m),
                    BTreeSet::from(["type", "notification_type", "data", "timestamp"])
                );
                assert_eq!(
                    keys(&m["data"]),
                    BTreeSet::from(["txid", "block_height", "amount", "address"])
                );
            }
            "health" => {
                assert_schema(&health, "a health message", &m);
                let x = &m["metrics"];
                assert_eq!(
                    keys(x),
                    BTreeSet::from(["uptime", "memory_usage", "cpu_usage", "connections"])
                );
                // Real figures: the host's memory as /proc says, the gateway's connections.
                let mem = x["memory_usage"].as_f64().unwrap();
                assert!(
                    (mem - host_memory_percent()).abs() < 20.0,
                    "memory_usage {mem}"
                );
                assert!((0.0..=100.0).contains(&x["cpu_usage"].as_f64().unwrap()));
                assert!(x["uptime"].as_u64().unwrap() < 3600, "the gateway's uptime");
                // The latest value may predate this client; a fresh one counts it.
                if x["connections"].as_u64().unwrap() >= 1 {
                    live_health = true;
                }
            }
            other => panic!("unexpected message type {other}: {m}"),
        }
        seen.insert(m["type"].as_str().unwrap().to_owned());
        // After the handshake, anything the client sends is ignored.
        if n % 4 == 0 {
            send_json(&mut ws, &json!({"type": "ping"})).await;
            send_text(&mut ws, "not json").await;
            send_json(&mut ws, &handshake()).await;
        }
    }
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn get(rest: SocketAddr, path: &str) -> (u16, Value) {
    let (s, _, body) = http(rest, "GET", path, &[]).await;
    (s, json_of(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_answers_every_route() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let ws_addr = gw.addr("ws").unwrap();
    let rest = gw.addr("rest").unwrap();
    let s = |f: &str| example_schema(EXAMPLE, &format!("schemas/http/{f}"));

    // A connected client, so the connection figures have something to count.
    let mut ws = connect(ws_addr, "/").await;
    send_json(&mut ws, &handshake()).await;
    assert_eq!(next_json(&mut ws).await["type"], "handshake_response");

    // Commands answer 503 until the relay plugin has started (a busy
    // machine may take a moment); from then on /health answers 200.
    let v = eventually("GET /health answering 200", || async {
        let (status, v) = get(rest, "/health").await;
        assert!(status == 200 || status == 503, "GET /health: {status} {v}");
        (status == 200).then_some(v)
    })
    .await;
    assert_schema(&s("health.json"), "GET /health", &v);
    assert_unix(&v["timestamp"], "/health timestamp");

    // The relay's sync rounds show in its metrics.
    let metrics = eventually("a sync round in the metrics", || async {
        let (status, v) = get(rest, "/metrics").await;
        assert_eq!(status, 200);
        (v["sync_metrics"]["sync_requests"].as_u64() > Some(0)).then_some(v)
    })
    .await;
    assert_schema(&s("metrics.json"), "GET /metrics", &metrics);
    assert!(metrics["system_metrics"]["active_connections"].as_u64() >= Some(1));
    let mem = metrics["system_metrics"]["memory_usage"].as_f64().unwrap();
    assert!(
        (mem - host_memory_percent()).abs() < 20.0,
        "memory_usage {mem}"
    );
    let requests = metrics["system_metrics"]["total_requests"]
        .as_u64()
        .unwrap();
    let (_, again) = get(rest, "/metrics").await;
    assert!(again["system_metrics"]["total_requests"].as_u64().unwrap() > requests);

    let (status, v) = get(rest, "/config").await;
    assert_eq!(status, 200);
    assert_schema(&s("config.json"), "GET /config", &v);
    assert_eq!(v["listeners"]["websocket"], format!("ws://{ws_addr}/"));

    let (status, v) = get(rest, "/relays").await;
    assert_eq!(status, 200);
    assert_schema(&s("relays.json"), "GET /relays", &v);
    assert!(!v["relays"].as_array().unwrap().is_empty());

    let (status, v) = get(rest, "/sync/status").await;
    assert_eq!(status, 200);
    assert_schema(&s("sync-status.json"), "GET /sync/status", &v);

    // A forced sync: answered at once, then streamed to WebSocket clients.
    let (status, _, body) = http_body(
        rest,
        "POST",
        "/sync/force",
        &[("Content-Type", "application/json")],
        r#"{"sync_types": ["MetricsSync", "StateSync"]}"#,
    )
    .await;
    let v = json_of(&body);
    assert_eq!(status, 200, "{v}");
    assert_schema(&s("sync-force.json"), "POST /sync/force", &v);
    assert_eq!(v["status"], "sync_triggered");
    assert_eq!(v["sync_types"], json!(["MetricsSync", "StateSync"]));
    assert_unix(&v["timestamp"], "/sync/force timestamp");
    let logs = eventually("the forced rounds in the logs", || async {
        let (status, v) = get(rest, "/logs?level=info&limit=100").await;
        assert_eq!(status, 200);
        let text = v.to_string();
        (text.contains("forced MetricsSync round") && text.contains("forced StateSync round"))
            .then_some(v)
    })
    .await;
    assert_schema(&s("logs.json"), "GET /logs", &logs);
    let lines = logs["logs"].as_array().unwrap();
    assert!(lines.len() <= 100);
    assert!(
        lines.iter().all(|l| l["level"] != "debug"),
        "level=info leaves debug out"
    );
    let (_, v) = get(rest, "/logs?level=debug&limit=3").await;
    assert_eq!(v["logs"].as_array().unwrap().len(), 3);
    let mut forced = BTreeSet::new();
    let until = deadline();
    while forced.len() < 2 {
        before(until, "the forced syncs on the socket");
        let m = next_json(&mut ws).await;
        if m["type"] == "sync" {
            forced.insert(m["sync_type"].as_str().unwrap().to_owned());
        }
    }

    // Errors: JSON bodies with the documented statuses.
    let err = s("error.json");
    for (method, path, body, status, code) in [
        ("POST", "/sync/force", "{not json", 400, "invalid_json"),
        (
            "POST",
            "/sync/force",
            r#"{"sync_types": ["Nope"]}"#,
            400,
            "command_failed",
        ),
        ("POST", "/sync/force", "{}", 400, "command_failed"),
        ("GET", "/logs?level=loud", "", 400, "command_failed"),
        ("GET", "/logs?limit=lots", "", 400, "command_failed"),
        ("GET", "/nothing", "", 404, "not_found"),
        // Only 400, 404, 500 and 503 are documented: `status_codes` on the
        // listener answers a wrong method (405) as 404.
        ("GET", "/sync/force", "", 404, "method_not_allowed"),
    ] {
        let (st, _, b) = http_body(rest, method, path, &[], body).await;
        let v = json_of(&b);
        assert_schema(&err, "an HTTP error", &v);
        assert_eq!(
            (st, v["error"].as_str()),
            (status, Some(code)),
            "{method} {path}: {v}"
        );
    }
    // A body over 10 MB, read as 10 MiB (413), is answered as 400 as soon as
    // its length is declared.
    let mut tcp = tokio::net::TcpStream::connect(rest).await.unwrap();
    let head = format!(
        "POST /sync/force HTTP/1.1\r\nHost: {rest}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{{\"sync_types\": [\"",
        (10 << 20) + 1
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let (st, _, b) = split_response(&buf);
    let v = json_of(&b);
    assert_schema(&err, "an HTTP error", &v);
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("body_too_large")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_limits_are_configured() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let cfg = &gw.state().config();
    let ws = &cfg.endpoints[0].limits;
    assert_eq!(ws.ping_interval, Some(std::time::Duration::from_secs(30)));
    assert_eq!(ws.idle_timeout, Some(std::time::Duration::from_secs(60)));
    assert_eq!(ws.max_message_size, 1 << 20);
    assert_eq!(cfg.limits.max_connections, 1000);
    // Bodies at most 10 MB, read as 10 MiB like the messages' 1 MB, so a
    // client counting either way fits; only POST /sync/force takes one.
    let force = cfg
        .http
        .iter()
        .find(|h| h.path.as_str() == "/sync/force")
        .expect("POST /sync/force");
    assert_eq!(force.max_body, 10 << 20);
    assert!(
        cfg.http.iter().all(|h| h.per_ip.is_some()),
        "every HTTP route is rate-limited"
    );
    // Beyond 1000 requests a minute (the quota refills one every 60 ms
    // while the loop runs) requests are refused.
    let rest = gw.addr("rest").unwrap();
    let mut refused = None;
    for i in 0..2000 {
        let (s, head, body) = http(rest, "GET", "/health", &[]).await;
        if s == 503 && json_of(&body)["error"] == "rate_limited" {
            refused = Some((i, head));
            break;
        }
    }
    // 429 is not among the documented statuses: `status_codes` answers it
    // as 503, still with Retry-After.
    let (i, head) = refused.expect("a 503 within 2000 requests");
    assert!(i >= 999, "refused too early, at request {i}");
    assert!(head.to_ascii_lowercase().contains("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_documented_close_codes_are_sent() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let ws_addr = gw.addr("ws").unwrap();
    // A message over 1 MB: 1003 (unsupported data), not 1009.
    let mut ws = connect(ws_addr, "/").await;
    send_json(&mut ws, &handshake()).await;
    assert_eq!(next_json(&mut ws).await["type"], "handshake_response");
    send_text(&mut ws, &format!(r#"{{"pad": "{}"}}"#, "x".repeat(1 << 20))).await;
    assert_eq!(close_code(&mut ws).await, Some(1003));
    // Invalid UTF-8 in a text message: 1003, not 1007.
    let mut ws = connect(ws_addr, "/").await;
    send_json(&mut ws, &handshake()).await;
    assert_eq!(next_json(&mut ws).await["type"], "handshake_response");
    {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        let bad = Frame::message(&b"{\"type\":\"\xff\"}"[..], OpCode::Data(Data::Text), true);
        ws.send(Message::Frame(bad)).await.unwrap();
    }
    assert_eq!(close_code(&mut ws).await, Some(1003));
    // No handshake within its 10 s: 1002 (protocol error), not 1008.
    let mut silent = connect(ws_addr, "/").await;
    let started = std::time::Instant::now();
    let code = next_json_or_close(&mut silent).await;
    assert_eq!(
        code,
        Err(Some(1002)),
        "no data before the handshake, then 1002"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(9),
        "closed after the 10 s allowed"
    );
}
