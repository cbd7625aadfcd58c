//! The client fleet: connect at a paced rate, then either measure the pushed
//! stream (stream / nats modes) or just hold the connections (idle modes).
//!
//! One tokio task per client. The hot path per `read`:
//! readiness → `try_read` into a per-worker-thread scratch buffer (so idle
//! clients hold no read buffer) → one clock read → parse every complete
//! WebSocket frame in place → scan each message for `"seq"`/`"ts"` → record
//! latencies into a per-worker-thread HDR histogram (uncontended; merged
//! when the run ends) → keep an incomplete tail (usually a few bytes) in the
//! task's own small buffer.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::nats;
use crate::scan::scan;
use crate::sys::{cpu_secs, now_ns};
use crate::ws::{self, WsUrl};

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Plain WebSocket; measure the pushed `{seq,ts}` messages.
    Stream,
    /// NATS protocol over WebSocket (SUB to a subject); measure messages.
    Nats,
    /// Plain WebSocket; connect and hold, count survivors.
    Idle,
    /// NATS over WebSocket, subscribed; connect and hold, count survivors.
    NatsIdle,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Nats => "nats",
            Mode::Idle => "idle",
            Mode::NatsIdle => "nats-idle",
        }
    }
    fn measures(self) -> bool {
        matches!(self, Mode::Stream | Mode::Nats)
    }
    fn nats(self) -> bool {
        matches!(self, Mode::Nats | Mode::NatsIdle)
    }
}

/// A run's parameters (the CLI maps onto this one to one).
#[derive(Debug, Clone)]
pub struct Config {
    /// Target URL; `{n}` in it is replaced per client (see `spread`).
    pub url: String,
    /// Client `c` connects to `url` with every `{n}` replaced by `c % spread`
    /// (e.g. `/bench/{n}` with 10: `/bench/0` … `/bench/9`). At least 1;
    /// more than 1 needs a `{n}` in the URL's path.
    pub spread: usize,
    pub clients: usize,
    /// New connections per second while connecting; 0 = as fast as possible.
    pub ramp: f64,
    pub duration: Duration,
    pub warmup: Duration,
    /// One text frame sent right after the handshake.
    pub send: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Begin each connection with a PROXY protocol version 1 header naming
    /// the client's own addresses, as a TCP load balancer in front of a
    /// `proxy_protocol` listener would (in the same write as the handshake).
    pub proxy_protocol: bool,
    /// Bind client sockets to 127.0.0.1..=127.0.0.N round-robin (N > 1 and
    /// an IPv4 loopback target only; otherwise the kernel picks).
    pub sources: u8,
    pub mode: Mode,
    pub nats_subject: String,
    pub hold: Duration,
    /// Messages per second each client should receive, if known.
    pub expect_rate: Option<f64>,
    /// Limit for connect + handshake (+ NATS subscribe) of one client.
    pub connect_timeout: Duration,
    /// Print progress to stderr.
    pub progress: bool,
    /// Reported in the output (the runtime is the caller's).
    pub threads: usize,
    /// Notified once when the measurement window opens (after the warmup):
    /// lets an in-process test server start sending exactly then.
    pub on_measure_start: Option<Arc<tokio::sync::Notify>>,
    /// Extra clients that connect first (and send `send`) and then never
    /// read: slow consumers beside the measured clients (plain modes only).
    pub stalled: usize,
    /// Socket receive buffer of the stalled clients (`SO_RCVBUF`), so that
    /// the server notices them after kilobytes instead of megabytes.
    pub stalled_rcvbuf: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            url: "ws://127.0.0.1:9900/bench".into(),
            spread: 1,
            clients: 1000,
            ramp: 2000.0,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            send: None,
            headers: Vec::new(),
            proxy_protocol: false,
            sources: 4,
            mode: Mode::Stream,
            nats_subject: "bench".into(),
            hold: Duration::from_secs(10),
            expect_rate: None,
            connect_timeout: Duration::from_secs(10),
            progress: true,
            threads: 2,
            on_measure_start: None,
            stalled: 0,
            stalled_rcvbuf: 4096,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
    /// Messages that carried a `ts` (the histogram's sample count).
    pub samples: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerClient {
    pub min: u64,
    pub mean: f64,
    pub max: u64,
}

/// The one JSON line the binary prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub mode: Mode,
    pub url: String,
    /// Distinct URLs the clients were spread over (`--spread`).
    pub spread: usize,
    pub clients: usize,
    pub connected: usize,
    pub connect_failures: usize,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub connect_errors: BTreeMap<String, u64>,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_secs: Option<f64>,
    /// Data messages received in the window (stream/nats) or during the
    /// whole run (idle).
    pub messages: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_bytes: Option<u64>,
    /// Absent in idle modes; `null` when no message carried a `ts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Option<Latency>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gaps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dups: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients_with_gaps: Option<usize>,
    /// Messages without a `"seq"` integer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unparsed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent_clients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_client: Option<PerClient>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_deliveries: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_ratio: Option<f64>,
    /// Clients still connected when the window / hold ended.
    pub connected_at_end: usize,
    /// Connected clients that lost their connection before the end.
    pub disconnects: usize,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub disconnect_reasons: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_errors: Option<u64>,
    pub threads: usize,
    pub sources: u8,
    /// The clients that never read (`--stalled`); absent without them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled: Option<StalledReport>,
    /// The generator's own CPU (user + system) over the whole run.
    pub loadgen_cpu_secs: Option<f64>,
    /// ... and during the measurement window / hold only.
    pub loadgen_cpu_window_secs: Option<f64>,
}

