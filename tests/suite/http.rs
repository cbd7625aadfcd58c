//! HTTP beside the sockets: admin routes, refusals before the upgrade, API keys.

use crate::common::*;

const UPGRADE: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

fn deployment() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .shipped_schema("ticker.json")
        .write("specs/keys.txt", "# demo keys\nkey-one\nkey-two\n")
        .write(
            "specs/ticker.yaml",
            "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 50}\nendpoints:\n  - path: /open\n  - path: /sub\n    subprotocols: [v2, v1]\n  - path: /secret\n    auth:\n      mode: api_key\n      query: api_key\n      header: X-Api-Key\n      keys_file: keys.txt\n",
        );
    dep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_answer() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let (status, _, body) = http(addr, "GET", "/healthz", &[]).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    // HEAD too (load balancers check health with it): the status, no body.
    for path in ["/healthz", "/metrics"] {
        let (status, _, body) = http(addr, "HEAD", path, &[]).await;
        assert_eq!((status, body.as_str()), (200, ""), "HEAD {path}");
    }
    let (status, head, body) = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for series in [
        "gateway_connections ",
        "gateway_messages_received_total{channel=\"ticker\",plugin=\"ticker\"}",
        "gateway_validation_failures_total{channel=\"ticker\",plugin=\"ticker\"}",
        "gateway_slow_consumer_drops_total{channel=\"ticker\",plugin=\"ticker\"}",
        "gateway_plugin_restarts_total{channel=\"ticker\",plugin=\"ticker\"}",
        "gateway_connections_refused_total{reason=\"auth\"}",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }
    let mut ws = connect(addr, "/open").await;
    next_json(&mut ws).await;
    assert_eq!(metric(addr, "gateway_connections").await, Some(1.0));
    assert_eq!(
        metric(
            addr,
            "gateway_subscribers{channel=\"ticker\",plugin=\"ticker\"}"
        )
        .await,
        Some(1.0)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_cannot_upgrade_get_json_errors() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let (status, _, body) = http(addr, "GET", "/nowhere", &[]).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        r#"{"error":"not_found","message":"nothing is served at /nowhere"}"#
    );
    let (status, head, body) = http(addr, "GET", "/open", &[]).await;
    assert_eq!(status, 426);
    assert_eq!(
        body,
        r#"{"error":"upgrade_required","message":"/open is a WebSocket endpoint: connect with a WebSocket client"}"#
    );
    // RFC 9110: a 426 names the protocol, with the `upgrade` option.
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("upgrade: websocket") && head.contains("connection: upgrade"),
        "{head}"
    );
    let (status, head, _) = http(addr, "POST", "/open", &UPGRADE).await;
    assert_eq!(status, 405);
    // RFC 9110: a 405 lists the methods the target takes.
    assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");
    for bad_key in [
        "",
        "short",
        "dGhlIHNhbXBsZSBub25jZQ=",
        "dGhlIHNhbXBsZSBub25jZQ!!",
    ] {
        let mut req = UPGRADE;
        req[3] = ("Sec-WebSocket-Key", bad_key);
        let (status, _, body) = http(addr, "GET", "/open", &req).await;
        assert_eq!(status, 400, "key {bad_key:?}");
        assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    }
    let mut old = UPGRADE;
    old[2] = ("Sec-WebSocket-Version", "8");
    let (status, head, _) = http(addr, "GET", "/open", &old).await;
    assert_eq!(status, 426);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("sec-websocket-version: 13"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_and_checked() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let (status, _, body) = http(addr, "GET", "/secret", &UPGRADE).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        r#"{"error":"missing_api_key","message":"an API key is required in the query parameter `api_key` or header `x-api-key`"}"#
    );
    let (status, _, body) = http(addr, "GET", "/secret?api_key=wrong", &UPGRADE).await;
    assert_eq!(status, 403);
    assert_eq!(
        body,
        r#"{"error":"invalid_api_key","message":"the API key is not valid"}"#
    );
    let mut with_header = UPGRADE.to_vec();
    with_header.push(("X-Api-Key", "key-one-but-longer"));
    let (status, _, _) = http(addr, "GET", "/secret", &with_header).await;
    assert_eq!(
        status, 403,
        "a key that merely starts with a valid key is refused"
    );
    let mut with_header = UPGRADE.to_vec();
    with_header.push(("X-Api-Key", "key-on"));
    let (status, _, _) = http(addr, "GET", "/secret", &with_header).await;
    assert_eq!(status, 403, "a valid key's prefix is refused");
    assert_eq!(
        metric(addr, "gateway_connections_refused_total{reason=\"auth\"}").await,
        Some(4.0)
    );

    // Accepted by query parameter and by header; the data flows.
    let mut ws = connect(addr, "/secret?api_key=key-two").await;
    next_json(&mut ws).await;
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{addr}/secret"),
    )
    .map(|mut r| {
        r.headers_mut()
            .insert("X-Api-Key", "key-one".parse().unwrap());
        r
    });
    let (mut ws2, _) = tokio_tungstenite::connect_async(req.unwrap())
        .await
        .expect("header key accepted");
    next_json(&mut ws2).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_endpoints_ignore_client_messages() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/open").await;
    send_text(&mut ws, "not json at all").await;
    send_text(&mut ws, r#"{"type":"subscribe","channel":"x"}"#).await;
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Binary(vec![0, 1, 2].into()),
    )
    .await
    .unwrap();
    // Still streaming, in order, after the client's chatter.
    let a = next_json(&mut ws).await["seq"].as_i64().unwrap();
    let b = next_json(&mut ws).await["seq"].as_i64().unwrap();
    assert_eq!(b, a + 1);
    gw.shutdown().await;
}

/// A client that asks for subprotocols gets one the endpoint speaks (the
/// first it offered), or 400: a 101 without one made a browser fail the
/// connection after the gateway had counted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocols_are_negotiated_or_refused() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/sub").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "v0, v1, v2".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgraded");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("v1"),
        "the first offered that the endpoint speaks"
    );
    next_json(&mut ws).await;
    let mut offer = UPGRADE.to_vec();
    offer.push(("Sec-WebSocket-Protocol", "v0, v1, v2"));
    let (status, _, body) = http(addr, "GET", "/open", &offer).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("unsupported_subprotocol") && body.contains("v0, v1, v2"),
        "{body}"
    );
    let mut other = UPGRADE.to_vec();
    other.push(("Sec-WebSocket-Protocol", "v9"));
    let (status, _, body) = http(addr, "GET", "/sub", &other).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("only v2, v1"), "{body}");
    // A real client that asks for v2 gets it, and the data.
    let mut ws = try_connect(addr, "/sub", &[("Sec-WebSocket-Protocol", "v2")])
        .await
        .expect("v2 is spoken");
    next_json(&mut ws).await;
    // Without the header, nothing changes.
    let mut plain = connect(addr, "/sub").await;
    next_json(&mut plain).await;
    gw.shutdown().await;
}
