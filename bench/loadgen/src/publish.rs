//! `loadgen publish`: a paced NATS publisher over plain TCP, producing the
//! same `{"seq":n,"ts":<ns>,"pad":"xxx…"}` messages the WebSocket servers
//! push, so NATS can be measured with the same producer shape.
//!
//! Pacing: every millisecond the publisher computes how many messages are
//! due since the start (`rate × elapsed`) and sends all of them in one
//! write, so the long-run rate is exact even though the timer is coarse and
//! a slow tick is made up on the next one.

use std::io::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::nats;
use crate::run::SetupError;
use crate::sys::{cpu_secs, now_ns};

#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// `host:port` of the NATS server (plain TCP protocol port).
    pub nats: String,
    pub subject: String,
    /// Messages per second.
    pub rate: f64,
    /// Length of the `pad` string.
    pub pad: usize,
    pub duration: Duration,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PublishReport {
    pub mode: &'static str,
    pub nats: String,
    pub subject: String,
    pub rate: f64,
    pub pad: usize,
    /// Size of one JSON payload (varies by a few bytes with the digits of
    /// seq; this is the first message's).
    pub payload_bytes: usize,
    pub duration_secs: f64,
    pub sent: u64,
    pub actual_rate: f64,
    /// Most messages sent in one write (how far a tick fell behind).
    pub max_batch: u64,
    /// The server answered the final PING, i.e. processed every PUB.
    pub flushed: bool,
    pub nats_errors: u64,
    pub loadgen_cpu_secs: Option<f64>,
}

/// Appends one benchmark message (`{"seq":..,"ts":..,"pad":".."}`).
pub fn bench_message(out: &mut Vec<u8>, seq: u64, ts: u64, pad: &[u8]) {
    let _ = write!(out, "{{\"seq\":{seq},\"ts\":{ts},\"pad\":\"");
    out.extend_from_slice(pad);
    out.extend_from_slice(b"\"}");
}

enum FromServer {
    Ping,
    Pong,
    Err(String),
    Closed(String),
}

fn err(msg: String) -> SetupError {
    SetupError(msg)
}

/// Reads until the first protocol line; returns it.
async fn read_info(stream: &mut TcpStream) -> Result<(), SetupError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| err(format!("nats read: {e}")))?;
        if n == 0 {
            return Err(err("nats: connection closed before INFO".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            if !buf.starts_with(b"INFO") {
                let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                return Err(err(format!("nats: expected INFO, got {line}")));
            }
            if buf.len() > i + 2 {
                return Err(err("nats: unexpected data after INFO".into()));
            }
            return Ok(());
        }
        if buf.len() > nats::MAX_LINE {
            return Err(err("nats: INFO line too long".into()));
        }
    }
}

