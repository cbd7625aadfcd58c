//! examples/iot-telemetry, loaded from its own gateway.yaml (listener moved
//! to port 0) and played by a client written from the reference description
//! (/work/shared/reference-apis.md §2): in-band JWT and its refusals, the
//! `type`/`channel` subscribe protocol, every channel's messages and
//! filters, the dedicated endpoints, ping/pong and the message size limit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use gateway::Gateway;
use gateway::config::{self, LoadOptions};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

fn example_dir() -> PathBuf {
    repo_root().join("examples/iot-telemetry")
}

/// The example's own configuration, every listener on port 0 (the CLI's
/// `--listen main=127.0.0.1:0`).
fn load() -> config::Config {
    let opts = LoadOptions {
        plugin_dirs: Some(vec![build_plugins()]),
        listen: BTreeMap::from([("main".to_string(), "127.0.0.1:0".to_string())]),
        ..Default::default()
    };
    config::load(&example_dir().join("gateway.yaml"), &opts)
        .unwrap_or_else(|e| panic!("examples/iot-telemetry/gateway.yaml should load:\n{e}"))
}

async fn start() -> Gateway {
    Gateway::start(load())
        .await
        .unwrap_or_else(|e| panic!("gateway should start:\n{e}"))
}

fn secret() -> String {
    std::env::var("IOT_JWT_SECRET").unwrap_or_else(|_| "iot-demo-secret".into())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(alg: Algorithm, secret: &str, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn good_token(sub: &str) -> String {
    token(
        Algorithm::HS256,
        &secret(),
        json!({"sub": sub, "exp": now() + 600}),
    )
}

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A schema of the example, compiled with format checks on (as the gateway does).
fn schema(name: &str) -> jsonschema::Validator {
    example_schema("iot-telemetry", &format!("schemas/{name}"))
}

/// Connect and authenticate with a good token.
async fn authed(addr: std::net::SocketAddr, path: &str) -> Ws {
    let mut ws = connect(addr, path).await;
    send_json(
        &mut ws,
        &json!({"type": "auth", "token": good_token("alice")}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "auth_response", "success": true})
    );
    ws
}

/// Subscribe and check the confirmation (data of an earlier subscription
/// already on its way may come first).
async fn subscribe(ws: &mut Ws, msg: Value) {
    let channel = msg["channel"].clone();
    send_json(ws, &msg).await;
    let r = loop {
        let r = next_json(ws).await;
        if r["channel"] != channel || r["type"] == "subscription_confirmed" || r["type"] == "error"
        {
            break r;
        }
    };
    assert_eq!(r["type"], "subscription_confirmed", "{msg} → {r}");
    assert_eq!(r["channel"], channel);
    assert!(is_iso_millis(&r["timestamp"]), "{r}");
    assert_eq!(sorted_keys(&r), ["channel", "timestamp", "type"]);
    assert_schema(&schema("control.json"), "message", &r);
}

/// The next message of type `ty`, skipping others (there are none unless
/// the test subscribed to several channels).
async fn next_of(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let m = next_json(ws).await;
        if m["type"] == ty {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_matches_the_reference() {
    let cfg = load();
    assert_eq!(cfg.limits.max_connections, 1000);
    assert_eq!(cfg.limits.max_message_size, 1024);
    let mut names: Vec<&str> = cfg.channels.iter().map(|c| &*c.name).collect();
    names.sort();
    assert_eq!(names, ["alerts", "devices", "system", "telemetry"]);
    // The shipped file binds the documented port.
    let text = std::fs::read_to_string(example_dir().join("gateway.yaml")).unwrap();
    assert!(text.contains("bind: 127.0.0.1:8000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_jwt_gates_everything_but_ping() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let control = schema("control.json");
    for path in [
        "/ws",
        "/ws/telemetry",
        "/ws/alerts",
        "/ws/system",
        "/ws/devices",
    ] {
        let mut ws = connect(addr, path).await;
        if path == "/ws/telemetry" {
            // Nothing arrives before auth, not even the auto-subscribed
            // channel (it publishes every second).
            assert_quiet(&mut ws, Duration::from_millis(1500)).await;
        }

        // ping is answered before auth; its timestamp is echoed.
        send_json(
            &mut ws,
            &json!({"type": "ping", "timestamp": 1_700_000_000}),
        )
        .await;
        let pong = next_json(&mut ws).await;
        assert_eq!(pong["type"], "pong", "{path}: {pong}");
        assert_eq!(pong["timestamp"], 1_700_000_000);
        assert!(is_iso_millis(&pong["server_time"]));
        assert_schema(&control, "message", &pong);

        // Anything else is refused before auth.
        send_json(&mut ws, &json!({"type": "subscribe", "channel": "alerts"})).await;
        let e = next_json(&mut ws).await;
        assert_eq!(e["type"], "error", "{path}: {e}");
        assert_eq!(e["error"], "not_authenticated");
        assert!(e["message"].as_str().unwrap().contains("auth"), "{e}");
        assert_schema(&control, "message", &e);

        // Refused tokens: auth_response with success false, the
        // reference's error `invalid_token` whatever the reason, and a
        // message saying why; the socket stays open for another try.
        let expired = token(
            Algorithm::HS256,
            &secret(),
            json!({"sub": "u", "exp": now() - 3600}),
        );
        let wrong_secret = token(
            Algorithm::HS256,
            "not-the-secret",
            json!({"sub": "u", "exp": now() + 600}),
        );
        let wrong_alg = token(
            Algorithm::HS512,
            &secret(),
            json!({"sub": "u", "exp": now() + 600}),
        );
        let alg_none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"sub": "mallory", "exp": now() + 600}))
        );
        for (t, why) in [
            (wrong_secret.as_str(), "signature"),
            (alg_none.as_str(), ""),
            (wrong_alg.as_str(), ""),
            ("not.a.jwt", ""),
            (expired.as_str(), "expired"),
        ] {
            send_json(&mut ws, &json!({"type": "auth", "token": t})).await;
            let r = next_json(&mut ws).await;
            assert_eq!(
                sorted_keys(&r),
                ["error", "message", "success", "type"],
                "{r}"
            );
            assert_eq!(r["type"], "auth_response");
            assert_eq!(r["success"], false);
            assert_eq!(r["error"], "invalid_token", "{path}: {r}");
            let message = r["message"].as_str().unwrap();
            assert!(!message.is_empty() && message.contains(why), "{r}");
            assert_schema(&control, "message", &r);
        }
        // Still not authenticated.
        send_json(&mut ws, &json!({"type": "subscribe", "channel": "alerts"})).await;
        assert_eq!(next_json(&mut ws).await["error"], "not_authenticated");

        // `exp` is honoured when present: a token without one is accepted.
        let no_exp = token(Algorithm::HS256, &secret(), json!({"sub": "carol"}));
        let mut other = connect(addr, path).await;
        send_json(&mut other, &json!({"type": "auth", "token": no_exp})).await;
        assert_eq!(
            next_json(&mut other).await,
            json!({"type": "auth_response", "success": true})
        );

        send_json(
            &mut ws,
            &json!({"type": "auth", "token": good_token("bob")}),
        )
        .await;
        let ok = next_json(&mut ws).await;
        assert_eq!(ok, json!({"type": "auth_response", "success": true}));
        assert_schema(&control, "message", &ok);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_authenticates_is_closed() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws").await;
    // The auth timeout is 10 s; close_code waits up to PATIENCE (20 s).
    assert_eq!(close_code(&mut ws).await, Some(1008));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_updates_and_their_filters() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let telemetry_schema = schema("telemetry.json");

    let mut all = authed(addr, "/ws").await;
    subscribe(
        &mut all,
        json!({"type": "subscribe", "channel": "telemetry"}),
    )
    .await;
    // device_id at the top level, metrics under `filters`.
    let mut one = authed(addr, "/ws").await;
    subscribe(
        &mut one,
        json!({"type": "subscribe", "channel": "telemetry", "device_id": 3,
               "filters": {"metrics": ["temperature", "battery"]}}),
    )
    .await;
    // device_id (a list) under `filters`, frequency at the top level.
    let mut some = authed(addr, "/ws").await;
    subscribe(
        &mut some,
        json!({"type": "subscribe", "channel": "telemetry", "frequency": "real-time",
               "filters": {"device_id": [1, 2]}}),
    )
    .await;
    let mut slow = authed(addr, "/ws").await;
    subscribe(
        &mut slow,
        json!({"type": "subscribe", "channel": "telemetry", "filters": {"frequency": "30s"}}),
    )
    .await;

    // Unfiltered: every device, every metric with value, unit, timestamp.
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut temps: HashMap<u64, Vec<f64>> = HashMap::new();
    while seen.get(&1).copied().unwrap_or(0) < 3 {
        let m = next_json(&mut all).await;
        assert_eq!(
            sorted_keys(&m),
            ["channel", "device_id", "telemetry", "type"],
            "{m}"
        );
        assert_eq!(m["type"], "telemetry_update");
        assert_eq!(m["channel"], "telemetry");
        assert_schema(&telemetry_schema, "message", &m);
        let d = m["device_id"].as_u64().unwrap();
        assert!((1..=8).contains(&d), "{m}");
        *seen.entry(d).or_default() += 1;
        let t = &m["telemetry"];
        assert_eq!(
            sorted_keys(t),
            ["battery", "humidity", "pressure", "temperature"]
        );
        for (name, unit) in [
            ("temperature", "°C"),
            ("humidity", "%"),
            ("pressure", "hPa"),
            ("battery", "%"),
        ] {
            assert_eq!(sorted_keys(&t[name]), ["timestamp", "unit", "value"]);
            assert_eq!(t[name]["unit"], unit);
            assert!(t[name]["value"].is_number());
            assert!(is_iso_millis(&t[name]["timestamp"]));
        }
        let h = t["humidity"]["value"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&h));
        temps
            .entry(d)
            .or_default()
            .push(t["temperature"]["value"].as_f64().unwrap());
    }
    assert_eq!(seen.len(), 8, "every device reports: {seen:?}");
    // Readings random-walk: a step is small.
    for series in temps.values() {
        for w in series.windows(2) {
            assert!((w[1] - w[0]).abs() <= 0.41, "{series:?}");
        }
    }

    // device_id 3, projected to two metrics.
    for _ in 0..2 {
        let m = next_json(&mut one).await;
        assert_eq!(m["device_id"], 3, "{m}");
        assert_eq!(
            sorted_keys(&m["telemetry"]),
            ["battery", "temperature"],
            "{m}"
        );
        assert_eq!(
            sorted_keys(&m["telemetry"]["battery"]),
            ["timestamp", "unit", "value"]
        );
    }
    // A list of devices.
    let mut got = HashSet::new();
    while got.len() < 2 {
        let m = next_json(&mut some).await;
        let d = m["device_id"].as_u64().unwrap();
        assert!(d == 1 || d == 2, "{m}");
        assert_eq!(sorted_keys(&m["telemetry"]).len(), 4);
        got.insert(d);
    }
    // 30 s: one update per device at once, then nothing for that device
    // while the unfiltered client sees two more rounds.
    let mut first: HashSet<u64> = HashSet::new();
    while first.len() < 8 {
        let m = next_json(&mut slow).await;
        assert!(
            first.insert(m["device_id"].as_u64().unwrap()),
            "a second update within 30 s: {m}"
        );
    }
    let mut rounds = 0;
    while rounds < 2 {
        if next_json(&mut all).await["device_id"] == 8 {
            rounds += 1;
        }
    }
    assert_quiet(&mut slow, Duration::from_millis(200)).await;

    // A subscribe naming another device adds it (`subscription_key:
    // device_id`); device 3 keeps its own filters.
    subscribe(
        &mut one,
        json!({"type": "subscribe", "channel": "telemetry", "device_id": 5}),
    )
    .await;
    let mut metric_counts: BTreeMap<u64, usize> = BTreeMap::new();
    while metric_counts.len() < 2 {
        let m = next_json(&mut one).await;
        let d = m["device_id"].as_u64().unwrap();
        assert!(d == 3 || d == 5, "{m}");
        metric_counts.insert(d, sorted_keys(&m["telemetry"]).len());
    }
    assert_eq!(metric_counts, BTreeMap::from([(3, 2), (5, 4)]));
    // Unsubscribing one device ends only that device's subscription.
    send_json(
        &mut one,
        &json!({"type": "unsubscribe", "channel": "telemetry", "device_id": 3}),
    )
    .await;
    let confirmed = loop {
        let m = next_json(&mut one).await;
        if m["type"] == "unsubscription_confirmed" {
            break m;
        }
    };
    assert_eq!(confirmed["channel"], "telemetry");
    let at = confirmed["timestamp"].as_str().unwrap().to_string();
    // Frames queued before the unsubscribe may still arrive; once a reading
    // taken after it has come, only device 5 follows.
    loop {
        let m = next_json(&mut one).await;
        let taken = m["telemetry"]["temperature"]["timestamp"]
            .as_str()
            .unwrap_or("");
        if m["device_id"] == 5 && taken > at.as_str() {
            break;
        }
    }
    for _ in 0..6 {
        let m = next_json(&mut one).await;
        assert_eq!(m["device_id"], 5, "{m}");
    }
    // And the device that is not subscribed is refused by name.
    send_json(
        &mut one,
        &json!({"type": "unsubscribe", "channel": "telemetry", "device_id": 3}),
    )
    .await;
    let refused = loop {
        let m = next_json(&mut one).await;
        if m["type"] == "error" {
            break m;
        }
    };
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|t| t.contains("with device_id 3")),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_with_severity_device_and_type_filters() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let alert_schema = schema("alert.json");
    let mut all = authed(addr, "/ws").await;
    subscribe(&mut all, json!({"type": "subscribe", "channel": "alerts"})).await;
    let mut severe = authed(addr, "/ws").await;
    subscribe(
        &mut severe,
        json!({"type": "subscribe", "channel": "alerts", "severity": ["high", "critical"]}),
    )
    .await;
    let mut devices = authed(addr, "/ws").await;
    subscribe(
        &mut devices,
        json!({"type": "subscribe", "channel": "alerts", "filters": {"device_id": [1, 2, 3, 4]}}),
    )
    .await;
    let mut kinds = authed(addr, "/ws").await;
    subscribe(
        &mut kinds,
        json!({"type": "subscribe", "channel": "alerts",
               "alert_type": ["high_temperature", "low_battery"]}),
    )
    .await;

    let mut ids = HashSet::new();
    for _ in 0..3 {
        let a = next_json(&mut all).await;
        assert_eq!(
            sorted_keys(&a),
            [
                "alert_id",
                "alert_type",
                "channel",
                "device_id",
                "message",
                "metadata",
                "severity",
                "timestamp",
                "title",
                "type"
            ],
            "{a}"
        );
        assert_schema(&alert_schema, "message", &a);
        assert_eq!(a["type"], "alert");
        assert_eq!(a["channel"], "alerts");
        assert!(ids.insert(a["alert_id"].as_str().unwrap().to_string()));
        assert!(is_iso_millis(&a["timestamp"]));
        assert_eq!(
            sorted_keys(&a["metadata"]),
            ["actual_value", "threshold_value"]
        );
        let th = a["metadata"]["threshold_value"].as_f64().unwrap();
        let actual = a["metadata"]["actual_value"].as_f64().unwrap();
        // The actual value is past the threshold, in the alert's direction.
        if a["alert_type"].as_str().unwrap().starts_with("high_") {
            assert!(actual > th, "{a}");
        } else {
            assert!(actual < th, "{a}");
        }
        assert!(!a["title"].as_str().unwrap().is_empty());
        let d = a["device_id"].to_string();
        assert!(a["message"].as_str().unwrap().contains(&d), "{a}");
    }
    for _ in 0..2 {
        let a = next_json(&mut severe).await;
        assert!(
            ["high", "critical"].contains(&a["severity"].as_str().unwrap()),
            "{a}"
        );
        let a = next_json(&mut devices).await;
        assert!((1..=4).contains(&a["device_id"].as_u64().unwrap()), "{a}");
        let a = next_json(&mut kinds).await;
        assert!(
            ["high_temperature", "low_battery"].contains(&a["alert_type"].as_str().unwrap()),
            "{a}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_status_changes_with_filters() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let device_schema = schema("device-status.json");
    let mut all = authed(addr, "/ws").await;
    subscribe(&mut all, json!({"type": "subscribe", "channel": "devices"})).await;
    let mut some = authed(addr, "/ws").await;
    subscribe(
        &mut some,
        json!({"type": "subscribe", "channel": "devices", "device_id": [1, 2, 3, 4],
               "filters": {"status_types": ["online", "offline"]}}),
    )
    .await;
    let mut one = authed(addr, "/ws").await;
    subscribe(
        &mut one,
        json!({"type": "subscribe", "channel": "devices", "filters": {"device_id": [5, 6, 7, 8]}}),
    )
    .await;

    // Transitions chain: a device's old_status is its previous new_status.
    let mut last: HashMap<u64, String> = HashMap::new();
    for _ in 0..4 {
        let m = next_json(&mut all).await;
        assert_eq!(
            sorted_keys(&m),
            [
                "channel",
                "device_id",
                "metadata",
                "new_status",
                "old_status",
                "reason",
                "timestamp",
                "type"
            ],
            "{m}"
        );
        assert_schema(&device_schema, "message", &m);
        assert_eq!(m["type"], "device_status_update");
        assert_eq!(m["channel"], "devices");
        assert_ne!(m["old_status"], m["new_status"]);
        assert!(is_iso_millis(&m["metadata"]["last_seen"]));
        assert!(m["metadata"]["last_seen"].as_str() <= m["timestamp"].as_str());
        let d = m["device_id"].as_u64().unwrap();
        if let Some(prev) = last.get(&d) {
            assert_eq!(m["old_status"], prev.as_str(), "{m}");
        }
        last.insert(d, m["new_status"].as_str().unwrap().to_string());
    }
    for _ in 0..2 {
        let m = next_json(&mut some).await;
        assert!((1..=4).contains(&m["device_id"].as_u64().unwrap()), "{m}");
        assert!(
            ["online", "offline"].contains(&m["new_status"].as_str().unwrap()),
            "{m}"
        );
        let m = next_json(&mut one).await;
        assert!((5..=8).contains(&m["device_id"].as_u64().unwrap()), "{m}");
    }
}

/// (MemTotal - MemAvailable) / MemTotal, in percent, from /proc/meminfo.
fn host_memory_usage() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let total = field("MemTotal:")?;
    Some((total - field("MemAvailable:")?) / total * 100.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_status_is_the_hosts_and_the_gateways() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let system_schema = schema("system-status.json");
    // The dedicated endpoint: subscribed once authenticated; the latest
    // figures come at once.
    let mut sys = authed(addr, "/ws/system").await;
    let m = next_json(&mut sys).await;
    assert_eq!(
        sorted_keys(&m),
        ["channel", "metrics", "timestamp", "type"],
        "{m}"
    );
    assert_eq!(m["type"], "system_status_update");
    assert_eq!(m["channel"], "system");
    assert!(is_iso_millis(&m["timestamp"]));
    assert_schema(&system_schema, "message", &m);
    let metrics = &m["metrics"];
    let cpu = metrics["cpu_usage"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu));
    // Real figures: memory as /proc/meminfo has it (give or take).
    if let Some(mem) = host_memory_usage() {
        let got = metrics["memory_usage"].as_f64().unwrap();
        assert!((got - mem).abs() < 10.0, "memory_usage {got}, host {mem}");
    }
    if let Some(d) = metrics.get("disk_usage") {
        assert!((0.0..=100.0).contains(&d.as_f64().unwrap()));
    }

    // active_connections is the gateway's own count: open two more.
    let mut a = authed(addr, "/ws").await;
    let _b = authed(addr, "/ws/alerts").await;
    let mut updates = 0;
    loop {
        let m = next_json(&mut sys).await;
        if m["metrics"]["active_connections"] == 3 {
            break;
        }
        updates += 1;
        assert!(updates < 8, "active_connections never reached 3: {m}");
    }

    // Filters: a projection of `metrics`, and frequency.
    subscribe(
        &mut a,
        json!({"type": "subscribe", "channel": "system", "metrics": ["cpu_usage", "active_connections"]}),
    )
    .await;
    let m = next_json(&mut a).await;
    assert_eq!(
        sorted_keys(&m["metrics"]),
        ["active_connections", "cpu_usage"],
        "{m}"
    );
    assert_eq!(m["type"], "system_status_update");

    let mut c = authed(addr, "/ws").await;
    subscribe(
        &mut c,
        json!({"type": "subscribe", "channel": "system",
               "filters": {"metrics": ["memory_usage"], "frequency": "30s"}}),
    )
    .await;
    let m = next_json(&mut c).await;
    assert_eq!(sorted_keys(&m["metrics"]), ["memory_usage"], "{m}");
    // Two more updates reach the dedicated client; none reaches the 30 s one.
    let first = next_json(&mut sys).await["timestamp"].clone();
    loop {
        let t = next_json(&mut sys).await["timestamp"].clone();
        if t != first {
            break;
        }
    }
    assert_quiet(&mut c, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_endpoints_carry_one_channel_each() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    for (path, channel, ty, other) in [
        ("/ws/telemetry", "telemetry", "telemetry_update", "alerts"),
        ("/ws/alerts", "alerts", "alert", "devices"),
        ("/ws/devices", "devices", "device_status_update", "system"),
        ("/ws/system", "system", "system_status_update", "telemetry"),
    ] {
        let mut ws = authed(addr, path).await;
        for _ in 0..2 {
            let m = next_json(&mut ws).await;
            assert_eq!(m["type"], ty, "{path}: {m}");
            assert_eq!(m["channel"], channel);
        }
        // Other channels are not served here.
        send_json(&mut ws, &json!({"type": "subscribe", "channel": other})).await;
        let e = next_of(&mut ws, "error").await;
        assert_eq!(e["error"], "unknown_channel", "{e}");
        assert_eq!(e["channel"], other);
        assert!(e["message"].as_str().unwrap().contains(channel), "{e}");
        // Filters work here too (re-subscribing the channel).
        if channel == "telemetry" {
            send_json(
                &mut ws,
                &json!({"type": "subscribe", "channel": "telemetry", "device_id": 2}),
            )
            .await;
            let ok = next_of(&mut ws, "subscription_confirmed").await;
            let at = ok["timestamp"].as_str().unwrap().to_string();
            // Readings taken after the confirmation are device 2's only
            // (earlier ones may still be on their way).
            let mut later = 0;
            while later < 3 {
                let m = next_of(&mut ws, "telemetry_update").await;
                let t = m["telemetry"]["humidity"]["timestamp"].as_str().unwrap();
                if t > at.as_str() {
                    assert_eq!(m["device_id"], 2, "{m}");
                    later += 1;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_errors_and_message_size() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let control = schema("control.json");
    let mut ws = authed(addr, "/ws").await;
    let mut other = authed(addr, "/ws").await;
    subscribe(
        &mut ws,
        json!({"type": "subscribe", "channel": "telemetry"}),
    )
    .await;
    subscribe(
        &mut other,
        json!({"type": "subscribe", "channel": "telemetry"}),
    )
    .await;
    next_json(&mut ws).await;

    // Unsubscribe (device_id may be given): confirmed; nothing produced
    // after the confirmation arrives.
    send_json(
        &mut ws,
        &json!({"type": "unsubscribe", "channel": "telemetry", "device_id": 1}),
    )
    .await;
    let un = next_of(&mut ws, "unsubscription_confirmed").await;
    assert_eq!(un["channel"], "telemetry");
    assert_schema(&control, "message", &un);
    let at = un["timestamp"].as_str().unwrap().to_string();
    // Wait until the other subscriber has readings produced after it.
    loop {
        let m = next_json(&mut other).await;
        if m["telemetry"]["temperature"]["timestamp"].as_str().unwrap() > at.as_str() {
            break;
        }
    }
    send_json(&mut ws, &json!({"type": "ping"})).await;
    loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "pong" {
            assert!(m.get("timestamp").is_none(), "nothing to echo: {m}");
            break;
        }
        let t = m["telemetry"]["temperature"]["timestamp"].as_str().unwrap();
        assert!(t <= at.as_str(), "an update after unsubscribing: {m}");
    }

    // Errors: each an `error` message; the connection stays.
    for (bad, code) in [
        (
            json!({"type": "unsubscribe", "channel": "alerts"}),
            "not_subscribed",
        ),
        (
            json!({"type": "subscribe", "channel": "weather"}),
            "unknown_channel",
        ),
        (json!({"type": "subscribe"}), "bad_request"),
        (json!({"type": "dance"}), "unknown_action"),
        (json!({"channel": "alerts"}), "bad_request"),
        (
            json!({"type": "subscribe", "channel": "alerts", "filters": {"colour": "red"}}),
            "invalid_filter",
        ),
        (
            json!({"type": "subscribe", "channel": "telemetry", "filters": {"frequency": "often"}}),
            "invalid_filter",
        ),
    ] {
        send_json(&mut ws, &bad).await;
        let e = next_json(&mut ws).await;
        assert_eq!(e["type"], "error", "{bad}: {e}");
        assert_eq!(e["error"], code, "{bad}: {e}");
        assert!(!e["message"].as_str().unwrap().is_empty());
        assert_schema(&control, "message", &e);
    }
    send_text(&mut ws, "{not json").await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["error"], "invalid_json");
    assert_schema(&control, "message", &e);

    // Inbound messages are at most 1 KB, read as 1024 bytes (a client
    // counting either way fits): 1024 bytes are answered like a short
    // message, 1025 close with 1009.
    let ping = |n: usize| json!({"type": "ping", "timestamp": "x".repeat(n)});
    send_json(&mut ws, &ping(1)).await;
    let short = next_json(&mut ws).await;
    let at_limit = ping(1024 - 30);
    assert_eq!(at_limit.to_string().len(), 1024);
    send_json(&mut ws, &at_limit).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["type"], short["type"], "{reply}");
    let over = ping(1025 - 30);
    assert_eq!(over.to_string().len(), 1025);
    send_json(&mut ws, &over).await;
    assert_eq!(close_code(&mut ws).await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_limits_are_enforced() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let ep = &gw.state().config().endpoints[0];
    assert_eq!(
        ep.limits
            .per_principal
            .iter()
            .map(|c| c.max())
            .collect::<Vec<_>>(),
        [100]
    );
    // More than 100 messages a second: error replies, the connection stays.
    let mut ws = authed(addr, "/ws").await;
    use futures_util::SinkExt;
    for _ in 0..300 {
        ws.send(tokio_tungstenite::tungstenite::Message::Text(
            r#"{"type":"ping","timestamp":1}"#.into(),
        ))
        .await
        .unwrap();
    }
    let mut limited = false;
    for _ in 0..300 {
        let m = next_json(&mut ws).await;
        if m["error"] == "rate_limited" {
            limited = true;
            break;
        }
    }
    assert!(limited, "300 messages at once must exceed 100/s");
    // At most 10 new connections per minute per client (this test made 1).
    let mut held = vec![ws];
    for _ in 0..9 {
        held.push(connect(addr, "/ws").await);
    }
    let (status, _) = try_connect(addr, "/ws", &[])
        .await
        .expect_err("the 11th new connection in a minute is refused");
    assert_eq!(status, 429);
}
