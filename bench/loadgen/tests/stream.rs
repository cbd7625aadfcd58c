//! End-to-end: the generator's client fleet against tiny in-process servers
//! built on tokio-tungstenite (an independent WebSocket implementation that
//! rejects unmasked client frames).
//!
//! No timing luck: the servers start sending only when the generator says
//! its measurement window is open (`Config::on_measure_start`), and end by
//! closing every connection, which ends the window early (the configured
//! duration is only an upper bound). Every wait is bounded.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use loadgen::{Config, Mode, run};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const CLIENTS: usize = 3;
const LAST_SEQ: u64 = 300;
const SKIPPED: u64 = 150;
const SUBSCRIBE: &str = r#"{"subscribe":"bench"}"#;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn msg(seq: u64) -> String {
    format!(
        r#"{{"seq":{seq},"ts":{},"pad":"{}"}}"#,
        now_ns(),
        "x".repeat(100)
    )
}

async fn accept_clients(
    listener: &TcpListener,
    n: usize,
) -> Vec<WebSocketStream<tokio::net::TcpStream>> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let (tcp, _) = listener.accept().await.unwrap();
        clients.push(tokio_tungstenite::accept_async(tcp).await.unwrap());
    }
    clients
}

fn config(url: String, mode: Mode, start: Arc<Notify>) -> Config {
    Config {
        url,
        clients: CLIENTS,
        ramp: 0.0,
        // Upper bound only: the servers close the connections when done.
        duration: Duration::from_secs(30),
        warmup: Duration::ZERO,
        mode,
        progress: false,
        connect_timeout: Duration::from_secs(5),
        on_measure_start: Some(start),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_counts_messages_gaps_and_latency() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/bench", listener.local_addr().unwrap());
    let start = Arc::new(Notify::new());

    let server = {
        let start = start.clone();
        tokio::spawn(async move {
            let mut clients = accept_clients(&listener, CLIENTS).await;
            // Each client sends the --send text first.
            for ws in &mut clients {
                let first = ws.next().await.unwrap().unwrap();
                assert_eq!(first, Message::Text(SUBSCRIBE.into()));
            }
            start.notified().await;
            for seq in 1..=LAST_SEQ {
                if seq == SKIPPED {
                    continue;
                }
                if seq == 100 {
                    for ws in &mut clients {
                        ws.send(Message::Ping(b"are you there".to_vec().into()))
                            .await
                            .unwrap();
                    }
                }
                let m = msg(seq);
                for ws in &mut clients {
                    ws.send(Message::Text(m.clone().into())).await.unwrap();
                }
            }
            // Every client answered the ping with a (masked) pong.
            for ws in &mut clients {
                match ws.next().await.unwrap().unwrap() {
                    Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
                    other => panic!("unexpected client message {other:?}"),
                }
            }
            for ws in &mut clients {
                ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "done".into(),
                }))
                .await
                .unwrap();
            }
            // The client echoes the close.
            for ws in &mut clients {
                while let Some(Ok(m)) = ws.next().await {
                    assert!(matches!(m, Message::Close(_)), "{m:?}");
                }
            }
        })
    };

    let mut cfg = config(url.clone(), Mode::Stream, start);
    cfg.send = Some(SUBSCRIBE.into());
    let report = tokio::time::timeout(Duration::from_secs(20), run(cfg))
        .await
        .expect("run finished in time")
        .expect("run set up");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server finished")
        .expect("server assertions");

    let per_client = LAST_SEQ - 1;
    assert_eq!(report.connected, CLIENTS);
    assert_eq!(report.connect_failures, 0);
    assert_eq!(report.messages, per_client * CLIENTS as u64);
    assert_eq!(report.gaps, Some(CLIENTS as u64), "one gap per client");
    assert_eq!(report.clients_with_gaps, Some(CLIENTS));
    assert_eq!(report.dups, Some(0));
    assert_eq!(report.unparsed, Some(0));
    assert_eq!(report.silent_clients, Some(0));
    let pc = report.per_client.clone().unwrap();
    assert_eq!((pc.min, pc.max), (per_client, per_client));
    let lat = report
        .latency_us
        .clone()
        .flatten()
        .expect("latency recorded");
    assert_eq!(lat.samples, per_client * CLIENTS as u64);
    assert!(lat.p50 <= lat.p99 && lat.p99 <= lat.max);
    assert!(lat.max < 10_000_000, "latency is loopback-small: {lat:?}");
    // The servers closed every connection: the window ended early.
    assert_eq!(report.disconnects, CLIENTS);
    assert_eq!(
        report.disconnect_reasons.get("close 1000"),
        Some(&(CLIENTS as u64))
    );
    assert!(report.duration_secs.unwrap() < 30.0);

    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["mode"], "stream");
    assert_eq!(json["gaps"], 3);
    assert!(json["latency_us"]["p99"].is_u64());
    assert!(json["loadgen_cpu_secs"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mode_parses_a_byte_stream_split_across_frames() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let start = Arc::new(Notify::new());

    let server = {
        let start = start.clone();
        tokio::spawn(async move {
            let mut clients = accept_clients(&listener, CLIENTS).await;
            for ws in &mut clients {
                ws.send(Message::Binary(
                    b"INFO {\"server_id\":\"fake\"}\r\n".to_vec().into(),
                ))
                .await
                .unwrap();
                // CONNECT, SUB and PING, possibly over several frames.
                let mut got = Vec::new();
                while !got.ends_with(b"PING\r\n") {
                    match ws.next().await.unwrap().unwrap() {
                        Message::Binary(b) => got.extend_from_slice(&b),
                        Message::Text(t) => got.extend_from_slice(t.as_bytes()),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                let got = String::from_utf8(got).unwrap();
                assert!(got.starts_with("CONNECT {"), "{got}");
                assert!(got.contains("\r\nSUB bench 1\r\n"), "{got}");
                ws.send(Message::Binary(b"PONG\r\n".to_vec().into()))
                    .await
                    .unwrap();
            }
            start.notified().await;
            // One byte stream: MSGs with a gap, a server PING in the middle,
            // cut into 37-byte frames so lines and payloads straddle frames.
            let mut stream = Vec::new();
            for seq in 1..=LAST_SEQ {
                if seq == SKIPPED {
                    continue;
                }
                if seq == 10 {
                    stream.extend_from_slice(b"PING\r\n");
                }
                let m = msg(seq);
                stream.extend_from_slice(format!("MSG bench 1 {}\r\n{m}\r\n", m.len()).as_bytes());
            }
            for ws in &mut clients {
                for chunk in stream.chunks(37) {
                    ws.send(Message::Binary(chunk.to_vec().into()))
                        .await
                        .unwrap();
                }
            }
            // The server's PING is answered with PONG (in a binary frame).
            for ws in &mut clients {
                match ws.next().await.unwrap().unwrap() {
                    Message::Binary(b) => assert_eq!(&b[..], b"PONG\r\n"),
                    other => panic!("unexpected {other:?}"),
                }
            }
            for ws in &mut clients {
                ws.close(None).await.unwrap();
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
    };

    let report = tokio::time::timeout(Duration::from_secs(20), run(config(url, Mode::Nats, start)))
        .await
        .expect("run finished in time")
        .expect("run set up");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server finished")
        .expect("server assertions");

    assert_eq!(report.connected, CLIENTS);
    assert_eq!(report.messages, (LAST_SEQ - 1) * CLIENTS as u64);
    assert_eq!(report.gaps, Some(CLIENTS as u64));
    assert_eq!(report.nats_errors, Some(0));
    let lat = report
        .latency_us
        .clone()
        .flatten()
        .expect("latency recorded");
    assert_eq!(lat.samples, (LAST_SEQ - 1) * CLIENTS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_reported_not_fatal() {
    // Bind then drop: nothing listens on the port any more.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = config(
        format!("ws://127.0.0.1:{port}/"),
        Mode::Idle,
        Arc::new(Notify::new()),
    );
    cfg.hold = Duration::from_secs(30);
    let report = tokio::time::timeout(Duration::from_secs(20), run(cfg))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.connected, 0);
    assert_eq!(report.connect_failures, CLIENTS);
    assert_eq!(report.connect_errors.values().sum::<u64>(), CLIENTS as u64);
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert!(json.get("latency_us").is_none(), "idle mode has no latency");
}

// tungstenite's handshake callback returns its (large) error response by value.
#[allow(clippy::result_large_err)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_clients_over_channels_with_their_own_seq() {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    // Two "channels", /bench/0 and /bench/1, each with its own sequence:
    // channel 0 counts 1..=200, channel 1 counts 1001..=1200. A client that
    // mixed them up, or checking that compared across channels, would report
    // gaps or duplicates.
    const SPREAD: usize = 2;
    const CLIENTS: usize = 4;
    const N: u64 = 200;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/bench/{{n}}", listener.local_addr().unwrap());
    let start = Arc::new(Notify::new());

    let server = {
        let start = start.clone();
        tokio::spawn(async move {
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut path = String::new();
                let ws =
                    tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
                        path = req.uri().path().to_string();
                        Ok(resp)
                    })
                    .await
                    .unwrap();
                let channel: u64 = path
                    .strip_prefix("/bench/")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected path {path}"));
                clients.push((channel, ws));
            }
            let mut per_channel = [0; SPREAD];
            for (ch, _) in &clients {
                per_channel[*ch as usize] += 1;
            }
            assert_eq!(
                per_channel,
                [CLIENTS / SPREAD; SPREAD],
                "clients spread evenly"
            );
            start.notified().await;
            for i in 1..=N {
                for (ch, ws) in &mut clients {
                    let seq = *ch * 1000 + i;
                    ws.send(Message::Text(msg(seq).into())).await.unwrap();
                }
            }
            for (_, ws) in &mut clients {
                ws.close(None).await.unwrap();
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
    };

    let mut cfg = config(url, Mode::Stream, start);
    cfg.clients = CLIENTS;
    cfg.spread = SPREAD;
    let report = tokio::time::timeout(Duration::from_secs(20), run(cfg))
        .await
        .expect("run finished in time")
        .expect("run set up");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server finished")
        .expect("server assertions");

    assert_eq!(report.spread, SPREAD);
    assert_eq!(report.connected, CLIENTS);
    assert_eq!(report.messages, N * CLIENTS as u64);
    assert_eq!(report.gaps, Some(0));
    assert_eq!(report.dups, Some(0));
    assert_eq!(report.silent_clients, Some(0));
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["spread"], SPREAD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_connect_first_never_read_and_are_reported() {
    const STALLED: usize = 2;
    const N: u64 = 100;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/bench", listener.local_addr().unwrap());
    let start = Arc::new(Notify::new());

    let server = {
        let start = start.clone();
        tokio::spawn(async move {
            // The stalled clients connect before the measured ones.
            let mut stalled = accept_clients(&listener, STALLED).await;
            let mut clients = accept_clients(&listener, CLIENTS).await;
            for ws in stalled.iter_mut().chain(&mut clients) {
                let first = ws.next().await.unwrap().unwrap();
                assert_eq!(first, Message::Text(SUBSCRIBE.into()));
            }
            start.notified().await;
            // A few messages for the stalled ones (their small buffers take
            // them); the first is then closed as a server's policy would.
            for ws in &mut stalled {
                for seq in 1..=5 {
                    ws.send(Message::Text(msg(seq).into())).await.unwrap();
                }
            }
            stalled[0]
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Policy,
                    reason: "slow consumer".into(),
                })))
                .await
                .unwrap();
            for seq in 1..=N {
                let m = msg(seq);
                for ws in &mut clients {
                    ws.send(Message::Text(m.clone().into())).await.unwrap();
                }
            }
            for ws in &mut clients {
                ws.close(None).await.unwrap();
                while let Some(Ok(_)) = ws.next().await {}
            }
            // After the run the stalled clients read: the closed one answers
            // the Close, the open one closes with 1000.
            for ws in &mut stalled {
                match ws.next().await {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {}
                    Some(Ok(other)) => panic!("unexpected {other:?}"),
                }
            }
        })
    };

    let mut cfg = config(url, Mode::Stream, start);
    cfg.send = Some(SUBSCRIBE.into());
    cfg.stalled = STALLED;
    let report = tokio::time::timeout(Duration::from_secs(20), run(cfg))
        .await
        .expect("run finished in time")
        .expect("run set up");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server finished")
        .expect("server assertions");

    // The stalled clients are not among the measured ones.
    assert_eq!(report.connected, CLIENTS);
    assert_eq!(report.messages, N * CLIENTS as u64);
    assert_eq!(report.gaps, Some(0));
    let stalled = report.stalled.clone().expect("stalled report");
    assert_eq!(
        (
            stalled.clients,
            stalled.connected,
            stalled.closed_by_server,
            stalled.open_at_end
        ),
        (STALLED, STALLED, 1, 1)
    );
    assert_eq!(stalled.close_reasons.get("close 1008"), Some(&1));
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["stalled"]["closed_by_server"], 1);
}

#[tokio::test]
async fn stalled_clients_need_a_plain_websocket_mode() {
    let cfg = Config {
        mode: Mode::Nats,
        stalled: 1,
        progress: false,
        ..Config::default()
    };
    let err = run(cfg).await.unwrap_err();
    assert!(err.0.contains("--stalled"), "{err}");
}

#[tokio::test]
async fn spread_without_placeholder_is_a_setup_error() {
    let cfg = Config {
        url: "ws://127.0.0.1:9/bench".into(),
        spread: 3,
        progress: false,
        ..Config::default()
    };
    let err = run(cfg).await.unwrap_err();
    assert!(err.0.contains("{n}"), "{err}");
}

/// `--proxy-protocol`: each connection begins with a PROXY protocol v1
/// header naming the client's own address and port and the server's, then
/// the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_name_each_client() {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = config(format!("ws://{addr}/"), Mode::Idle, Arc::new(Notify::new()));
    cfg.proxy_protocol = true;
    cfg.sources = 1;
    cfg.hold = Duration::from_millis(200);
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..CLIENTS {
            let (mut tcp, peer) = listener.accept().await.unwrap();
            // Byte by byte, so nothing of the handshake is taken with it.
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                line.push(tcp.read_u8().await.unwrap());
            }
            assert_eq!(
                String::from_utf8(line).unwrap(),
                format!(
                    "PROXY TCP4 {} {} {} {}\r\n",
                    peer.ip(),
                    addr.ip(),
                    peer.port(),
                    addr.port()
                )
            );
            held.push(tokio_tungstenite::accept_async(tcp).await.unwrap());
        }
        held
    });
    let report = tokio::time::timeout(Duration::from_secs(20), run(cfg))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((report.connected, report.connect_failures), (CLIENTS, 0));
    assert_eq!(server.await.unwrap().len(), CLIENTS);
}
