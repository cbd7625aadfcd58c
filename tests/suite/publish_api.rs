//! The HTTP publish API: `POST /publish/{channel}`, validated like every
//! other outbound message, delivered to real WebSocket clients.

use crate::common::*;
use serde_json::{Value, json};

/// The publish API on channel `news`; `spec_extra` adds lines to its spec.
fn deployment(spec_extra: &str) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(
        "publish:\n  auth: {mode: api_key, header: X-Api-Key, keys_file: keys.txt}\n  max_body: 256\n  requests_per_ip: 20/1h\n",
    )
    .write("keys.txt", "pub-key\n")
    .write("specs/schemas/seq.json", SEQ_SCHEMA)
    .write(
        "specs/news.yaml",
        &format!(
            "channel: news\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: push\n  config: {{burst: 0}}\n{spec_extra}endpoints:\n  - path: /news\n"
        ),
    );
    dep
}

/// Wait until the gateway counts one subscriber on `news`.
async fn subscribed(addr: std::net::SocketAddr) {
    metric_becomes(
        addr,
        "gateway_subscribers{channel=\"news\",plugin=\"test-faults\"}",
        1.0,
    )
    .await;
}

async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = key.map(|k| vec![("X-Api-Key", k)]).unwrap_or_default();
    let (s, _, b) = http_body(addr, "POST", path, &headers, body).await;
    (s, serde_json::from_str(&b).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_messages_are_validated_and_delivered() {
    let dep = deployment("");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/news").await;
    subscribed(addr).await;

    let (s, b) = post(addr, "/publish/news", Some("pub-key"), r#"{"seq": 1}"#).await;
    assert_eq!((s, b), (202, json!({"accepted": 1})));
    assert_eq!(next_json(&mut ws).await, json!({"seq": 1}));
    let (s, b) = post(
        addr,
        "/publish/news",
        Some("pub-key"),
        r#"[{"seq": 2}, {"seq": 3}]"#,
    )
    .await;
    assert_eq!((s, b), (202, json!({"accepted": 2})));
    assert_eq!(next_json(&mut ws).await, json!({"seq": 2}));
    assert_eq!(next_json(&mut ws).await, json!({"seq": 3}));

    // A batch with one bad message publishes nothing.
    let (s, b) = post(
        addr,
        "/publish/news",
        Some("pub-key"),
        r#"[{"seq": 4}, {"seq": "five"}]"#,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(b["error"], "validation_failed");
    assert_eq!(
        (b["index"].as_u64(), b["instance_path"].as_str()),
        (Some(1), Some("/seq"))
    );
    for (key, path, body, status, error) in [
        (
            None,
            "/publish/news",
            r#"{"seq": 9}"#,
            401,
            "missing_api_key",
        ),
        (
            Some("nope"),
            "/publish/news",
            r#"{"seq": 9}"#,
            403,
            "invalid_api_key",
        ),
        (
            Some("pub-key"),
            "/publish/weather",
            r#"{"seq": 9}"#,
            404,
            "unknown_channel",
        ),
        (
            Some("pub-key"),
            "/publish/news",
            "{oops",
            400,
            "invalid_json",
        ),
        (Some("pub-key"), "/publish/news", "", 400, "bad_request"),
        (
            Some("pub-key"),
            "/publish/news",
            &format!(r#"{{"seq": 9, "pad": "{}"}}"#, "x".repeat(300)),
            413,
            "body_too_large",
        ),
    ] {
        let (s, b) = post(addr, path, key, body).await;
        assert_eq!(
            (s, b["error"].as_str()),
            (status, Some(error)),
            "{path} {body:.40}"
        );
    }
    // Only what passed arrived: the next message is the one published now.
    let (s, _) = post(addr, "/publish/news", Some("pub-key"), r#"{"seq": 10}"#).await;
    assert_eq!(s, 202);
    assert_eq!(next_json(&mut ws).await, json!({"seq": 10}));
    // requests_per_ip: 20 per hour; 10 requests so far (refusals count too).
    let mut refused = None;
    for i in 0..20 {
        let (s, b) = post(addr, "/publish/news", Some("pub-key"), r#"{"seq": 11}"#).await;
        if s == 429 {
            refused = Some((i, b));
            break;
        }
    }
    let (i, b) = refused.expect("a 429 within the hour's quota");
    assert_eq!((i, b["error"].as_str()), (10, Some("rate_limited")));
}

/// A channel with `linger` sends a message that follows a send closely only
/// once the linger is up, together with what came after it, in order. (Only
/// a lower bound on time is checked: it holds however slow the machine is.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_channel_holds_close_followers_back_and_sends_them_together() {
    const LINGER: std::time::Duration = std::time::Duration::from_millis(400);
    let dep = deployment("linger: 400ms\n");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/news").await;
    subscribed(addr).await;

    let t0 = std::time::Instant::now();
    let (s, _) = post(addr, "/publish/news", Some("pub-key"), r#"{"seq": 1}"#).await;
    assert_eq!(s, 202);
    assert_eq!(next_json(&mut ws).await, json!({"seq": 1}));
    for seq in [2, 3] {
        let (s, _) = post(
            addr,
            "/publish/news",
            Some("pub-key"),
            &format!(r#"{{"seq": {seq}}}"#),
        )
        .await;
        assert_eq!(s, 202);
    }
    assert_eq!(next_json(&mut ws).await, json!({"seq": 2}));
    assert!(
        t0.elapsed() >= LINGER,
        "seq 2 came {:?} after seq 1 was published, before the 400ms linger was up",
        t0.elapsed()
    );
    assert_eq!(next_json(&mut ws).await, json!({"seq": 3}));
    assert_eq!(
        metric(
            addr,
            "gateway_messages_published_total{channel=\"news\",plugin=\"test-faults\"}"
        )
        .await,
        Some(3.0)
    );
}

/// `gateway_delivery_delay_seconds` times each socket write from when its
/// oldest message came in: with `linger: 1s`, a message that follows
/// another at once waits for the linger, and the histogram shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_delay_histogram_shows_what_a_message_waited() {
    let dep = deployment("linger: 1s\n");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/news").await;
    subscribed(addr).await;
    let count = "gateway_delivery_delay_seconds_count";
    assert_eq!(metric(addr, count).await, Some(0.0));

    let started = std::time::Instant::now();
    for seq in [1, 2] {
        let (s, _) = post(
            addr,
            "/publish/news",
            Some("pub-key"),
            &format!("{{\"seq\": {seq}}}"),
        )
        .await;
        assert_eq!(s, 202);
    }
    // The second came in at most `elapsed` after the first went out, and
    // was held until 1 s after that send.
    let waited_at_least = 1.0 - started.elapsed().as_secs_f64() - 0.001;
    assert_eq!(next_json(&mut ws).await, json!({"seq": 1}));
    assert_eq!(next_json(&mut ws).await, json!({"seq": 2}));
    // One write each: the first at once, the second after the linger.
    metric_becomes(addr, count, 2.0).await;
    let sum = metric(addr, "gateway_delivery_delay_seconds_sum")
        .await
        .unwrap();
    assert!(sum >= waited_at_least, "sum {sum} < {waited_at_least}");
    let inf = metric(addr, "gateway_delivery_delay_seconds_bucket{le=\"+Inf\"}").await;
    assert_eq!(inf, Some(2.0));
    // The largest bucket bound below what the second surely waited.
    let bound = gateway::metrics::DELAY_BOUNDS_US
        .iter()
        .rev()
        .map(|&us| us as f64 / 1e6)
        .find(|&b| b < waited_at_least)
        .expect("the two requests took under a second");
    let below = metric(
        addr,
        &format!("gateway_delivery_delay_seconds_bucket{{le=\"{bound}\"}}"),
    )
    .await
    .unwrap();
    assert!(
        below < 2.0,
        "both writes counted under {bound} s, one waited {waited_at_least} s"
    );
}

/// A request body that never ends is answered 408 once `BODY_TIMEOUT` is
/// up, and the connection closed: a client sending a byte at a time does
/// not hold a connection and its buffer for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_ends_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dep = deployment("");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /publish/news HTTP/1.1\r\nHost: {addr}\r\nX-Api-Key: pub-key\r\nContent-Length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(
        gateway::http_routes::body_deadline(256) + PATIENCE,
        s.read_to_end(&mut buf),
    )
    .await
    .expect("an answer, then the end of the connection")
    .unwrap();
    let (status, _, body) = split_response(&buf);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("request_timeout"), "{body}");
    gw.shutdown().await;
}

/// A published message goes out byte for byte (its key order, a large
/// integer), may be as large as a plugin's and no larger (413 with its
/// index), and a refused key counts as an HTTP refusal, not a WebSocket
/// one. The builtin status channel takes no messages unless named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_messages_go_out_as_sent_within_a_plugin_s_size() {
    use futures_util::StreamExt;
    let dep = Deployment::new();
    dep.gateway_yaml(
        "publish:\n  auth: {mode: api_key, header: X-Api-Key, keys_file: keys.txt}\n  max_body: 4MiB\n",
    )
    .write("keys.txt", "pub-key\n")
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/news.yaml", &bus_spec("news", "endpoints:\n  - path: /news\n"))
    .write(
        "specs/status.yaml",
        "channel: status\nschema: schemas/any.json\nsource:\n  builtin: status\n  interval: 1h\nendpoints:\n  - path: /status-feed\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/news").await;
    subscribed(addr).await;

    let sent = r#"{"z":1,"a":[2, 3],"big":123456789012345678901234}"#;
    let (s, b) = post(addr, "/publish/news", Some("pub-key"), sent).await;
    assert_eq!((s, b), (202, json!({"accepted": 1})));
    let got = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("a message in time")
        .expect("open")
        .expect("read");
    assert_eq!(got.into_text().unwrap().as_str(), sent);

    // 1 MiB (limits.max_message_size is 64 KiB) is the most a plugin may emit.
    let pad = "x".repeat(1 << 20);
    let big = format!(r#"[{{"ok":1}},{{"pad":"{pad}"}}]"#);
    let (s, b) = post(addr, "/publish/news", Some("pub-key"), &big).await;
    assert_eq!(s, 413, "{b}");
    assert_eq!(
        (b["error"].as_str(), b["index"].as_u64()),
        (Some("message_too_large"), Some(1))
    );

    let (s, b) = post(addr, "/publish/status", Some("pub-key"), r#"{"fake":true}"#).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (404, Some("unknown_channel")),
        "{b}"
    );

    let (s, _) = post(addr, "/publish/news", Some("wrong"), r#"{"seq":1}"#).await;
    assert_eq!(s, 403);
    assert_eq!(
        metric(addr, "gateway_http_auth_refused_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(addr, "gateway_connections_refused_total{reason=\"auth\"}").await,
        Some(0.0)
    );
    gw.shutdown().await;

    // `channels: all` leaves it out too; named, it takes messages.
    for (channels, status_takes) in [("all", false), ("[news, status]", true)] {
        dep.gateway_yaml(&format!(
            "publish:\n  auth: {{mode: none}}\n  channels: {channels}\n"
        ));
        let cfg = dep.load().unwrap_or_else(|e| panic!("{e}"));
        let taken = cfg
            .http
            .iter()
            .find_map(|r| match &r.answer {
                gateway::config::endpoints::HttpAnswer::Publish(c) => Some(c.clone()),
                _ => None,
            })
            .expect("the publish route");
        assert!(
            taken.iter().any(|c| &**c == "news"),
            "{channels}: {taken:?}"
        );
        assert_eq!(
            taken.iter().any(|c| &**c == "status"),
            status_takes,
            "{channels}: {taken:?}"
        );
    }
}
