//! Bad input tried for real against a running gateway: malformed and
//! mistyped control messages, binary where text is expected, oversized and
//! fragmented messages, deep nesting, huge numbers, invalid UTF-8, clients
//! that vanish mid-frame, stall after the upgrade, stall inside their HTTP
//! headers, or come and go by the hundred.
//!
//! After every attack the gateway must answer as documented (an error reply
//! or a close code, never a panic or a hang), two observers connected all
//! along must still receive fresh data, and when everyone has gone
//! `gateway_connections` must be back to 0: no session leaked.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// `limits.max_message_size` of the deployment.
const MAX: usize = 64 * 1024;

/// A subscribe endpoint `/ws` (`type`/`channel`, filters beside the action or
/// under `filters`) and a stream endpoint `/stream`, both serving the
/// `telemetry` bus channel, whose plugin emits what `POST /emit` tells it.
fn deployment() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(
        r#"
limits:
  max_message_size: 64KiB
  session_queue: 16
protocols:
  iot:
    action_field: type
    channel_field: channel
    filters_at: [top_level, filters]
endpoints:
  - path: /ws
    protocol: iot
    channels: all
http:
  - path: /emit
    method: POST
    max_body: 4MiB
    command: {channel: telemetry, request: {op: emit, messages: "{{request.body}}"}}
"#,
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write(
        "specs/telemetry.yaml",
        &bus_spec(
            "telemetry",
            "filters:\n  device_id: {match: device_id}\n  severity: {match: severity}\n  metrics: {project: telemetry}\n  frequency: {frequency: true, key: device_id}\nendpoints:\n  - path: /stream\n",
        ),
    );
    dep
}

const SUBSCRIBERS: &str = "gateway_subscribers{channel=\"telemetry\",plugin=\"test-faults\"}";

async fn emit(addr: SocketAddr, messages: &Value) -> u16 {
    http_body(addr, "POST", "/emit", &[], &messages.to_string())
        .await
        .0
}

/// Two clients connected through every attack: one on `/ws` with a filter
/// and a projection, one on the stream endpoint. [`Watch::alive`] proves both
/// still receive data published after the attack.
struct Watch {
    addr: SocketAddr,
    filtered: Ws,
    stream: Ws,
    n: u64,
}

impl Watch {
    async fn new(addr: SocketAddr) -> Watch {
        let mut filtered = connect(addr, "/ws").await;
        send_json(
            &mut filtered,
            &json!({"type": "subscribe", "channel": "telemetry", "device_id": 1,
                    "filters": {"metrics": ["cpu"]}}),
        )
        .await;
        let r = next_json(&mut filtered).await;
        assert_eq!(r, json!({"type": "subscribed", "channel": "telemetry"}));
        let stream = connect(addr, "/stream").await;
        // The handshake completes a little before the subscription is made.
        metric_becomes(addr, SUBSCRIBERS, 2.0).await;
        // The plugin may still be starting: emit until it takes commands.
        eventually("the bus plugin to run", || async {
            (emit(addr, &json!([])).await == 200).then_some(())
        })
        .await;
        let mut w = Watch {
            addr,
            filtered,
            stream,
            n: 0,
        };
        w.alive("start").await;
        w
    }

    /// Publish a fresh marker; both observers must receive it (the filtered
    /// one projected), whatever else they receive first.
    async fn alive(&mut self, after: &str) {
        self.n += 1;
        let n = self.n;
        let msg = json!({"device_id": 1, "marker": n, "telemetry": {"cpu": n, "temp": 0}});
        assert_eq!(
            emit(self.addr, &json!([msg])).await,
            200,
            "emit after {after}"
        );
        loop {
            let v = next_json(&mut self.filtered).await;
            assert_eq!(v["device_id"], 1, "filter holds after {after}: {v}");
            if v["marker"] == n {
                assert_eq!(
                    v,
                    json!({"device_id": 1, "marker": n, "telemetry": {"cpu": n}}),
                    "projection holds after {after}"
                );
                break;
            }
        }
        loop {
            let v = next_json(&mut self.stream).await;
            if v["marker"] == n {
                assert_eq!(v, msg, "after {after}");
                break;
            }
        }
    }

    /// Close both observers; then no session may remain.
    async fn finish(self) {
        let addr = self.addr;
        for mut ws in [self.filtered, self.stream] {
            ws.close(None).await.expect("close");
            close_code(&mut ws).await;
        }
        no_sessions_left(addr).await;
    }
}

async fn connections(addr: SocketAddr) -> Option<f64> {
    metric(addr, "gateway_connections").await
}

