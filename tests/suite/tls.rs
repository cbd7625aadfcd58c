//! TLS listeners: `wss://` and `https://` with a self-signed certificate made
//! at test time (rcgen) and trusted by the tests' rustls clients. A client
//! that does not speak TLS, or does not trust the certificate, is turned
//! away and counted, and the listener keeps serving everyone else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream};

/// A gateway with a TLS listener `secure` (admin routes, HTTP routes, the
/// `ticker` and `feed` endpoints) and a plain listener `plain` (`ticker`),
/// and a client configuration that trusts the certificate.
struct Setup {
    dep: Deployment,
    client: Arc<rustls::ClientConfig>,
}

fn setup() -> Setup {
    let dep = Deployment::new();
    let (cert, key) = self_signed_cert();
    dep.write("tls/cert.pem", &cert)
        .write("tls/key.pem", &key)
        .write(
            "gateway.yaml",
            &format!(
                r#"
listeners:
  secure:
    bind: 127.0.0.1:0
    tls: {{cert: tls/cert.pem, key: tls/key.pem}}
  plain: {{bind: 127.0.0.1:0}}
plugins:
  dirs: [{}]
channels: [specs/*.yaml]
admin: {{listener: secure}}
http:
  - path: /api/endpoints
    listener: secure
    body: "{{{{gateway.endpoints}}}}"
  - path: /api/listeners
    listener: secure
    body: "{{{{listeners}}}}"
  - path: /emit/feed
    listener: secure
    method: POST
    command: {{channel: feed, request: {{op: emit, messages: "{{{{request.body}}}}"}}}}
"#,
                target_dir().display()
            ),
        )
        .shipped_schema("ticker.json")
        .write("specs/schemas/any.json", ANY_SCHEMA)
        .write(
            "specs/ticker.yaml",
            "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 50}\nendpoints:\n  - path: /ticker\n    listener: secure\n  - path: /ticker\n    listener: plain\n",
        )
        .write(
            "specs/feed.yaml",
            &bus_spec("feed", "endpoints:\n  - path: /feed\n    listener: secure\n"),
        );
    Setup {
        dep,
        client: client_config(&cert),
    }
}

/// A rustls client configuration trusting exactly the certificates in `pem`.
fn client_config(pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(c.expect("certificate PEM"))
            .expect("trust anchor");
    }
    client_config_with(roots)
}

fn client_config_with(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// `wss://localhost:PORT{path}` over `tcp`.
async fn wss_over(tcp: TcpStream, client: &Arc<rustls::ClientConfig>, path: &str) -> Ws {
    let port = tcp.peer_addr().expect("peer").port();
    let url = format!("wss://localhost:{port}{path}");
    let (ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async_tls_with_config(
            url,
            tcp,
            None,
            Some(Connector::Rustls(client.clone())),
        ),
    )
    .await
    .expect("wss handshake in time")
    .expect("wss handshake");
    assert!(matches!(ws.get_ref(), MaybeTlsStream::Rustls(_)));
    ws
}

async fn wss(addr: SocketAddr, client: &Arc<rustls::ClientConfig>, path: &str) -> Ws {
    wss_over(
        TcpStream::connect(addr).await.expect("connect"),
        client,
        path,
    )
    .await
}

/// An HTTP/1.1 request over TLS (server name 127.0.0.1, ALPN http/1.1);
/// returns (status, headers, body).
async fn https(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut s = tokio::time::timeout(
        PATIENCE,
        tokio_rustls::TlsConnector::from(client.clone())
            .connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    // The gateway ends the TLS session properly (close_notify): a clean end
    // of stream, not an error.
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read to a clean end");
    split_response(&buf)
}

/// One metric sample, read over https.
async fn tls_metric(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    series: &str,
) -> Option<f64> {
    let (_, _, body) = https(addr, client, "GET", "/metrics", "").await;
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

const FAILURES: &str = "gateway_tls_handshake_failures_total";

fn ticker_schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(repo_root().join("channel-specs/schemas/ticker.json"))
        .expect("read ticker.json");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&serde_json::from_str(&text).expect("JSON"))
        .expect("schema compiles")
}

/// Three ticker messages in order, each valid.
async fn three_ticks(ws: &mut Ws, schema: &jsonschema::Validator) {
    let mut last = 0;
    for _ in 0..3 {
        let m = next_json(ws).await;
        assert_schema(schema, "a ticker message", &m);
        let seq = m["seq"].as_u64().expect("seq");
        assert!(seq > last, "seq {seq} after {last}");
        last = seq;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_clients_get_validated_channel_messages() {
    let s = setup();
    let gw = s.dep.start().await;
    let secure = gw.addr("secure").unwrap();
    let plain = gw.addr("plain").unwrap();
    let schema = ticker_schema();

    let mut ws = wss(secure, &s.client, "/ticker").await;
    three_ticks(&mut ws, &schema).await;
    // The plain listener beside it is unchanged.
    let mut plain_ws = connect(plain, "/ticker").await;
    three_ticks(&mut plain_ws, &schema).await;
    assert_eq!(
        tls_metric(secure, &s.client, "gateway_connections").await,
        Some(2.0)
    );

    // Client frames are read over TLS too: a Ping gets its Pong.
    ws.send(Message::Ping(b"over tls"[..].into()))
        .await
        .expect("send ping");
    let until = deadline();
    loop {
        before(until, "the pong");
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => {
                assert_eq!(&p[..], b"over tls");
                break;
            }
            Ok(Some(Ok(Message::Text(_) | Message::Ping(_)))) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }

    // A clean close: the gateway answers the Close and ends the stream
    // without an error.
    ws.close(None).await.expect("send close");
    let until = deadline();
    loop {
        before(until, "the end of the stream");
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("the gateway closes in time")
        {
            None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("the close ended with an error: {e}"),
        }
    }
    eventually("the wss session to end", || async {
        (tls_metric(secure, &s.client, "gateway_connections").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(tls_metric(secure, &s.client, FAILURES).await, Some(0.0));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_admin_and_http_routes() {
    let s = setup();
    let gw = s.dep.start().await;
    let secure = gw.addr("secure").unwrap();
    let plain = gw.addr("plain").unwrap();

    let (status, head, body) = https(secure, &s.client, "GET", "/healthz", "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body = eventually("/readyz to answer 200", || async {
        let (status, _, body) = https(secure, &s.client, "GET", "/readyz", "").await;
        (status == 200).then_some(body)
    })
    .await;
    let ready: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["status"], "ready", "{body}");
    assert_eq!(ready["channels"]["ticker"]["state"], "up", "{body}");
    let (status, _, body) = https(secure, &s.client, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(body.contains(&format!("\n{FAILURES} 0\n")), "{body}");

    // HTTP routes, with wss:// and https:// where the listener serves TLS.
    let (status, _, body) = https(secure, &s.client, "GET", "/api/endpoints", "").await;
    assert_eq!(status, 200, "{body}");
    let endpoints: Value = serde_json::from_str(&body).expect("JSON");
    let mut urls: Vec<&str> = endpoints
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| e["url"].as_str().expect("url"))
        .collect();
    urls.sort();
    let mut want = vec![
        format!("ws://{plain}/ticker"),
        format!("wss://{secure}/ticker"),
        format!("wss://{secure}/feed"),
    ];
    want.sort();
    assert_eq!(urls, want);
    let (status, _, body) = https(secure, &s.client, "GET", "/api/listeners", "").await;
    assert_eq!(status, 200, "{body}");
    let listeners: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(listeners["secure"]["tls"], json!(true));
    assert_eq!(listeners["secure"]["port"], json!(secure.port()));
    assert_eq!(listeners["plain"]["tls"], json!(false));

    // Errors are the same JSON as on plain listeners.
    let (status, _, body) = https(secure, &s.client, "GET", "/nowhere", "").await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        r#"{"error":"not_found","message":"nothing is served at /nowhere"}"#
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_tls_are_turned_away_and_counted() {
    let s = setup();
    let gw = s.dep.start().await;
    let secure = gw.addr("secure").unwrap();
    let schema = ticker_schema();
    let mut before_ws = wss(secure, &s.client, "/ticker").await;
    three_ticks(&mut before_ws, &schema).await;

    // A WebSocket upgrade in plain text: no upgrade, only TLS's refusal.
    let mut tcp = TcpStream::connect(secure).await.expect("connect");
    tcp.write_all(
        format!(
            "GET /ticker HTTP/1.1\r\nHost: {secure}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    // The gateway closes the connection; a reset is as good as a close here.
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut got))
        .await
        .expect("the gateway closes the connection in time");
    assert!(
        !got.starts_with(b"HTTP/"),
        "a plain-text client got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    eventually("the failed handshake to be counted", || async {
        (tls_metric(secure, &s.client, FAILURES).await == Some(1.0)).then_some(())
    })
    .await;

    // A ws:// client fails the same way.
    let url = format!("ws://{secure}/ticker");
    let r = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("the ws:// attempt ends in time");
    assert!(r.is_err(), "a ws:// client was upgraded on a TLS listener");
    eventually("the second failure to be counted", || async {
        (tls_metric(secure, &s.client, FAILURES).await == Some(2.0)).then_some(())
    })
    .await;

    // A TLS client that does not trust the certificate gives up, counted too.
    let distrustful = client_config_with(rustls::RootCertStore::empty());
    let tcp = TcpStream::connect(secure).await.expect("connect");
    let r = tokio_rustls::TlsConnector::from(distrustful)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(r.is_err(), "an untrusted certificate was accepted");
    eventually("the third failure to be counted", || async {
        (tls_metric(secure, &s.client, FAILURES).await == Some(3.0)).then_some(())
    })
    .await;

    // Everyone else is served as before.
    three_ticks(&mut before_ws, &schema).await;
    let mut after_ws = wss(secure, &s.client, "/ticker").await;
    three_ticks(&mut after_ws, &schema).await;
    let (status, _, _) = https(secure, &s.client, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_reader_gets_the_whole_burst() {
    let s = setup();
    let gw = s.dep.start().await;
    let secure = gw.addr("secure").unwrap();
    // A tiny receive buffer: the gateway's writes back up, and large frames
    // go out in many TLS records and partial writes. (That the tail TLS
    // holds back is flushed is pinned down by a unit test in
    // gateway/src/tls.rs, where the timing is under control.)
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = sock.connect(secure).await.expect("connect");
    let mut ws = wss_over(tcp, &s.client, "/feed").await;
    // The handshake completes a little before the subscription is made.
    let feed = "gateway_subscribers{channel=\"feed\",plugin=\"test-faults\"}";
    eventually("the client to be subscribed", || async {
        (tls_metric(secure, &s.client, feed).await == Some(1.0)).then_some(())
    })
    .await;

    // Megabytes, in posts under the route's 1 MiB body limit.
    const N: usize = 100;
    const PER_POST: usize = 50;
    let pad = "x".repeat(16 * 1024);
    for first in (1..=N).step_by(PER_POST) {
        let messages: Vec<Value> = (first..first + PER_POST)
            .map(|n| json!({"n": n, "pad": pad}))
            .collect();
        let body = Value::Array(messages).to_string();
        eventually("the plugin to take the burst", || async {
            let (status, _, _) = https(secure, &s.client, "POST", "/emit/feed", &body).await;
            (status == 200).then_some(())
        })
        .await;
    }
    // Not reading for a moment lets the burst pile up in the gateway; the
    // test only gets weaker, never wrong, if it does not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..=N {
        let m = next_json(&mut ws).await;
        assert_eq!(m["n"], json!(n));
        assert_eq!(m["pad"].as_str().map(str::len), Some(16 * 1024));
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_a_renewed_certificate_for_new_connections() {
    let s = setup();
    let gw = s.dep.start().await;
    let secure = gw.addr("secure").unwrap();
    let schema = ticker_schema();
    let mut before = wss(secure, &s.client, "/ticker").await;
    three_ticks(&mut before, &schema).await;

    let (cert, key) = self_signed_cert();
    s.dep
        .write("tls/cert.pem", &cert)
        .write("tls/key.pem", &key);
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));

    // New connections get the new certificate: trusted by a client that
    // knows it, refused by one that knows only the old one.
    let renewed = client_config(&cert);
    let mut after = wss(secure, &renewed, "/ticker").await;
    three_ticks(&mut after, &schema).await;
    let tcp = TcpStream::connect(secure).await.expect("connect");
    let r = tokio_rustls::TlsConnector::from(s.client.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(r.is_err(), "the old certificate is still served");
    // The connection made before the reload carries on.
    three_ticks(&mut before, &schema).await;
    gw.shutdown().await;
}

/// On a TLS listener behind a TCP load balancer the PROXY protocol header
/// comes first, in plain text, and the TLS handshake after it: the session
/// runs over TLS and its peer is the header's client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_comes_before_the_tls_handshake() {
    let dep = Deployment::new();
    let (cert, key) = self_signed_cert();
    dep.write("tls/cert.pem", &cert)
        .write("tls/key.pem", &key)
        .write(
            "gateway.yaml",
            &format!(
                r#"
listeners:
  secure:
    bind: 127.0.0.1:0
    tls: {{cert: tls/cert.pem, key: tls/key.pem}}
    proxy_protocol: true
    trusted_proxies: [127.0.0.1]
plugins:
  dirs: [{}]
channels: [specs/*.yaml]
protocols:
  p:
    replies:
      status: {{type: me, peer: "{{{{client.peer}}}}"}}
endpoints:
  - path: /feed
    protocol: p
    channels: [feed]
"#,
                target_dir().display()
            ),
        )
        .write("specs/schemas/any.json", ANY_SCHEMA)
        .write("specs/feed.yaml", &bus_spec("feed", ""));
    let gw = dep.start().await;
    let secure = gw.addr("secure").unwrap();
    let client = client_config(&cert);

    let mut tcp = TcpStream::connect(secure).await.expect("connect");
    tcp.write_all(b"PROXY TCP6 2001:db8::7 2001:db8::1 50123 443\r\n")
        .await
        .expect("write the header");
    let mut ws = wss_over(tcp, &client, "/feed").await;
    ws.send(Message::text(r#"{"type":"status"}"#))
        .await
        .expect("send");
    let reply = next_json(&mut ws).await;
    assert_eq!(reply, json!({"type": "me", "peer": "[2001:db8::7]:50123"}));

    // Without the header the TLS client hello is not a header: closed, and
    // counted as such (not as a failed TLS handshake).
    let tcp = TcpStream::connect(secure).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(client.clone());
    let r = tokio::time::timeout(
        PATIENCE,
        tls.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("the gateway closes in time");
    assert!(r.is_err(), "a TLS session without the header");
    let counted = |name: &'static str| {
        let client = client.clone();
        async move {
            let mut tcp = TcpStream::connect(secure).await.expect("connect");
            tcp.write_all(b"PROXY UNKNOWN\r\n").await.expect("header");
            let tls = tokio_rustls::TlsConnector::from(client);
            let mut s = tls
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .expect("TLS after an UNKNOWN header");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            let (_, _, body) = split_response(&buf);
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        }
    };
    eventually("the refusal to be counted", || async {
        (counted("gateway_proxy_protocol_refused_total").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(counted(FAILURES).await, Some(0.0));
    gw.shutdown().await;
}