/// What became of the clients that never read.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StalledReport {
    /// As asked (`--stalled`).
    pub clients: usize,
    /// Those that completed the handshake.
    pub connected: usize,
    /// Connected ones the server had closed by the end of the run (seen
    /// when they read what their buffers held, after the run).
    pub closed_by_server: usize,
    /// Why, by reason (`"close 1008"`, `"eof"`, `"read: …"`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub close_reasons: BTreeMap<String, u64>,
    /// Connected ones still open at the end.
    pub open_at_end: usize,
}

impl Report {
    /// The single output line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

/// Errors that stop a run before it starts.
#[derive(Debug)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SetupError {}

const HIST_MAX_US: u64 = 3_600_000_000;
const SCRATCH_MIN_READ: usize = 256 * 1024;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

type SharedHist = Arc<Mutex<Histogram<u64>>>;

static RUN_IDS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Read buffer shared by every client task that runs on this thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// This thread's latency histogram for run `.0`.
    static HIST: RefCell<Option<(u64, SharedHist)>> = const { RefCell::new(None) };
}

struct Shared {
    run_id: u64,
    mode: Mode,
    /// `Config::proxy_protocol`.
    proxy_protocol: bool,
    send: Option<Vec<u8>>,
    nats_subject: String,
    /// Measurement window in ns since the epoch; `u64::MAX` until known.
    window_start: AtomicU64,
    window_end: AtomicU64,
    cancel: CancellationToken,
    /// Messages seen (any time), for progress output.
    live_msgs: AtomicU64,
    ready_ok: AtomicUsize,
    ready_fail: AtomicUsize,
    /// Latest time (µs after `t0`) a client became ready.
    last_ready_us: AtomicU64,
    t0: Instant,
    /// Connected and not (yet) gone.
    alive: AtomicUsize,
    connect_errors: Mutex<HashMap<String, u64>>,
    hists: Mutex<Vec<SharedHist>>,
    log_budget: AtomicU64,
    /// Stalled clients whose connect attempt is over (either way).
    stalled_done: AtomicUsize,
}

impl Shared {
    /// Runs `f` on this thread's histogram for this run.
    fn with_hist(&self, f: impl FnOnce(&mut Histogram<u64>)) {
        HIST.with_borrow_mut(|slot| {
            let h = match slot {
                Some((id, h)) if *id == self.run_id => h,
                _ => {
                    let h = Arc::new(Mutex::new(new_hist()));
                    self.hists.lock().unwrap().push(h.clone());
                    &mut slot.insert((self.run_id, h)).1
                }
            };
            f(&mut h.lock().unwrap());
        });
    }

    /// Logs to stderr, at most a few dozen lines per run.
    fn log(&self, msg: impl FnOnce() -> String) {
        let n = self.log_budget.fetch_add(1, Relaxed);
        if n < 20 {
            eprintln!("loadgen: {}", msg());
        } else if n == 20 {
            eprintln!("loadgen: (further per-client messages suppressed)");
        }
    }

    fn connect_failed(&self, err: String) {
        *self.connect_errors.lock().unwrap().entry(err).or_default() += 1;
        self.ready_fail.fetch_add(1, Relaxed);
    }
}

/// Why a client task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// Stopped by the run (normal).
    Cancelled,
    /// Never became ready.
    ConnectFailed,
    /// Lost after becoming ready.
    Lost(String),
}

#[derive(Debug, Clone)]
struct ClientStats {
    ready: bool,
    messages: u64,
    bytes: u64,
    gaps: u64,
    dups: u64,
    unparsed: u64,
    nats_errors: u64,
    end: End,
}

/// Per-client message accounting (everything but the socket).
struct Counter {
    measure: bool,
    in_window: bool,
    recv_ns: u64,
    messages: u64,
    bytes: u64,
    gaps: u64,
    dups: u64,
    unparsed: u64,
    last_seq: Option<u64>,
    /// Latencies (µs) of this read, flushed into the thread histogram.
    lat: Vec<u64>,
    /// Messages seen this read (for progress).
    seen: u64,
}

impl Counter {
    #[inline]
    fn on_message(&mut self, payload: &[u8]) {
        self.seen += 1;
        if !self.measure {
            self.messages += 1;
            return;
        }
        let f = scan(payload);
        match f.seq {
            Some(s) => match self.last_seq {
                Some(last) if s <= last => {
                    if self.in_window {
                        self.dups += 1;
                    }
                }
                Some(last) => {
                    if self.in_window {
                        self.gaps += s - last - 1;
                    }
                    self.last_seq = Some(s);
                }
                None => self.last_seq = Some(s),
            },
            None => {
                if self.in_window {
                    self.unparsed += 1;
                }
            }
        }
        if self.in_window {
            self.messages += 1;
            self.bytes += payload.len() as u64;
            if let Some(ts) = f.ts {
                self.lat.push(self.recv_ns.saturating_sub(ts) / 1000);
            }
        }
    }
}