async fn sessions_become(addr: SocketAddr, n: f64) {
    metric_becomes(addr, "gateway_connections", n).await;
}

async fn no_sessions_left(addr: SocketAddr) {
    sessions_become(addr, 0.0).await;
    metric_becomes(addr, SUBSCRIBERS, 0.0).await;
}

/// Send `ping` with a fresh `data`: the next message must be its pong, so
/// the connection is open and nothing else (no stray reply) came first.
async fn ping_pong(ws: &mut Ws, n: u64) {
    send_json(ws, &json!({"type": "ping", "data": n})).await;
    assert_eq!(next_json(ws).await, json!({"type": "pong", "data": n}));
}

/// The next message must be the error reply with `code`.
async fn expect_error(ws: &mut Ws, code: &str, what: &str) -> Value {
    let e = next_json(ws).await;
    assert_eq!(e["type"], "error", "{what} → {e}");
    assert_eq!(e["error"], code, "{what} → {e}");
    assert!(e["message"].is_string(), "{what} → {e}");
    e
}

// --- Raw frames -------------------------------------------------------------

/// A masked client frame; `len` overrides the length written in the header.
fn frame_with_len(fin: bool, opcode: u8, payload: &[u8], len: u64) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    if len < 126 {
        v.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        v.push(0x80 | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&len.to_be_bytes());
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    v
}

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_with_len(fin, opcode, payload, payload.len() as u64)
}

fn text(s: &str) -> Vec<u8> {
    frame(true, 0x1, s.as_bytes())
}

/// A client speaking frames by hand.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

