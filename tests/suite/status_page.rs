//! The status page (`admin.status_page`) and the builtin `status` source
//! behind it: the page is served with a strict Content-Security-Policy and
//! loads nothing from elsewhere; its socket needs the key; the snapshots
//! satisfy the shipped schema and show what really happens.
//! (`tests/status_page_browser.rs` runs the page in Chromium.)

use std::net::SocketAddr;

use crate::common::*;
use base64::Engine;
use serde_json::Value;

const KEY: &str = "status-test-key";

/// The status page deployment (see `status_page_deployment`), fast.
fn deployment() -> Deployment {
    status_page_deployment(KEY, "100ms", "20ms", 3, 2)
}

fn status_path(key: &str) -> String {
    format!("/ws/status?api_key={key}")
}

/// The shipped schema of the status snapshots.
fn status_schema() -> jsonschema::Validator {
    gateway::config::compile_schema(&repo_root().join("channel-specs/schemas/gateway-status.json"))
        .expect("the shipped schema compiles")
}

/// The channel named `name` in a snapshot.
fn channel<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["channels"]
        .as_array()
        .expect("channels is a list")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no channel {name:?} in {s}"))
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_policy_and_nothing_from_elsewhere() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let (status, head, body) = http(addr, "GET", "/status", &[]).await;
    assert_eq!(status, 200, "{head}");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} header in\n{head}"))
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let csp = header("content-security-policy");
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    assert!(directives.contains(&"default-src 'none'"), "{csp}");
    assert!(
        directives.contains(&format!("connect-src 'self' ws://{addr} wss://{addr}").as_str()),
        "{csp}"
    );
    assert!(directives.contains(&"frame-ancestors 'none'"), "{csp}");
    // The only script and style allowed are the page's own, by hash: the
    // browser runs them only if these hashes are theirs.
    let inline = |open: &str, close: &str| {
        let start = body.find(open).expect("inline element") + open.len();
        let end = start + body[start..].find(close).expect("closing tag");
        let d = ring::digest::digest(&ring::digest::SHA256, &body.as_bytes()[start..end]);
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(d.as_ref())
        )
    };
    assert!(
        directives.contains(&format!("script-src {}", inline("<script>", "</script>")).as_str()),
        "{csp}"
    );
    assert!(
        directives.contains(&format!("style-src {}", inline("<style>", "</style>")).as_str()),
        "{csp}"
    );
    // No external resource: no URL, no src or href at all.
    for bad in ["http://", "https://", " src=", " href=", "@import", "url("] {
        assert!(!body.contains(bad), "the page contains {bad:?}");
    }
    // It knows where its data comes from.
    assert!(body.contains(r#"<meta name="status-endpoint" content="/ws/status">"#));
    assert!(body.contains(r#"<meta name="status-key-param" content="api_key">"#));
    // Only GET /status is the page.
    let (status, _, _) = http(addr, "GET", "/status/x", &[]).await;
    assert_eq!(status, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_status_socket_needs_the_key() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    match try_connect(addr, "/ws/status", &[]).await {
        Err((status, body)) => {
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("missing_api_key"), "{body}");
        }
        Ok(_) => panic!("connected without a key"),
    }
    match try_connect(addr, &status_path("wrong-key"), &[]).await {
        Err((status, body)) => {
            assert_eq!(status, 403, "{body}");
            assert!(body.contains("invalid_api_key"), "{body}");
        }
        Ok(_) => panic!("connected with a wrong key"),
    }
    let mut ws = connect(addr, &status_path(KEY)).await;
    let s = next_json(&mut ws).await;
    assert!(s["channels"].is_array(), "{s}");
    gw.shutdown().await;
}

/// Read snapshots until `check` accepts one, checking every one against
/// the shipped schema on the way.
async fn snapshot_where(
    ws: &mut Ws,
    schema: &jsonschema::Validator,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = deadline();
    loop {
        before(deadline, what);
        let s = next_json(ws).await;
        assert_schema(schema, "a status snapshot", &s);
        if check(&s) {
            return s;
        }
    }
}

#[tokio::test]
async fn snapshots_satisfy_the_schema_and_show_what_happens() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr: SocketAddr = gw.addr("main").unwrap();
    let schema = status_schema();
    let mut ws = connect(addr, &status_path(KEY)).await;

    // The configuration as served.
    let s = snapshot_where(&mut ws, &schema, "a first snapshot", |_| true).await;
    let listeners = s["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "{s}");
    assert_eq!(listeners[0]["name"], "main");
    assert_eq!(listeners[0]["address"], addr.to_string());
    assert_eq!(listeners[0]["tls"], false);
    assert_eq!(listeners[0]["admin"], true);
    let endpoint = |path: &str| {
        s["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no endpoint {path} in {s}"))
            .clone()
    };
    assert_eq!(endpoint("/ws/status")["auth"], "api_key");
    assert_eq!(
        endpoint("/ws/status")["channels"],
        serde_json::json!(["status"])
    );
    assert_eq!(endpoint("/ws/faults")["auth"], "none");
    assert_eq!(endpoint("/ws/faults")["protocol"], "stream");
    assert_eq!(channel(&s, "status")["source"], "builtin:status");
    assert_eq!(channel(&s, "faults")["source"], "test-faults");
    assert_eq!(channel(&s, "faults")["subscribers"], 0, "{s}");
    assert_eq!(s["limits_hit"]["total"], 0, "{s}");

    // A subscriber on another channel; a second one over that endpoint's cap.
    let mut sub = connect(addr, "/ws/faults").await;
    let first = next_json(&mut sub).await;
    assert!(first["seq"].is_u64(), "{first}");
    match try_connect(addr, "/ws/faults", &[]).await {
        Err((status, _)) => assert_eq!(status, 503),
        Ok(_) => panic!("the endpoint allows one connection"),
    }
    let s = snapshot_where(
        &mut ws,
        &schema,
        "the subscriber, the refused connection, the invalid messages and the restarts",
        |s| {
            let f = channel(s, "faults");
            let flaky = channel(s, "flaky");
            f["subscribers"] == 1
                && f["validation_failures"].as_u64() > Some(0)
                && f["rate"].as_f64() > Some(0.0)
                && s["limits_hit"]["connections_refused"]["limit"] == 1
                && flaky["plugin"]["restarts"].as_u64() > Some(0)
        },
    )
    .await;
    let f = channel(&s, "faults");
    // test-faults sends {"seq": "<n>"} for every third message.
    assert_eq!(f["last_validation_failure"]["instance_path"], "/seq", "{f}");
    assert!(
        f["last_validation_failure"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("integer")),
        "{f}"
    );
    assert_eq!(s["limits_hit"]["total"], 1, "{s}");
    let flaky = channel(&s, "flaky");
    assert!(flaky["plugin"]["failures"].as_u64() > Some(0), "{flaky}");
    assert!(
        flaky["plugin"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("planned error")),
        "{flaky}"
    );
    assert_eq!(channel(&s, "status")["plugin"]["state"], "up");
    // The status channel counts its own subscriber, and its snapshots (this
    // one came after another, so at least one was emitted before it).
    assert_eq!(channel(&s, "status")["subscribers"], 1);
    assert!(channel(&s, "status")["received"].as_u64() >= Some(1), "{s}");
    assert!(s["gateway"]["connections"].as_i64() >= Some(2), "{s}");

    // The subscriber leaves: the count follows.
    drop(sub);
    snapshot_where(&mut ws, &schema, "the subscriber gone", |s| {
        channel(s, "faults")["subscribers"] == 0
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn the_delivery_delay_covers_the_writes_since_the_last_snapshot() {
    let dep = deployment();
    // Messages 20 ms apart on a channel that holds them for a second: the
    // oldest frame of each of its writes waited most of that second.
    dep.write(
        "specs/slow.yaml",
        "channel: slow\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\nlinger: 1s\nendpoints:\n  - path: /ws/slow\n",
    );
    let gw = dep.start().await;
    let addr: SocketAddr = gw.addr("main").unwrap();
    let schema = status_schema();
    let mut ws = connect(addr, &status_path(KEY)).await;
    let delay = |s: &Value| s["gateway"]["delivery_delay"].clone();
    let p99 = |s: &Value| delay(s)["p99_le_ms"].as_f64();

    // Nobody reads the slow channel: the timed writes are the snapshots
    // themselves, written at once.
    let s = snapshot_where(&mut ws, &schema, "a window of prompt writes", |s| {
        delay(s)["writes"].as_u64() > Some(0) && p99(s).is_some_and(|p| p <= 250.0)
    })
    .await;
    let d = delay(&s);
    assert!(d["p50_le_ms"].as_f64() <= p99(&s), "{d}");
    assert_eq!(d["writes_over_10s"], 0, "{d}");
    assert!(d["window_seconds"].as_f64() > Some(0.0), "{d}");

    // A subscriber of the slow channel: its held writes show, bucketed above
    // 250 ms (each waited about 1 s less the 20 ms between messages).
    let mut slow = connect(addr, "/ws/slow").await;
    next_json(&mut slow).await;
    let s = snapshot_where(&mut ws, &schema, "a window with a held write", |s| {
        p99(s).is_some_and(|p| p >= 500.0)
    })
    .await;
    assert!(p99(&s) <= Some(2_500.0), "{}", delay(&s));

    // It leaves: later windows hold only prompt writes again. Over the whole
    // run instead of the window, the held writes (one a second against ten
    // snapshots) would keep p99 above 250 ms.
    drop(slow);
    snapshot_where(&mut ws, &schema, "prompt writes again", |s| {
        delay(s)["writes"].as_u64() > Some(0) && p99(s).is_some_and(|p| p <= 250.0)
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn the_shipped_deployment_serves_the_status_page_with_the_demo_key() {
    // The root gateway.yaml as shipped, on port 0.
    build_plugins();
    let cfg = gateway::config::load(
        &repo_root().join("gateway.yaml"),
        &gateway::config::LoadOptions {
            plugin_dirs: Some(vec![target_dir()]),
            listen: [("main".to_string(), "127.0.0.1:0".to_string())].into(),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("gateway.yaml should load:\n{e}"));
    let sp = cfg.status_page.clone().expect("the status page is on");
    assert_eq!(
        (sp.path.as_str(), sp.endpoint.as_str()),
        ("/status", "/ws/status")
    );
    let gw = gateway::Gateway::start(cfg).await.expect("start");
    let addr = gw.addr("main").unwrap();
    let (status, _, _) = http(addr, "GET", "/status", &[]).await;
    assert_eq!(status, 200);
    let mut ws = connect(addr, "/ws/status?api_key=status-demo-key").await;
    let s = next_json(&mut ws).await;
    for name in ["system", "ticker", "status"] {
        channel(&s, name);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_reload_restarts_the_status_source_and_shows_the_new_generation() {
    let dep = deployment();
    // Reloads only when asked, so the generation is known.
    dep.gateway_yaml(
        "admin:\n  status_page:\n    path: /status\n    endpoint: /ws/status\nreload:\n  watch: false\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let schema = status_schema();
    let mut ws = connect(addr, &status_path(KEY)).await;
    let s = snapshot_where(&mut ws, &schema, "a first snapshot", |_| true).await;
    assert_eq!(s["gateway"]["generation"], 1);
    // A changed status spec: its source is stopped and started again, and the
    // subscriber stays.
    let spec = std::fs::read_to_string(dep.path("specs/status.yaml")).unwrap();
    dep.write(
        "specs/status.yaml",
        &spec.replace("interval: 100ms", "interval: 150ms"),
    );
    let report = gw.reload().await.expect("the reload applies");
    assert_eq!(report.changed, ["status"], "{report:?}");
    let s = snapshot_where(&mut ws, &schema, "a snapshot of generation 2", |s| {
        s["gateway"]["generation"] == 2
    })
    .await;
    assert_eq!(channel(&s, "status")["plugin"]["state"], "up", "{s}");
    assert_eq!(s["gateway"]["reloads"]["ok"], 1, "{s}");
    gw.shutdown().await;
}
