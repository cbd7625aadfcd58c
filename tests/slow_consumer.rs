//! The per-channel policy when a subscriber's queue is full.

mod common;

use common::*;

fn deployment(on_full: &str) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("limits:\n  session_queue: 8\n")
        // No pattern on the large pad: a debug build would spend its time in the regex.
        .write("specs/schemas/flood.json", SEQ_SCHEMA)
        .write(
            "specs/flood.yaml",
            &format!(
                "channel: flood\nschema: schemas/flood.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {{rate: 5000, pad: 30000}}\nqueue:\n  on_full: {on_full}\nendpoints:\n  - path: /flood\n"
            ),
        );
    dep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_skips_frames_for_a_stalled_client_and_keeps_it_connected() {
    let dep = deployment("drop_oldest");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut stalled = connect_stalling(addr, "/flood").await;
    // Read nothing until the gateway has had to drop frames for this client.
    let drops = "gateway_slow_consumer_drops_total{channel=\"flood\",plugin=\"ticker\"}";
    eventually("frames dropped for the stalled client", || async {
        metric(addr, drops).await.filter(|v| *v > 0.0)
    })
    .await;
    // Catching up: the stream resumes (a gap shows where frames were
    // dropped) and the connection stays open.
    let mut prev = next_json(&mut stalled).await["seq"].as_i64().unwrap();
    let mut gap = false;
    for _ in 0..2000 {
        let s = next_json(&mut stalled).await["seq"].as_i64().unwrap();
        assert!(s > prev, "order is kept even when dropping");
        gap |= s > prev + 1;
        prev = s;
        if gap {
            break;
        }
    }
    assert!(gap, "dropped frames leave a gap in the sequence");
    assert_eq!(
        metric(
            addr,
            "gateway_slow_consumer_closes_total{channel=\"flood\",plugin=\"ticker\"}"
        )
        .await,
        Some(0.0)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_policy_disconnects_a_stalled_client_with_1008() {
    let dep = deployment("close");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut stalled = connect_stalling(addr, "/flood").await;
    let closes = "gateway_slow_consumer_closes_total{channel=\"flood\",plugin=\"ticker\"}";
    eventually("the stalled client closed by policy", || async {
        metric(addr, closes).await.filter(|v| *v >= 1.0)
    })
    .await;
    // Whatever was already in flight arrives first, then Close 1008.
    assert_eq!(close_code(&mut stalled).await, Some(1008));
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
    let mut tcp = connect_stalling_raw(addr, "/flood").await;
    use tokio::io::AsyncWriteExt;
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
    metric_becomes(addr, "gateway_connections", 0.0).await;
    drop(tcp);
    gw.shutdown().await;
}