/// Publishes for `duration` at `rate`; returns the report.
pub async fn publish(cfg: PublishConfig) -> Result<PublishReport, SetupError> {
    if !(cfg.rate > 0.0 && cfg.rate.is_finite()) {
        return Err(err("--rate must be a positive number".into()));
    }
    if cfg.subject.is_empty() || cfg.subject.contains([' ', '\t', '\r', '\n']) {
        return Err(err("--subject must be a non-empty NATS subject".into()));
    }
    let cpu0 = cpu_secs();
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&cfg.nats))
        .await
        .map_err(|_| err(format!("nats connect {}: timeout", cfg.nats)))?
        .map_err(|e| err(format!("nats connect {}: {e}", cfg.nats)))?;
    stream.set_nodelay(true).ok();
    tokio::time::timeout(Duration::from_secs(5), read_info(&mut stream))
        .await
        .map_err(|_| err("nats: no INFO within 5s".into()))??;
    let mut hello = nats::CONNECT.to_vec();
    hello.extend_from_slice(b"PING\r\n");
    stream
        .write_all(&hello)
        .await
        .map_err(|e| err(format!("nats write: {e}")))?;

    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut parser = nats::Parser::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = tx.send(FromServer::Closed("connection closed".into()));
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(FromServer::Closed(format!("read: {e}")));
                    return;
                }
            };
            let r = parser.feed(
                &buf[..n],
                |_| {},
                |ev| {
                    let m = match ev {
                        nats::Event::Ping => FromServer::Ping,
                        nats::Event::Pong => FromServer::Pong,
                        nats::Event::Err(e) => {
                            FromServer::Err(String::from_utf8_lossy(e).into_owned())
                        }
                        nats::Event::Info(_) | nats::Event::Ok => return,
                    };
                    let _ = tx.send(m);
                },
            );
            if let Err(e) = r {
                let _ = tx.send(FromServer::Closed(e.to_string()));
                return;
            }
        }
    });

    let mut nats_errors = 0u64;
    // Wait for the PONG that confirms CONNECT was accepted.
    let confirmed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = rx.recv().await {
            match m {
                FromServer::Pong => return Ok(()),
                FromServer::Ping => {}
                FromServer::Err(e) => return Err(format!("nats -ERR {e}")),
                FromServer::Closed(e) => return Err(format!("nats: {e}")),
            }
        }
        Err("nats: connection lost".into())
    })
    .await;
    match confirmed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(err(e)),
        Err(_) => return Err(err("nats: no PONG within 5s after CONNECT".into())),
    }

    let pad = vec![b'x'; cfg.pad];
    let total = (cfg.rate * cfg.duration.as_secs_f64()).round() as u64;
    let mut first = Vec::new();
    bench_message(&mut first, 1, now_ns(), &pad);
    let payload_bytes = first.len();
    if cfg.progress {
        eprintln!(
            "loadgen publish: {total} messages of ~{payload_bytes} B to {} on '{}' at {}/s",
            cfg.nats, cfg.subject, cfg.rate
        );
    }

    let mut out = Vec::with_capacity(64 * 1024);
    let mut payload = Vec::with_capacity(payload_bytes + 16);
    let mut sent = 0u64;
    let mut max_batch = 0u64;
    let mut pongs_owed = 0u32;
    let mut lost: Option<String> = None;
    let t0 = Instant::now();
    let t0_ns = now_ns();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_print = Instant::now();
    const MAX_BATCH: u64 = 50_000;
    while sent < total {
        tick.tick().await;
        while let Ok(m) = rx.try_recv() {
            match m {
                FromServer::Ping => pongs_owed += 1,
                FromServer::Pong => {}
                FromServer::Err(e) => {
                    nats_errors += 1;
                    eprintln!("loadgen publish: nats -ERR {e}");
                }
                FromServer::Closed(e) => lost = Some(e),
            }
        }
        if lost.is_some() {
            break;
        }
        let due = ((t0.elapsed().as_secs_f64() * cfg.rate) as u64).min(total);
        let n = (due - sent).min(MAX_BATCH);
        max_batch = max_batch.max(n);
        out.clear();
        for _ in 0..pongs_owed {
            out.extend_from_slice(b"PONG\r\n");
        }
        pongs_owed = 0;
        for _ in 0..n {
            sent += 1;
            // When message `sent` was due (`sent / rate` after the start),
            // not when it is sent: a publisher that falls behind shows in
            // the latency (no coordinated omission).
            let ts = t0_ns + (sent as f64 * 1e9 / cfg.rate) as u64;
            payload.clear();
            bench_message(&mut payload, sent, ts, &pad);
            nats::pub_msg(&mut out, &cfg.subject, &payload);
        }
        if !out.is_empty()
            && let Err(e) = wr.write_all(&out).await
        {
            lost = Some(format!("write: {e}"));
            break;
        }
        if cfg.progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "loadgen publish: {:>6.1}s: {sent}/{total} sent",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();

    // Flush: the server answers a PING only after processing what came
    // before it.
    let mut flushed = false;
    if lost.is_none() && wr.write_all(b"PING\r\n").await.is_ok() {
        flushed = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(m) = rx.recv().await {
                match m {
                    FromServer::Pong => return true,
                    FromServer::Ping => {
                        if wr.write_all(b"PONG\r\n").await.is_err() {
                            return false;
                        }
                    }
                    FromServer::Err(e) => {
                        nats_errors += 1;
                        eprintln!("loadgen publish: nats -ERR {e}");
                    }
                    FromServer::Closed(_) => return false,
                }
            }
            false
        })
        .await
        .unwrap_or(false);
    }
    if let Some(e) = &lost {
        eprintln!("loadgen publish: connection lost after {sent} messages: {e}");
    }
    let _ = wr.shutdown().await;
    reader.abort();
    Ok(PublishReport {
        mode: "publish",
        nats: cfg.nats,
        subject: cfg.subject,
        rate: cfg.rate,
        pad: cfg.pad,
        payload_bytes,
        duration_secs: (elapsed * 1000.0).round() / 1000.0,
        sent,
        actual_rate: (sent as f64 / elapsed.max(1e-9) * 10.0).round() / 10.0,
        max_batch,
        flushed,
        nats_errors,
        loadgen_cpu_secs: cpu0
            .zip(cpu_secs())
            .map(|(a, b)| ((b - a) * 100.0).round() / 100.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{Fields, scan};

    #[test]
    fn message_shape_round_trips_through_the_scanner() {
        let mut m = Vec::new();
        bench_message(&mut m, 17, 1_700_000_000_000_000_001, &[b'x'; 100]);
        assert_eq!(
            scan(&m),
            Fields {
                seq: Some(17),
                ts: Some(1_700_000_000_000_000_001)
            }
        );
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(v["pad"].as_str().unwrap().len(), 100);
        assert!((140..=160).contains(&m.len()), "{}", m.len());
    }
}