async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    url: &WsUrl,
    headers: &[(String, String)],
    rng: &mut ws::MaskRng,
    rcvbuf: Option<u32>,
    proxy_protocol: bool,
) -> Result<(TcpStream, Vec<u8>), String> {
    let sock = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(size) = rcvbuf {
        sock.set_recv_buffer_size(size)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    if let Some(src) = source {
        sock.set_reuseaddr(true)
            .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
        sock.bind(SocketAddr::new(src, 0))
            .map_err(|e| format!("bind {src}: {e}"))?;
    }
    let mut stream = sock
        .connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let key = ws::handshake_key(rng);
    let mut request = Vec::new();
    if proxy_protocol {
        let (from, to) = (
            stream
                .local_addr()
                .map_err(|e| format!("local address: {e}"))?,
            stream
                .peer_addr()
                .map_err(|e| format!("peer address: {e}"))?,
        );
        let family = if from.is_ipv4() { "TCP4" } else { "TCP6" };
        request.extend_from_slice(
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                from.ip(),
                to.ip(),
                from.port(),
                to.port()
            )
            .as_bytes(),
        );
    }
    request.extend_from_slice(&ws::handshake_request(url, &key, headers));
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("handshake write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("handshake read: {e}"))?;
        if n == 0 {
            return Err("handshake: connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        match ws::parse_handshake_response(&buf, &key) {
            Ok(Some(len)) => {
                buf.drain(..len);
                return Ok((stream, buf));
            }
            Ok(None) if buf.len() > 64 * 1024 => {
                return Err("handshake: response head too large".into());
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// One connection's protocol state and counters (everything but the socket).
struct Client {
    idx: usize,
    conn: ws::Conn,
    /// Unconsumed tail of the previous read (an incomplete frame).
    pending: Vec<u8>,
    /// Size the incomplete frame will have (0 if unknown / none).
    need: usize,
    nats: Option<nats::Parser>,
    nats_out: Vec<u8>,
    sent_connect: bool,
    nats_errors: u64,
    ready: bool,
    c: Counter,
}

impl Client {
    fn mark_ready(ready: &mut bool, shared: &Shared) {
        *ready = true;
        shared.alive.fetch_add(1, Relaxed);
        shared
            .last_ready_us
            .fetch_max(shared.t0.elapsed().as_micros() as u64, Relaxed);
        shared.ready_ok.fetch_add(1, Relaxed);
    }

    /// Parses `data` (pending tail + new bytes) received at `recv_ns`.
    /// Keeps the incomplete tail in `self.pending`; returns whether the
    /// server closed the WebSocket.
    fn process(&mut self, data: &mut [u8], recv_ns: u64, shared: &Shared) -> Result<bool, String> {
        let c = &mut self.c;
        c.recv_ns = recv_ns;
        c.in_window = recv_ns >= shared.window_start.load(Relaxed)
            && recv_ns < shared.window_end.load(Relaxed);
        let fed = if let Some(parser) = self.nats.as_mut() {
            let (nats_out, sent_connect, ready, nats_errors, idx) = (
                &mut self.nats_out,
                &mut self.sent_connect,
                &mut self.ready,
                &mut self.nats_errors,
                self.idx,
            );
            let mut perr = None;
            let fed = self
                .conn
                .feed(data, true, |_, chunk| {
                    if perr.is_some() {
                        return;
                    }
                    let r = parser.feed(
                        chunk,
                        |m| c.on_message(m),
                        |ev| match ev {
                            nats::Event::Info(_) => {
                                if !*sent_connect {
                                    *sent_connect = true;
                                    nats_out.extend_from_slice(nats::CONNECT);
                                    nats::sub_line(nats_out, &shared.nats_subject, 1);
                                    nats_out.extend_from_slice(b"PING\r\n");
                                }
                            }
                            nats::Event::Ping => nats_out.extend_from_slice(b"PONG\r\n"),
                            nats::Event::Pong => {
                                if !*ready {
                                    Self::mark_ready(ready, shared);
                                }
                            }
                            nats::Event::Ok => {}
                            nats::Event::Err(e) => {
                                *nats_errors += 1;
                                let e = String::from_utf8_lossy(e).into_owned();
                                shared.log(|| format!("client {idx}: nats -ERR {e}"));
                            }
                        },
                    );
                    if let Err(e) = r {
                        perr = Some(e);
                    }
                })
                .map_err(|e| e.to_string())?;
            if let Some(e) = perr {
                return Err(e.to_string());
            }
            if !self.nats_out.is_empty() {
                self.conn.queue(ws::OP_BINARY, &self.nats_out);
                self.nats_out.clear();
            }
            fed
        } else {
            self.conn
                .feed(data, false, |_, m| c.on_message(m))
                .map_err(|e| e.to_string())?
        };
        self.pending.clear();
        if !fed.closed {
            self.pending.extend_from_slice(&data[fed.consumed..]);
        }
        if self.pending.capacity() > 1 << 20 && self.pending.len() < 4096 {
            self.pending.shrink_to(4096);
        }
        self.need = fed.need;
        // Per-read bookkeeping: one histogram lock, one shared counter add.
        if !self.c.lat.is_empty() {
            let lat = &self.c.lat;
            shared.with_hist(|h| {
                for &v in lat {
                    h.saturating_record(v);
                }
            });
            self.c.lat.clear();
        }
        if self.c.seen > 0 {
            shared.live_msgs.fetch_add(self.c.seen, Relaxed);
            self.c.seen = 0;
        }
        Ok(fed.closed)
    }

    /// Reads once (into this worker thread's scratch buffer, behind the
    /// pending tail) and processes what arrived. `poll_read` (unlike
    /// `try_read`) clears the readiness after a short read, which saves
    /// the second, empty `read` per wake-up.
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut TcpStream,
        shared: &Shared,
    ) -> Poll<Step> {
        SCRATCH.with_borrow_mut(|scratch| {
            let p = self.pending.len();
            let want = (p + SCRATCH_MIN_READ).max(self.need);
            if scratch.len() < want {
                scratch.resize(want, 0);
            }
            let mut rb = ReadBuf::new(&mut scratch[p..]);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Step::Failed(format!("read: {e}"))),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Step::Eof);
                    }
                    let recv_ns = now_ns();
                    scratch[..p].copy_from_slice(&self.pending);
                    Poll::Ready(match self.process(&mut scratch[..p + n], recv_ns, shared) {
                        Ok(closed) => Step::Data { closed },
                        Err(e) => Step::Failed(e),
                    })
                }
            }
        })
    }
}

