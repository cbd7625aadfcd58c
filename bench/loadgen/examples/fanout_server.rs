//! A trivially fast WebSocket fan-out server for calibrating the generator:
//! it pushes `{"seq":n,"ts":<ns>,"pad":"xxx…"}` to every client at a fixed
//! rate, building each batch of frames once and writing the same bytes to
//! every connection (one `write` per client per millisecond tick).
//!
//! ```sh
//! cargo run --release -p loadgen --example fanout_server -- \
//!     --listen 127.0.0.1:9900 --rate 1000 --pad 100 --threads 1
//! loadgen --url ws://127.0.0.1:9900/bench --clients 1000 --expect-rate 1000
//! ```
//!
//! A client that falls more than `--backlog` batches behind skips them
//! (which the generator then reports as sequence gaps).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9900")]
    listen: String,
    /// Messages per second (each goes to every client).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of the "pad" string.
    #[arg(long, default_value_t = 100)]
    pad: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Batches a client may fall behind before it skips ahead.
    #[arg(long, default_value_t = 4096)]
    backlog: usize,
}

fn now_ns() -> u64 {
    loadgen::sys::now_ns()
}

/// Appends an unmasked server text frame.
fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else if n <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

async fn handshake(stream: &mut TcpStream) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 16 * 1024 {
            return Err("request head too large".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let key = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-key"))
        .map(|(_, v)| v.trim().to_string())
        .ok_or("no Sec-WebSocket-Key")?;
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        loadgen::ws::accept_key(&key)
    );
    stream
        .write_all(resp.as_bytes())
        .await
        .map_err(|e| e.to_string())
}

async fn serve(
    mut stream: TcpStream,
    mut rx: broadcast::Receiver<Arc<Vec<u8>>>,
    clients: Arc<AtomicUsize>,
) {
    if handshake(&mut stream).await.is_err() {
        return;
    }
    stream.set_nodelay(true).ok();
    clients.fetch_add(1, Relaxed);
    let (mut rd, mut wr) = stream.into_split();
    // Client frames (the generator's --send, pongs, close) are read and
    // dropped; EOF or a close frame ends the connection.
    let mut reader = tokio::spawn(async move {
        let mut b = [0u8; 1024];
        loop {
            match rd.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) if b[0] == 0x88 => return,
                Ok(_) => {}
            }
        }
    });
    loop {
        tokio::select! {
            _ = &mut reader => break,
            r = rx.recv() => match r {
                Ok(batch) => {
                    if wr.write_all(&batch).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
    // Answer a close with a close, then FIN.
    let _ = wr.write_all(&[0x88, 0x02, 0x03, 0xE8]).await;
    let _ = wr.shutdown().await;
    reader.abort();
    clients.fetch_sub(1, Relaxed);
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await.expect("bind");
        eprintln!(
            "fanout_server: ws://{}/ {} msg/s, pad {}",
            listener.local_addr().unwrap(),
            args.rate,
            args.pad
        );
        let (tx, _) = broadcast::channel::<Arc<Vec<u8>>>(args.backlog);
        let clients = Arc::new(AtomicUsize::new(0));
        {
            let tx = tx.clone();
            let clients = clients.clone();
            tokio::spawn(async move {
                let pad = vec![b'x'; args.pad];
                let mut payload = Vec::new();
                let mut seq = 0u64;
                let t0 = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut last_print = Instant::now();
                loop {
                    tick.tick().await;
                    let due = (t0.elapsed().as_secs_f64() * args.rate) as u64;
                    if due <= seq {
                        continue;
                    }
                    let ts = now_ns();
                    let mut batch = Vec::with_capacity(((due - seq) as usize) * (pad.len() + 60));
                    while seq < due {
                        seq += 1;
                        payload.clear();
                        loadgen::publish::bench_message(&mut payload, seq, ts, &pad);
                        frame(&mut batch, &payload);
                    }
                    let _ = tx.send(Arc::new(batch));
                    if last_print.elapsed() >= Duration::from_secs(5) {
                        last_print = Instant::now();
                        eprintln!(
                            "fanout_server: seq {seq}, {} clients",
                            clients.load(Relaxed)
                        );
                    }
                }
            });
        }
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(stream, tx.subscribe(), clients.clone()));
        }
    });
}
