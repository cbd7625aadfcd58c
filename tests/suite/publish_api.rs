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

/// The publish API on `news` with `limits` in gateway.yaml and `endpoint`
/// lines added to the `/news` endpoint.
fn paced_deployment(limits: &str, endpoint: &str) -> Deployment {
    let dep = deployment("");
    dep.gateway_yaml(&format!(
        "publish:\n  auth: {{mode: api_key, header: X-Api-Key, keys_file: keys.txt}}\n  max_body: 4096\n  requests_per_ip: 20/1h\nlimits:\n{limits}"
    ))
    .write(
        "specs/news.yaml",
        &format!(
            "channel: news\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: push\n  config: {{burst: 0}}\nendpoints:\n  - path: /news\n{endpoint}"
        ),
    );
    dep
}

async fn publish_seq(addr: std::net::SocketAddr, seqs: &[u64]) {
    let body = Value::Array(seqs.iter().map(|n| json!({"seq": n})).collect());
    let (s, b) = post(addr, "/publish/news", Some("pub-key"), &body.to_string()).await;
    assert_eq!(s, 202, "{b}");
}

/// With `write_interval`, a connection's next write of queued messages
/// comes an interval after its last: what is published meanwhile waits, and
/// goes out in order. (Only lower bounds on time are checked for the wait:
/// they hold however slow the machine is.) After a quiet spell a message
/// goes at once: its wait in the gateway is checked against 250 ms, far
/// above a wake-up (a message held until the interval ends would wait
/// anywhere up to 400 ms, so a hold is caught when it is longer than that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_interval_holds_what_follows_a_write_until_the_interval_is_up() {
    const INTERVAL: std::time::Duration = std::time::Duration::from_millis(400);
    let dep = paced_deployment("  write_interval: 400ms\n", "");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/news").await;
    subscribed(addr).await;
    let writes = "gateway_delivery_delay_seconds_count";

    let t0 = std::time::Instant::now();
    publish_seq(addr, &[1]).await;
    assert_eq!(next_json(&mut ws).await, json!({"seq": 1}));
    // Two publishes, each its own batch for the channel.
    publish_seq(addr, &[2]).await;
    publish_seq(addr, &[3]).await;
    assert_eq!(next_json(&mut ws).await, json!({"seq": 2}));
    assert!(
        t0.elapsed() >= INTERVAL,
        "seq 2 came {:?} after seq 1 was published, before the 400ms interval was up",
        t0.elapsed()
    );
    assert_eq!(next_json(&mut ws).await, json!({"seq": 3}));

    // After a quiet spell longer than the interval, a message is not held:
    // the gateway's own delay for that write stays far below the interval.
    tokio::time::sleep(INTERVAL + std::time::Duration::from_millis(100)).await;
    let before = metric(addr, writes).await.unwrap();
    let under = "gateway_delivery_delay_seconds_bucket{le=\"0.25\"}";
    let under_before = metric(addr, under).await.unwrap();
    publish_seq(addr, &[4]).await;
    assert_eq!(next_json(&mut ws).await, json!({"seq": 4}));
    metric_becomes(addr, writes, before + 1.0).await;
    assert_eq!(
        metric(addr, under).await,
        Some(under_before + 1.0),
        "the first message after a quiet spell waited 250ms or more in the gateway"
    );
}

/// A Close is not held for the interval: at shutdown a paced connection
/// gets what is queued for it and its Close at once. Held, they would come
/// when the interval that seq 1's write started ends, at least 1 s after
/// `t0`; the check is exactly that bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_interval_does_not_hold_a_close() {
    let dep = paced_deployment("  write_interval: 1s\n", "");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/news").await;
    subscribed(addr).await;
    let t0 = std::time::Instant::now();
    publish_seq(addr, &[1]).await;
    assert_eq!(next_json(&mut ws).await, json!({"seq": 1}));
    // Waits for the interval that seq 1's write started.
    publish_seq(addr, &[2]).await;
    let stop = tokio::spawn(gw.shutdown());
    assert_eq!(next_json(&mut ws).await, json!({"seq": 2}));
    assert_eq!(close_code(&mut ws).await, Some(1001));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(1),
        "the Close came {:?} after seq 1 was published: it waited for the interval",
        t0.elapsed()
    );
    assert!(stop.await.unwrap(), "a clean shutdown");
}

/// A backlog larger than one write (`write_batch`) goes out batch after
/// batch without waiting an interval between them; an endpoint's own
/// `write_interval` applies (here over a gateway-wide `off`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_interval_does_not_hold_back_a_backlog() {
    let dep = paced_deployment(
        "  write_batch: 2\n  write_interval: off\n",
        "    limits: {write_interval: 1s}\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/news").await;
    subscribed(addr).await;
    let writes = "gateway_delivery_delay_seconds_count";
    let under = "gateway_delivery_delay_seconds_bucket{le=\"2.5\"}";
    let t0 = std::time::Instant::now();
    publish_seq(addr, &[1, 2, 3, 4, 5, 6, 7]).await;
    for seq in 1..=7 {
        assert_eq!(next_json(&mut ws).await, json!({"seq": seq}));
    }
    // At least four writes of at most two. The publisher may take the first
    // message alone (then the rest wait one interval, 1 s, as they should),
    // but a backlog never waits an interval per write: paced batch by
    // batch, the last would wait 3 s.
    let n = metric(addr, writes).await.unwrap();
    assert!(n >= 4.0, "{n} writes for 7 messages of at most 2");
    assert_eq!(
        metric(addr, under).await,
        Some(n),
        "a write of the backlog waited 2.5 s or more: it waited an interval per batch"
    );
    // The endpoint's interval is in force: what follows the backlog's last
    // write (after `t0`) waits until a second after it, or is published
    // later than that.
    publish_seq(addr, &[8]).await;
    assert_eq!(next_json(&mut ws).await, json!({"seq": 8}));
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(1),
        "seq 8 came {:?} after the backlog was published, within the endpoint's 1s interval",
        t0.elapsed()
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
