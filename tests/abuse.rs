//! Clients that misbehave on purpose cannot make the gateway hold unbounded
//! memory or keep a session past its close deadline. (Own test binary: the
//! memory check reads this process's RSS.)

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// A masked client frame with an empty payload.
fn empty_ping() -> [u8; 6] {
    [0x89, 0x80, 1, 2, 3, 4]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_from_a_client_that_never_reads_stays_bounded() {
    let dep = Deployment::new();
    dep.gateway_yaml("").shipped_schema("ticker.json").write(
        "specs/t.yaml",
        "channel: t\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 0.01}\nendpoints:\n  - path: /t\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let ws = connect_stalling(addr, "/t").await;
    let mut tcp = match ws.into_inner() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s,
        _ => unreachable!(),
    };
    let before = rss_kib();
    // 30 MB of empty pings (5 million), never reading a single pong.
    let chunk: Vec<u8> = std::iter::repeat_n(empty_ping(), 100_000)
        .flatten()
        .collect();
    for _ in 0..50 {
        tokio::time::timeout(PATIENCE, tcp.write_all(&chunk))
            .await
            .expect("the gateway keeps reading")
            .unwrap();
    }
    let grown = rss_kib().saturating_sub(before);
    // Answering every ping would hold ~64 bytes per ping: over 300 MiB.
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_client_stopped_reading_still_ends_after_its_close() {
    let dep = Deployment::new();
    dep.gateway_yaml("limits:\n  session_queue: 8\n").write("specs/schemas/flood.json", SEQ_SCHEMA).write(
        "specs/flood.yaml",
        "channel: flood\nschema: schemas/flood.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 2000, pad: 30000}\nendpoints:\n  - path: /flood\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let ws = connect_stalling(addr, "/flood").await;
    let mut tcp = match ws.into_inner() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s,
        _ => unreachable!(),
    };
    // Wait until the gateway cannot write to this client any more.
    eventually("frames dropped for the stalled client", || async {
        metric(
            addr,
            "gateway_slow_consumer_drops_total{channel=\"flood\",plugin=\"ticker\"}",
        )
        .await
        .filter(|v| *v > 0.0)
    })
    .await;
    // The client says goodbye but never reads the echo: the session must
    // still end (within its 2 s close deadline), freeing its connection.
    tcp.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .await
        .unwrap();
    eventually("the session to end", || async {
        (metric(addr, "gateway_connections").await == Some(0.0)).then_some(())
    })
    .await;
    drop(tcp);
    gw.shutdown().await;
}
