//! examples/ledger-events, as a client written from
//! /work/shared/reference-apis.md §4 sees it: the API root on one listener
//! names the stream URL on the other; the stream sends
//! `{transaction_id, asset_id, height}` per committed transaction, a block's
//! transactions together, ignores whatever the client sends and answers
//! WebSocket Pings.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const EXAMPLE: &str = "ledger-events";
const LISTENERS: [&str; 2] = ["api", "stream"];
const STREAM_PATH: &str = "/api/v1/streams/valid_transactions";

/// GET `path` with this Host header; (status, JSON body).
async fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_root_names_the_stream_on_the_other_port() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let api = gw.addr("api").unwrap();
    let stream = gw.addr("stream").unwrap();
    let schema = example_schema(EXAMPLE, "schemas/api-v1.json");
    let root_schema = example_schema(EXAMPLE, "schemas/root.json");

    let (status, v) = get_with_host(api, "/api/v1/", &api.to_string()).await;
    assert_eq!(status, 200);
    assert_schema(&schema, "GET /api/v1/", &v);
    assert_eq!(
        v["streams"],
        format!("ws://127.0.0.1:{}{STREAM_PATH}", stream.port())
    );
    // The host is the one the client used; the port is the stream listener's.
    let (_, v) = get_with_host(api, "/api/v1/", "ledger.example:9984").await;
    assert_eq!(
        v["streams"],
        format!("ws://ledger.example:{}{STREAM_PATH}", stream.port())
    );
    let (status, v) = get_with_host(api, "/", "ledger.example").await;
    assert_eq!(status, 200);
    assert_schema(&root_schema, "GET /", &v);
    assert_eq!(
        v["api"]["v1"]["streams"],
        format!("ws://ledger.example:{}{STREAM_PATH}", stream.port())
    );

    // The stream is on its own port only; unknown paths are JSON 404s.
    let (status, v) = get_with_host(api, "/api/v1/nothing", "x").await;
    assert_eq!((status, v["error"].as_str()), (404, Some("not_found")));
    assert_eq!(
        try_connect(api, STREAM_PATH, &[]).await.err().map(|e| e.0),
        Some(404)
    );

    // A client follows the discovered URL as it is.
    let url = v_streams(api).await;
    let path = url
        .strip_prefix(&format!("ws://127.0.0.1:{}", stream.port()))
        .expect("the stream listener's address");
    let mut ws = connect(stream, path).await;
    let m = next_json(&mut ws).await;
    assert!(m["transaction_id"].is_string(), "{m}");
}

async fn v_streams(api: SocketAddr) -> String {
    let (_, _, v) = http(api, "GET", "/api/v1/", &[]).await;
    let v: Value = serde_json::from_str(&v).unwrap();
    v["streams"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transactions_block_by_block_and_client_text_ignored() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let stream = gw.addr("stream").unwrap();
    let schema = example_schema(EXAMPLE, "schemas/valid-transaction.json");
    let mut ws = connect(stream, STREAM_PATH).await;

    // Anything the client sends is ignored: never an error, never a close.
    send_text(&mut ws, "hello").await;
    send_json(&mut ws, &json!({"type": "subscribe", "channel": "blocks"})).await;
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .expect("send binary");

    let mut heights: Vec<u64> = Vec::new();
    let mut done: BTreeSet<u64> = BTreeSet::new();
    let mut pongs = 0;
    // Five block boundaries (the first block may be partial), and the
    // Pong to a protocol Ping sent along the way.
    let until = deadline();
    while done.len() < 5 || pongs == 0 {
        before(
            until,
            &format!("5 blocks and a Pong; blocks {done:?}, pongs {pongs}"),
        );
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .expect("the stream stays open")
            .expect("no read error");
        let m: Value = match msg {
            Message::Text(t) => serde_json::from_str(&t).expect("JSON"),
            Message::Pong(p) => {
                assert_eq!(&p[..], b"keep-alive", "the Pong echoes the Ping");
                pongs += 1;
                continue;
            }
            Message::Ping(_) => continue,
            other => panic!("unexpected {other:?}"),
        };
        assert_schema(&schema, "a valid_transactions event", &m);
        let keys: BTreeSet<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["transaction_id", "asset_id", "height"])
        );
        let h = m["height"].as_u64().unwrap();
        if let Some(&last) = heights.last() {
            if h != last {
                assert_eq!(h, last + 1, "heights rise one block at a time");
                assert!(done.insert(last), "block {last} arrived in pieces");
                // Noise between blocks, and a protocol Ping.
                send_json(&mut ws, &json!({"type": "ping"})).await;
                ws.send(Message::Ping(b"keep-alive".to_vec().into()))
                    .await
                    .expect("send ping");
            }
            assert!(!done.contains(&h), "block {h} arrived in pieces");
        }
        heights.push(h);
    }
    assert!(heights.len() >= 5);
}
