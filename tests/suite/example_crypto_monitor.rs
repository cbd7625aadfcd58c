//! examples/crypto-monitor, loaded from its own gateway.yaml (listener moved
//! to port 0) and played by a client written from the reference description
//! (/work/shared/reference-apis.md §3): the {service, type, data, timestamp}
//! envelope, the action/service protocol, master/all/group/dedicated/alias
//! endpoints, every service's update payload and interval, and the HTTP
//! routes beside the sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::common::*;
use gateway::Gateway;
use gateway::config::{self, LoadOptions};
use serde_json::{Value, json};

/// Services, their groups and documented update intervals (seconds).
const SERVICES: &[(&str, &str, f64)] = &[
    ("market_data", "data", 5.0),
    ("explorers", "data", 10.0),
    ("news", "data", 60.0),
    ("sentiment", "data", 30.0),
    ("whale_tracking", "data", 15.0),
    ("rpc_nodes", "data", 20.0),
    ("onchain", "data", 30.0),
    ("health_checker", "monitoring", 30.0),
    ("pool_manager", "monitoring", 20.0),
    ("scheduler", "monitoring", 15.0),
    ("huggingface", "integration", 60.0),
    ("persistence", "integration", 30.0),
];

/// The documented fields of each update payload.
fn documented_fields(service: &str) -> &'static [&'static str] {
    match service {
        "market_data" => &[
            "prices",
            "volumes",
            "market_caps",
            "price_changes",
            "source",
            "timestamp",
        ],
        "whale_tracking" => &[
            "large_transactions",
            "whale_wallets",
            "total_volume",
            "alert_threshold",
            "timestamp",
        ],
        "news" => &["articles", "sources", "categories", "timestamp"],
        "sentiment" => &[
            "overall_sentiment",
            "sentiment_score",
            "social_volume",
            "trending_topics",
            "sentiment_by_source",
            "timestamp",
        ],
        "health_checker" => &[
            "overall_health",
            "healthy_count",
            "unhealthy_count",
            "total_providers",
            "providers",
            "timestamp",
        ],
        "pool_manager" => &[
            "pools",
            "active_sources",
            "inactive_sources",
            "failover_count",
            "timestamp",
        ],
        "scheduler" => &["running", "total_jobs", "active_jobs", "jobs", "timestamp"],
        "huggingface" => &[
            "total_models",
            "total_datasets",
            "available_models",
            "available_datasets",
            "last_refresh",
            "timestamp",
        ],
        "persistence" => &[
            "storage_location",
            "total_records",
            "storage_size",
            "last_save",
            "active_writers",
            "timestamp",
        ],
        // Not detailed by the reference: only a timestamp is promised.
        _ => &["timestamp"],
    }
}

fn example_dir() -> PathBuf {
    repo_root().join("examples/crypto-monitor")
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
        .unwrap_or_else(|e| panic!("examples/crypto-monitor/gateway.yaml should load:\n{e}"))
}

async fn start() -> Gateway {
    Gateway::start(load())
        .await
        .unwrap_or_else(|e| panic!("gateway should start:\n{e}"))
}

fn schema(name: &str) -> jsonschema::Validator {
    example_schema("crypto-monitor", &format!("schemas/{name}"))
}

/// Every server message: exactly {service, type, data, timestamp}.
fn check_envelope(m: &Value) {
    assert_eq!(
        sorted_keys(m),
        ["data", "service", "timestamp", "type"],
        "{m}"
    );
    assert!(is_iso_millis(&m["timestamp"]), "{m}");
    let types = [
        "connection_established",
        "welcome",
        "update",
        "subscription_confirmed",
        "unsubscription_confirmed",
        "status",
        "pong",
        "error",
    ];
    assert!(types.contains(&m["type"].as_str().unwrap()), "{m}");
}

/// An update of `service`: its envelope, its documented fields, its schema.
fn check_update(m: &Value) {
    check_envelope(m);
    assert_eq!(m["type"], "update", "{m}");
    let service = m["service"].as_str().unwrap();
    for f in documented_fields(service) {
        assert!(m["data"].get(f).is_some(), "{service} lacks {f}: {m}");
    }
    assert!(is_iso_millis(&m["data"]["timestamp"]));
    assert_schema(&schema(&format!("{service}.json")), "message", m);
}