enum Step {
    Data { closed: bool },
    Eof,
    Failed(String),
}

async fn client(
    idx: usize,
    shared: Arc<Shared>,
    target: SocketAddr,
    source: Option<IpAddr>,
    url: Arc<WsUrl>,
    headers: Arc<Vec<(String, String)>>,
    connect_timeout: Duration,
) -> ClientStats {
    let mode = shared.mode;
    let mut stats = ClientStats {
        ready: false,
        messages: 0,
        bytes: 0,
        gaps: 0,
        dups: 0,
        unparsed: 0,
        nats_errors: 0,
        end: End::ConnectFailed,
    };
    let deadline = tokio::time::Instant::now() + connect_timeout;
    let mut rng = ws::MaskRng::new((idx as u64) ^ now_ns().rotate_left(17));
    let connected = tokio::time::timeout_at(
        deadline,
        connect(
            target,
            source,
            &url,
            &headers,
            &mut rng,
            None,
            shared.proxy_protocol,
        ),
    )
    .await;
    let (mut stream, early) = match connected {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            shared.connect_failed(e);
            return stats;
        }
        Err(_) => {
            shared.connect_failed("timeout (connect/handshake)".into());
            return stats;
        }
    };
    let mut cl = Client {
        idx,
        conn: ws::Conn::new(rng.next_u64()),
        pending: Vec::new(),
        need: 0,
        nats: mode.nats().then(nats::Parser::new),
        nats_out: Vec::new(),
        sent_connect: false,
        nats_errors: 0,
        ready: false,
        c: Counter {
            measure: mode.measures(),
            in_window: false,
            recv_ns: 0,
            messages: 0,
            bytes: 0,
            gaps: 0,
            dups: 0,
            unparsed: 0,
            last_seq: None,
            lat: Vec::new(),
            seen: 0,
        },
    };
    if !mode.nats() {
        // (The nats modes speak NATS only; `--send` is for the plain modes.)
        if let Some(text) = &shared.send {
            cl.conn.queue(ws::OP_TEXT, text);
        }
        if !cl.conn.out.is_empty()
            && let Err(e) = stream.write_all(&cl.conn.out).await
        {
            shared.connect_failed(format!("send: {e}"));
            return stats;
        }
        cl.conn.out.clear();
        Client::mark_ready(&mut cl.ready, &shared);
    }

    let cancelled = shared.cancel.cancelled();
    tokio::pin!(cancelled);
    let ready_timer = tokio::time::sleep_until(deadline);
    tokio::pin!(ready_timer);
    // Bytes the handshake read past the response head are frames already.
    let mut first = (!early.is_empty()).then_some(early);

    let end = loop {
        let step = if let Some(mut data) = first.take() {
            let r = cl.process(&mut data, now_ns(), &shared);
            match r {
                Ok(closed) => Step::Data { closed },
                Err(e) => Step::Failed(e),
            }
        } else {
            tokio::select! {
                biased;
                _ = &mut cancelled => break End::Cancelled,
                _ = &mut ready_timer, if !cl.ready => break End::ConnectFailed,
                s = std::future::poll_fn(|cx| cl.poll_step(cx, &mut stream, &shared)) => s,
            }
        };
        let closed = match step {
            Step::Data { closed } => closed,
            Step::Eof => break End::Lost("eof".into()),
            Step::Failed(e) => {
                shared.log(|| format!("client {idx}: {e}"));
                break End::Lost(e);
            }
        };
        if !cl.conn.out.is_empty() {
            if let Err(e) = stream.write_all(&cl.conn.out).await {
                break End::Lost(format!("write: {e}"));
            }
            cl.conn.out.clear();
        }
        if closed {
            let code = cl.conn.close_code.unwrap_or(1005);
            break End::Lost(format!("close {code}"));
        }
    };

    let ready = cl.ready;
    stats.ready = ready;
    stats.messages = cl.c.messages;
    stats.bytes = cl.c.bytes;
    stats.gaps = cl.c.gaps;
    stats.dups = cl.c.dups;
    stats.unparsed = cl.c.unparsed;
    stats.nats_errors = cl.nats_errors;
    if ready {
        shared.alive.fetch_sub(1, Relaxed);
    }
    match (&end, ready) {
        (End::Cancelled, true) => {
            // Polite close: send a close frame and let the server close the
            // TCP connection first (so TIME_WAIT lands on its side).
            cl.conn.out.clear();
            cl.conn.queue_close(1000);
            if stream.write_all(&cl.conn.out).await.is_ok() {
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            }
            stats.end = End::Cancelled;
        }
        (End::Cancelled, false) => shared.connect_failed("cancelled before ready".into()),
        (End::ConnectFailed, _) => shared.connect_failed("timeout (not ready)".into()),
        (End::Lost(e), false) => shared.connect_failed(e.clone()),
        (End::Lost(_), true) => stats.end = end,
    }
    stats
}

