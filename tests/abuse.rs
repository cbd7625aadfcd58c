//! A client that misbehaves on purpose cannot make the gateway hold unbounded
//! memory. This test is alone in its binary because it reads the process's
//! RSS: nothing else may allocate meanwhile.

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
    let mut tcp = connect_stalling_raw(addr, "/t").await;
    let before = rss_kib();
    // 30 MB of empty pings (5 million), never reading a single pong.
    let chunk: Vec<u8> = std::iter::repeat_n(empty_ping(), 100_000)
        .flatten()
        .collect();
    let mut written = 0;
    for _ in 0..50 {
        match tokio::time::timeout(std::time::Duration::from_secs(2), tcp.write_all(&chunk)).await {
            Ok(r) => {
                r.unwrap();
                written += chunk.len();
            }
            // The session stopped reading because its pongs cannot be
            // written: backpressure on a client that reads nothing, as
            // designed. The flood ends here.
            Err(_) => break,
        }
    }
    assert!(
        written >= 1 << 20,
        "only {written} bytes of pings were accepted"
    );
    let grown = rss_kib().saturating_sub(before);
    // Answering every ping would hold ~64 bytes per ping: over 300 MiB.
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    gw.shutdown().await;
}
