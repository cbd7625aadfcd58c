//! Several gateway instances as one, over NATS (`broker: {kind: nats}`).
//!
//! ```text
//!  instance A (holds the lease of channel c)        instance B
//!  source ─▶ publisher ─▶ ClusterBroker ──local──▶ A's sessions
//!                              │ core publish {p}.msg.c (the frame bytes)
//!                              ▼
//!                 JetStream stream {p}_messages (last per subject)
//!                              │ ordered consumer per instance
//!                              ▼
//!                        B's feed ──local──▶ B's sessions
//! ```
//!
//! - A message is parsed, validated and framed once, by the instance whose
//!   publisher took it; the frame's bytes travel as the NATS payload and
//!   every other instance hands them to its sessions as they are.
//! - The stream keeps the latest messages per subject (`STREAM_PER_SUBJECT`,
//!   so a feed that lags a little loses nothing): a starting instance gets
//!   every channel's last value from it before it serves, and a keyed
//!   stream's last value is fetched from it on a first local subscribe.
//! - Each plugin source runs on one instance at a time: the holder of its
//!   lease, a subject of the JetStream stream `{p}_leases` written with
//!   conditional publishes (see `channel::leased`).
//! - Every instance says once a second which keyed streams its clients
//!   follow and how many connections it counts per limit (`{p}.ctl.hb.*`),
//!   so the lease holder opens the streams the cluster wants and connection
//!   caps count the whole cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, MemoryBroker, Message, Subscriber, SubscriptionId, Topic};
use crate::config::{NatsAuth, NatsCfg};
use crate::state::GatewayState;

/// How often instances announce themselves.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// An instance not heard from for this long is gone: its connections and
/// its clients' keyed streams no longer count.
pub const PEER_EXPIRY: Duration = Duration::from_secs(4);
/// Messages waiting to go to NATS; beyond it they are dropped and counted.
const OUTBOX: usize = 65_536;

/// The most payload bytes the outbox holds.
const OUTBOX_BYTES: u64 = 64 << 20;

/// How long, after shutdown began, the last messages may take to reach NATS.
const FINAL_SEND: Duration = Duration::from_secs(1);
/// Messages the stream keeps, in bytes (the oldest go first).
const STREAM_BYTES: i64 = 256 << 20;
/// Messages the stream keeps per subject: how far an instance's feed may
/// lag behind one channel (or keyed stream) before it misses messages. The
/// newest one is the subject's last value.
const STREAM_PER_SUBJECT: i64 = 256;

const H_ORIGIN: &str = "Gw-Origin";
const H_RETAIN: &str = "Gw-Retain";
const H_END: &str = "Gw-End";

/// Cluster figures for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Messages sent to the other instances.
    pub sent: AtomicU64,
    /// Messages dropped because the outbox to NATS was full.
    pub send_dropped: AtomicU64,
    /// Publishes NATS refused (connection lost while sending).
    pub send_errors: AtomicU64,
    /// Messages received from other instances.
    pub received: AtomicU64,
    /// Received frames that were not one whole WebSocket text frame, dropped.
    pub received_invalid: AtomicU64,
    /// Received messages for channels this instance does not serve.
    pub received_unknown: AtomicU64,
    /// Other instances seen in the last `PEER_EXPIRY`.
    pub peers: AtomicU64,
    /// Connections open on the other instances (their last heartbeat).
    pub peer_connections: AtomicU64,
    /// Sources this instance took over (leases acquired).
    pub leases_acquired: AtomicU64,
    /// Leases this instance lost without giving them up (renewal failed).
    pub leases_lost: AtomicU64,
    /// Commands forwarded to the instance running the source.
    pub commands_forwarded: AtomicU64,
}

/// What an instance tells the others once a second.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Heartbeat {
    instance: String,
    /// The process (instance name and a random part).
    origin: String,
    /// Open WebSocket connections.
    connections: u64,
    /// Per connection-limit setting, the count per key.
    counts: HashMap<String, HashMap<String, usize>>,
    /// Per keyed channel, the keys its clients follow, with their parameters.
    keys: HashMap<String, Vec<(String, String)>>,
}

/// A keyed stream wanted, or no longer wanted, by an instance's clients.
#[derive(Debug, Serialize, Deserialize)]
struct KeyInterest {
    instance: String,
    channel: String,
    key: String,
    /// Path parameters (JSON), when opening.
    params: Option<String>,
}

/// What another instance wants of a channel's keyed streams (for the
/// channel's lease task).
#[derive(Debug)]
pub enum RemoteInterest {
    /// `instance` follows `key` now.
    Open(Arc<str>, Arc<str>, Vec<u8>),
    /// `instance` no longer follows `key`.
    Close(Arc<str>, Arc<str>),
    /// Everything `instance` follows (its heartbeat).
    Sync(Arc<str>, Vec<(Arc<str>, Vec<u8>)>),
    /// `instance` is gone.
    Gone(Arc<str>),
}

struct Peer {
    seen: Instant,
    connections: u64,
    counts: HashMap<String, HashMap<String, usize>>,
}

struct Outgoing {
    subject: Subject,
    headers: HeaderMap,
    payload: Bytes,
    /// A channel's message: the channel and its fence when it was queued.
    fence: Option<(Arc<str>, u64)>,
}

