//! The per-channel policy when a subscriber's queue is full.

use crate::common::*;

/// A `flood` channel from the ticker with `config` (a YAML flow mapping),
/// under queue policy `on_full`, with `gateway` added to gateway.yaml.
fn flood(gateway: &str, config: &str, on_full: &str) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(gateway)
        // No pattern on the large pad: a debug build would spend its time in the regex.
        .write("specs/schemas/flood.json", SEQ_SCHEMA)
        .write(
            "specs/flood.yaml",
            &format!(
                "channel: flood\nschema: schemas/flood.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {config}\nqueue:\n  on_full: {on_full}\nendpoints:\n  - path: /flood\n"
            ),
        );
    dep
}

fn deployment(on_full: &str) -> Deployment {
    flood(
        "limits:\n  session_queue: 8\n",
        "{rate: 5000, pad: 30000}",
        on_full,
    )
}

/// A client of /flood that reads nothing until the gateway has had to drop
/// frames for it.
async fn stalled_until_drops(addr: std::net::SocketAddr) -> Ws {
    let stalled = connect_stalling(addr, "/flood").await;
    let drops = "gateway_slow_consumer_drops_total{channel=\"flood\",plugin=\"ticker\"}";
    eventually("frames dropped for the stalled client", || async {
        metric(addr, drops).await.filter(|v| *v > 0.0)
    })
    .await;
    stalled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_skips_frames_for_a_stalled_client_and_keeps_it_connected() {
    let dep = deployment("drop_oldest");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut stalled = stalled_until_drops(addr).await;
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

/// A client that catches up after a full writer's write waited gets the
/// rest of the stream. A frame queued while a full writer waited (with
/// `write_batch: 1`, any write that waits) used to leave the session asleep
/// once that write was done: the queue was not empty, so nothing woke it
/// again (with pings off, never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_catching_up_after_a_full_writer_waited_gets_the_rest() {
    let dep = flood(
        "limits:\n  session_queue: 1\n  write_batch: 1\n  ping_interval: off\n",
        "{rate: 500, pad: 30000}",
        "drop_oldest",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut stalled = stalled_until_drops(addr).await;
    let mut prev = 0;
    for _ in 0..300 {
        let s = next_json(&mut stalled).await["seq"].as_i64().unwrap();
        assert!(s > prev, "order is kept");
        prev = s;
    }
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

/// A channel whose every message is larger than the kernel can ever buffer
/// towards a client (the largest send buffer, plus 1 MiB for the client's
/// receive buffer): once a session takes one for a client that does not
/// read, its write never ends. A queue of one; no ping due for minutes.
fn unwritable_deployment(on_full: &str) -> Deployment {
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .expect("tcp_wmem")
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .expect("tcp_wmem's maximum");
    let pad = wmem_max + (1 << 20);
    flood(
        &format!(
            "limits:\n  session_queue: 1\n  ping_interval: 5m\n  max_message_size: {}\nshutdown:\n  deadline: 20s\n",
            2 * pad
        ),
        &format!("{{rate: 5, pad: {pad}}}"),
        on_full,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_session_whose_client_stopped_reading() {
    let dep = unwritable_deployment("drop_oldest");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let _stalled = connect_stalling(addr, "/flood").await;
    // Two messages queued to the session and not dropped, and its queue
    // holds one: it has taken the other into its writer, for good.
    let series = |name: &str| format!("{name}{{channel=\"flood\",plugin=\"ticker\"}}");
    eventually("a message taken into the session's writer", || async {
        let queued = metric(addr, &series("gateway_deliveries_total")).await?;
        let dropped = metric(addr, &series("gateway_slow_consumer_drops_total")).await?;
        (queued - dropped >= 2.0).then_some(())
    })
    .await;
    // Only shutdown can end the session now. Its Close 1001 cannot be
    // written, so it ends at its 2 s close deadline, long before the
    // gateway's.
    assert!(
        gw.shutdown().await,
        "the stalled session ended before the 20 s shutdown deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closed_by_policy_while_its_write_waits_is_disconnected() {
    let dep = unwritable_deployment("close");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let _stalled = connect_stalling(addr, "/flood").await;
    // The first message is taken into the writer for good, the second fills
    // the queue, the third closes the client by policy. Its Close 1008
    // cannot be written: the session ends at its 2 s close deadline.
    metric_becomes(
        addr,
        "gateway_slow_consumer_closes_total{channel=\"flood\",plugin=\"ticker\"}",
        1.0,
    )
    .await;
    metric_becomes(addr, "gateway_connections", 0.0).await;
    gw.shutdown().await;
}
