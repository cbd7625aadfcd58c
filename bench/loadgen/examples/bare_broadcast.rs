//! The floor: a bare tokio-tungstenite broadcast server (no routing, no
//! parsing, no schema, no limits). It produces the benchmark stream itself
//! (`{"seq":n,"ts":<ns>,"pad":"x"*100}` at `BENCH_RATE` msg/s) and sends each
//! message to every client through a `tokio::sync::broadcast` channel.
//!
//! `cargo build --release -p loadgen --example bare_broadcast`, then
//! `BENCH_RATE=1000 target/release/examples/bare_broadcast 9905`.
//!
//! A second argument (`15ms`) paces each client as the gateway's
//! `limits.write_interval` does: after a write, the next waits until that
//! long after it, and takes everything that arrived meanwhile; the first
//! message after a quiet spell goes at once. It is the floor of that
//! setting.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(9905);
    let interval: Option<Duration> = std::env::args().nth(2).map(|d| {
        humantime::parse_duration(&d)
            .unwrap_or_else(|e| panic!("write interval {d:?}: {e} (write e.g. 15ms)"))
    });
    // Fractions allowed (the idle runs use 0.001 msg/s).
    let rate: f64 = match std::env::var("BENCH_RATE") {
        Err(_) => 1000.0,
        Ok(r) => match r.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => r,
            _ => panic!("BENCH_RATE={r:?} is not a positive number"),
        },
    };
    let (tx, _) = broadcast::channel::<Utf8Bytes>(8192);
    let producer = tx.clone();
    tokio::spawn(async move {
        let start = Instant::now();
        let start_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let pad = "x".repeat(100);
        let mut seq: u64 = 0;
        // Message n is due (n - 1) / rate s after the start; every due
        // message is sent (late ones in a burst).
        let offset = |n: u64| Duration::from_secs_f64(n as f64 / rate);
        loop {
            tokio::time::sleep_until((start + offset(seq)).into()).await;
            while start + offset(seq) <= Instant::now() {
                // `ts`: when it was due, not when it is built (no
                // coordinated omission).
                let ts = start_ns + offset(seq).as_nanos();
                seq += 1;
                let msg = format!(r#"{{"seq":{seq},"ts":{ts},"pad":"{pad}"}}"#);
                let _ = producer.send(Utf8Bytes::from(msg));
            }
        }
    });
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    eprintln!("listening on 127.0.0.1:{port}");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let mut rx = tx.subscribe();
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            // Drain what the client sends (pongs, close) so the socket keeps flowing.
            tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            loop {
                match rx.recv().await {
                    Ok(m) => {
                        // Everything already waiting goes in one flush.
                        if sink.feed(Message::Text(m)).await.is_err() {
                            return;
                        }
                        while let Ok(m) = rx.try_recv() {
                            if sink.feed(Message::Text(m)).await.is_err() {
                                return;
                            }
                        }
                        if sink.flush().await.is_err() {
                            return;
                        }
                        if let Some(d) = interval {
                            tokio::time::sleep(d).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}