/// Why a lease was not written.
#[derive(Debug)]
pub enum LeaseError {
    /// Another instance holds it (or took it meanwhile).
    Held,
    /// NATS did not answer, or refused otherwise.
    Failed(String),
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClusterError(pub String);

/// A command's answer, as it travels between instances.
pub enum RemoteAnswer {
    /// The plugin's JSON answer.
    Ok(Vec<u8>),
    /// The plugin refused (its message).
    Failed(String),
    /// The plugin panicked.
    Crashed(String),
    /// No instance runs the source (or it is not running there).
    Unavailable,
    /// No answer in time.
    Timeout,
    /// The holder runs as many commands of the channel as it may at once.
    Busy,
}

/// This instance's membership of the cluster; also its [`Broker`].
pub struct Cluster {
    /// Settings.
    pub cfg: Arc<NatsCfg>,
    /// The NATS connection.
    pub client: async_nats::Client,
    stream: stream::Stream,
    js: jetstream::Context,
    leases: stream::Stream,
    lease_ttl: Duration,
    /// Delivery to this instance's sessions.
    pub local: Arc<MemoryBroker>,
    out: mpsc::Sender<Outgoing>,
    /// Payload bytes in the outbox (at most `OUTBOX_BYTES`).
    out_bytes: AtomicU64,
    /// Per channel, raised when this instance loses the channel's lease:
    /// its messages queued before then are not sent.
    fences: Mutex<HashMap<Arc<str>, u64>>,
    out_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Figures.
    pub metrics: ClusterMetrics,
    peers: Mutex<HashMap<Arc<str>, Peer>>,
    /// The stream sequence of the last message the feed processed. The feed
    /// holds it while it hands a message to sessions, so a last value
    /// replayed from the stream and the feed's deliveries never cross.
    feed_seq: Arc<Mutex<u64>>,
    /// When the message stream in use was created (ns since the epoch),
    /// and when `ensure_streams` last asked NATS.
    streams: Mutex<(i128, Option<Instant>)>,
    /// Bumped when the streams had to be made again (the feed follows the
    /// new message stream).
    streams_made: watch::Sender<u64>,
    /// Encoded subject prefix of messages: `{p}.msg`.
    msg_prefix: String,
    /// This process in the cluster: the instance name and a random part, so
    /// that a restarted instance of the same name reads what its previous
    /// run published (last values) instead of skipping it as its own.
    origin: String,
    /// Whether another process with this instance name was seen (logged once).
    twin_seen: std::sync::atomic::AtomicBool,
}

/// `s` as one NATS subject token: letters, digits, `-` and `_` stay, every
/// other byte is `%XX`.
pub fn encode_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_token`].
pub fn decode_token(t: &str) -> Option<String> {
    let b = t.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where a WebSocket frame's payload starts, if `frame` is exactly one
/// unmasked, final text frame.
pub fn frame_payload(frame: &[u8]) -> Option<usize> {
    let (&b0, &b1) = (frame.first()?, frame.get(1)?);
    if b0 != 0x81 || b1 & 0x80 != 0 {
        return None;
    }
    let (header, len): (usize, usize) = match b1 & 0x7f {
        126 => (
            4,
            u16::from_be_bytes(frame.get(2..4)?.try_into().ok()?) as usize,
        ),
        127 => (
            10,
            u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?) as usize,
        ),
        n => (2, n as usize),
    };
    // A foreign publisher's length can be anything: no overflow.
    (header.checked_add(len) == Some(frame.len())).then_some(header)
}

/// The stream that keeps the last messages per subject (for instances that
/// start later). In memory: a NATS restart loses it, and it is made again.
fn messages_stream(p: &str) -> stream::Config {
    stream::Config {
        name: format!("{p}_messages"),
        subjects: vec![format!("{p}.msg.>")],
        max_messages_per_subject: STREAM_PER_SUBJECT,
        max_bytes: STREAM_BYTES,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::Memory,
        ..Default::default()
    }
}

/// Leases: one subject per source, at most one message each, which expires
/// `ttl` after it was written.
fn leases_stream(p: &str, ttl: Duration) -> stream::Config {
    stream::Config {
        name: format!("{p}_leases"),
        subjects: vec![format!("{p}.lease.>")],
        max_messages_per_subject: 1,
        max_age: ttl,
        storage: stream::StorageType::Memory,
        ..Default::default()
    }
}

impl Cluster {
    /// Connect to NATS and make sure the message stream and the lease
    /// bucket exist.
    pub async fn connect(cfg: Arc<NatsCfg>) -> Result<Arc<Cluster>, ClusterError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| ClusterError(format!("{what}: {e}"));
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("gateway {}", cfg.instance))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(5)));
        opts = match &cfg.auth {
            NatsAuth::None => opts,
            NatsAuth::Token(t) => opts.token(t.clone()),
            NatsAuth::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
            NatsAuth::CredsFile(path) => opts
                .credentials_file(path)
                .await
                .map_err(|e| fail("cannot read the NATS credentials file", &e))?,
        };
        let servers: Vec<&str> = cfg.url.split(',').map(str::trim).collect();
        let client = opts
            .connect(servers)
            .await
            .map_err(|e| fail(&format!("cannot connect to NATS at {}", cfg.url), &e))?;
        let js = jetstream::new(client.clone());
        let p = &cfg.prefix;
        let stream = js
            .get_or_create_stream(messages_stream(p))
            .await
            .map_err(|e| {
                fail(
                    "cannot create the JetStream stream (is JetStream enabled?)",
                    &e,
                )
            })?;
        // Leases: one subject per source, at most one message each, which
        // expires `lease_ttl` after it was written. Taking and renewing are
        // conditional publishes on the subject's last sequence (what a KV
        // bucket does underneath; NATS 2.9 servers included).
        let leases = js
            .get_or_create_stream(leases_stream(p, cfg.lease_ttl))
            .await
            .map_err(|e| fail("cannot create the lease stream (is JetStream enabled?)", &e))?;
        let mut lease_ttl = cfg.lease_ttl;
        let info = leases
            .get_info()
            .await
            .map_err(|e| fail("cannot read the lease stream", &e))?;
        if info.config.max_age.is_zero() {
            return Err(ClusterError(format!(
                "the lease stream {p}_leases has no max_age: the lease of an instance that dies would never expire and its sources would run nowhere; give it max_age = lease_ttl, or delete it to have it created"
            )));
        }
        if info.config.max_age != cfg.lease_ttl {
            tracing::warn!(
                configured = ?cfg.lease_ttl,
                in_use = ?info.config.max_age,
                "the cluster's lease stream has another lease_ttl (the first instance's): using it; configure the same one on every instance"
            );
            lease_ttl = info.config.max_age;
        }
        let (out, out_rx) = mpsc::channel(OUTBOX);
        let created = stream.cached_info().created.unix_timestamp_nanos();
        tracing::info!(instance = %cfg.instance, url = %cfg.url, prefix = %p, lease_ttl = ?cfg.lease_ttl, "joined the cluster");
        Ok(Arc::new(Cluster {
            msg_prefix: format!("{p}.msg"),
            origin: format!("{}/{:016x}", cfg.instance, rand::random::<u64>()),
            twin_seen: Default::default(),
            cfg: cfg.clone(),
            client,
            js,
            stream,
            leases,
            lease_ttl,
            local: Arc::new(MemoryBroker::new()),
            out,
            out_bytes: AtomicU64::new(0),
            fences: Mutex::new(HashMap::new()),
            out_rx: Mutex::new(Some(out_rx)),
            metrics: ClusterMetrics::default(),
            peers: Mutex::new(HashMap::new()),
            feed_seq: Arc::default(),
            streams: Mutex::new((created, None)),
            streams_made: watch::channel(0).0,
        }))
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.cfg.instance
    }

    fn subject(&self, prefix: &str, channel: &str, key: Option<&str>) -> String {
        match key {
            None => format!("{prefix}.{}", encode_token(channel)),
            Some(k) => format!("{prefix}.{}.{}", encode_token(channel), encode_token(k)),
        }
    }

    fn msg_subject(&self, topic: &Topic) -> String {
        self.subject(&self.msg_prefix, &topic.channel, topic.key.as_deref())
    }

    /// The subject a channel's commands are asked on.
    pub fn cmd_subject(&self, channel: &str) -> String {
        self.subject(&format!("{}.cmd", self.cfg.prefix), channel, None)
    }

    /// The lease subject of a channel's source.
    pub fn lease_key(&self, channel: &str) -> String {
        self.subject(&format!("{}.lease", self.cfg.prefix), channel, None)
    }

    /// Write this instance's name to lease subject `key` if its last
    /// sequence is `last` (0: nobody holds it); the new sequence.
    pub async fn lease_write(&self, key: &str, last: u64) -> Result<u64, LeaseError> {
        match self.lease_write_once(key, last).await {
            Err(LeaseError::Held) => {
                // Refused: is the lease this instance's own after all (an
                // earlier write NATS stored but whose answer was lost, so
                // `last` is stale)? Then write on its actual sequence.
                let Ok(m) = self.leases.get_last_raw_message_by_subject(key).await else {
                    return Err(LeaseError::Held);
                };
                if m.payload.as_ref() != self.origin.as_bytes() {
                    return Err(LeaseError::Held);
                }
                self.lease_write_once(key, m.sequence).await
            }
            r => r,
        }
    }

    async fn lease_write_once(&self, key: &str, last: u64) -> Result<u64, LeaseError> {
        let mut h = HeaderMap::new();
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            last.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(key.to_string(), h, self.origin.clone().into())
            .await
            .map_err(|e| LeaseError::Failed(e.to_string()))?
            .await;
        match ack {
            Ok(a) => Ok(a.sequence),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Err(LeaseError::Held)
            }
            Err(e) => Err(LeaseError::Failed(e.to_string())),
        }
    }

    /// Give lease `key` up, if this instance's write (sequence `rev`) is
    /// still its last: the purge removes messages up to `rev` only, so a
    /// lease another instance took since stays.
    pub async fn lease_release(&self, key: &str, rev: u64) {
        let _ = self.leases.purge().filter(key).sequence(rev + 1).await;
    }

    /// How long a lease lives without renewal: the lease stream's `max_age`
    /// (the first instance's `lease_ttl`; every instance must agree).
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// Make the streams again if they are gone (a NATS server restarted
    /// without them: they live in memory). Called when a lease write fails;
    /// if the message stream is a new one, the feed follows it from now on.
    /// Every channel's lease task calls it when its write fails: NATS is
    /// asked once a second at most.
    pub async fn ensure_streams(&self) {
        {
            let mut st = self.streams.lock();
            if st.1.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            st.1 = Some(Instant::now());
        }
        let p = &self.cfg.prefix;
        let Ok(msgs) = self.js.get_or_create_stream(messages_stream(p)).await else {
            return;
        };
        let _ = self
            .js
            .get_or_create_stream(leases_stream(p, self.lease_ttl))
            .await;
        let created = msgs.cached_info().created.unix_timestamp_nanos();
        let made = std::mem::replace(&mut self.streams.lock().0, created) != created;
        if made {
            tracing::warn!(prefix = %p, "the cluster's streams were gone (NATS restarted?): made them again; the last values kept there are lost");
            self.streams_made.send_modify(|n| *n += 1);
        }
    }

    /// A consumer of the message stream for the feed.
    async fn follow(
        &self,
        from: consumer::DeliverPolicy,
    ) -> Result<(consumer::push::Ordered, u64), ClusterError> {
        let consumer = self
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                deliver_policy: from,
                filter_subject: format!("{}.>", self.msg_prefix),
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError(format!("cannot follow the message stream: {e}")))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ClusterError(format!("cannot follow the message stream: {e}")))?;
        Ok((messages, pending))
    }

    fn send(&self, topic: &Topic, payload: Bytes, retain: bool, end: bool) {
        let mut headers = HeaderMap::new();
        headers.insert(H_ORIGIN, self.origin.as_str());
        if retain {
            headers.insert(H_RETAIN, "1");
        }
        if end {
            headers.insert(H_END, "1");
        }
        let fence = self.fences.lock().get(&topic.channel).copied().unwrap_or(0);
        let o = Outgoing {
            subject: self.msg_subject(topic).into(),
            headers,
            payload,
            fence: Some((topic.channel.clone(), fence)),
        };
        self.enqueue(o);
    }

    /// This instance lost `channel`'s lease without giving it up (cut off
    /// from NATS): what its source made meanwhile, still in the outbox, is
    /// older than what the new holder publishes, and is not sent when NATS
    /// is back (it would reach the other instances after the new holder's
    /// messages, and stand as the last value).
    pub fn fence(&self, channel: &str) {
        *self.fences.lock().entry(channel.into()).or_insert(0) += 1;
    }

    fn fenced(&self, o: &Outgoing) -> bool {
        o.fence
            .as_ref()
            .is_some_and(|(ch, at)| self.fences.lock().get(ch).is_some_and(|now| now > at))
    }

    /// Into the outbox, unless it is full (in messages or in bytes: while
    /// NATS is away messages wait there, and nowhere else): then dropped
    /// and counted.
    fn enqueue(&self, o: Outgoing) {
        let len = o.payload.len() as u64;
        let before = self.out_bytes.fetch_add(len, Relaxed);
        if before + len > OUTBOX_BYTES || self.out.try_send(o).is_err() {
            self.out_bytes.fetch_sub(len, Relaxed);
            self.metrics.send_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Start the tasks: the outbox pump, the message feed, the control
    /// subscription and the heartbeat. Returns once the feed has delivered
    /// the stream's retained messages (or after 10 s).
    pub async fn start(
        self: &Arc<Self>,
        state: Weak<GatewayState>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<(), ClusterError> {
        if let Some(rx) = self.out_rx.lock().take() {
            tracker.spawn(pump(self.clone(), rx, shutdown.clone()));
        }
        let (ready_tx, mut ready) = watch::channel(false);
        let (messages, pending) = self.follow(consumer::DeliverPolicy::LastPerSubject).await?;
        if pending == 0 {
            let _ = ready_tx.send(true);
        }
        tracker.spawn(feed(
            self.clone(),
            messages,
            state.clone(),
            ready_tx,
            shutdown.clone(),
        ));
        let ctl = self
            .client
            .subscribe(format!("{}.ctl.>", self.cfg.prefix))
            .await
            .map_err(|e| {
                ClusterError(format!(
                    "cannot subscribe to the cluster's control subjects: {e}"
                ))
            })?;
        tracker.spawn(control(self.clone(), ctl, state.clone(), shutdown.clone()));
        tracker.spawn(heartbeat(self.clone(), state, shutdown));
        let _ = tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r)).await;
        Ok(())
    }

    /// Tell the other instances that this one follows (or no longer
    /// follows) `key` of `channel`.
    pub fn announce_key(&self, channel: &str, key: &str, params: Option<&[u8]>) {
        let k = KeyInterest {
            instance: self.cfg.instance.clone(),
            channel: channel.to_string(),
            key: key.to_string(),
            params: params.map(|p| String::from_utf8_lossy(p).into_owned()),
        };
        let payload = serde_json::to_vec(&k).unwrap_or_default();
        let o = Outgoing {
            subject: format!("{}.ctl.key.{}", self.cfg.prefix, self.cfg.instance).into(),
            headers: HeaderMap::new(),
            payload: payload.into(),
            fence: None,
        };
        self.enqueue(o);
    }

    /// Ask the instance running `channel`'s source for a command's answer.
    pub async fn command(
        &self,
        channel: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> RemoteAnswer {
        self.metrics.commands_forwarded.fetch_add(1, Relaxed);
        let mut headers = HeaderMap::new();
        headers.insert("Gw-Timeout-Ms", timeout.as_millis().to_string().as_str());
        let req = self.client.send_request(
            self.cmd_subject(channel),
            async_nats::Request::new()
                .headers(headers)
                .payload(request.into())
                // A little longer than the holder's own wait, so its
                // timeout answer comes back.
                .timeout(Some(timeout + Duration::from_millis(500))),
        );
        match req.await {
            Ok(m) => match m.payload.split_first() {
                Some((b'o', rest)) => RemoteAnswer::Ok(rest.to_vec()),
                Some((b'f', rest)) => RemoteAnswer::Failed(String::from_utf8_lossy(rest).into()),
                Some((b'c', rest)) => RemoteAnswer::Crashed(String::from_utf8_lossy(rest).into()),
                Some((b't', _)) => RemoteAnswer::Timeout,
                Some((b'b', _)) => RemoteAnswer::Busy,
                _ => RemoteAnswer::Unavailable,
            },
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => RemoteAnswer::Timeout,
            Err(_) => RemoteAnswer::Unavailable,
        }
    }

    /// `gateway.cluster` in templates and the status snapshot: this
    /// instance's name and the cluster-wide figures.
    pub fn summary(&self, st: &GatewayState) -> serde_json::Value {
        let local = st.metrics.connections.load(Relaxed).max(0) as u64;
        serde_json::json!({
            "instance": self.cfg.instance,
            "instances": self.metrics.peers.load(Relaxed) + 1,
            "connections": local + self.metrics.peer_connections.load(Relaxed),
        })
    }

    /// The cluster's series for `/metrics`. Figures named `gateway_cluster_*`
    /// are cluster-wide (this instance's view of every instance); the
    /// others are this instance's.
    pub fn render(&self, st: &GatewayState, out: &mut String) {
        use std::fmt::Write;
        let m = &self.metrics;
        let local = st.metrics.connections.load(Relaxed).max(0) as u64;
        let figures: [(&str, &str, &str, u64); 11] = [
            (
                "gateway_cluster_instances",
                "gauge",
                "Cluster-wide: gateway instances in the cluster (this one and those heard from lately).",
                m.peers.load(Relaxed) + 1,
            ),
            (
                "gateway_cluster_connections",
                "gauge",
                "Cluster-wide: open WebSocket connections on every instance (the others' as of their last heartbeat).",
                local + m.peer_connections.load(Relaxed),
            ),
            (
                "gateway_broker_messages_sent_total",
                "counter",
                "This instance: messages published here and sent to the other instances.",
                m.sent.load(Relaxed),
            ),
            (
                "gateway_broker_messages_received_total",
                "counter",
                "This instance: messages from other instances handed to sessions here.",
                m.received.load(Relaxed),
            ),
            (
                "gateway_broker_send_dropped_total",
                "counter",
                "This instance: messages not sent to the other instances because the outbox to NATS was full.",
                m.send_dropped.load(Relaxed),
            ),
            (
                "gateway_broker_send_errors_total",
                "counter",
                "This instance: publishes to NATS that failed.",
                m.send_errors.load(Relaxed),
            ),
            (
                "gateway_broker_received_invalid_total",
                "counter",
                "This instance: messages from NATS that were not one whole text frame of a known subject, dropped.",
                m.received_invalid.load(Relaxed),
            ),
            (
                "gateway_broker_received_unknown_channel_total",
                "counter",
                "This instance: messages from other instances for channels not served here, dropped.",
                m.received_unknown.load(Relaxed),
            ),
            (
                "gateway_source_leases_acquired_total",
                "counter",
                "This instance: source leases taken (sources started here).",
                m.leases_acquired.load(Relaxed),
            ),
            (
                "gateway_source_leases_lost_total",
                "counter",
                "This instance: source leases lost because renewing failed (sources stopped here).",
                m.leases_lost.load(Relaxed),
            ),
            (
                "gateway_commands_forwarded_total",
                "counter",
                "This instance: plugin commands asked of the instance running the source.",
                m.commands_forwarded.load(Relaxed),
            ),
        ];
        for (name, kind, help, v) in figures {
            crate::metrics::series(out, name, kind, help, v as i64);
        }
        let _ = writeln!(
            out,
            "# HELP gateway_source_lease_held This instance: 1 while it holds the channel source's lease and runs the source.\n# TYPE gateway_source_lease_held gauge"
        );
        let live = st.live();
        let mut chans: Vec<_> = live.channels.values().collect();
        chans.sort_by(|a, b| a.cfg.name.cmp(&b.cfg.name));
        for rt in chans {
            let _ = writeln!(
                out,
                "gateway_source_lease_held{{channel=\"{}\",instance=\"{}\"}} {}",
                crate::metrics::escape(&rt.cfg.name),
                self.cfg.instance,
                u8::from(rt.metrics.lease_held.load(Relaxed))
            );
        }
    }

    /// Forget the other instances not heard from within `PEER_EXPIRY`;
    /// returns their names.
    fn expire_peers(&self, st: &GatewayState) -> Vec<Arc<str>> {
        let mut peers = self.peers.lock();
        let now = Instant::now();
        let gone: Vec<Arc<str>> = peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.seen) > PEER_EXPIRY)
            .map(|(k, _)| k.clone())
            .collect();
        for g in &gone {
            peers.remove(g);
        }
        if !gone.is_empty() {
            self.peers_changed(&peers, st);
        }
        gone
    }

    /// The other instances changed: recount them and their connections,
    /// and (with cluster limits) hand their counts, summed per setting and
    /// key, to the connection caps.
    fn peers_changed(&self, peers: &HashMap<Arc<str>, Peer>, st: &GatewayState) {
        self.metrics.peers.store(peers.len() as u64, Relaxed);
        self.metrics
            .peer_connections
            .store(peers.values().map(|p| p.connections).sum(), Relaxed);
        if !self.cfg.cluster_limits {
            return;
        }
        let mut sum: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for p in peers.values() {
            for (id, keys) in &p.counts {
                let e = sum.entry(id.clone()).or_default();
                for (k, n) in keys {
                    *e.entry(k.clone()).or_default() += n;
                }
            }
        }
        st.config().pool.remote.set(sum);
    }
}

/// Instance `inst` is gone: its clients' keyed-stream interest no longer
/// counts.
fn peer_gone(st: &GatewayState, inst: &Arc<str>) {
    for rt in st.live().channels.values().filter(|rt| rt.cfg.keyed) {
        rt.remote_interest(RemoteInterest::Gone(inst.clone()));
    }
}

impl Broker for Cluster {
    fn publish(&self, topic: &Topic, msg: &Message, retain: bool) {
        self.publish_batch(topic, std::slice::from_ref(msg), retain)
    }

    fn publish_batch(&self, topic: &Topic, msgs: &[Message], retain: bool) {
        // Keyed streams are kept here only while some session here follows
        // them; the stream keeps them for everyone else.
        let keep = retain && (topic.key.is_none() || self.local.follows(topic));
        self.local.publish_batch(topic, msgs, keep);
        self.metrics.sent.fetch_add(msgs.len() as u64, Relaxed);
        for msg in msgs {
            self.send(topic, msg.frame.clone(), retain, false);
        }
    }

    fn last(&self, topic: &Topic) -> Option<Message> {
        self.local.last(topic)
    }

    fn end(&self, topic: &Topic) -> Vec<Subscriber> {
        let kept = self.local.end(topic);
        self.send(topic, Bytes::new(), false, true);
        kept
    }

    fn end_here(&self, topic: &Topic) -> Vec<Subscriber> {
        self.local.end(topic)
    }

    fn subscribe(&self, topic: &Topic, sub: Subscriber, replay: bool) -> (SubscriptionId, usize) {
        let fetch = replay && topic.key.is_some() && self.local.last(topic).is_none();
        let (id, n) = self.local.subscribe(topic, sub, replay);
        if fetch && let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (stream, subject, local, topic, feed_seq, origin) = (
                self.stream.clone(),
                self.msg_subject(topic),
                self.local.clone(),
                topic.clone(),
                self.feed_seq.clone(),
                self.origin.clone(),
            );
            rt.spawn(async move {
                let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await else {
                    return;
                };
                if m.headers.get(H_END).is_some() || m.headers.get(H_RETAIN).is_none() {
                    return;
                }
                let Some(header) = frame_payload(&m.payload) else {
                    return;
                };
                let own = m
                    .headers
                    .get(H_ORIGIN)
                    .is_some_and(|o| o.as_str() == origin);
                // A message the feed has not reached yet reaches the new
                // subscriber through the feed (this instance's own ones
                // excepted: the feed skips those). Otherwise it is replayed,
                // unless something was published since the subscriber joined.
                let fed = feed_seq.lock();
                if own || *fed >= m.sequence {
                    local.replay_if_fresh(&topic, id, &Message::new(m.payload, header));
                }
                drop(fed);
            });
        }
        (id, n)
    }

    fn unsubscribe(&self, topic: &Topic, id: SubscriptionId) -> usize {
        self.local.unsubscribe(topic, id)
    }

    fn close_channel(&self, channel: &str, code: u16, reason: &'static str) -> usize {
        self.local.close_channel(channel, code, reason)
    }
}

/// Send what publishers hand over to NATS, in order, until shutdown (and
/// then what was handed over before it).
async fn pump(c: Arc<Cluster>, mut rx: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
    let mut batch = Vec::with_capacity(256);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            _ = shutdown.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, OUTBOX).await
            }
        };
        if n == 0 {
            break;
        }
        let sent = AtomicU64::new(0);
        let send = async {
            for o in batch.drain(..) {
                // While NATS is away, messages wait in the outbox (bounded)
                // rather than in the client's own queue (not bounded in bytes).
                while c.client.connection_state() != async_nats::connection::State::Connected {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let len = o.payload.len() as u64;
                if c.fenced(&o) {
                    c.metrics.send_dropped.fetch_add(1, Relaxed);
                } else if c
                    .client
                    .publish_with_headers(o.subject, o.headers, o.payload)
                    .await
                    .is_err()
                {
                    c.metrics.send_errors.fetch_add(1, Relaxed);
                }
                c.out_bytes.fetch_sub(len, Relaxed);
                sent.fetch_add(1, Relaxed);
            }
        };
        tokio::pin!(send);
        // A publish waits while NATS is away and the client's queue is
        // full; after shutdown only for a while.
        let done = tokio::select! {
            () = &mut send => true,
            () = shutdown.cancelled() => tokio::time::timeout(FINAL_SEND, &mut send).await.is_ok(),
        };
        if !done {
            let left = (n as u64 - sent.load(Relaxed)) + rx.len() as u64;
            c.metrics.send_dropped.fetch_add(left, Relaxed);
            tracing::warn!(
                messages = left,
                "NATS took no more messages within {FINAL_SEND:?} of the shutdown: the other instances will not get these"
            );
            return;
        }
        if shutdown.is_cancelled() && rx.is_empty() {
            break;
        }
    }
    // After everything this instance announced: the others forget it now.
    let bye = async {
        let _ = c
            .client
            .publish(
                format!("{}.ctl.bye.{}", c.cfg.prefix, c.cfg.instance),
                Bytes::new(),
            )
            .await;
        let _ = c.client.flush().await;
    };
    if tokio::time::timeout(FINAL_SEND, bye).await.is_err() {
        tracing::warn!(
            "NATS did not confirm this instance's last messages within {FINAL_SEND:?} of the shutdown; the other instances may miss them and will count this instance for a few seconds more"
        );
    }
}

/// Hand the other instances' messages to this instance's sessions.
async fn feed(
    c: Arc<Cluster>,
    mut messages: consumer::push::Ordered,
    state: Weak<GatewayState>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let skip = c.msg_prefix.len() + 1;
    let mut made = c.streams_made.subscribe();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = made.changed() => {
                // A new message stream: everything in it is new.
                match c.follow(consumer::DeliverPolicy::All).await {
                    Ok((m, _)) => messages = m,
                    Err(e) => tracing::warn!("cluster message feed: {}", e.0),
                }
                continue;
            }
            m = messages.next() => m,
        };
        let m = match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cluster message feed: {e}");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let starting = !*ready.borrow();
        if starting && m.info().map(|i| i.pending == 0).unwrap_or(true) {
            let _ = ready.send(true);
        }
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        // Held until this message is handed to the sessions (see `feed_seq`).
        let mut fed = c.feed_seq.lock();
        *fed = (*fed).max(seq);
        let headers = m.headers.clone().unwrap_or_default();
        if headers
            .get(H_ORIGIN)
            .is_some_and(|o| o.as_str() == c.origin)
        {
            continue;
        }
        let Some(rest) = m.subject.get(skip..) else {
            continue;
        };
        let (ch, key) = match rest.split_once('.') {
            Some((ch, k)) => (decode_token(ch), decode_token(k).map(Some)),
            None => (decode_token(rest), Some(None)),
        };
        let (Some(ch), Some(key)) = (ch, key) else {
            c.metrics.received_invalid.fetch_add(1, Relaxed);
            continue;
        };
        let Some(st) = state.upgrade() else { break };
        let Some(rt) = st.live().channels.get(ch.as_str()).cloned() else {
            c.metrics.received_unknown.fetch_add(1, Relaxed);
            continue;
        };
        drop(st);
        let key: Option<Arc<str>> = key.map(Into::into);
        if headers.get(H_END).is_some() {
            if let Some(k) = key {
                rt.end_key_remote(k);
            }
            continue;
        }
        let topic = Topic {
            channel: rt.cfg.name.clone(),
            key,
        };
        // While starting, the stream's last values arrive; one this
        // instance published itself meanwhile is newer.
        if starting && c.local.last(&topic).is_some() {
            continue;
        }
        let payload = m.message.payload.clone();
        let Some(header) = frame_payload(&payload) else {
            c.metrics.received_invalid.fetch_add(1, Relaxed);
            continue;
        };
        let mut msg = Message::new(payload, header).emitted_at(crate::metrics::stamp());
        if !rt.cfg.filters.is_empty() {
            match serde_json::from_slice(msg.json()) {
                Ok(v) => msg.value = Some(Arc::new(v)),
                Err(_) => {
                    c.metrics.received_invalid.fetch_add(1, Relaxed);
                    continue;
                }
            }
        }
        c.metrics.received.fetch_add(1, Relaxed);
        let retain =
            headers.get(H_RETAIN).is_some() && (topic.key.is_none() || c.local.follows(&topic));
        c.local.publish(&topic, &msg, retain);
        drop(fed);
    }
}

/// Follow the other instances' heartbeats and keyed-stream interest.
async fn control(
    c: Arc<Cluster>,
    mut sub: async_nats::Subscriber,
    state: Weak<GatewayState>,
    shutdown: CancellationToken,
) {
    let hb = format!("{}.ctl.hb.", c.cfg.prefix);
    let key = format!("{}.ctl.key.", c.cfg.prefix);
    let bye = format!("{}.ctl.bye.", c.cfg.prefix);
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(st) = state.upgrade() else { break };
        if let Some(from) = m.subject.strip_prefix(hb.as_str()) {
            let Ok(h) = serde_json::from_slice::<Heartbeat>(&m.payload) else {
                continue;
            };
            if from == c.cfg.instance {
                if h.origin != c.origin && !c.twin_seen.swap(true, Relaxed) {
                    tracing::error!(instance = %from, "another gateway process uses this instance name: give every instance its own `broker.instance`");
                }
                continue;
            }
            let from: Arc<str> = from.into();
            {
                let mut peers = c.peers.lock();
                peers.insert(
                    from.clone(),
                    Peer {
                        seen: Instant::now(),
                        connections: h.connections,
                        counts: h.counts,
                    },
                );
                c.peers_changed(&peers, &st);
            }
            let mut keys = h.keys;
            for rt in st.live().channels.values().filter(|rt| rt.cfg.keyed) {
                let list = keys
                    .remove(&*rt.cfg.name)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, p)| (Arc::from(k), p.into_bytes()))
                    .collect();
                rt.remote_interest(RemoteInterest::Sync(from.clone(), list));
            }
        } else if let Some(from) = m.subject.strip_prefix(key.as_str()) {
            if from == c.cfg.instance {
                continue;
            }
            let Ok(k) = serde_json::from_slice::<KeyInterest>(&m.payload) else {
                continue;
            };
            if let Some(rt) = st.live().channels.get(k.channel.as_str()) {
                let inst: Arc<str> = k.instance.into();
                rt.remote_interest(match k.params {
                    Some(p) => RemoteInterest::Open(inst, k.key.into(), p.into_bytes()),
                    None => RemoteInterest::Close(inst, k.key.into()),
                });
            }
        } else if let Some(from) = m.subject.strip_prefix(bye.as_str()) {
            if from == c.cfg.instance {
                continue;
            }
            let from: Arc<str> = from.into();
            {
                let mut peers = c.peers.lock();
                peers.remove(&from);
                c.peers_changed(&peers, &st);
            }
            peer_gone(&st, &from);
        }
    }
}

/// Tell the others once a second what this instance counts and follows;
/// forget the instances gone quiet. At shutdown, say goodbye.
async fn heartbeat(c: Arc<Cluster>, state: Weak<GatewayState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let subject = format!("{}.ctl.hb.{}", c.cfg.prefix, c.cfg.instance);
    let mut hb_failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(st) = state.upgrade() else { break };
        let mut h = Heartbeat {
            instance: c.cfg.instance.clone(),
            origin: c.origin.clone(),
            connections: st.metrics.connections.load(Relaxed).max(0) as u64,
            ..Default::default()
        };
        if c.cfg.cluster_limits {
            h.counts = st.config().pool.local_counts();
        }
        for rt in st.live().channels.values().filter(|rt| rt.cfg.keyed) {
            let keys = rt.local_keys();
            if !keys.is_empty() {
                h.keys.insert(
                    rt.cfg.name.to_string(),
                    keys.into_iter()
                        .map(|(k, p)| (k.to_string(), String::from_utf8_lossy(&p).into_owned()))
                        .collect(),
                );
            }
        }
        for g in c.expire_peers(&st) {
            tracing::info!(instance = %g, "cluster peer gone quiet");
            peer_gone(&st, &g);
        }
        drop(st);
        let payload = serde_json::to_vec(&h).unwrap_or_default();
        if let Err(e) = c.client.publish(subject.clone(), payload.into()).await {
            c.metrics.send_errors.fetch_add(1, Relaxed);
            if !hb_failing {
                tracing::warn!(error = %e, "cannot send this instance's heartbeat: the others will count it as gone");
            }
            hb_failing = true;
        } else {
            hb_failing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_hold_subject_separators() {
        for s in ["ticker", "a.b", "job 1/2", "x*y>z", "é%", ""] {
            let t = encode_token(s);
            assert!(!t.contains(['.', '*', '>', ' ']), "{t}");
            assert_eq!(decode_token(&t).as_deref(), Some(s));
        }
        assert_eq!(encode_token("a.b"), "a%2Eb");
        assert_eq!(decode_token("%zz"), None);
        assert_eq!(decode_token("%4"), None);
    }

    #[test]
    fn frame_payload_accepts_one_whole_text_frame_only() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let body = vec![b'1'; len];
            let (frame, header) = crate::ws::text_frame(&body);
            assert_eq!(frame_payload(&frame), Some(header), "{len}");
            assert_eq!(frame_payload(&frame[..frame.len() - 1]), None, "{len} cut");
        }
        assert_eq!(frame_payload(b""), None);
        assert_eq!(frame_payload(b"\x82\x00"), None, "binary");
        assert_eq!(frame_payload(b"\x81\x81x"), None, "masked");
        // A 64-bit length near the top: header + length would overflow.
        assert_eq!(
            frame_payload(b"\x81\x7f\xff\xff\xff\xff\xff\xff\xff\xffxx"),
            None,
            "length overflow"
        );
    }
}