const HANDSHAKE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {HANDSHAKE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

impl Raw {
    async fn connect(addr: SocketAddr, path: &str) -> Raw {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(upgrade_request(addr, path).as_bytes())
            .await
            .expect("write handshake");
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
                .await
                .expect("handshake in time")
                .expect("read");
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        Raw { s, buf }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// The next server frame (opcode, payload); None when the server closed
    /// the TCP connection.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                assert_eq!(self.buf[0] & 0x80, 0x80, "server frames are final");
                let (len, off) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    l => (l as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= off + len {
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[off..off + len].to_vec();
                    self.buf.drain(..off + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(PATIENCE, self.s.read(&mut chunk))
                .await
                .expect("a server frame in time (no hang)")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text message as JSON, skipping Pong frames.
    async fn next_json(&mut self) -> Value {
        loop {
            match self.next_frame().await {
                Some((0x1, p)) => return serde_json::from_slice(&p).expect("server sent JSON"),
                Some((0xA, _)) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The server's Close code, skipping data and pongs.
    async fn expect_close(&mut self, what: &str) -> u16 {
        loop {
            match self.next_frame().await {
                Some((0x8, p)) => {
                    assert!(p.len() >= 2, "{what}: close without a code");
                    return u16::from_be_bytes([p[0], p[1]]);
                }
                Some((0x1 | 0xA, _)) => continue,
                other => panic!("{what}: expected Close, got {other:?}"),
            }
        }
    }

    /// A ping action answered by its pong: the connection is open and usable.
    async fn ping_pong(&mut self, n: u64) {
        self.send(&text(&json!({"type": "ping", "data": n}).to_string()))
            .await;
        assert_eq!(self.next_json().await, json!({"type": "pong", "data": n}));
    }
}

// --- Tests --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_mistyped_control_messages_get_error_replies_never_a_close() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    let mut ws = connect(addr, "/ws").await;
    let long_action = "x".repeat(20_000);
    let cases: Vec<(String, &str)> = vec![
        // Not JSON.
        ("{not json".into(), "invalid_json"),
        ("".into(), "invalid_json"),
        ("   ".into(), "invalid_json"),
        ("{\"type\":".into(), "invalid_json"),
        ("{'type':'ping'}".into(), "invalid_json"),
        ("{\"type\":\"ping\"}}".into(), "invalid_json"),
        ("{\"type\":\"ping\",}".into(), "invalid_json"),
        ("NaN".into(), "invalid_json"),
        ("\u{0}".into(), "invalid_json"),
        ("{\"type\":\"\\ud800\"}".into(), "invalid_json"),
        ("{\"type\":\"\\x41\"}".into(), "invalid_json"),
        ("\u{feff}{\"type\":\"ping\"}".into(), "invalid_json"),
        // JSON, but not an object.
        ("[]".into(), "bad_request"),
        ("[{\"type\":\"ping\"}]".into(), "bad_request"),
        ("42".into(), "bad_request"),
        ("-0.5e-7".into(), "bad_request"),
        ("\"subscribe\"".into(), "bad_request"),
        ("null".into(), "bad_request"),
        ("true".into(), "bad_request"),
        // No string action.
        ("{}".into(), "bad_request"),
        ("{\"channel\":\"telemetry\"}".into(), "bad_request"),
        ("{\"type\":5}".into(), "bad_request"),
        ("{\"type\":null}".into(), "bad_request"),
        ("{\"type\":[\"ping\"]}".into(), "bad_request"),
        ("{\"type\":{\"ping\":1}}".into(), "bad_request"),
        ("{\"type\":true}".into(), "bad_request"),
        // Unknown actions.
        ("{\"type\":\"dance\"}".into(), "unknown_action"),
        ("{\"type\":\"\"}".into(), "unknown_action"),
        ("{\"type\":\"PING\"}".into(), "unknown_action"),
        ("{\"type\":\"ping \"}".into(), "unknown_action"),
        ("{\"type\":\"subscribe\\u0000\"}".into(), "unknown_action"),
        ("{\"type\":\"héllo 🦀\"}".into(), "unknown_action"),
        (json!({"type": long_action}).to_string(), "unknown_action"),
        // The channel field of the wrong type, missing or unknown.
        ("{\"type\":\"subscribe\"}".into(), "bad_request"),
        ("{\"type\":\"subscribe\",\"channel\":7}".into(), "bad_request"),
        ("{\"type\":\"subscribe\",\"channel\":{\"name\":\"telemetry\"}}".into(), "bad_request"),
        ("{\"type\":\"subscribe\",\"channel\":[\"telemetry\"]}".into(), "bad_request"),
        ("{\"type\":\"subscribe\",\"channel\":null}".into(), "bad_request"),
        ("{\"type\":\"subscribe\",\"channel\":false}".into(), "bad_request"),
        ("{\"type\":\"unsubscribe\",\"channel\":1.5}".into(), "bad_request"),
        ("{\"type\":\"subscribe\",\"channel\":\"nope\"}".into(), "unknown_channel"),
        ("{\"type\":\"subscribe\",\"channel\":\"\"}".into(), "unknown_channel"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry \"}".into(), "unknown_channel"),
        ("{\"type\":\"subscribe\",\"channel\":\"../telemetry\"}".into(), "unknown_channel"),
        ("{\"type\":\"unsubscribe\",\"channel\":\"telemetry\"}".into(), "not_subscribed"),
        ("{\"type\":\"unsubscribe\",\"channel\":\"nope\"}".into(), "unknown_channel"),
        // Filters of the wrong type.
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":[]}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":[{\"device_id\":1}]}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":\"device_id=1\"}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":5}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":true}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":{\"colour\":\"red\"}}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"frequency\":{\"every\":\"1s\"}}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":{\"frequency\":{\"every\":\"1s\"}}}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"frequency\":[\"1s\"]}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"frequency\":true}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"frequency\":-1}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"frequency\":\"often\"}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"frequency\":\"-5s\"}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"device_id\":{\"eq\":1}}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":{\"device_id\":{\"eq\":1}}}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"metrics\":5}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"metrics\":[1,2]}".into(), "invalid_filter"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":{\"metrics\":{\"cpu\":true}}}".into(), "invalid_filter"),
        // A huge number is not JSON serde accepts.
        ("{\"type\":\"ping\",\"data\":1e400}".into(), "invalid_json"),
        ("{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"device_id\":-1e999}".into(), "invalid_json"),
    ];
    for (i, (bad, code)) in cases.iter().enumerate() {
        send_text(&mut ws, bad).await;
        let what = if bad.len() > 200 { &bad[..200] } else { bad };
        expect_error(&mut ws, code, what).await;
        // Still open, and nothing else was sent (a refused subscribe does
        // not subscribe).
        ping_pong(&mut ws, i as u64).await;
    }
    // The client was never subscribed by any of these.
    send_json(&mut ws, &json!({"type": "status"})).await;
    let st = next_json(&mut ws).await;
    assert_eq!(st["subscriptions"], json!([]), "{st}");
    watch.alive("malformed messages").await;

    // Valid but odd values are accepted: huge and tiny numbers as match
    // values, a huge integer beyond i64, duplicate keys (the last wins),
    // unknown extra fields.
    for ok in [
        json!({"type": "subscribe", "channel": "telemetry", "device_id": 1e308}),
        json!({"type": "subscribe", "channel": "telemetry", "device_id": [-1e308, 5e-324, 123456789012345678901234567890u128 as f64]}),
        json!({"type": "subscribe", "channel": "telemetry", "device_id": 18446744073709551615u64, "junk": {"a": [1, {"b": null}]}}),
        json!({"type": "subscribe", "channel": "telemetry", "device_id": null, "severity": [], "frequency": "real-time"}),
    ] {
        send_json(&mut ws, &ok).await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "subscribed", "channel": "telemetry"}),
            "{ok}"
        );
    }
    send_text(
        &mut ws,
        "{\"type\":\"dance\",\"type\":\"subscribe\",\"channel\":\"telemetry\",\"device_id\":123456789012345678901234567890}",
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "subscribed", "channel": "telemetry"})
    );
    watch.alive("odd but valid subscriptions").await;
    // An empty `severity` list matches nothing: the last subscription
    // replaced the earlier ones, so this client got nothing of the markers.
    ping_pong(&mut ws, 10_000).await;

    drop(ws);
    watch.finish().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_ignored_where_text_is_expected() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    let mut ws = connect(addr, "/ws").await;
    let mut st = connect(addr, "/stream").await;
    for (i, b) in [
        br#"{"type":"subscribe","channel":"telemetry"}"#.to_vec(),
        br#"{"type":"ping","data":99}"#.to_vec(),
        Vec::new(),
        vec![0xff, 0xfe, 0x00, 0x80],
        vec![0u8; MAX],
    ]
    .into_iter()
    .enumerate()
    {
        ws.send(Message::Binary(b.clone().into())).await.unwrap();
        st.send(Message::Binary(b.into())).await.unwrap();
        // No reply, no subscription, no close: the next message is the pong.
        ping_pong(&mut ws, i as u64).await;
    }
    send_json(&mut ws, &json!({"type": "status"})).await;
    assert_eq!(next_json(&mut ws).await["subscriptions"], json!([]));
    // The stream endpoint ignores text too, whatever it is.
    for t in [
        "{not json",
        "[1]",
        r#"{"type":"unsubscribe","channel":"telemetry"}"#,
    ] {
        send_text(&mut st, t).await;
    }
    watch.alive("binary frames").await;
    // The stream client is still subscribed and receiving.
    let n = watch.n;
    loop {
        let v = next_json(&mut st).await;
        if v["marker"] == n {
            break;
        }
    }
    drop((ws, st));
    watch.finish().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_with_1009_and_the_limit_is_exact() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;

    // Exactly the limit is accepted: a ping whose `data` pads it to MAX bytes.
    let mut c = Raw::connect(addr, "/ws").await;
    let shell = json!({"type": "ping", "data": ""}).to_string();
    let pad = "p".repeat(MAX - shell.len());
    let exact = json!({"type": "ping", "data": pad}).to_string();
    assert_eq!(exact.len(), MAX);
    c.send(&text(&exact)).await;
    assert_eq!(c.next_json().await, json!({"type": "pong", "data": pad}));
    c.ping_pong(1).await;
    drop(c);
    // One byte more is closed with 1009, for text and for binary, on both
    // kinds of endpoint.
    for (path, op) in [
        ("/ws", 0x1),
        ("/ws", 0x2),
        ("/stream", 0x1),
        ("/stream", 0x2),
    ] {
        let mut c = Raw::connect(addr, path).await;
        c.send(&frame(true, op, &vec![b' '; MAX + 1])).await;
        assert_eq!(c.expect_close("MAX + 1").await, 1009, "{path} opcode {op}");
    }
    // A header announcing an absurd length is refused from the header,
    // without waiting for (or buffering) the payload.
    for len in [u64::from(u32::MAX), 1 << 62, (1 << 63) - 1] {
        let mut c = Raw::connect(addr, "/ws").await;
        c.send(&frame_with_len(true, 0x1, b"{}", len)).await;
        assert_eq!(c.expect_close("huge length").await, 1009, "length {len}");
    }
    // A length with its top bit set is a protocol error.
    let mut c = Raw::connect(addr, "/ws").await;
    c.send(&frame_with_len(true, 0x1, b"{}", u64::MAX)).await;
    assert_eq!(c.expect_close("top bit").await, 1002);
    drop(c);
    // A big frame from a client that keeps writing still gets its Close.
    let mut c = Raw::connect(addr, "/ws").await;
    let big = frame(true, 0x1, &vec![b'a'; 60_000]);
    let first = frame(true, 0x1, &vec![b'a'; MAX + 10]);
    c.send(&first).await;
    for _ in 0..4 {
        // The server may already have hung up: errors are fine here.
        if c.s.write_all(&big).await.is_err() {
            break;
        }
    }
    assert_eq!(c.expect_close("a big write").await, 1009);
    assert!(
        metric(addr, "gateway_closed_message_too_big_total")
            .await
            .is_some_and(|n| n >= 8.0)
    );
    c.ping_pong_impossible().await;
    watch.alive("oversized messages").await;
    drop(c);
    watch.finish().await;
    gw.shutdown().await;
}

impl Raw {
    /// After its Close the connection is gone: writes may fail, nothing
    /// more is read.
    async fn ping_pong_impossible(&mut self) {
        let _ = self.s.write_all(&text("{\"type\":\"ping\"}")).await;
        assert_eq!(self.next_frame().await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_messages_are_reassembled_limited_and_checked() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    let mut c = Raw::connect(addr, "/ws").await;

    // A ping action in three fragments, with a Ping frame between them.
    let mut b = frame(false, 0x1, b"{\"type\":");
    b.extend(frame(true, 0x9, b"between"));
    b.extend(frame(false, 0x0, b"\"ping\",\"data\":"));
    b.extend(frame(true, 0x0, b"7}"));
    c.send(&b).await;
    let mut got_pong_frame = false;
    let reply = loop {
        match c.next_frame().await {
            Some((0xA, p)) => {
                assert_eq!(p, b"between");
                got_pong_frame = true;
            }
            Some((0x1, p)) => break serde_json::from_slice::<Value>(&p).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reply, json!({"type": "pong", "data": 7}));
    if !got_pong_frame {
        assert_eq!(c.next_frame().await, Some((0xA, b"between".to_vec())));
    }

    // 2 000 one-byte fragments (and empty ones between them).
    let msg = json!({"type": "ping", "data": "x".repeat(1990)}).to_string();
    let bytes = msg.as_bytes();
    let mut b = frame(false, 0x1, &bytes[..1]);
    for (i, byte) in bytes[1..].iter().enumerate() {
        let last = i == bytes.len() - 2;
        b.extend(frame(false, 0x0, b""));
        b.extend(frame(last, 0x0, std::slice::from_ref(byte)));
    }
    c.send(&b).await;
    assert_eq!(c.next_json().await["data"].as_str().unwrap().len(), 1990);

    // A multi-byte character split across fragments is fine.
    let mut b = frame(
        false,
        0x1,
        "{\"type\":\"ping\",\"data\":\"\u{1F980}".as_bytes()[..24].as_ref(),
    );
    b.extend(frame(
        true,
        0x0,
        &"{\"type\":\"ping\",\"data\":\"\u{1F980}\"}".as_bytes()[24..],
    ));
    c.send(&b).await;
    assert_eq!(
        c.next_json().await,
        json!({"type": "pong", "data": "\u{1F980}"})
    );

    // Invalid JSON in fragments: an error reply, the connection stays.
    let mut b = frame(false, 0x1, b"{\"type\"");
    b.extend(frame(true, 0x0, b"\"ping\"}"));
    c.send(&b).await;
    assert_eq!(c.next_json().await["error"], "invalid_json");
    // A fragmented binary message is ignored.
    let mut b = frame(false, 0x2, b"{\"type\":");
    b.extend(frame(true, 0x0, b"\"ping\"}"));
    c.send(&b).await;
    c.ping_pong(1).await;
    watch.alive("valid fragments").await;

    // Violations close the connection with the documented code.
    type Case = (&'static str, Vec<u8>, u16);
    let split_utf8 = {
        // Each fragment alone is fine; together they are not UTF-8.
        let mut b = frame(false, 0x1, b"{\"a\":\"\xc3");
        b.extend(frame(true, 0x0, b"\x28\"}"));
        b
    };
    let cases: Vec<Case> = vec![
        (
            "fragments adding up past the limit",
            (0..70)
                .flat_map(|i| frame(false, if i == 0 { 0x1 } else { 0x0 }, &[b' '; 1024]))
                .collect(),
            1009,
        ),
        (
            "a final fragment crossing the limit",
            [
                frame(false, 0x2, &vec![0; MAX - 10]),
                frame(true, 0x0, &[0; 11]),
            ]
            .concat(),
            1009,
        ),
        (
            "a continuation with no message",
            frame(true, 0x0, b"{}"),
            1002,
        ),
        (
            "a new message inside a fragmented one",
            [frame(false, 0x1, b"{"), frame(true, 0x1, b"{}")].concat(),
            1002,
        ),
        ("a fragmented ping", frame(false, 0x9, b"p"), 1002),
        (
            "a ping longer than 125 bytes",
            frame(true, 0x9, &[b'p'; 126]),
            1002,
        ),
        ("a close of one byte", frame(true, 0x8, &[3]), 1002),
        (
            "reserved bits",
            {
                let mut f = text("{}");
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("an unmasked frame", vec![0x81, 0x02, b'{', b'}'], 1002),
        ("opcode 0xB", frame(true, 0xB, b""), 1002),
        ("invalid UTF-8 across fragments", split_utf8, 1007),
        (
            "invalid UTF-8",
            frame(true, 0x1, b"{\"type\":\"\xff\"}"),
            1007,
        ),
        ("an overlong encoding", frame(true, 0x1, b"\xc0\x80"), 1007),
        ("a UTF-8 surrogate", frame(true, 0x1, b"\xed\xa0\x80"), 1007),
        (
            "beyond U+10FFFF",
            frame(true, 0x1, b"\xf4\x90\x80\x80"),
            1007,
        ),
        (
            "a truncated sequence",
            frame(true, 0x1, b"ok\xe2\x82"),
            1007,
        ),
        (
            "a close reason that is not UTF-8",
            frame(true, 0x8, b"\x03\xe8\xff"),
            1007,
        ),
    ];
    for (what, bytes, code) in cases {
        for path in ["/ws", "/stream"] {
            let mut c = Raw::connect(addr, path).await;
            c.send(&bytes).await;
            assert_eq!(c.expect_close(what).await, code, "{what} on {path}");
        }
    }
    c.ping_pong(2).await;
    watch.alive("bad fragments").await;
    drop(c);
    watch.finish().await;
    gw.shutdown().await;
}

/// `[[[…]]]` `depth` deep (a valid JSON document past serde_json's
/// recursion limit of 128 when `depth` > 128).
fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_an_error_reply_not_a_stack_overflow() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    let mut ws = connect(addr, "/ws").await;
    let cases = [
        nested_arrays(10_000),
        nested_objects(10_000, "1"),
        "[".repeat(MAX),
        "{\"a\":".repeat(MAX / 5),
        format!("{{\"type\":\"ping\",\"data\":{}}}", nested_arrays(10_000)),
        format!(
            "{{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"device_id\":{}}}",
            nested_arrays(5_000)
        ),
        format!(
            "{{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"filters\":{}}}",
            nested_objects(5_000, "null")
        ),
        // Just past the limit.
        format!("{{\"type\":\"ping\",\"data\":{}}}", nested_arrays(128)),
    ];
    for (i, bad) in cases.iter().enumerate() {
        assert!(bad.len() <= MAX, "case {i} fits the message limit");
        send_text(&mut ws, bad).await;
        let e = expect_error(&mut ws, "invalid_json", &format!("nested case {i}")).await;
        assert!(
            e["message"].as_str().unwrap().contains("recursion limit")
                || e["message"].as_str().unwrap().contains("EOF"),
            "{e}"
        );
        ping_pong(&mut ws, i as u64).await;
    }
    // Within the limit, deep values are echoed back as they came.
    let deep = nested_arrays(120);
    send_text(&mut ws, &format!("{{\"type\":\"ping\",\"data\":{deep}}}")).await;
    let pong = next_json(&mut ws).await;
    assert_eq!(pong["data"], serde_json::from_str::<Value>(&deep).unwrap());
    // A deep match value subscribes; data still flows past it.
    send_text(
        &mut ws,
        &format!(
            "{{\"type\":\"subscribe\",\"channel\":\"telemetry\",\"device_id\":[1,{}]}}",
            nested_arrays(120)
        ),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    watch.alive("deep nesting").await;
    let v = next_json(&mut ws).await;
    assert_eq!(
        v["marker"], watch.n,
        "the deep subscription matched device 1"
    );
    drop(ws);
    watch.finish().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_mid_frame_leave_no_session() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    let subscribe = text(r#"{"type":"subscribe","channel":"telemetry","device_id":1}"#);
    let cut_points: Vec<Vec<u8>> = vec![
        // Half a frame header.
        text("{\"type\":\"ping\"}")[..1].to_vec(),
        text("{\"type\":\"ping\"}")[..4].to_vec(),
        // A whole header announcing 50 000 bytes, then 10 of them.
        frame_with_len(true, 0x1, &[b' '; 10], 50_000),
        // The first fragment of a message that never ends.
        frame(false, 0x1, b"{\"type\":\"pi"),
        // Subscribed, then half of the next frame.
        [subscribe.clone(), text("{\"type\":\"ping\"}")[..6].to_vec()].concat(),
        // A Close frame cut in half.
        frame(true, 0x8, b"\x03\xe8bye")[..5].to_vec(),
    ];
    for path in ["/ws", "/stream"] {
        for cut in &cut_points {
            let mut c = Raw::connect(addr, path).await;
            c.send(cut).await;
            drop(c);
        }
        // The same cuts right behind the handshake, in its packet.
        for cut in &cut_points {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut b = upgrade_request(addr, path).into_bytes();
            b.extend_from_slice(cut);
            s.write_all(&b).await.unwrap();
            drop(s);
        }
    }
    // Subscribed clients cut while data is flowing to them.
    let mut subscribed = Vec::new();
    for _ in 0..5 {
        let mut c = Raw::connect(addr, "/ws").await;
        c.send(&subscribe).await;
        assert_eq!(c.next_json().await["type"], "subscribed");
        subscribed.push(c);
    }
    let stream_clients: Vec<Raw> =
        futures_util::future::join_all((0..5).map(|_| Raw::connect(addr, "/stream"))).await;
    watch.alive("clients connected").await;
    for mut c in subscribed.into_iter().chain(stream_clients) {
        c.send(&text("{\"type\":\"ping\"}")[..3]).await;
        drop(c);
    }
    watch.alive("abrupt disconnects").await;
    // Only the observers remain.
    sessions_become(addr, 2.0).await;
    metric_becomes(addr, SUBSCRIBERS, 2.0).await;
    watch.finish().await;
    gw.shutdown().await;
}

/// A batch of 32 messages of 32 KiB for device 2, numbered from `b * 32`.
fn flood_batch(b: u64) -> Value {
    (0..32)
        .map(|i| json!({"device_id": 2, "seq": b * 32 + i, "pad": "z".repeat(32 * 1024)}))
        .collect()
}

/// Read a silent client's backlog up to `last`: the sequence must have gaps
/// (frames were dropped for it, not buffered) but never go back.
async fn assert_dropped_for(next: &mut (impl AsyncNext + ?Sized), last: u64, who: &str) {
    let mut prev: Option<u64> = None;
    let mut gap = false;
    loop {
        let v = next.next_value().await;
        let Some(seq) = v["seq"].as_u64() else {
            continue;
        };
        if let Some(p) = prev {
            assert!(seq > p, "{who}: order kept");
            gap |= seq > p + 1;
        } else {
            gap |= seq > 0;
        }
        prev = Some(seq);
        if seq == last {
            break;
        }
    }
    assert!(
        gap,
        "{who}: no frame was dropped for a client that read nothing"
    );
}

trait AsyncNext {
    async fn next_value(&mut self) -> Value;
}

impl AsyncNext for Ws {
    async fn next_value(&mut self) -> Value {
        next_json(self).await
    }
}

impl AsyncNext for Raw {
    async fn next_value(&mut self) -> Value {
        self.next_json().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_bounded_by_its_queue() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    // Upgraded, then silent and never reading: subscribed to everything on
    // the stream endpoint, and on /ws after one subscribe.
    let mut silent = Raw {
        s: connect_stalling_raw(addr, "/stream").await,
        buf: Vec::new(),
    };
    let mut silent_ws = connect_stalling(addr, "/ws").await;
    send_json(
        &mut silent_ws,
        &json!({"type": "subscribe", "channel": "telemetry"}),
    )
    .await;
    sessions_become(addr, 4.0).await;
    metric_becomes(addr, SUBSCRIBERS, 4.0).await;
    // Publish 1 MB batches until the gateway drops frames: queues are
    // bounded, what a client does not read is not buffered without end.
    let drops = "gateway_slow_consumer_drops_total{channel=\"telemetry\",plugin=\"test-faults\"}";
    let mut sent = 0u64;
    eventually("frames dropped for the silent clients", || {
        let b = sent;
        sent += 1;
        async move {
            assert_eq!(emit(addr, &flood_batch(b)).await, 200);
            metric(addr, drops).await.filter(|n| *n > 0.0)
        }
    })
    .await;
    // A few more, so every silent client's queue has overflowed.
    for b in sent..sent + 8 {
        assert_eq!(emit(addr, &flood_batch(b)).await, 200);
    }
    let last = (sent + 8) * 32 - 1;
    // Both silent clients are still connected (drop_oldest keeps them), and
    // the others still receive what is published now.
    assert_eq!(connections(addr).await, Some(4.0));
    watch.alive("silent clients").await;
    // Catching up, each silent client finds gaps where frames were dropped.
    assert_eq!(next_json(&mut silent_ws).await["type"], "subscribed");
    assert_dropped_for(&mut silent_ws, last, "the silent /ws client").await;
    assert_dropped_for(&mut silent, last, "the silent /stream client").await;
    drop(silent);
    drop(silent_ws);
    sessions_become(addr, 2.0).await;
    watch.finish().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http_headers_are_cut_by_the_header_timeout() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    // Ten clients stop in the middle of their request headers.
    let mut stalled = Vec::new();
    for i in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = upgrade_request(addr, "/ws");
        s.write_all(&req.as_bytes()[..20 + i * 7]).await.unwrap();
        stalled.push(s);
    }
    // One trickles a header that never ends, a byte every 100 ms: the
    // timeout is for the whole head, not per byte.
    let trickler = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nX-Pad: ").as_bytes())
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        while started.elapsed() < PATIENCE {
            if s.write_all(b"a").await.is_err() {
                return started.elapsed();
            }
            // Has the server hung up?
            let mut b = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(n)) => {
                    let head = String::from_utf8_lossy(&b[..n]).into_owned();
                    assert!(!head.starts_with("HTTP/1.1 101"), "{head}");
                }
                Err(_) => {}
            }
        }
        panic!("a trickled header kept its connection for {PATIENCE:?}");
    });
    // Meanwhile everything else works: new clients, HTTP, data.
    let mut fresh = connect(addr, "/ws").await;
    ping_pong(&mut fresh, 1).await;
    assert_eq!(http(addr, "GET", "/healthz", &[]).await.0, 200);
    watch.alive("stalled headers").await;
    // They are not sessions.
    assert_eq!(connections(addr).await, Some(3.0));
    // The server ends each stalled connection (without upgrading it).
    for mut s in stalled {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
            .await
            .expect("the server hangs up on a stalled header");
        let _ = r;
        assert!(
            !String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 101"),
            "a partial request was upgraded"
        );
    }
    let took = trickler.await.unwrap();
    assert!(took < PATIENCE, "{took:?}");
    watch.alive("header timeouts").await;
    drop(fresh);
    watch.finish().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_connections_dropped_without_closing_leak_nothing() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    for round in 0..4 {
        let tasks = (0..50).map(|i| async move {
            match i % 5 {
                // TCP only.
                0 => drop(TcpStream::connect(addr).await.unwrap()),
                // Upgraded, then gone.
                1 => drop(connect(addr, "/stream").await),
                // Subscribed, then gone without a Close.
                2 => {
                    let mut ws = connect(addr, "/ws").await;
                    send_json(
                        &mut ws,
                        &json!({"type": "subscribe", "channel": "telemetry", "frequency": "1s"}),
                    )
                    .await;
                    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
                    drop(ws);
                }
                // The request sent, the answer never read.
                3 => {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    s.write_all(upgrade_request(addr, "/ws").as_bytes())
                        .await
                        .unwrap();
                    drop(s);
                }
                // A Close sent, its echo never read.
                _ => {
                    let mut c = Raw::connect(addr, "/ws").await;
                    c.send(&frame(true, 0x8, b"\x03\xe8")).await;
                    drop(c);
                }
            }
        });
        futures_util::future::join_all(tasks).await;
        watch.alive(&format!("round {round}")).await;
    }
    sessions_become(addr, 2.0).await;
    metric_becomes(addr, SUBSCRIBERS, 2.0).await;
    let total = metric(addr, "gateway_connections_total").await.unwrap();
    assert!(total >= 2.0 + 4.0 * 30.0, "{total} sessions were opened");
    watch.finish().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_overflow_as_a_number_is_an_invalid_filter_not_a_panic() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    let mut ws = connect(addr, "/ws").await;
    for f in ["1e300", "1.7976931348623157e308", "18446744073709551616"] {
        send_text(
            &mut ws,
            &format!(r#"{{"type":"subscribe","channel":"telemetry","frequency":{f}}}"#),
        )
        .await;
        expect_error(&mut ws, "invalid_filter", f).await;
        ping_pong(&mut ws, 1).await;
    }
    watch.alive("huge frequencies").await;
    drop(ws);
    watch.finish().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_overflow_when_held_does_not_stop_the_channel() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut watch = Watch::new(addr).await;
    for f in [json!(1.8e19), json!("500000000000y")] {
        let mut ws = connect(addr, "/ws").await;
        send_json(
            &mut ws,
            &json!({"type": "subscribe", "channel": "telemetry", "frequency": f}),
        )
        .await;
        let r = next_json(&mut ws).await;
        if r["type"] == "error" {
            // Refusing such a period is as good as honouring it.
            assert_eq!(r["error"], "invalid_filter", "{r}");
            continue;
        }
        assert_eq!(r["type"], "subscribed", "{r}");
        // Two messages: the first passes, the second is held for the period.
        for _ in 0..2 {
            watch.alive(&format!("frequency {f}")).await;
        }
        ping_pong(&mut ws, 1).await;
    }
    watch.finish().await;
    gw.shutdown().await;
}
