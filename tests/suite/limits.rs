//! Limits with real clients: connections per IP, per principal and per
//! endpoint; new connections per IP; inbound message rate and size; idle
//! timeout, connection lifetime and server pings; HTTP requests per IP; a
//! channel's outbound rate.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One server frame from a raw socket: (opcode, payload).
async fn raw_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    loop {
        if buf.len() >= 2 {
            let (len, off) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                126 => (usize::MAX, 0),
                127 => panic!("unexpected huge frame"),
                l => (l as usize, 2),
            };
            if len != usize::MAX && buf.len() >= off + len {
                let op = buf[0] & 0x0f;
                let payload = buf[off..off + len].to_vec();
                buf.drain(..off + len);
                return Some((op, payload));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("a frame in time")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Read raw frames until Close; returns (code, reason, pings seen before it).
async fn raw_close(s: &mut TcpStream) -> (u16, String, usize) {
    let mut buf = Vec::new();
    let mut pings = 0;
    loop {
        match raw_frame(s, &mut buf).await {
            Some((0x9, _)) => pings += 1,
            Some((0x8, p)) => {
                return (
                    u16::from_be_bytes([p[0], p[1]]),
                    String::from_utf8_lossy(&p[2..]).into_owned(),
                    pings,
                );
            }
            Some(_) => {}
            None => panic!("connection ended without a Close frame"),
        }
    }
}

fn jwt(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap()
}

fn deployment() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(
        r#"
limits:
  max_connections_per_ip: 20
  ping_interval: off
protocols:
  p: {}
endpoints:
  - path: /per-ip
    channels: [feed]
    limits: {max_connections_per_ip: 3}
  - path: /per-endpoint
    channels: [feed]
    limits: {max_connections: 1}
  - path: /new-rate
    channels: [feed]
    limits: {new_connections_per_ip: 2/1h}
  - path: /user
    channels: [feed]
    auth: {mode: jwt, algorithm: HS256, secret_default: s3cret}
    limits: {max_connections_per_principal: 1}
  - path: /inband-user
    protocol: p
    channels: [feed]
    auth:
      mode: jwt
      algorithm: HS256
      secret_default: s3cret
      bearer: false
      message: {match: {type: auth}, token_field: token, reply: {type: ok}, error_reply: {type: refused, why: "{{error.code}}"}}
    limits: {max_connections_per_principal: 1}
  - path: /header-or-inband-user
    protocol: p
    channels: [feed]
    auth:
      mode: jwt
      algorithm: HS256
      secret_default: s3cret
      message: {match: {type: auth}, token_field: token, reply: {type: ok}, error_reply: {type: refused, why: "{{error.code}}"}}
    limits: {max_connections_per_principal: 1}
  - path: /chatty-close
    protocol: p
    channels: [feed]
    limits: {inbound_messages: 3/1h}
  - path: /chatty-error
    protocol: p
    channels: [feed]
    limits: {inbound_messages: 3/1h, on_inbound_limit: error}
  - path: /small
    channels: [feed]
    limits: {max_message_size: 16}
  - path: /idle
    channels: [feed]
    limits: {idle_timeout: 300ms}
  - path: /short-lived
    channels: [feed]
    limits: {max_connection_duration: 300ms}
  - path: /pinged
    channels: [feed]
    limits: {ping_interval: 50ms, pong_timeout: 10s}
  - path: /dead
    channels: [feed]
    limits: {ping_interval: 50ms, pong_timeout: 200ms}
http:
  - path: /hello
    requests_per_ip: 3/1h
    body: {hello: world}
  - path: /emit/feed
    method: POST
    command: {channel: feed, request: {op: emit, messages: "{{request.body}}"}}
  - path: /emit/capped
    method: POST
    command: {channel: capped, request: {op: emit, messages: "{{request.body}}"}}
  - path: /emit/dropping
    method: POST
    command: {channel: dropping, request: {op: emit, messages: "{{request.body}}"}}
  - path: /emit/paced
    method: POST
    command: {channel: paced, request: {op: emit, messages: "{{request.body}}"}}
"#,
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/feed.yaml", &bus_spec("feed", ""))
    .write(
        "specs/capped.yaml",
        &bus_spec(
            "capped",
            "rate_limit: {rate: 1/1h, on_exceed: conflate}\nendpoints:\n  - path: /capped\n",
        ),
    )
    .write(
        "specs/dropping.yaml",
        &bus_spec(
            "dropping",
            "rate_limit: {rate: 1/1h, on_exceed: drop}\nendpoints:\n  - path: /dropping\n",
        ),
    )
    .write(
        "specs/paced.yaml",
        &bus_spec(
            "paced",
            "rate_limit: {rate: 2/1s}\nendpoints:\n  - path: /paced\n",
        ),
    );
    dep
}

async fn emit(addr: std::net::SocketAddr, channel: &str, messages: Value) {
    eventually("the plugin to take the messages", || async {
        let (s, _, _) = http_body(
            addr,
            "POST",
            &format!("/emit/{channel}"),
            &[],
            &messages.to_string(),
        )
        .await;
        (s == 200).then_some(())
    })
    .await;
}

/// Wait until `channel` (a test-faults bus channel) has one subscriber: the
/// handshake completes a little before the subscription is made.
async fn subscribed(addr: std::net::SocketAddr, channel: &str) {
    metric_becomes(
        addr,
        &format!("gateway_subscribers{{channel=\"{channel}\",plugin=\"test-faults\"}}"),
        1.0,
    )
    .await;
}

fn error_of(body: &str) -> Value {
    serde_json::from_str::<Value>(body).unwrap()["error"].clone()
}

/// Behind a reverse proxy every connection comes from the proxy's address,
/// so per-IP limits would count all clients as one. A listener's
/// `trusted_proxies` takes the client from `X-Forwarded-For` for
/// connections from those proxies, and from nowhere else: on a listener
/// without it the header is anybody's to write and is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limits_count_the_client_a_trusted_proxy_names() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            r#"listeners:
  proxied:
    bind: 127.0.0.1:0
    trusted_proxies: [10.0.0.0/8, 127.0.0.1]
  direct:
    bind: 127.0.0.1:0
plugins:
  dirs: [{}]
channels:
  - specs/*.yaml
limits:
  ping_interval: off
endpoints:
  - path: /feed
    listener: proxied
    channels: [feed]
    limits: {{max_connections_per_ip: 1}}
  - path: /feed
    listener: direct
    channels: [feed]
    limits: {{max_connections_per_ip: 1}}
http:
  - path: /hello
    listener: proxied
    requests_per_ip: 1/1h
    body: {{hello: world}}
"#,
            target_dir().display()
        ),
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/feed.yaml", &bus_spec("feed", ""));
    let gw = dep.start().await;
    let (proxied, direct) = (gw.addr("proxied").unwrap(), gw.addr("direct").unwrap());
    let xff = |v: &'static str| [("X-Forwarded-For", v)];

    // Two clients through the proxy: one connection each.
    let a = try_connect(proxied, "/feed", &xff("203.0.113.1"))
        .await
        .unwrap();
    let b = try_connect(proxied, "/feed", &xff("203.0.113.2"))
        .await
        .unwrap();
    // Through two proxies; what the client wrote itself (left) is not believed.
    let (s, body) = try_connect(
        proxied,
        "/feed",
        &xff("198.51.100.7, 203.0.113.1, 10.1.2.3"),
    )
    .await
    .expect_err("203.0.113.1 has its one connection");
    assert_eq!(
        (s, error_of(&body)),
        (429, json!("too_many_connections_per_ip"))
    );
    // Without the header: the proxy itself, a client of its own.
    let c = try_connect(proxied, "/feed", &[]).await.unwrap();
    drop((a, b, c));

    // On the listener that trusts nobody the header changes nothing.
    let d = try_connect(direct, "/feed", &xff("203.0.113.3"))
        .await
        .unwrap();
    let (s, body) = try_connect(direct, "/feed", &xff("203.0.113.4"))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (s, error_of(&body)),
        (429, json!("too_many_connections_per_ip"))
    );
    drop(d);

    // HTTP routes' per-IP limits count the same client.
    let hello = |v: &'static str| async move {
        http(proxied, "GET", "/hello", &[("X-Forwarded-For", v)])
            .await
            .0
    };
    assert_eq!(hello("203.0.113.1").await, 200);
    assert_eq!(hello("203.0.113.2").await, 200);
    assert_eq!(hello("203.0.113.1").await, 429);
    gw.shutdown().await;
}

/// `client_ip_header` names the header the trusted proxies name the client
/// in: `Forwarded` (RFC 7239) or `X-Real-IP` in place of `X-Forwarded-For`,
/// and then only that one is read (a proxy that sets one leaves the others
/// to whatever the client wrote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_header_reads_forwarded_or_x_real_ip_and_nothing_else() {
    let dep = peer_deployment(
        r#"  rfc:
    bind: 127.0.0.1:0
    trusted_proxies: [127.0.0.1]
    client_ip_header: forwarded
  real:
    bind: 127.0.0.1:0
    trusted_proxies: [127.0.0.1]
    client_ip_header: x-real-ip
"#,
        r#"endpoints:
  - path: /feed
    listener: rfc
    protocol: p
    channels: [feed]
  - path: /feed
    listener: real
    protocol: p
    channels: [feed]
"#,
    );
    let gw = dep.start().await;
    let (rfc, real) = (gw.addr("rfc").unwrap(), gw.addr("real").unwrap());
    let spoofed = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=192.0.2.1"),
        ("X-Real-IP", "198.51.100.1"),
    ];
    let with = |own: (&'static str, &'static str), skip: &str| {
        let mut h: Vec<(&str, &str)> = spoofed
            .iter()
            .copied()
            .filter(|(n, _)| *n != skip)
            .collect();
        h.push(own);
        h
    };

    // What the client wrote itself (left) is not believed; the proxy's
    // element, an IPv6 address with a port, is.
    let mut a = ws_via_balancer_with(
        rfc,
        b"",
        "/feed",
        &with(
            ("Forwarded", r#"for=198.51.100.7, for="[2001:db8::1]:4711""#),
            "Forwarded",
        ),
    )
    .await
    .unwrap();
    assert_eq!(peer_of(&mut a).await, json!("[2001:db8::1]:0"));
    let mut b = ws_via_balancer_with(
        real,
        b"",
        "/feed",
        &with(("X-Real-IP", "203.0.113.5"), "X-Real-IP"),
    )
    .await
    .unwrap();
    assert_eq!(peer_of(&mut b).await, json!("203.0.113.5:0"));
    // Without its header the other two change nothing: the proxy itself.
    for (addr, own) in [(rfc, "Forwarded"), (real, "X-Real-IP")] {
        let others: Vec<(&str, &str)> =
            spoofed.iter().copied().filter(|(n, _)| *n != own).collect();
        let mut c = ws_via_balancer_with(addr, b"", "/feed", &others)
            .await
            .unwrap();
        let peer = peer_of(&mut c).await;
        let peer = peer.as_str().unwrap();
        assert!(
            peer.starts_with("127.0.0.1:") && !peer.ends_with(":0"),
            "{peer}: not the socket's own address"
        );
    }
    gw.shutdown().await;
}

/// A connection to a `proxy_protocol` listener: `header`, then what follows.
async fn via_balancer(addr: std::net::SocketAddr, header: &[u8]) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(header).await.expect("write the header");
    s
}

/// A WebSocket upgrade of `path` after `header`: the socket, or the status.
async fn ws_via_balancer(
    addr: std::net::SocketAddr,
    header: &[u8],
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    ws_via_balancer_with(addr, header, path, &[]).await
}

/// The same with request headers.
async fn ws_via_balancer_with(
    addr: std::net::SocketAddr,
    header: &[u8],
    path: &str,
    headers: &[(&str, &str)],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let s = via_balancer(addr, header).await;
    let req = ws_request(addr, path, headers);
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(req, s))
        .await
        .expect("upgrade in time")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// A PROXY protocol version 2 header for a TCP over IPv4 client.
fn proxy_v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

/// A deployment with these `listeners` (their entries), the bus channel
/// `feed`, protocol `p` whose `status` reply names the session's
/// `client.peer`, and `rest` (endpoints, routes) in gateway.yaml.
fn peer_deployment(listeners: &str, rest: &str) -> Deployment {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            r#"listeners:
{listeners}plugins:
  dirs: [{}]
channels:
  - specs/*.yaml
limits:
  ping_interval: off
protocols:
  p:
    replies:
      status: {{type: me, peer: "{{{{client.peer}}}}"}}
{rest}"#,
            target_dir().display()
        ),
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/feed.yaml", &bus_spec("feed", ""));
    dep
}

/// The peer a session's `client.peer` names, asked through the protocol's
/// `status` reply.
async fn peer_of(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Value {
    ws.send(Message::text(r#"{"type":"status"}"#))
        .await
        .unwrap();
    let reply = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("a reply in time")
        .expect("a reply")
        .expect("a reply");
    let reply: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
    reply["peer"].clone()
}

/// Behind a TCP load balancer that speaks the PROXY protocol, the header's
/// source address is the client: per-IP limits count it, version 1 and 2
/// alike, and `X-Forwarded-For` counts only when the header names a trusted
/// proxy. A connection without a header, or from an address that is not a
/// trusted proxy, is closed before any HTTP, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limits_count_the_client_a_proxy_protocol_header_names() {
    use tokio::io::AsyncWriteExt;
    let dep = peer_deployment(
        r#"  direct:
    bind: 127.0.0.1:0
  balanced:
    bind: 127.0.0.1:0
    proxy_protocol: true
    trusted_proxies: [127.0.0.1, 10.0.0.0/8]
  elsewhere:
    bind: 127.0.0.1:0
    proxy_protocol: true
    trusted_proxies: [10.0.0.0/8]
"#,
        r#"admin:
  listener: direct
endpoints:
  - path: /feed
    listener: balanced
    protocol: p
    channels: [feed]
    limits: {max_connections_per_ip: 1}
  - path: /feed
    listener: elsewhere
    channels: [feed]
http:
  - path: /hello
    listener: balanced
    requests_per_ip: 1/1h
    body: {hello: world}
"#,
    );
    let gw = dep.start().await;
    let (direct, balanced, elsewhere) = (
        gw.addr("direct").unwrap(),
        gw.addr("balanced").unwrap(),
        gw.addr("elsewhere").unwrap(),
    );
    let refused = "gateway_proxy_protocol_refused_total";
    assert_eq!(metric(direct, refused).await, Some(0.0));

    // Two clients through one balancer: a connection each, and each
    // connection's peer is its client's address and port.
    let mut a = ws_via_balancer(
        balanced,
        b"PROXY TCP4 203.0.113.1 127.0.0.1 40000 443\r\n",
        "/feed",
    )
    .await
    .expect("version 1");
    let mut b = ws_via_balancer(balanced, &proxy_v2([203, 0, 113, 2], 40001), "/feed")
        .await
        .expect("version 2");
    assert_eq!(peer_of(&mut a).await, json!("203.0.113.1:40000"));
    assert_eq!(peer_of(&mut b).await, json!("203.0.113.2:40001"));
    // X-Forwarded-For: believed when the header names a trusted proxy (an
    // HTTP proxy behind the balancer), not when it names a client.
    let xff = [("X-Forwarded-For", "198.51.100.9")];
    let mut via_proxy = ws_via_balancer_with(
        balanced,
        b"PROXY TCP4 10.1.2.3 127.0.0.1 40010 443\r\n",
        "/feed",
        &xff,
    )
    .await
    .unwrap();
    assert_eq!(peer_of(&mut via_proxy).await, json!("198.51.100.9:0"));
    let mut own = ws_via_balancer_with(
        balanced,
        b"PROXY TCP4 203.0.113.4 127.0.0.1 40011 443\r\n",
        "/feed",
        &xff,
    )
    .await
    .unwrap();
    assert_eq!(peer_of(&mut own).await, json!("203.0.113.4:40011"));
    drop((via_proxy, own));
    // The first client again, by the other version: its one slot is taken.
    assert_eq!(
        ws_via_balancer(balanced, &proxy_v2([203, 0, 113, 1], 40002), "/feed")
            .await
            .err(),
        Some(429)
    );
    // A header written in two pieces is read whole.
    let mut s = via_balancer(balanced, b"PROXY TCP4 203.0.11").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    s.write_all(b"3.3 127.0.0.1 40003 443\r\n").await.unwrap();
    let c = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(format!("ws://{balanced}/feed"), s),
    )
    .await
    .unwrap()
    .expect("203.0.113.3 has a slot of its own");
    drop((a, b, c));

    // HTTP routes' per-IP limits count the same clients; a LOCAL header
    // (the balancer's own health check) is the balancer itself.
    let hello = |header: Vec<u8>| async move {
        let mut s = via_balancer(balanced, &header).await;
        // A refused connection may be closed before this write (it then
        // fails), and, closed unread, end with a reset instead of EOF.
        let _ = s
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
            .await
            .expect("an answer or a close in time");
        if buf.is_empty() {
            0
        } else {
            split_response(&buf).0
        }
    };
    assert_eq!(
        hello(b"PROXY TCP4 203.0.113.1 127.0.0.1 1 443\r\n".to_vec()).await,
        200
    );
    assert_eq!(hello(proxy_v2([203, 0, 113, 2], 2)).await, 200);
    assert_eq!(
        hello(b"PROXY TCP4 203.0.113.1 127.0.0.1 3 443\r\n".to_vec()).await,
        429
    );
    let mut local = proxy_v2([0; 4], 0);
    local[12] = 0x20;
    assert_eq!(hello(local.clone()).await, 200);
    assert_eq!(hello(local).await, 429, "the balancer's own second request");
    assert_eq!(metric(direct, refused).await, Some(0.0));

    // No header: closed without an answer. A malformed one, likewise.
    assert_eq!(hello(Vec::new()).await, 0);
    assert_eq!(
        hello(b"PROXY TCP4 203.0.113.9 127.0.0.1 99999 443\r\n".to_vec()).await,
        0
    );
    // A valid header from an address that is not a trusted proxy.
    // (The gateway may have closed it before this write: a refusal too.)
    let mut s = via_balancer(elsewhere, &proxy_v2([203, 0, 113, 4], 4)).await;
    let _ = s.write_all(b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("a close in time");
    assert!(buf.is_empty(), "127.0.0.1 is not in 10.0.0.0/8: {buf:?}");
    metric_becomes(direct, refused, 3.0).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_per_ip_endpoint_and_principal() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(try_connect(addr, "/per-ip", &[]).await.unwrap());
    }
    let (s, b) = try_connect(addr, "/per-ip", &[]).await.err().unwrap();
    assert_eq!(
        (s, error_of(&b)),
        (429, json!("too_many_connections_per_ip"))
    );
    // A slot comes back when a connection ends.
    // Wait until the gateway has seen it go: a retried connect would be
    // refused (and counted) while the slot is still held.
    drop(held.pop());
    metric_becomes(addr, "gateway_connections", 2.0).await;
    let again = try_connect(addr, "/per-ip", &[])
        .await
        .expect("the freed per-IP slot is available");
    drop(again);
    drop(held);

    let one = eventually("free slots", || async {
        try_connect(addr, "/per-endpoint", &[]).await.ok()
    })
    .await;
    let (s, b) = try_connect(addr, "/per-endpoint", &[]).await.err().unwrap();
    assert_eq!((s, error_of(&b)), (503, json!("too_many_connections")));
    drop(one);

    let alice = format!("Bearer {}", jwt("alice"));
    let a1 = eventually("free slots", || async {
        try_connect(addr, "/user", &[("Authorization", &alice)])
            .await
            .ok()
    })
    .await;
    let (s, b) = try_connect(addr, "/user", &[("Authorization", &alice)])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (s, error_of(&b)),
        (429, json!("too_many_connections_per_principal"))
    );
    let bob = format!("Bearer {}", jwt("bob"));
    let b1 = try_connect(addr, "/user", &[("Authorization", &bob)])
        .await
        .unwrap();
    drop((a1, b1));

    // In-band: the second connection of a principal is refused after auth,
    // with the auth's own refusal.
    let mut c1 = eventually("free slots", || async {
        try_connect(addr, "/inband-user", &[]).await.ok()
    })
    .await;
    send_json(&mut c1, &json!({"type": "auth", "token": jwt("carol")})).await;
    assert_eq!(next_json(&mut c1).await, json!({"type": "ok"}));
    let mut c2 = try_connect(addr, "/inband-user", &[]).await.unwrap();
    send_json(&mut c2, &json!({"type": "auth", "token": jwt("carol")})).await;
    assert_eq!(
        next_json(&mut c2).await,
        json!({"type": "refused", "why": "too_many_connections_per_principal"})
    );
    assert_eq!(close_code(&mut c2).await, Some(1008));
    // Authenticating again as another user moves the connection to that
    // user's count: carol's slot is free, dave's taken.
    send_json(&mut c1, &json!({"type": "auth", "token": jwt("dave")})).await;
    assert_eq!(next_json(&mut c1).await, json!({"type": "ok"}));
    let mut c3 = try_connect(addr, "/inband-user", &[]).await.unwrap();
    send_json(&mut c3, &json!({"type": "auth", "token": jwt("carol")})).await;
    assert_eq!(next_json(&mut c3).await, json!({"type": "ok"}));
    let mut c4 = try_connect(addr, "/inband-user", &[]).await.unwrap();
    send_json(&mut c4, &json!({"type": "auth", "token": jwt("dave")})).await;
    assert_eq!(
        next_json(&mut c4).await,
        json!({"type": "refused", "why": "too_many_connections_per_principal"})
    );
    assert_eq!(close_code(&mut c4).await, Some(1008));

    assert_eq!(
        metric(addr, "gateway_connections_refused_total{reason=\"per_ip\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            addr,
            "gateway_connections_refused_total{reason=\"per_principal\"}"
        )
        .await,
        Some(3.0)
    );
}

/// An API key's principal names the key, not its position in a list: the
/// first keys of two endpoints' lists are two principals (they were one,
/// `api_key#0`, sharing one gateway-wide count), and one key accepted by
/// both endpoints is one principal on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_principals_name_the_key_across_endpoints() {
    let dep = Deployment::new();
    dep.gateway_yaml(
        r#"
limits:
  ping_interval: off
  max_connections_per_principal: 1
protocols:
  p:
    replies:
      status: {type: me, principal: "{{principal}}"}
endpoints:
  - path: /a
    protocol: p
    channels: [feed]
    auth: {mode: api_key, header: X-Api-Key, keys_file: a.keys}
  - path: /b
    protocol: p
    channels: [feed]
    auth: {mode: api_key, header: X-Api-Key, keys_file: b.keys}
"#,
    )
    .write("a.keys", "key-a1\nshared-key\n")
    .write("b.keys", "# b's own first\nkey-b1\nshared-key\n")
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/feed.yaml", &bus_spec("feed", ""));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let key = |k: &'static str| [("X-Api-Key", k)];
    async fn whoami(ws: &mut Ws) -> String {
        send_json(ws, &json!({"type": "status"})).await;
        let r = next_json(ws).await;
        r["principal"].as_str().expect("a principal").to_string()
    }

    let mut a1 = try_connect(addr, "/a", &key("key-a1")).await.unwrap();
    let mut b1 = try_connect(addr, "/b", &key("key-b1"))
        .await
        .expect("key-b1 is not key-a1: a principal of its own");
    let (pa, pb) = (whoami(&mut a1).await, whoami(&mut b1).await);
    assert_ne!(pa, pb);
    for p in [&pa, &pb] {
        let hex = p.strip_prefix("api_key:").expect("api_key:<hex>");
        assert!(
            hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{p}"
        );
    }
    // The shared key: listed second by /a and third by /b, one principal.
    let mut s = try_connect(addr, "/b", &key("shared-key")).await.unwrap();
    let ps = whoami(&mut s).await;
    assert!(![&pa, &pb].contains(&&ps), "{ps}");
    let (st, body) = try_connect(addr, "/a", &key("shared-key"))
        .await
        .expect_err("shared-key has its one connection, made on /b");
    assert_eq!(
        (st, error_of(&body)),
        (429, json!("too_many_connections_per_principal"))
    );
    // Its slot, freed on /b, serves it on /a, as the same principal.
    drop(s);
    let mut s = eventually("the shared key's slot back", || async {
        try_connect(addr, "/a", &key("shared-key")).await.ok()
    })
    .await;
    assert_eq!(whoami(&mut s).await, ps);
    drop((a1, b1, s));
    gw.shutdown().await;
}

/// A client that connected with a token in the header and authenticates
/// again in-band keeps its slot as the same principal (it was refused as
/// its own second connection), and moves it as another (the first
/// principal's slot stayed taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_auth_after_a_header_token_keeps_or_moves_the_principal_s_slot() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let bearer = |sub: &str| format!("Bearer {}", jwt(sub));
    let path = "/header-or-inband-user";
    let mut ws = try_connect(addr, path, &[("Authorization", &bearer("alice"))])
        .await
        .unwrap();
    send_json(&mut ws, &json!({"type": "auth", "token": jwt("alice")})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "ok"}));
    let (s, _) = try_connect(addr, path, &[("Authorization", &bearer("alice"))])
        .await
        .expect_err("alice's second connection is refused");
    assert_eq!(s, 429);
    send_json(&mut ws, &json!({"type": "auth", "token": jwt("bob")})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "ok"}));
    let _alice = try_connect(addr, path, &[("Authorization", &bearer("alice"))])
        .await
        .expect("alice's slot is free again");
    let (s, _) = try_connect(addr, path, &[("Authorization", &bearer("bob"))])
        .await
        .expect_err("bob's slot is taken");
    assert_eq!(s, 429);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_ip_are_rate_limited_with_retry_after() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let _a = try_connect(addr, "/new-rate", &[]).await.unwrap();
    let _b = try_connect(addr, "/new-rate", &[]).await.unwrap();
    let (status, head, body) = http(
        addr,
        "GET",
        "/new-rate",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await;
    assert_eq!((status, error_of(&body)), (429, json!("rate_limited")));
    let retry: u64 = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or_else(|| l.strip_prefix("Retry-After: "))
        })
        .expect("a Retry-After header")
        .trim()
        .parse()
        .unwrap();
    assert!(
        (1700..=1800).contains(&retry),
        "half of an hour's quota of 2: {retry}"
    );
    assert_eq!(
        metric(addr, "gateway_connections_refused_total{reason=\"rate\"}").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_messages_beyond_the_rate_close_or_get_an_error() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();

    let mut c = connect(addr, "/chatty-close").await;
    for i in 0..3 {
        send_json(&mut c, &json!({"type": "ping", "data": i})).await;
        assert_eq!(next_json(&mut c).await["type"], "pong");
    }
    send_json(&mut c, &json!({"type": "ping", "data": 4})).await;
    assert_eq!(close_code(&mut c).await, Some(1008));

    let mut e = connect(addr, "/chatty-error").await;
    send_json(&mut e, &json!({"type": "subscribe", "channel": "feed"})).await;
    assert_eq!(next_json(&mut e).await["type"], "subscribed");
    for i in 0..2 {
        send_json(&mut e, &json!({"type": "ping", "data": i})).await;
        assert_eq!(next_json(&mut e).await["type"], "pong");
    }
    for i in 0..2 {
        send_json(&mut e, &json!({"type": "ping", "data": i})).await;
        assert_eq!(next_json(&mut e).await["error"], "rate_limited");
    }
    // Still open: data flows.
    emit(addr, "feed", json!([{"k": 1}])).await;
    assert_eq!(next_json(&mut e).await, json!({"k": 1}));

    let mut s = connect(addr, "/small").await;
    send_text(&mut s, "this is more than sixteen bytes").await;
    assert_eq!(close_code(&mut s).await, Some(1009));

    assert_eq!(
        metric(
            addr,
            "gateway_connections_closed_by_limit_total{limit=\"inbound_messages\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(addr, "gateway_inbound_rate_errors_total").await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_lifetime_and_ping_timeouts_close_with_1001() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();

    let mut idle = connect_stalling_raw(addr, "/idle").await;
    let (code, reason, _) = raw_close(&mut idle).await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));

    let mut short = connect_stalling_raw(addr, "/short-lived").await;
    let (code, reason, _) = raw_close(&mut short).await;
    assert_eq!(
        (code, reason.as_str()),
        (1001, "maximum connection duration reached")
    );

    // A client that never answers pings.
    let mut dead = connect_stalling_raw(addr, "/dead").await;
    let (code, reason, pings) = raw_close(&mut dead).await;
    assert_eq!((code, reason.as_str()), (1001, "ping timeout"));
    assert!(pings >= 1);

    // A client that answers (tungstenite answers pings as it reads) stays
    // connected across many ping intervals.
    let mut live = connect(addr, "/pinged").await;
    let mut pings = 0;
    while pings < 10 {
        match tokio::time::timeout(PATIENCE, live.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    emit(addr, "feed", json!([{"still": "here"}])).await;
    assert_eq!(next_json(&mut live).await, json!({"still": "here"}));

    for limit in ["idle_timeout", "max_connection_duration", "ping_timeout"] {
        assert_eq!(
            metric(
                addr,
                &format!("gateway_connections_closed_by_limit_total{{limit=\"{limit}\"}}")
            )
            .await,
            Some(1.0),
            "{limit}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_per_ip_get_429_with_retry_after() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    for _ in 0..3 {
        assert_eq!(http(addr, "GET", "/hello", &[]).await.0, 200);
    }
    let (s, head, body) = http(addr, "GET", "/hello", &[]).await;
    assert_eq!((s, error_of(&body)), (429, json!("rate_limited")));
    assert!(
        head.to_ascii_lowercase().contains("retry-after: "),
        "{head}"
    );
    assert_eq!(
        metric(addr, "gateway_http_rate_limited_total").await,
        Some(1.0)
    );
}

/// A message held back by `conflate` is not lost when its channel's source
/// stops (here: a reload that changes the channel): it goes out then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflated_message_goes_out_when_its_channel_stops() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut capped = connect(addr, "/capped").await;
    subscribed(addr, "capped").await;
    emit(addr, "capped", json!([{"n": 1}, {"n": 2}, {"n": 3}])).await;
    assert_eq!(next_json(&mut capped).await, json!({"n": 1}));
    eventually("n 2 replaced by n 3", || async {
        let c = metric(
            addr,
            "gateway_rate_limit_conflated_total{channel=\"capped\",plugin=\"test-faults\"}",
        )
        .await;
        (c == Some(1.0)).then_some(())
    })
    .await;
    dep.write(
        "specs/capped.yaml",
        &bus_spec(
            "capped",
            "rate_limit: {rate: 2/1h, on_exceed: conflate}\nendpoints:\n  - path: /capped\n",
        ),
    );
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next_json(&mut capped).await, json!({"n": 3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_rate_limit_conflates_or_drops() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut capped = connect(addr, "/capped").await;
    let mut dropping = connect(addr, "/dropping").await;
    let mut paced = connect(addr, "/paced").await;
    for channel in ["capped", "dropping", "paced"] {
        subscribed(addr, channel).await;
    }
    emit(addr, "capped", json!([{"n": 1}, {"n": 2}, {"n": 3}])).await;
    emit(addr, "dropping", json!([{"n": 1}, {"n": 2}, {"n": 3}])).await;
    assert_eq!(next_json(&mut capped).await, json!({"n": 1}));
    assert_eq!(next_json(&mut dropping).await, json!({"n": 1}));
    let series = |m: &str, c: &str| format!("{m}{{channel=\"{c}\",plugin=\"test-faults\"}}");
    eventually("the conflated and dropped counts", || async {
        let c = metric(
            addr,
            &series("gateway_rate_limit_conflated_total", "capped"),
        )
        .await;
        let d = metric(
            addr,
            &series("gateway_rate_limit_dropped_total", "dropping"),
        )
        .await;
        (c == Some(1.0) && d == Some(2.0)).then_some(())
    })
    .await;

    // 2 per second: two at once, then the latest of the rest when allowed.
    emit(
        addr,
        "paced",
        json!([{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, {"n": 5}]),
    )
    .await;
    assert_eq!(next_json(&mut paced).await, json!({"n": 1}));
    assert_eq!(next_json(&mut paced).await, json!({"n": 2}));
    assert_eq!(next_json(&mut paced).await, json!({"n": 5}));
}
