//! The WebSocket protocol at the byte level: control frames, the close
//! handshake, fragments, and the close codes for bad client frames.

use std::net::SocketAddr;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn deployment() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("limits:\n  max_message_size: 1KiB\n")
        .shipped_schema("ticker.json")
        .write(
            "specs/ticker.yaml",
            "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 0.01}\nendpoints:\n  - path: /quiet\n",
        );
    dep
}

/// A masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    assert!(payload.len() < 65536);
    if payload.len() < 126 {
        v.push(0x80 | payload.len() as u8);
    } else {
        v.push(0x80 | 126);
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    v
}

/// Handshake by hand; `extra` is written in the same packet right after it.
async fn raw(addr: SocketAddr, path: &str, extra: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(extra);
    s.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455 sample accept key: {head}"
    );
    (s, buf[end..].to_vec())
}

/// Read the next server frame that is not a data (text) frame: (opcode, payload).
async fn server_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    loop {
        match any_frame(s, buf).await {
            Some((0x1, _)) => continue,
            other => return other,
        }
    }
}

/// Read one server frame (opcode, payload).
async fn any_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    loop {
        if buf.len() >= 2 {
            assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
            let (len, off) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                126 => (usize::MAX, 0),
                127 => panic!("unexpected huge frame"),
                l => (l as usize, 2),
            };
            if len != usize::MAX && buf.len() >= off + len {
                let op = buf[0] & 0x0f;
                assert_eq!(buf[0] & 0x80, 0x80, "server frames are final");
                let payload = buf[off..off + len].to_vec();
                buf.drain(..off + len);
                return Some((op, payload));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn expect_close(s: &mut TcpStream, buf: &mut Vec<u8>) -> u16 {
    let (op, p) = server_frame(s, buf).await.expect("a close frame");
    assert_eq!(op, 0x8, "expected Close, got opcode {op}");
    u16::from_be_bytes([p[0], p[1]])
}

/// The next message that is not data (the ticker's messages may come first).
async fn next_control(ws: &mut Ws) -> Message {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_with_the_same_payload() {
    let dep = deployment();
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/quiet").await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = next_control(&mut ws).await;
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_echoed_and_the_connection_ends() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/quiet").await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let reply = next_control(&mut ws).await;
    match reply {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected the Close echo, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .is_none_or(|r| r.is_err())
    );
    metric_becomes(addr, "gateway_connections", 0.0).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_closes_with_1009() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let (mut s, mut buf) = raw(addr, "/quiet", &[]).await;
    s.write_all(&client_frame(true, 0x1, &[b'a'; 1025]))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut s, &mut buf).await, 1009);
    assert_eq!(
        metric(addr, "gateway_closed_message_too_big_total").await,
        Some(1.0)
    );
    // A fragmented message is limited as a whole.
    let (mut s, mut buf) = raw(addr, "/quiet", &[]).await;
    let mut frames = client_frame(false, 0x1, &[b'a'; 600]);
    frames.extend(client_frame(true, 0x0, &[b'a'; 600]));
    s.write_all(&frames).await.unwrap();
    assert_eq!(expect_close(&mut s, &mut buf).await, 1009);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002_and_bad_utf8_with_1007() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // An unmasked client frame.
    let (mut s, mut buf) = raw(addr, "/quiet", &[]).await;
    s.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(expect_close(&mut s, &mut buf).await, 1002);
    // An unknown opcode.
    let (mut s, mut buf) = raw(addr, "/quiet", &[]).await;
    s.write_all(&client_frame(true, 0x3, b"?")).await.unwrap();
    assert_eq!(expect_close(&mut s, &mut buf).await, 1002);
    // Text that is not UTF-8.
    let (mut s, mut buf) = raw(addr, "/quiet", &[]).await;
    s.write_all(&client_frame(true, 0x1, &[0xc3, 0x28]))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut s, &mut buf).await, 1007);
    // The gateway is unaffected.
    let (status, _, _) = http(addr, "GET", "/healthz", &[]).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_and_bytes_sent_with_the_handshake_are_read() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // A fragmented text message (ignored by a stream endpoint), with a ping
    // between its fragments, all sent in the same packet as the handshake.
    let mut early = client_frame(false, 0x1, b"{\"type\":");
    early.extend(client_frame(true, 0x9, b"mid"));
    early.extend(client_frame(true, 0x0, b"\"ping\"}"));
    early.extend(client_frame(true, 0x9, b"end"));
    let (mut s, mut buf) = raw(addr, "/quiet", &early).await;
    // Both pings arrived in one read: only the newest is answered (RFC 6455
    // §5.5.3 allows it, and it bounds what a ping flood can cost).
    assert_eq!(
        server_frame(&mut s, &mut buf).await,
        Some((0xA, b"end".to_vec()))
    );
    // Then a clean close.
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.extend_from_slice(b"done");
    s.write_all(&client_frame(true, 0x8, &p)).await.unwrap();
    assert_eq!(expect_close(&mut s, &mut buf).await, 1000);
    assert_eq!(
        server_frame(&mut s, &mut buf).await,
        None,
        "the server closes the TCP connection"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abrupt_disconnect_ends_the_session() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    for _ in 0..5 {
        let (mut s, _) = raw(addr, "/quiet", &[]).await;
        // Half a frame, then gone.
        s.write_all(&client_frame(true, 0x1, b"hello")[..4])
            .await
            .unwrap();
        drop(s);
    }
    // A session counts itself when it starts, a little after its 101:
    // all five must have started before "none open" means anything.
    metric_becomes(addr, "gateway_connections_total", 5.0).await;
    metric_becomes(addr, "gateway_connections", 0.0).await;
    metric_becomes(
        addr,
        "gateway_subscribers{channel=\"ticker\",plugin=\"ticker\"}",
        0.0,
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_bad_frame_still_gets_its_close_frame_not_a_reset() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    for _ in 0..3 {
        let (mut s, mut buf) = raw(addr, "/quiet", &[]).await;
        // 200 KB against a 1 KiB limit: refused from the header; the rest is
        // read and dropped so the client receives the Close.
        let frame = client_frame(true, 0x2, &vec![0u8; 60_000]);
        for _ in 0..3 {
            s.write_all(&frame).await.unwrap();
        }
        assert_eq!(expect_close(&mut s, &mut buf).await, 1009);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_a_client_may_not_send_are_answered_with_1002() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    for (sent, echoed) in [
        (1016u16, 1002u16),
        (1005, 1002),
        (2999, 1002),
        (3000, 3000),
        (4999, 4999),
        (1001, 1001),
    ] {
        let (mut s, mut buf) = raw(addr, "/quiet", &[]).await;
        s.write_all(&client_frame(true, 0x8, &sent.to_be_bytes()))
            .await
            .unwrap();
        assert_eq!(
            expect_close(&mut s, &mut buf).await,
            echoed,
            "client sent {sent}"
        );
    }
    gw.shutdown().await;
}