/// How long a stalled client reads, after the run, to find out whether the
/// server had closed it.
const STALLED_DRAIN: Duration = Duration::from_secs(1);

/// A client that connects, sends `--send`, and never reads until the run is
/// over. Returns whether it connected and, if the server had closed it, why.
#[allow(clippy::too_many_arguments)]
async fn stalled_client(
    idx: usize,
    shared: Arc<Shared>,
    target: SocketAddr,
    source: Option<IpAddr>,
    url: Arc<WsUrl>,
    headers: Arc<Vec<(String, String)>>,
    connect_timeout: Duration,
    rcvbuf: u32,
) -> (bool, Option<String>) {
    let mut rng = ws::MaskRng::new((idx as u64) ^ now_ns().rotate_left(29));
    let connected = tokio::time::timeout(
        connect_timeout,
        connect(
            target,
            source,
            &url,
            &headers,
            &mut rng,
            Some(rcvbuf),
            shared.proxy_protocol,
        ),
    )
    .await;
    let mut conn = ws::Conn::new(rng.next_u64());
    let stream = match connected {
        Ok(Ok((mut stream, _))) => {
            if let Some(text) = &shared.send {
                conn.queue(ws::OP_TEXT, text);
            }
            match stream.write_all(&conn.out).await {
                Ok(()) => Some(stream),
                Err(e) => {
                    shared.log(|| format!("stalled client {idx}: send: {e}"));
                    None
                }
            }
        }
        Ok(Err(e)) => {
            shared.log(|| format!("stalled client {idx}: {e}"));
            None
        }
        Err(_) => {
            shared.log(|| format!("stalled client {idx}: timeout (connect/handshake)"));
            None
        }
    };
    shared.stalled_done.fetch_add(1, Relaxed);
    let Some(mut stream) = stream else {
        return (false, None);
    };
    conn.out.clear();
    shared.cancel.cancelled().await;
    // Now read what the buffers held: a Close or EOF means the server had
    // closed the connection; still data after STALLED_DRAIN means it is open.
    let closed = tokio::time::timeout(STALLED_DRAIN, async {
        let mut pending = Vec::new();
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) => return "eof".to_string(),
                Ok(n) => n,
                Err(e) => return format!("read: {e}"),
            };
            pending.extend_from_slice(&chunk[..n]);
            match conn.feed(&mut pending, false, |_, _| {}) {
                Ok(fed) if fed.closed => {
                    return format!("close {}", conn.close_code.unwrap_or(1005));
                }
                Ok(fed) => {
                    pending.drain(..fed.consumed);
                }
                Err(e) => return format!("websocket: {e}"),
            }
        }
    })
    .await
    .ok();
    conn.out.clear();
    if closed.is_none() {
        conn.queue_close(1000);
    }
    // The close reply (or our own close); the server may be gone already.
    let _ = stream.write_all(&conn.out).await;
    (true, closed)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn round(v: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (v * m).round() / m
}

/// The placeholder that `--spread` replaces in the URL.
pub const SPREAD_PLACEHOLDER: &str = "{n}";

/// `template` with every `{n}` replaced by `n`.
pub fn spread_url(template: &str, n: usize) -> String {
    template.replace(SPREAD_PLACEHOLDER, &n.to_string())
}

/// The `spread` URLs of a run: index `i` is `template` with `{n}` = `i`, so
/// client `c` uses index `c % spread`. All must name the same host and port
/// (the placeholder belongs in the path or query), and `spread > 1` needs a
/// placeholder, or every client would share one URL after all.
pub fn spread_urls(template: &str, spread: usize) -> Result<Vec<WsUrl>, String> {
    if spread == 0 {
        return Err("--spread must be at least 1".into());
    }
    if spread > 1 && !template.contains(SPREAD_PLACEHOLDER) {
        return Err(format!(
            "--spread {spread} needs a {SPREAD_PLACEHOLDER} in the URL to replace, e.g. ws://127.0.0.1:9900/bench/{SPREAD_PLACEHOLDER}"
        ));
    }
    let urls = (0..spread)
        .map(|n| WsUrl::parse(&spread_url(template, n)))
        .collect::<Result<Vec<_>, _>>()?;
    let first = &urls[0];
    if let Some(u) = urls.iter().find(|u| {
        (&u.host, u.port, &u.host_header) != (&first.host, first.port, &first.host_header)
    }) {
        return Err(format!(
            "{SPREAD_PLACEHOLDER} must be in the URL's path or query, not its host or port ({}:{} vs {}:{})",
            first.host, first.port, u.host, u.port
        ));
    }
    Ok(urls)
}

/// Resolves the target and checks the source-address setup.
async fn resolve(url: &WsUrl, sources: u8) -> Result<(SocketAddr, u8), SetupError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| SetupError(format!("cannot resolve {}: {e}", url.host)))?
        .collect();
    if sources > 1 {
        // Source addresses 127.0.0.x only work towards an IPv4 loopback target.
        if let Some(t) = addrs.iter().find(|a| a.is_ipv4() && a.ip().is_loopback()) {
            return Ok((*t, sources));
        }
        eprintln!(
            "loadgen: warning: --sources {sources} needs a 127.x target; {} is not, using the default source address",
            url.host
        );
    }
    let target = addrs
        .first()
        .copied()
        .ok_or_else(|| SetupError(format!("no usable address for {}", url.host)))?;
    Ok((target, 1))
}