async fn next(ws: &mut Ws) -> Value {
    let m = next_json(ws).await;
    check_envelope(&m);
    m
}

/// Connect and read `connection_established`; returns the client id.
async fn open(addr: SocketAddr, path: &str) -> (Ws, String) {
    let mut ws = connect(addr, path).await;
    let hello = next(&mut ws).await;
    assert_eq!(hello["type"], "connection_established", "{path}: {hello}");
    assert_eq!(hello["service"], "system");
    assert_schema(&schema("control.json"), "message", &hello);
    let id = hello["data"]["client_id"].as_str().unwrap().to_string();
    assert!(!id.is_empty());
    (ws, id)
}

/// The next message that is not an update (replies jump ahead of queued
/// updates, but updates already on the wire come first).
async fn next_reply(ws: &mut Ws) -> Value {
    loop {
        let m = next(ws).await;
        if m["type"] != "update" {
            assert_schema(&schema("control.json"), "message", &m);
            return m;
        }
    }
}

fn all_names() -> BTreeSet<String> {
    SERVICES.iter().map(|s| s.0.to_string()).collect()
}

fn names_of(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn group(g: &str) -> BTreeSet<String> {
    SERVICES
        .iter()
        .filter(|s| s.1 == g)
        .map(|s| s.0.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_matches_the_reference() {
    let cfg = load();
    let names: BTreeSet<String> = cfg.channels.iter().map(|c| c.name.to_string()).collect();
    assert_eq!(names, all_names());
    let text = std::fs::read_to_string(example_dir().join("gateway.yaml")).unwrap();
    assert!(text.contains("bind: 127.0.0.1:7860"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_subscription_status_ping_and_errors() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let (mut ws, client_id) = open(addr, "/ws").await;

    // subscribe → subscription_confirmed, then updates at once (last value).
    send_json(
        &mut ws,
        &json!({"action": "subscribe", "service": "market_data"}),
    )
    .await;
    let ok = next(&mut ws).await;
    assert_eq!(ok["type"], "subscription_confirmed", "{ok}");
    assert_eq!(ok["service"], "market_data");
    assert_eq!(ok["data"]["service"], "market_data");
    assert_schema(&schema("control.json"), "message", &ok);
    let first = next(&mut ws).await;
    assert_eq!(first["service"], "market_data");
    check_update(&first);
    for k in ["prices", "volumes", "market_caps", "price_changes"] {
        assert!(first["data"][k]["BTC"].is_number(), "{first}");
    }

    // The next update comes one interval (5 s) later, prices having moved a
    // little (a random walk).
    let second = next(&mut ws).await;
    check_update(&second);
    let (a, b) = (
        first["data"]["prices"]["BTC"].as_f64().unwrap(),
        second["data"]["prices"]["BTC"].as_f64().unwrap(),
    );
    assert!((b / a - 1.0).abs() < 0.01, "{a} → {b}");
    let (ta, tb) = (
        humantime::parse_rfc3339(first["timestamp"].as_str().unwrap()).unwrap(),
        humantime::parse_rfc3339(second["timestamp"].as_str().unwrap()).unwrap(),
    );
    let gap = tb.duration_since(ta).unwrap().as_secs_f64();
    assert!(
        gap > 4.0 && gap < 10.0,
        "market_data every 5 s, got {gap} s"
    );

    // An unknown service: an error with a message and the available services.
    send_json(
        &mut ws,
        &json!({"action": "subscribe", "service": "weather"}),
    )
    .await;
    let e = next_reply(&mut ws).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["service"], "system");
    assert!(e["data"]["message"].as_str().unwrap().contains("weather"));
    assert_eq!(names_of(&e["data"]["available_services"]), all_names());

    // ping: data echoed.
    let data = json!({"n": 7, "nested": {"s": "x"}});
    send_json(&mut ws, &json!({"action": "ping", "data": data})).await;
    let pong = next_reply(&mut ws).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["service"], "system");
    assert_eq!(pong["data"], data);
    // Without data: the envelope keeps its `data` key, null.
    send_json(&mut ws, &json!({"action": "ping"})).await;
    let pong = next_reply(&mut ws).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong.get("data"), Some(&json!(null)), "{pong}");

    // get_status.
    send_json(&mut ws, &json!({"action": "subscribe", "service": "news"})).await;
    assert_eq!(next_reply(&mut ws).await["type"], "subscription_confirmed");
    send_json(&mut ws, &json!({"action": "get_status"})).await;
    let st = next_reply(&mut ws).await;
    assert_eq!(st["type"], "status");
    assert_eq!(
        sorted_keys(&st["data"]),
        [
            "client_id",
            "connected_at",
            "last_activity",
            "subscriptions",
            "total_clients"
        ]
    );
    assert_eq!(st["data"]["client_id"], client_id.as_str());
    assert!(is_iso_millis(&st["data"]["connected_at"]));
    assert!(is_iso_millis(&st["data"]["last_activity"]));
    assert!(st["data"]["connected_at"].as_str() <= st["data"]["last_activity"].as_str());
    assert_eq!(
        names_of(&st["data"]["subscriptions"]),
        ["market_data", "news"].map(String::from).into()
    );
    assert_eq!(st["data"]["total_clients"], 1);

    // unsubscribe → unsubscription_confirmed; no update produced after it.
    send_json(
        &mut ws,
        &json!({"action": "unsubscribe", "service": "market_data"}),
    )
    .await;
    let un = next_reply(&mut ws).await;
    assert_eq!(un["type"], "unsubscription_confirmed", "{un}");
    assert_eq!(un["service"], "market_data");
    let at = un["timestamp"].as_str().unwrap().to_string();
    let (mut watcher, _) = open(addr, "/ws/market_data").await;
    loop {
        let m = next(&mut watcher).await;
        if m["timestamp"].as_str().unwrap() > at.as_str() {
            break;
        }
    }
    send_json(&mut ws, &json!({"action": "ping", "data": 1})).await;
    loop {
        let m = next(&mut ws).await;
        if m["type"] == "pong" {
            break;
        }
        if m["service"] == "market_data" {
            assert!(m["timestamp"].as_str().unwrap() <= at.as_str(), "{m}");
        }
    }

    // Unsubscribing from a service not followed is confirmed as well (the
    // reference answers unsubscribe with unsubscription_confirmed only).
    send_json(
        &mut ws,
        &json!({"action": "unsubscribe", "service": "sentiment"}),
    )
    .await;
    let un = next_reply(&mut ws).await;
    assert_eq!(un["type"], "unsubscription_confirmed", "{un}");
    assert_eq!(un["service"], "sentiment");

    // Malformed messages: an error, never a close.
    for (bad, code) in [
        ("{not json", "invalid_json"),
        (r#"{"service":"news"}"#, "bad_request"),
        (r#"{"action":"dance"}"#, "unknown_action"),
    ] {
        send_text(&mut ws, bad).await;
        let e = next_reply(&mut ws).await;
        assert_eq!(e["type"], "error", "{bad}");
        assert_eq!(e["data"]["code"], code, "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_endpoint_gets_every_service_with_its_payload() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let (mut ws, _) = open(addr, "/ws/all").await;
    let mut seen: HashMap<String, Value> = HashMap::new();
    while seen.len() < SERVICES.len() {
        let m = next(&mut ws).await;
        check_update(&m);
        seen.insert(m["service"].as_str().unwrap().to_string(), m);
    }
    // Consistency of a few payloads.
    let w = &seen["whale_tracking"]["data"];
    let th = w["alert_threshold"].as_f64().unwrap();
    let mut sum = 0.0;
    for t in w["large_transactions"].as_array().unwrap() {
        assert_eq!(
            sorted_keys(t),
            ["asset", "from", "hash", "timestamp", "to", "value"]
        );
        assert!(t["value"].as_f64().unwrap() > th);
        sum += t["value"].as_f64().unwrap();
        let hash = t["hash"].as_str().unwrap();
        assert!(hash.len() == 66 && hash.starts_with("0x"), "{hash}");
    }
    assert!((sum - w["total_volume"].as_f64().unwrap()).abs() < 0.01);
    let h = &seen["health_checker"]["data"];
    let providers = h["providers"].as_object().unwrap();
    assert_eq!(h["total_providers"], providers.len());
    for p in providers.values() {
        assert_eq!(sorted_keys(p), ["last_check", "response_time_ms", "status"]);
    }
    let up = providers
        .values()
        .filter(|p| p["status"] == "healthy")
        .count();
    assert_eq!(h["healthy_count"], up);
    assert_eq!(h["unhealthy_count"], providers.len() - up);
    for j in seen["scheduler"]["data"]["jobs"].as_array().unwrap() {
        assert_eq!(sorted_keys(j), ["id", "next_run", "status"]);
    }
    for a in seen["news"]["data"]["articles"].as_array().unwrap() {
        assert_eq!(sorted_keys(a), ["published_at", "source", "title", "url"]);
    }
    // Subscribed to everything: get_status lists every service.
    send_json(&mut ws, &json!({"action": "get_status"})).await;
    let st = next_reply(&mut ws).await;
    assert_eq!(names_of(&st["data"]["subscriptions"]), all_names());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_welcome_and_group_endpoints() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let (mut master, id) = open(addr, "/ws/master").await;
    let welcome = next(&mut master).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["service"], "system");
    assert_schema(&schema("control.json"), "message", &welcome);
    assert_eq!(welcome["data"]["client_id"], id.as_str());
    let by_group = welcome["data"]["available_services"].as_object().unwrap();
    assert_eq!(by_group.len(), 3);
    for g in ["data", "monitoring", "integration"] {
        assert_eq!(names_of(&by_group[g]), group(g), "{welcome}");
    }
    assert_eq!(
        welcome["data"]["usage"]["subscribe"],
        json!({"action": "subscribe", "service": "<service_name>"})
    );
    // Then manual subscription.
    send_json(
        &mut master,
        &json!({"action": "subscribe", "service": "persistence"}),
    )
    .await;
    assert_eq!(next(&mut master).await["type"], "subscription_confirmed");
    let u = next(&mut master).await;
    assert_eq!(u["service"], "persistence");
    check_update(&u);

    // Group endpoints serve their group only.
    for (path, g, inside, outside) in [
        ("/ws/data", "data", "whale_tracking", "scheduler"),
        ("/ws/monitoring", "monitoring", "pool_manager", "news"),
        (
            "/ws/integration",
            "integration",
            "huggingface",
            "market_data",
        ),
    ] {
        let (mut ws, _) = open(addr, path).await;
        send_json(&mut ws, &json!({"action": "subscribe", "service": outside})).await;
        let e = next(&mut ws).await;
        assert_eq!(e["type"], "error", "{path}: {e}");
        assert_eq!(names_of(&e["data"]["available_services"]), group(g));
        send_json(&mut ws, &json!({"action": "subscribe", "service": inside})).await;
        assert_eq!(next(&mut ws).await["type"], "subscription_confirmed");
        let u = next(&mut ws).await;
        assert_eq!(u["service"], inside, "{path}: {u}");
        check_update(&u);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_endpoints_are_subscribed_on_connect() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    for (path, service) in [
        ("/ws/market_data", "market_data"),
        ("/ws/whale_tracking", "whale_tracking"),
        ("/ws/news", "news"),
        ("/ws/sentiment", "sentiment"),
        ("/ws/health", "health_checker"),
        ("/ws/pool_status", "pool_manager"),
        ("/ws/scheduler_status", "scheduler"),
        ("/ws/huggingface", "huggingface"),
        ("/ws/ai", "huggingface"),
        ("/ws/persistence", "persistence"),
    ] {
        let (mut ws, _) = open(addr, path).await;
        let u = next(&mut ws).await;
        assert_eq!(u["service"], service, "{path}: {u}");
        check_update(&u);
        send_json(&mut ws, &json!({"action": "get_status"})).await;
        let st = next_reply(&mut ws).await;
        assert_eq!(st["data"]["subscriptions"], json!([service]), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_stats_services_and_endpoints() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let (mut a, a_id) = open(addr, "/ws").await;
    send_json(&mut a, &json!({"action": "subscribe", "service": "news"})).await;
    assert_eq!(next_reply(&mut a).await["type"], "subscription_confirmed");
    let (_b, b_id) = open(addr, "/ws/health").await;

    let (status, head, body) = http(addr, "GET", "/ws/stats", &[]).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("application/json"),
        "{head}"
    );
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_schema(&schema("http-stats.json"), "message", &stats);
    assert_eq!(stats["status"], "success");
    assert_eq!(stats["data"]["total_connections"], 2);
    let clients = stats["data"]["clients"].as_array().unwrap();
    let ids: BTreeSet<&str> = clients
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a_id.as_str(), b_id.as_str()].into());
    for c in clients {
        for f in [
            "client_id",
            "connected_at",
            "last_activity",
            "subscriptions",
        ] {
            assert!(c.get(f).is_some(), "{c}");
        }
    }
    let counts = &stats["data"]["subscription_counts"];
    assert_eq!(counts["news"], 1);
    assert_eq!(counts["health_checker"], 1);
    assert_eq!(counts["market_data"], 0);

    let (status, _, body) = http(addr, "GET", "/ws/services", &[]).await;
    assert_eq!(status, 200);
    let services: Value = serde_json::from_str(&body).unwrap();
    assert_schema(&schema("http-services.json"), "message", &services);
    let list = services["data"]["services"].as_array().unwrap();
    assert_eq!(list.len(), SERVICES.len());
    for (name, g, interval) in SERVICES {
        let s = list
            .iter()
            .find(|s| s["name"] == *name)
            .unwrap_or_else(|| panic!("{name} not listed"));
        assert_eq!(s["interval_seconds"].as_f64(), Some(*interval), "{s}");
        assert_eq!(s["groups"], json!([g]));
        assert!(!s["description"].as_str().unwrap().is_empty());
    }

    let (status, _, body) = http(addr, "GET", "/ws/endpoints", &[]).await;
    assert_eq!(status, 200);
    let endpoints: Value = serde_json::from_str(&body).unwrap();
    assert_schema(&schema("http-endpoints.json"), "message", &endpoints);
    let urls: BTreeSet<String> = endpoints["data"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["url"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = [
        "/ws",
        "/ws/master",
        "/ws/all",
        "/ws/data",
        "/ws/monitoring",
        "/ws/integration",
        "/ws/market_data",
        "/ws/whale_tracking",
        "/ws/news",
        "/ws/sentiment",
        "/ws/health",
        "/ws/pool_status",
        "/ws/scheduler_status",
        "/ws/huggingface",
        "/ws/ai",
        "/ws/persistence",
    ]
    .iter()
    .map(|p| format!("ws://{addr}{p}"))
    .collect();
    assert_eq!(urls, expected);

    // Errors of the HTTP side.
    assert_eq!(http(addr, "GET", "/ws/nothing", &[]).await.0, 404);
    assert_eq!(http(addr, "POST", "/ws/stats", &[]).await.0, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_and_system_services_can_be_subscribed() {
    let gw = start().await;
    let addr = gw.addr("main").unwrap();
    let (mut ws, _) = open(addr, "/ws").await;
    send_json(
        &mut ws,
        &json!({"action": "subscribe", "service": "system"}),
    )
    .await;
    let ok = next_reply(&mut ws).await;
    assert_eq!(
        (ok["type"].as_str(), ok["service"].as_str()),
        (Some("subscription_confirmed"), Some("system"))
    );
    send_json(&mut ws, &json!({"action": "subscribe", "service": "all"})).await;
    let ok = next_reply(&mut ws).await;
    assert_eq!(
        (ok["type"].as_str(), ok["service"].as_str()),
        (Some("subscription_confirmed"), Some("all"))
    );
    // Every service's latest update arrives (they keep their last value).
    let mut seen = BTreeSet::new();
    while seen != all_names() {
        let m = next(&mut ws).await;
        if m["type"] == "update" {
            seen.insert(m["service"].as_str().unwrap().to_string());
        }
    }
    send_json(&mut ws, &json!({"action": "get_status"})).await;
    let st = next_reply(&mut ws).await;
    assert_eq!(names_of(&st["data"]["subscriptions"]), all_names());
    send_json(&mut ws, &json!({"action": "unsubscribe", "service": "all"})).await;
    let un = next_reply(&mut ws).await;
    assert_eq!(
        (un["type"].as_str(), un["service"].as_str()),
        (Some("unsubscription_confirmed"), Some("all"))
    );
    send_json(&mut ws, &json!({"action": "get_status"})).await;
    let st = next_reply(&mut ws).await;
    assert_eq!(st["data"]["subscriptions"], json!([]));
}