/// Sleeps until `until` in steps of at most 100 ms, calling `tick(now)`
/// after each; returns false early once no client is connected any more.
async fn wait_while_alive(
    shared: &Shared,
    until: tokio::time::Instant,
    mut tick: impl FnMut(tokio::time::Instant),
) -> bool {
    loop {
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        if shared.alive.load(Relaxed) == 0 {
            return false;
        }
        tokio::time::sleep_until(until.min(now + Duration::from_millis(100))).await;
        tick(tokio::time::Instant::now());
    }
}

/// Runs the whole thing (inside the caller's tokio runtime). Returns an
/// error only for setup problems (bad URL, unresolvable host); a server
/// that refuses every connection yields a report with `connected: 0`.
pub async fn run(cfg: Config) -> Result<Report, SetupError> {
    let urls = spread_urls(&cfg.url, cfg.spread).map_err(SetupError)?;
    let url = &urls[0];
    if cfg.sources == 0 {
        return Err(SetupError("--sources must be at least 1".into()));
    }
    if cfg.mode.nats() && cfg.nats_subject.trim().is_empty() {
        return Err(SetupError("--nats-subject must not be empty".into()));
    }
    if cfg.mode.nats() && cfg.stalled > 0 {
        return Err(SetupError(
            "--stalled works with the plain WebSocket modes (stream, idle) only".into(),
        ));
    }
    let (target, sources) = resolve(url, cfg.sources).await?;
    let cpu_start = cpu_secs();
    let shared = Arc::new(Shared {
        run_id: RUN_IDS.fetch_add(1, Relaxed),
        mode: cfg.mode,
        proxy_protocol: cfg.proxy_protocol,
        send: cfg.send.clone().map(String::into_bytes),
        nats_subject: cfg.nats_subject.clone(),
        window_start: AtomicU64::new(u64::MAX),
        window_end: AtomicU64::new(u64::MAX),
        cancel: CancellationToken::new(),
        live_msgs: AtomicU64::new(0),
        ready_ok: AtomicUsize::new(0),
        ready_fail: AtomicUsize::new(0),
        last_ready_us: AtomicU64::new(0),
        t0: Instant::now(),
        alive: AtomicUsize::new(0),
        connect_errors: Mutex::new(HashMap::new()),
        hists: Mutex::new(Vec::new()),
        log_budget: AtomicU64::new(0),
        stalled_done: AtomicUsize::new(0),
    });
    let urls: Vec<Arc<WsUrl>> = urls.into_iter().map(Arc::new).collect();
    let headers = Arc::new(cfg.headers.clone());
    let progress = cfg.progress;
    if progress {
        eprintln!(
            "loadgen: {} mode, {} clients -> {}{} ({}), ramp {}/s, {} source address(es)",
            cfg.mode.name(),
            cfg.clients,
            cfg.url,
            if urls.len() > 1 {
                format!(" with {{n}} = 0..{}", urls.len() - 1)
            } else {
                String::new()
            },
            target,
            cfg.ramp,
            sources
        );
    }

    // --- stalled clients: connected first, never read -------------------
    let mut stalled = Vec::with_capacity(cfg.stalled);
    for i in 0..cfg.stalled {
        let source = (sources > 1)
            .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % sources as usize) as u8)));
        stalled.push(tokio::spawn(stalled_client(
            i,
            shared.clone(),
            target,
            source,
            urls[i % urls.len()].clone(),
            headers.clone(),
            cfg.connect_timeout,
            cfg.stalled_rcvbuf,
        )));
    }
    while shared.stalled_done.load(Relaxed) < cfg.stalled {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if progress && cfg.stalled > 0 {
        eprintln!(
            "loadgen: {} stalled client(s) connected; they never read",
            cfg.stalled
        );
    }

    // --- connect phase -------------------------------------------------
    let mut handles = Vec::with_capacity(cfg.clients);
    let t0 = shared.t0;
    let mut last_print = Instant::now();
    let spawn_one = |i: usize, handles: &mut Vec<_>| {
        let source = (sources > 1)
            .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % sources as usize) as u8)));
        handles.push(tokio::spawn(client(
            i,
            shared.clone(),
            target,
            source,
            urls[i % urls.len()].clone(),
            headers.clone(),
            cfg.connect_timeout,
        )));
    };
    let print_connect = |shared: &Shared| {
        eprintln!(
            "loadgen: connecting {:>6.1}s: {} ok, {} failed, {} pending",
            t0.elapsed().as_secs_f64(),
            shared.ready_ok.load(Relaxed),
            shared.ready_fail.load(Relaxed),
            cfg.clients - shared.ready_ok.load(Relaxed) - shared.ready_fail.load(Relaxed),
        )
    };
    let mut spawned = 0;
    while spawned < cfg.clients {
        let due = if cfg.ramp > 0.0 {
            ((t0.elapsed().as_secs_f64() * cfg.ramp) as usize + 1).min(cfg.clients)
        } else {
            cfg.clients
        };
        while spawned < due {
            spawn_one(spawned, &mut handles);
            spawned += 1;
            if spawned % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        if progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            print_connect(&shared);
        }
        if spawned < cfg.clients {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    while shared.ready_ok.load(Relaxed) + shared.ready_fail.load(Relaxed) < cfg.clients {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            print_connect(&shared);
        }
    }
    let connected = shared.ready_ok.load(Relaxed);
    let connect_failures = shared.ready_fail.load(Relaxed);
    let connect_secs = if connected > 0 {
        shared.last_ready_us.load(Relaxed) as f64 / 1e6
    } else {
        t0.elapsed().as_secs_f64()
    };
    if progress {
        print_connect(&shared);
        eprintln!(
            "loadgen: connected {connected}/{} in {connect_secs:.2}s{}",
            cfg.clients,
            if connect_failures > 0 {
                format!(", {connect_failures} failed")
            } else {
                String::new()
            }
        );
    }

    // --- measure / hold ------------------------------------------------
    let measures = cfg.mode.measures();
    let window_cpu;
    let connected_at_end;
    let window_secs;
    if connected == 0 {
        window_cpu = None;
        connected_at_end = 0;
        window_secs = 0.0;
    } else if measures {
        let start_ns = now_ns() + cfg.warmup.as_nanos() as u64;
        let end_ns = start_ns + cfg.duration.as_nanos() as u64;
        shared.window_start.store(start_ns, Relaxed);
        shared.window_end.store(end_ns, Relaxed);
        let start_at = tokio::time::Instant::now() + cfg.warmup;
        let end_at = start_at + cfg.duration;
        if progress {
            eprintln!(
                "loadgen: warmup {:.1}s, then measuring {:.1}s",
                secs(cfg.warmup),
                secs(cfg.duration)
            );
        }
        if !wait_while_alive(&shared, start_at, |_| {}).await && progress {
            eprintln!("loadgen: every client disconnected during warmup");
        }
        let cpu0 = cpu_secs();
        if let Some(n) = &cfg.on_measure_start {
            n.notify_one();
        }
        let mut last = shared.live_msgs.load(Relaxed);
        let mut next_print = start_at + Duration::from_secs(1);
        let all_alive = wait_while_alive(&shared, end_at, |now| {
            if progress && now >= next_print && now < end_at {
                let msgs = shared.live_msgs.load(Relaxed);
                eprintln!(
                    "loadgen: {:>6.1}s: {} msg/s, {} connected",
                    (now - start_at).as_secs_f64(),
                    msgs - last,
                    shared.alive.load(Relaxed)
                );
                last = msgs;
                next_print += Duration::from_secs(1);
            }
        })
        .await;
        let now = tokio::time::Instant::now();
        if !all_alive && progress {
            eprintln!("loadgen: every client disconnected; ending the window early");
        }
        window_secs = now
            .min(end_at)
            .saturating_duration_since(start_at)
            .as_secs_f64();
        let cpu1 = cpu_secs();
        window_cpu = cpu0.zip(cpu1).map(|(a, b)| round(b - a, 2));
        connected_at_end = shared.alive.load(Relaxed);
        // Let reads stamped before the window's end finish processing.
        tokio::time::sleep(Duration::from_millis(20)).await;
    } else {
        if progress {
            eprintln!("loadgen: holding {:.1}s", secs(cfg.hold));
        }
        let cpu0 = cpu_secs();
        let start = tokio::time::Instant::now();
        wait_while_alive(&shared, start + cfg.hold, |_| {}).await;
        window_secs = start.elapsed().as_secs_f64().min(secs(cfg.hold));
        let cpu1 = cpu_secs();
        window_cpu = cpu0.zip(cpu1).map(|(a, b)| round(b - a, 2));
        connected_at_end = shared.alive.load(Relaxed);
    }
    shared.cancel.cancel();

    let mut all = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(s) => all.push(s),
            Err(e) => eprintln!("loadgen: client task failed: {e}"),
        }
    }
    let stalled_report = if cfg.stalled > 0 {
        let mut r = StalledReport {
            clients: cfg.stalled,
            connected: 0,
            closed_by_server: 0,
            close_reasons: BTreeMap::new(),
            open_at_end: 0,
        };
        for h in stalled {
            match h.await {
                Ok((true, Some(reason))) => {
                    r.connected += 1;
                    r.closed_by_server += 1;
                    *r.close_reasons.entry(reason).or_insert(0) += 1;
                }
                Ok((true, None)) => {
                    r.connected += 1;
                    r.open_at_end += 1;
                }
                Ok((false, _)) => {}
                Err(e) => eprintln!("loadgen: stalled client task failed: {e}"),
            }
        }
        Some(r)
    } else {
        None
    };

    // --- report ----------------------------------------------------------
    let ready: Vec<&ClientStats> = all.iter().filter(|s| s.ready).collect();
    let messages: u64 = ready.iter().map(|s| s.messages).sum();
    let mut disconnect_reasons = BTreeMap::new();
    for s in &ready {
        if let End::Lost(r) = &s.end {
            *disconnect_reasons.entry(r.clone()).or_insert(0u64) += 1;
        }
    }
    let disconnects = disconnect_reasons.values().sum::<u64>() as usize;
    let connect_errors: BTreeMap<String, u64> =
        shared.connect_errors.lock().unwrap().drain().collect();
    let mut hist = new_hist();
    for h in shared.hists.lock().unwrap().iter() {
        hist.add(&*h.lock().unwrap())
            .expect("same-shaped histograms");
    }
    let latency = (!hist.is_empty()).then(|| Latency {
        p50: hist.value_at_quantile(0.50),
        p90: hist.value_at_quantile(0.90),
        p99: hist.value_at_quantile(0.99),
        p999: hist.value_at_quantile(0.999),
        max: hist.max(),
        mean: round(hist.mean(), 1),
        samples: hist.len(),
    });
    let dur = window_secs;
    let per_client = (!ready.is_empty()).then(|| PerClient {
        min: ready.iter().map(|s| s.messages).min().unwrap_or(0),
        mean: round(messages as f64 / ready.len() as f64, 1),
        max: ready.iter().map(|s| s.messages).max().unwrap_or(0),
    });
    let m = |v: u64| measures.then_some(v);
    let expected = cfg
        .expect_rate
        .filter(|_| measures)
        .map(|r| r * dur * connected as f64);
    let report = Report {
        mode: cfg.mode,
        url: cfg.url.clone(),
        spread: urls.len(),
        clients: cfg.clients,
        connected,
        connect_failures,
        connect_errors,
        connect_secs: round(connect_secs, 3),
        connects_per_sec: if connect_secs > 0.0 {
            round(connected as f64 / connect_secs, 1)
        } else {
            0.0
        },
        warmup_secs: measures.then(|| secs(cfg.warmup)),
        duration_secs: measures.then(|| round(dur, 3)),
        hold_secs: (!measures).then(|| round(window_secs, 3)),
        messages,
        deliveries_per_sec: measures.then(|| {
            if dur > 0.0 {
                round(messages as f64 / dur, 1)
            } else {
                0.0
            }
        }),
        payload_bytes: m(ready.iter().map(|s| s.bytes).sum()),
        latency_us: measures.then_some(latency),
        gaps: m(ready.iter().map(|s| s.gaps).sum()),
        dups: m(ready.iter().map(|s| s.dups).sum()),
        clients_with_gaps: measures.then(|| ready.iter().filter(|s| s.gaps > 0).count()),
        unparsed: m(ready.iter().map(|s| s.unparsed).sum()),
        silent_clients: measures.then(|| ready.iter().filter(|s| s.messages == 0).count()),
        per_client: per_client.filter(|_| measures),
        expected_deliveries: expected,
        delivery_ratio: expected.map(|e| {
            if e > 0.0 {
                round(messages as f64 / e, 4)
            } else {
                0.0
            }
        }),
        connected_at_end,
        disconnects,
        disconnect_reasons,
        nats_errors: cfg
            .mode
            .nats()
            .then(|| all.iter().map(|s| s.nats_errors).sum()),
        threads: cfg.threads,
        sources,
        stalled: stalled_report,
        loadgen_cpu_secs: cpu_start.zip(cpu_secs()).map(|(a, b)| round(b - a, 2)),
        loadgen_cpu_window_secs: window_cpu,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_url_replaces_every_placeholder() {
        assert_eq!(
            spread_url("ws://127.0.0.1:9900/bench/{n}", 7),
            "ws://127.0.0.1:9900/bench/7"
        );
        assert_eq!(spread_url("ws://h/a/{n}?ch={n}", 12), "ws://h/a/12?ch=12");
        assert_eq!(spread_url("ws://h/bench", 3), "ws://h/bench");
    }

    #[test]
    fn spread_urls_one_per_index() {
        let urls = spread_urls("ws://127.0.0.1:9900/bench/{n}", 3).unwrap();
        let paths: Vec<&str> = urls.iter().map(|u| u.path.as_str()).collect();
        assert_eq!(paths, ["/bench/0", "/bench/1", "/bench/2"]);
        assert!(urls.iter().all(|u| u.host == "127.0.0.1" && u.port == 9900));
        // Client c uses index c % spread.
        let client_path = |c: usize| urls[c % urls.len()].path.clone();
        assert_eq!(client_path(0), "/bench/0");
        assert_eq!(client_path(4), "/bench/1");
        assert_eq!(client_path(1001), "/bench/2");

        // In the query too.
        let urls = spread_urls("ws://127.0.0.1:9900/s?ch=bench-{n}", 2).unwrap();
        assert_eq!(urls[1].path, "/s?ch=bench-1");
    }

    #[test]
    fn spread_of_one_substitutes_zero_and_needs_no_placeholder() {
        let urls = spread_urls("ws://127.0.0.1:9900/bench", 1).unwrap();
        assert_eq!(urls.len(), 1);
        assert_eq!(urls[0].path, "/bench");
        let urls = spread_urls("ws://127.0.0.1:9900/bench/{n}", 1).unwrap();
        assert_eq!(urls[0].path, "/bench/0");
    }

    #[test]
    fn spread_urls_rejects_bad_setups() {
        let err = spread_urls("ws://127.0.0.1:9900/bench", 10).unwrap_err();
        assert!(err.contains("needs a {n}"), "{err}");
        assert!(spread_urls("ws://127.0.0.1:9900/bench/{n}", 0).is_err());
        // The placeholder may not change where the clients connect.
        let err = spread_urls("ws://127.0.0.1:990{n}/bench", 2).unwrap_err();
        assert!(err.contains("path or query"), "{err}");
        let err = spread_urls("ws://127.0.0.{n}:9900/bench", 2).unwrap_err();
        assert!(err.contains("path or query"), "{err}");
        // Still a ws:// URL after substitution.
        assert!(spread_urls("wss://127.0.0.1/{n}", 2).is_err());
    }
}
