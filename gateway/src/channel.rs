//! A running channel: its source supervisor and its publisher.
//!
//! ```text
//! plugin ──emit──▶ bounded mpsc ──▶ publisher: parse once, validate once,
//!                                   frame once ──▶ broker ──▶ session queues
//! ```
//!
//! The supervisor owns the plugin instance: it creates it, polls it on its
//! interval (on a blocking thread) or starts it (push), and restarts it with
//! exponential backoff and jitter when it fails or panics.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Message, Subscriber, SubscriptionId, Topic};
use crate::cluster::{Cluster, LeaseError, RemoteAnswer, RemoteInterest};
use crate::config::types::OnRateLimit;
use crate::config::{Builtin, ChannelCfg, Limits, SourceKind, SourceMode};
use crate::filter::SubFilter;
use crate::metrics::{ChannelMetrics, Metrics, ValidationFailure};
use crate::plugin::{Instance, InstanceParams, LoadedPlugin, PluginFailure, SourceEvent};
use crate::queue::SessionQueue;
use crate::state::GatewayState;

/// First restart delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An instance that ran this long without failing resets the backoff and
/// the count of failures in a row.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Failures in a row from which the log line is an error.
const KEEPS_FAILING: u32 = 5;
/// Longest plugin error message kept for `/readyz`, in bytes.
const MAX_ERROR_LEN: usize = 512;

/// What the supervisor is doing with a channel's plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginState {
    /// No instance has run yet (the first create, or retries of it).
    Starting,
    /// An instance runs.
    Up,
    /// The instance failed; waiting out the backoff or creating the next one.
    Restarting,
    /// A push plugin's run loop ended by itself without an error. Its
    /// instance stays (commands, keyed streams) and is not restarted.
    Finished,
    /// Another gateway instance of the cluster runs the source (it holds
    /// the lease); this one takes over if that one goes.
    Standby,
    /// `MAX_ABANDONED_CALLS` calls into the plugin ran past
    /// `source.call_timeout` and have not returned: no new instance is
    /// created until one does.
    Stalled,
}

impl PluginState {
    /// As reported by `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginState::Starting => "starting",
            PluginState::Up => "up",
            PluginState::Restarting => "restarting",
            PluginState::Finished => "finished",
            PluginState::Standby => "standby",
            PluginState::Stalled => "stalled",
        }
    }

    /// Whether the channel is served as configured (up, finished by itself,
    /// or run by another instance of the cluster).
    pub fn healthy(self) -> bool {
        matches!(
            self,
            PluginState::Up | PluginState::Finished | PluginState::Standby
        )
    }
}

/// A channel's plugin health, as the supervisor last saw it.
#[derive(Clone, Debug)]
pub struct PluginHealth {
    /// What the supervisor is doing.
    pub state: PluginState,
    /// Failures since an instance last ran `HEALTHY_AFTER` (30 s) without
    /// failing; the restart backoff grows with it.
    pub consecutive_failures: u32,
    /// The last failure's message (at most 512 bytes), kept after recovery.
    pub last_error: Option<String>,
    /// When the last failure happened.
    pub last_failure: Option<SystemTime>,
    /// When the next instance will be created (while starting or restarting
    /// after a failure; in the past while it is being created).
    pub retry_at: Option<Instant>,
    /// The supervisor's call into the plugin running now, and since when.
    pub call: Option<(&'static str, Instant)>,
}

impl Default for PluginHealth {
    fn default() -> PluginHealth {
        PluginHealth {
            state: PluginState::Starting,
            consecutive_failures: 0,
            last_error: None,
            last_failure: None,
            retry_at: None,
            call: None,
        }
    }
}

/// `msg` cut to at most `max` bytes at a character boundary, marked with `…`.
fn truncate(msg: &str, max: usize) -> String {
    if msg.len() <= max {
        return msg.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &msg[..end])
}

enum SourceCmd {
    /// Subscribers here want the key (its path parameters).
    OpenKey(Arc<str>, Vec<u8>),
    /// Nobody here wants the key any more.
    CloseKey(Arc<str>),
    /// The stream of the key ended (sent before the close and a re-open
    /// for subscribers kept): in a cluster, everyone's interest in it
    /// starts over.
    Ended(Arc<str>),
    /// Another instance's interest in keyed streams.
    Remote(RemoteInterest),
}

/// A channel at run time.
pub struct ChannelRuntime {
    /// Its configuration.
    pub cfg: Arc<ChannelCfg>,
    /// Its metrics.
    pub metrics: Arc<ChannelMetrics>,
    /// Set once the plugin instance started for the first time.
    pub started: AtomicBool,
    /// Stops this channel's source (a reload that changes or removes the
    /// channel; a child of the gateway's shutdown).
    stop: CancellationToken,
    /// The plugin's health (for `/readyz`; the metrics mirror the counts).
    health: Mutex<PluginHealth>,
    broker: Arc<dyn Broker>,
    cmd_tx: mpsc::UnboundedSender<SourceCmd>,
    /// The running plugin instance (for commands).
    current: Mutex<Option<Arc<Instance>>>,
    /// The publisher's input (for the HTTP publish API). Weak: the
    /// publisher ends when the source's sender goes, at shutdown.
    inject: mpsc::WeakSender<SourceEvent>,
    all_metrics: Arc<Metrics>,
    started_at: std::time::SystemTime,
    /// Per open key: (generation, subscribers). A key that ends is
    /// forgotten, so its next subscriber opens it afresh; the generation
    /// keeps sessions of the ended stream from counting against the new one.
    key_refs: Mutex<KeyRefs>,
    /// The cluster, when several instances share the source (it runs
    /// where the lease is).
    cluster: Option<Arc<Cluster>>,
    /// Cancelled when the publisher has ended: everything the source
    /// handed over has been published.
    published_all: CancellationToken,
    /// Set when a reload removed the channel, or closed its keyed streams:
    /// what its source still hands over is published to nobody (and kept as
    /// nobody's last value).
    removed: AtomicBool,
    /// Plugin commands running now (`MAX_CHANNEL_COMMANDS`).
    commands: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct KeyRefs {
    open: HashMap<Arc<str>, KeyRef>,
    next_gen: u64,
}

/// One open keyed stream.
struct KeyRef {
    /// Which opening of the key this is.
    generation: u64,
    /// Subscriptions following it.
    subscribers: usize,
    /// Its path parameters (JSON), to open it again.
    params: Vec<u8>,
    /// Opened again for subscribers its previous opening ended before they
    /// got anything: the topic's published count then.
    reopened_at: Option<u64>,
}

/// Unsubscribes when dropped.
pub struct Subscription {
    rt: Arc<ChannelRuntime>,
    topic: Topic,
    id: SubscriptionId,
    /// The opening of its keyed stream it counts against (moved on when a
    /// stream it got nothing of ended and was opened again for it).
    generation: Arc<AtomicU64>,
    cancelled: Arc<AtomicBool>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancelled.store(true, Relaxed);
        self.rt.broker.unsubscribe(&self.topic, self.id);
        self.rt.metrics.subscribers.fetch_sub(1, Relaxed);
        if let Some(key) = &self.topic.key {
            let mut refs = self.rt.key_refs.lock();
            if let Some(r) = refs.open.get_mut(key)
                && r.generation == self.generation.load(Relaxed)
            {
                r.subscribers -= 1;
                if r.subscribers == 0 {
                    refs.open.remove(key);
                    // A retired runtime's source is stopping: told now, in a
                    // cluster it could announce the close after the new
                    // runtime announced the key open again.
                    if !self.rt.removed.load(Relaxed) {
                        let _ = self.rt.cmd_tx.send(SourceCmd::CloseKey(key.clone()));
                    }
                }
            }
        }
    }
}

impl ChannelRuntime {
    /// Stop the source (shutdown's first step), then wait until everything
    /// it handed over has been published.
    pub async fn stop_source_and_publish(&self) {
        self.stop.cancel();
        self.published_all.cancelled().await;
    }

    /// The plugin instance running now, if any (to call it directly, past
    /// the command bound: tests and tools).
    pub fn current_instance(&self) -> Option<Arc<Instance>> {
        self.current.lock().clone()
    }

    /// Cancelled once everything the source handed over is published (a
    /// successor's publisher waits for it).
    pub fn published_all(&self) -> CancellationToken {
        self.published_all.clone()
    }

    /// A reload removed the channel (or closed its keyed streams): stop the
    /// source; what it still hands over goes nowhere (its subscribers are
    /// closed, and a retained value would outlive the channel).
    pub fn remove(&self) {
        self.removed.store(true, Relaxed);
        self.stop();
    }

    /// Subscribe a session queue to the channel (or to one keyed stream,
    /// opening it at the plugin for its first subscriber). `None` if a
    /// reload has removed this runtime (the channel, or its keyed streams):
    /// the caller read it just before the reload swapped it out, and
    /// subscribes again through what is live now.
    pub fn subscribe(
        self: &Arc<Self>,
        key: Option<(Arc<str>, Vec<u8>)>,
        queue: Arc<SessionQueue>,
        filter: Option<Arc<SubFilter>>,
    ) -> Option<Subscription> {
        if self.removed.load(Relaxed) {
            return None;
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let topic = Topic {
            channel: self.cfg.name.clone(),
            key: key.as_ref().map(|(k, _)| k.clone()),
        };
        let sub = Subscriber {
            queue,
            on_full: self.cfg.on_full,
            metrics: self.metrics.clone(),
            filter,
            cancelled: cancelled.clone(),
            joined_at: 0,
            generation: generation.clone(),
        };
        let id = match key {
            None => self.broker.subscribe(&topic, sub, self.cfg.last_value).0,
            Some((k, params)) => {
                // The key's count and the broker's subscribers change
                // together, so an ending stream sees both or neither.
                let mut refs = self.key_refs.lock();
                let refs = &mut *refs;
                // Subscribe before asking the plugin for the stream, so its
                // first message cannot be published to nobody.
                let (id, _) = self.broker.subscribe(&topic, sub, self.cfg.last_value);
                let r = refs.open.entry(k.clone()).or_insert_with(|| {
                    refs.next_gen += 1;
                    KeyRef {
                        generation: refs.next_gen,
                        subscribers: 0,
                        params: params.clone(),
                        reopened_at: None,
                    }
                });
                r.subscribers += 1;
                generation.store(r.generation, Relaxed);
                if r.subscribers == 1 && !self.removed.load(Relaxed) {
                    let _ = self.cmd_tx.send(SourceCmd::OpenKey(k, params));
                }
                id
            }
        };
        self.metrics.subscribers.fetch_add(1, Relaxed);
        let sub = Subscription {
            rt: self.clone(),
            topic,
            id,
            generation,
            cancelled,
        };
        // A reload sets `removed` before it closes the channel's
        // subscribers under the broker's lock, which the subscribe above
        // also took: either that close found this subscriber, or this load
        // sees the flag. Without it, a subscriber that came after the close
        // followed a runtime nobody publishes to again, and was never told.
        (!self.removed.load(Relaxed)).then_some(sub)
    }

    /// Check a message as the publisher would (parse, envelope, schema).
    pub fn check(&self, json: &[u8]) -> Result<Message, Dropped> {
        let (frame, header) = crate::ws::text_frame(json);
        if self.cfg.envelope.is_none() && self.cfg.filters.is_empty() {
            check_message(&self.cfg.validator, frame, header)
        } else {
            check_message_full(
                &self.cfg,
                &self.all_metrics,
                self.started_at,
                None,
                frame,
                header,
            )
        }
    }

    /// Most messages one `inject` can take.
    /// 0 once the publisher takes no more (the source has ended).
    pub fn inject_capacity(&self) -> usize {
        self.inject
            .upgrade()
            .filter(|s| !s.is_closed())
            .map(|s| s.max_capacity())
            .unwrap_or(0)
    }

    /// Publish checked messages in order; false when the publisher's buffer
    /// has no room for all of them (nothing is published then).
    pub fn inject(&self, msgs: Vec<Message>) -> bool {
        let Some(tx) = self.inject.upgrade() else {
            return false;
        };
        let Ok(permits) = tx.try_reserve_many(msgs.len()) else {
            return false;
        };
        self.metrics.received.fetch_add(msgs.len() as u64, Relaxed);
        let now = crate::metrics::stamp();
        for (permit, msg) in permits.zip(msgs) {
            permit.send(SourceEvent::Ready {
                key: None,
                msg: msg.emitted_at(now),
            });
        }
        true
    }

    /// Stop the source; the publisher ends once the source's messages are
    /// out. Subscribers stay subscribed to the channel's topics.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// This runtime replaces `prev` (a reload changed the channel): a
    /// channel that was ready stays ready, its new source restarting.
    pub fn succeed(&self, prev: &ChannelRuntime) {
        if prev.started.load(Relaxed) {
            self.started.store(true, Relaxed);
            let mut h = self.health.lock();
            if h.state == PluginState::Starting {
                h.state = PluginState::Restarting;
            }
        }
    }

    /// The plugin's health now.
    pub fn health(&self) -> PluginHealth {
        self.health.lock().clone()
    }

    /// An instance runs.
    fn set_up(&self) {
        self.metrics.plugin_up.store(true, Relaxed);
        let mut h = self.health.lock();
        h.state = PluginState::Up;
        h.retry_at = None;
    }

    /// Another instance runs the source.
    fn set_standby(&self) {
        self.started.store(true, Relaxed);
        self.metrics.plugin_up.store(false, Relaxed);
        let mut h = self.health.lock();
        h.state = PluginState::Standby;
        h.retry_at = None;
    }

    /// Another instance's interest in keyed streams (for the lease task).
    pub fn remote_interest(&self, ev: RemoteInterest) {
        let _ = self.cmd_tx.send(SourceCmd::Remote(ev));
    }

    /// The keyed streams subscribers here follow, with their parameters.
    pub fn local_keys(&self) -> Vec<(Arc<str>, Vec<u8>)> {
        self.key_refs
            .lock()
            .open
            .iter()
            .map(|(k, r)| (k.clone(), r.params.clone()))
            .collect()
    }

    /// `MAX_ABANDONED_CALLS` calls given up on still run in the plugin. A
    /// channel whose source never ran stays `Starting` (`/readyz` answers
    /// 503 until it has), its last error saying why.
    fn set_stalled(&self) {
        let mut h = self.health.lock();
        if self.started.load(Relaxed) {
            h.state = PluginState::Stalled;
        }
        h.retry_at = None;
    }

    /// The supervisor's call `name` into the plugin begins; what
    /// `call_ended` takes.
    fn call_began(&self, name: &'static str) -> u64 {
        self.health.lock().call = Some((name, Instant::now()));
        // Never 0, which means "none runs".
        let ms = crate::state::epoch_ms(SystemTime::now()).max(1);
        self.metrics.plugin_call_started_ms.store(ms, Relaxed);
        ms
    }

    /// The call `call_began` stamped `ms` ended. The gauge is left alone if
    /// a successor (a reload; the metrics are shared) has stamped it since.
    fn call_ended(&self, ms: u64) {
        self.health.lock().call = None;
        let _ = self
            .metrics
            .plugin_call_started_ms
            .compare_exchange(ms, 0, Relaxed, Relaxed);
    }

    /// The push plugin finished by itself.
    fn set_finished(&self) {
        self.health.lock().state = PluginState::Finished;
    }

    /// The instance ran `HEALTHY_AFTER` without failing: failures in a row
    /// start over. Returns how many there had been.
    fn set_healthy(&self) -> u32 {
        self.metrics.plugin_consecutive_failures.store(0, Relaxed);
        std::mem::take(&mut self.health.lock().consecutive_failures)
    }

    /// A failure; the next instance is created after `delay`. Returns the
    /// failures in a row, this one included.
    fn set_failed(&self, f: &PluginFailure, delay: Duration) -> u32 {
        let now = SystemTime::now();
        let mut h = self.health.lock();
        h.state = if self.started.load(Relaxed) {
            PluginState::Restarting
        } else {
            PluginState::Starting
        };
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        h.last_error = Some(truncate(&f.to_string(), MAX_ERROR_LEN));
        h.last_failure = Some(now);
        h.retry_at = Some(Instant::now() + delay);
        let m = &self.metrics;
        m.plugin_failures.fetch_add(1, Relaxed);
        m.plugin_consecutive_failures
            .store(u64::from(h.consecutive_failures), Relaxed);
        m.plugin_last_failure_ms
            .store(crate::state::epoch_ms(now), Relaxed);
        h.consecutive_failures
    }

    /// The latest message of the (unkeyed) channel.
    pub fn latest(&self) -> Option<Message> {
        self.broker.last(&Topic {
            channel: self.cfg.name.clone(),
            key: None,
        })
    }

    /// Ask the plugin a command; its JSON answer.
    pub async fn command(
        &self,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CommandError> {
        let current = self.current.lock().clone();
        let inst = match (current, &self.cluster) {
            (Some(i), _) => i,
            // The source runs on another instance: ask it there.
            (None, Some(c)) if !self.metrics.lease_held.load(Relaxed) => {
                return match c.command(&self.cfg.name, request, timeout).await {
                    RemoteAnswer::Ok(v) => Ok(v),
                    RemoteAnswer::Failed(m) => Err(CommandError::Failed(m)),
                    RemoteAnswer::Crashed(m) => Err(CommandError::Crashed(m)),
                    RemoteAnswer::Unavailable => Err(CommandError::Unavailable),
                    RemoteAnswer::Timeout => Err(CommandError::Timeout),
                    RemoteAnswer::Busy => Err(CommandError::Busy),
                };
            }
            (None, _) => return Err(CommandError::Unavailable),
        };
        let Ok(permit) = self.commands.clone().try_acquire_owned() else {
            // This clone may be the instance's last (its source stopped
            // meanwhile): freeing it stops the plugin, which blocks.
            tokio::task::spawn_blocking(move || drop(inst));
            return Err(CommandError::Busy);
        };
        // The permit goes back when the plugin returns, not at the timeout.
        let call = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inst.command(&request)
        });
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(CommandError::Timeout),
            Ok(Err(_)) => Err(CommandError::Crashed("the command thread failed".into())),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(f))) if f.code == plugin_api::abi::GW_PANIC => {
                Err(CommandError::Crashed(f.message))
            }
            Ok(Ok(Err(f))) => Err(CommandError::Failed(f.message)),
        }
    }

    /// The plugin ended `key`: its subscribers get Close 1000 after what was
    /// published before, and the next subscriber opens the key again. Those
    /// that joined after its last message got nothing of it: the key is
    /// opened again for them at once.
    fn end_key(&self, key: Arc<str>) {
        self.end_key_where(key, false)
    }

    /// Another instance's plugin ended `key`: [`Self::end_key`] for the
    /// subscribers here.
    pub fn end_key_remote(&self, key: Arc<str>) {
        self.end_key_where(key, true)
    }

    fn end_key_where(&self, key: Arc<str>, remote: bool) {
        let mut refs = self.key_refs.lock();
        let topic = Topic {
            channel: self.cfg.name.clone(),
            key: Some(key.clone()),
        };
        let kept = if remote {
            self.broker.end_here(&topic)
        } else {
            self.broker.end(&topic)
        };
        if self.cluster.is_some() {
            let _ = self.cmd_tx.send(SourceCmd::Ended(key.clone()));
        }
        let Some(ended) = refs.open.remove(&key) else {
            return;
        };
        let _ = self.cmd_tx.send(SourceCmd::CloseKey(key.clone()));
        if kept.is_empty() {
            return;
        }
        // Kept: they joined after the last message, so their `joined_at` is
        // the topic's published count now. Opened again for them, and ended
        // again with nothing published since (the plugin ends the stream
        // without a message, or every message is dropped): once more would
        // loop for as long as they stay. They are closed as the others were.
        // (An opening that published something and ended is opened again
        // for its late joiners, as the first one was.)
        let published = kept.first().map_or(0, |s| s.joined_at);
        if ended.reopened_at.is_some_and(|at| published <= at) {
            for s in &kept {
                s.queue.close(crate::ws::close::NORMAL, "stream ended");
            }
            return;
        }
        refs.next_gen += 1;
        let generation = refs.next_gen;
        for s in &kept {
            s.generation.store(generation, Relaxed);
        }
        refs.open.insert(
            key.clone(),
            KeyRef {
                generation,
                subscribers: kept.len(),
                params: ended.params.clone(),
                reopened_at: Some(published),
            },
        );
        let _ = self.cmd_tx.send(SourceCmd::OpenKey(key, ended.params));
    }
}

/// Why a command got no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandError {
    /// The plugin is not running (starting, restarting or stopped).
    Unavailable,
    /// No answer in time.
    Timeout,
    /// The plugin refused (its message).
    Failed(String),
    /// The plugin panicked.
    Crashed(String),
    /// `MAX_CHANNEL_COMMANDS` of the channel's commands are still running
    /// in the plugin (a command that timed out runs on until the plugin
    /// returns).
    Busy,
}

/// Most plugin commands of one channel running at once. Each runs on a
/// blocking thread until the plugin returns, past its timeout too: without
/// a bound, a command that hangs, asked again and again, would take every
/// thread of the pool that polls and `open_key` share.
pub const MAX_CHANNEL_COMMANDS: usize = 16;

/// Start a channel's publisher and source supervisor. `state` is the
/// gateway's (builtin sources report on it; it may not be upgradable yet
/// while the gateway starts). With a `cluster`, the plugin source runs
/// where its lease is.
#[allow(clippy::too_many_arguments)]
pub fn start(
    cfg: Arc<ChannelCfg>,
    limits: &Limits,
    metrics: &Arc<Metrics>,
    broker: Arc<dyn Broker>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    state: Weak<GatewayState>,
    cluster: Option<&Arc<Cluster>>,
    after: Option<CancellationToken>,
) -> Arc<ChannelRuntime> {
    let cm = metrics.channel(&cfg.name, cfg.source.name());
    // Builtin sources report on this instance: their messages stay here,
    // and every instance runs its own.
    let (broker, cluster) = match (cluster, &cfg.source.kind) {
        (Some(c), SourceKind::Plugin(_)) => (broker, Some(c.clone())),
        (Some(c), SourceKind::Builtin(_)) => (c.local.clone() as Arc<dyn Broker>, None),
        (None, _) => (broker, None),
    };
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::channel(limits.source_buffer);
    let stop = shutdown.child_token();
    let rt = Arc::new(ChannelRuntime {
        cfg: cfg.clone(),
        metrics: cm,
        started: AtomicBool::new(false),
        stop: stop.clone(),
        health: Mutex::new(PluginHealth::default()),
        broker,
        cmd_tx,
        key_refs: Mutex::new(KeyRefs::default()),
        current: Mutex::new(None),
        inject: ev_tx.downgrade(),
        all_metrics: metrics.clone(),
        started_at: std::time::SystemTime::now(),
        cluster: cluster.clone(),
        published_all: CancellationToken::new(),
        removed: AtomicBool::new(false),
        commands: Arc::new(tokio::sync::Semaphore::new(MAX_CHANNEL_COMMANDS)),
    });
    let source_over = CancellationToken::new();
    tracker.spawn(publish_loop(rt.clone(), ev_rx, after, source_over.clone()));
    let max_message = limits.max_plugin_message();
    let source: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match &cfg.source.kind {
        SourceKind::Plugin(plugin) if let Some(c) = cluster => Box::pin(leased(
            rt.clone(),
            plugin.clone(),
            ev_tx,
            cmd_rx,
            max_message,
            stop,
            c,
            tracker.clone(),
        )),
        SourceKind::Plugin(plugin) => Box::pin(supervise(
            rt.clone(),
            plugin.clone(),
            ev_tx,
            cmd_rx,
            max_message,
            stop,
        )),
        SourceKind::Builtin(Builtin::Status) => {
            Box::pin(run_status(rt.clone(), ev_tx, state, stop))
        }
    };
    tracker.spawn(async move {
        source.await;
        source_over.cancel();
    });
    rt
}

/// The builtin `status` source: a snapshot of the gateway's state every
/// `interval`, through the channel's publisher like any plugin message.
async fn run_status(
    rt: Arc<ChannelRuntime>,
    tx: mpsc::Sender<SourceEvent>,
    state: Weak<GatewayState>,
    stop: CancellationToken,
) {
    let every = rt.cfg.source.interval.unwrap_or(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rates = crate::status::Rates::default();
    rt.started.store(true, Relaxed);
    rt.set_up();
    tracing::info!(channel = %rt.cfg.name, source = rt.cfg.source.name(), interval = ?every, "source started");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // None only while the gateway is still starting (or already gone).
        let Some(st) = state.upgrade() else { continue };
        let snapshot = crate::status::snapshot(&st, &mut rates);
        drop(st);
        let body = serde_json::to_vec(&snapshot).unwrap_or_default();
        let (frame, header) = crate::ws::text_frame(&body);
        let emitted = crate::metrics::stamp();
        tokio::select! {
            _ = stop.cancelled() => break,
            r = tx.send(SourceEvent::Message { key: None, frame, header, emitted }) => if r.is_err() { break },
        }
        rt.metrics.received.fetch_add(1, Relaxed);
    }
    // A stopped channel's metrics belong to its successor (a reload that
    // changed it) from now on.
    if !stop.is_cancelled() {
        rt.metrics.plugin_up.store(false, Relaxed);
    }
}

/// How long a channel's publisher waits, after a reload that changed the
/// channel, for its predecessor's last messages.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(5);

/// Parse, validate and frame each message once, then hand it to the broker.
/// With `after` (the predecessor's `published_all`, at a reload that changed
/// the channel), nothing is published before the old source's last
/// messages, or `PREDECESSOR_WAIT`: the two never interleave.
///
/// It ends once every sender is gone, or once the source's task has ended
/// (`source_over`) and what was queued is published: an instance a command
/// still runs in keeps its sender, refusing everything (`Instance::revoke`).
async fn publish_loop(
    rt: Arc<ChannelRuntime>,
    mut rx: mpsc::Receiver<SourceEvent>,
    after: Option<CancellationToken>,
    source_over: CancellationToken,
) {
    if let Some(prev) = after
        && tokio::time::timeout(PREDECESSOR_WAIT, prev.cancelled())
            .await
            .is_err()
    {
        tracing::warn!(
            channel = %rt.cfg.name,
            "the channel's previous source was still stopping {PREDECESSOR_WAIT:?} after the reload; its last messages may come after the new source's"
        );
    }
    let cfg = &rt.cfg;
    let log_limit: DefaultDirectRateLimiter = RateLimiter::direct(
        Quota::per_second(NonZeroU32::MIN)
            .allow_burst(NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN)),
    );
    let mut rate = cfg.rate_limit.map(|(r, on)| RateGate::new(r.quota(), on));
    let mut out = Outbox::new(cfg.linger);
    let mut batch = Vec::with_capacity(64);
    let mut closed = false;
    // Made once: a token's `cancelled()` takes its lock to register and to
    // deregister, which per batch would cost the hot loop two locks.
    let over = source_over.cancelled();
    tokio::pin!(over);
    loop {
        let flush = async {
            match rate.as_ref().and_then(|r| r.flush_at) {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let send_held = async {
            match out.due() {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = rx.recv_many(&mut batch, 64) => if n == 0 { break },
            // No more sends; what is queued is still received.
            _ = &mut over, if !closed => {
                closed = true;
                rx.close();
                continue;
            }
            _ = send_held => {
                out.send(&rt);
                continue;
            }
            _ = flush => {
                if let Some(r) = &mut rate {
                    r.release(&mut out);
                }
                out.send_if_due(&rt);
                continue;
            }
        }
        for ev in batch.drain(..) {
            match ev {
                SourceEvent::Message { .. } | SourceEvent::Ready { .. } => {
                    let (key, msg) = match ev {
                        SourceEvent::Message {
                            key,
                            frame,
                            header,
                            emitted,
                        } => match prepare(&rt, key.as_deref(), frame, header, &log_limit) {
                            Some(m) => (key, m.emitted_at(emitted)),
                            None => continue,
                        },
                        SourceEvent::Ready { key, msg } => (key, msg),
                        SourceEvent::End { .. } => continue,
                    };
                    let admitted = match &mut rate {
                        Some(r) => r.admit(key, msg, &rt.metrics),
                        None => Some((key, msg)),
                    };
                    if let Some((key, msg)) = admitted {
                        out.hold(key, msg);
                    }
                }
                // A retired source's end of a stream would end the stream
                // reopened on its successor (the topic is the same).
                SourceEvent::End { .. } if rt.removed.load(Relaxed) => {}
                SourceEvent::End { key } => {
                    // A stream's last message is never held back.
                    if let Some(msg) = rate
                        .as_mut()
                        .and_then(|r| r.pending.remove(&Some(key.clone())))
                    {
                        out.hold(Some(key.clone()), msg);
                    }
                    out.send(&rt);
                    rt.end_key(key)
                }
            }
        }
        out.send_if_due(&rt);
    }
    // The source stopped: what `conflate` still holds (the latest per key)
    // goes out now rather than nowhere, a last burst over the rate limit.
    if let Some(r) = &mut rate {
        for (key, msg) in std::mem::take(&mut r.pending) {
            out.hold(key, msg);
        }
    }
    out.send(&rt);
    rt.published_all.cancel();
}

/// A channel's `rate_limit`: what goes now, what waits (`conflate`: the
/// latest message per key) and what is dropped.
struct RateGate {
    lim: DefaultDirectRateLimiter,
    on: OnRateLimit,
    /// Conflated messages waiting for the rate limit, latest per key.
    pending: BTreeMap<Option<Arc<str>>, Message>,
    /// When the limit lets the first of them go.
    flush_at: Option<tokio::time::Instant>,
}

impl RateGate {
    fn new(quota: Quota, on: OnRateLimit) -> RateGate {
        RateGate {
            lim: RateLimiter::direct(quota),
            on,
            pending: BTreeMap::new(),
            flush_at: None,
        }
    }

    /// `msg` if it may go now; otherwise it waits (`conflate`) or is
    /// dropped, and is counted.
    fn admit(
        &mut self,
        key: Option<Arc<str>>,
        msg: Message,
        m: &ChannelMetrics,
    ) -> Option<(Option<Arc<str>>, Message)> {
        // A key with a message held back stays behind it: the newer one
        // takes its place. (A slot the limiter frees is the held one's;
        // taken by the newer message, the held one would go after it, and
        // stand as the last value.)
        if let Some(held) = self.pending.get_mut(&key) {
            *held = msg;
            m.rate_conflated.fetch_add(1, Relaxed);
            return None;
        }
        let Err(nu) = self.lim.check() else {
            return Some((key, msg));
        };
        match self.on {
            OnRateLimit::Drop => {
                m.rate_dropped.fetch_add(1, Relaxed);
            }
            OnRateLimit::Conflate => {
                self.pending.insert(key, msg);
                if self.flush_at.is_none() {
                    self.flush_at = Some(Self::after(&nu));
                }
            }
        }
        None
    }

    /// The held messages the limit lets go now, into `out`; the rest wait
    /// for the next slot.
    fn release(&mut self, out: &mut Outbox) {
        self.flush_at = None;
        while let Some((key, _)) = self.pending.first_key_value() {
            if let Err(nu) = self.lim.check() {
                self.flush_at = Some(Self::after(&nu));
                break;
            }
            let key = key.clone();
            if let Some(msg) = self.pending.remove(&key) {
                out.hold(key, msg);
            }
        }
    }

    fn after(nu: &governor::NotUntil<governor::clock::QuantaInstant>) -> tokio::time::Instant {
        let now = governor::clock::Clock::now(&governor::clock::DefaultClock::default());
        tokio::time::Instant::now() + nu.wait_time_from(now)
    }
}

/// Messages ready for the broker. What one read of the source brought goes
/// out together (each subscriber gets it in one wake-up and one write); with
/// the channel's `linger`, messages that come less than `linger` after the
/// last send wait for the next one, at most `linger`.
struct Outbox {
    linger: Duration,
    last_sent: Option<tokio::time::Instant>,
    keys: Vec<Option<Arc<str>>>,
    msgs: Vec<Message>,
}

impl Outbox {
    fn new(linger: Duration) -> Outbox {
        Outbox {
            linger,
            last_sent: None,
            keys: Vec::new(),
            msgs: Vec::new(),
        }
    }

    fn hold(&mut self, key: Option<Arc<str>>, msg: Message) {
        self.keys.push(key);
        self.msgs.push(msg);
    }

    /// When what is held must go (None: nothing is held).
    fn due(&self) -> Option<tokio::time::Instant> {
        if self.msgs.is_empty() {
            return None;
        }
        Some(match self.last_sent {
            Some(t) if !self.linger.is_zero() => t + self.linger,
            _ => tokio::time::Instant::now(),
        })
    }

    /// Send what is held if it is due.
    fn send_if_due(&mut self, rt: &ChannelRuntime) {
        if self.due().is_some_and(|t| t <= tokio::time::Instant::now()) {
            self.send(rt);
        }
    }

    /// Hand everything held to the broker.
    fn send(&mut self, rt: &ChannelRuntime) {
        self.drain(|key, msgs| publish(rt, key, msgs));
    }

    /// Everything held, one batch per run of one key, in order.
    fn drain(&mut self, mut each: impl FnMut(Option<Arc<str>>, &[Message])) {
        if self.msgs.is_empty() {
            return;
        }
        let mut start = 0;
        while start < self.msgs.len() {
            let key = &self.keys[start];
            let run = self.keys[start..].iter().take_while(|k| *k == key).count();
            each(key.clone(), &self.msgs[start..start + run]);
            start += run;
        }
        self.keys.clear();
        self.msgs.clear();
        self.last_sent = Some(tokio::time::Instant::now());
    }
}

fn publish(rt: &ChannelRuntime, key: Option<Arc<str>>, msgs: &[Message]) {
    if rt.removed.load(Relaxed) {
        rt.metrics.discarded.fetch_add(msgs.len() as u64, Relaxed);
        return;
    }
    let cfg = &rt.cfg;
    rt.metrics.published.fetch_add(msgs.len() as u64, Relaxed);
    // Unkeyed channels always keep their latest message (for `latest` HTTP
    // routes); keyed ones only when asked, and only while the key is followed.
    let retain = key.is_none() || cfg.last_value;
    let topic = Topic {
        channel: cfg.name.clone(),
        key,
    };
    rt.broker.publish_batch(&topic, msgs, retain);
}

/// Why a plugin message was not published.
#[derive(Debug)]
pub enum Dropped {
    /// The bytes are not JSON.
    NotJson(serde_json::Error),
    /// The JSON fails the channel's schema.
    Invalid {
        /// JSON pointer of the failing value (`/` for the root).
        instance_path: String,
        /// What is wrong.
        error: String,
    },
}

/// The publisher's per-message step: the one parse and the one validation.
/// On success the frame built at the plugin boundary is the message, sent as
/// it is to every subscriber: parsing succeeded, so its payload is UTF-8 JSON
/// (serde_json checks the UTF-8 of every string, everything else is ASCII),
/// and nothing is re-serialized.
pub fn check_message(
    validator: &jsonschema::Validator,
    frame: Bytes,
    header: usize,
) -> Result<Message, Dropped> {
    let value: serde_json::Value =
        serde_json::from_slice(&frame[header..]).map_err(Dropped::NotJson)?;
    validate(validator, &value)?;
    drop(value);
    Ok(Message::new(frame, header))
}

fn validate(validator: &jsonschema::Validator, value: &serde_json::Value) -> Result<(), Dropped> {
    // `is_valid` skips the error bookkeeping (about 20% faster on the bench
    // schema); only a message that fails is validated again for the report.
    if validator.is_valid(value) {
        return Ok(());
    }
    if let Err(e) = validator.validate(value) {
        let at = e.instance_path().to_string();
        return Err(Dropped::Invalid {
            instance_path: if at.is_empty() { "/".into() } else { at },
            error: e.to_string(),
        });
    }
    Ok(())
}

/// The publisher's step for channels with an envelope or filters: one parse,
/// the envelope rendered around it (so the schema sees what is sent), one
/// validation, and one serialization when the envelope changed the message.
/// The parsed message is kept for subscribers' filters.
pub fn check_message_full(
    cfg: &ChannelCfg,
    metrics: &Metrics,
    started: std::time::SystemTime,
    key: Option<&str>,
    frame: Bytes,
    header: usize,
) -> Result<Message, Dropped> {
    let data: serde_json::Value =
        serde_json::from_slice(&frame[header..]).map_err(Dropped::NotJson)?;
    let Some(env) = &cfg.envelope else {
        validate(&cfg.validator, &data)?;
        let mut m = Message::new(frame, header);
        m.value = Some(Arc::new(data));
        return Ok(m);
    };
    let ctx = crate::context::EnvelopeCtx {
        data: &data,
        channel: &cfg.name,
        key,
        metrics,
        started,
        fmt: cfg.timestamps,
    };
    let value = env.render(&ctx);
    validate(&cfg.validator, &value)?;
    let body = serde_json::to_vec(&value).map_err(Dropped::NotJson)?;
    let (frame, header) = crate::ws::text_frame(&body);
    let mut m = Message::new(frame, header);
    if !cfg.filters.is_empty() {
        m.value = Some(Arc::new(value));
    }
    Ok(m)
}

/// [`check_message`], counting and logging (rate-limited) what is dropped.
fn prepare(
    rt: &ChannelRuntime,
    key: Option<&str>,
    frame: Bytes,
    header: usize,
    log_limit: &DefaultDirectRateLimiter,
) -> Option<Message> {
    let cfg = &rt.cfg;
    let plugin = cfg.source.name();
    let checked = if cfg.envelope.is_none() && cfg.filters.is_empty() {
        check_message(&cfg.validator, frame, header)
    } else {
        check_message_full(cfg, &rt.all_metrics, rt.started_at, key, frame, header)
    };
    match checked {
        Ok(m) => Some(m),
        Err(Dropped::NotJson(e)) => {
            rt.metrics.invalid_json.fetch_add(1, Relaxed);
            if log_limit.check().is_ok() {
                tracing::warn!(channel = %cfg.name, plugin = %plugin, error = %e, "dropped a plugin message that is not JSON");
            }
            None
        }
        Err(Dropped::Invalid {
            instance_path,
            error,
        }) => {
            rt.metrics.schema_failures.fetch_add(1, Relaxed);
            *rt.metrics.last_validation_failure.lock() = Some(ValidationFailure {
                instance_path: instance_path.clone(),
                error: truncate(&error, 256),
                at: SystemTime::now(),
            });
            if log_limit.check().is_ok() {
                tracing::warn!(channel = %cfg.name, plugin = %plugin, instance_path = %instance_path, error = %error, "dropped a message that fails the channel schema");
            }
            None
        }
    }
}

/// Who wants one keyed stream, cluster-wide.
#[derive(Default)]
struct Want {
    /// Its path parameters.
    params: Vec<u8>,
    /// Subscribers of this instance follow it.
    local: bool,
    /// Other instances whose subscribers follow it.
    remote: HashSet<Arc<str>>,
}

impl Want {
    fn wanted(&self) -> bool {
        self.local || !self.remote.is_empty()
    }
}

/// The keyed streams the cluster wants of a channel, and what the plugin
/// has been asked to open.
struct Interest {
    want: HashMap<Arc<str>, Want>,
    /// Keys whose stream ended lately: a heartbeat sent before its instance
    /// saw the end does not open them again.
    ended: HashMap<Arc<str>, Instant>,
}

impl Interest {
    /// Apply `cmd`; returns what the plugin must be told (open or close).
    fn apply(&mut self, cmd: SourceCmd, cluster: &Cluster, channel: &str) -> Vec<SourceCmd> {
        if !self.ended.is_empty() {
            let now = Instant::now();
            self.ended
                .retain(|_, at| now.duration_since(*at) < 2 * crate::cluster::HEARTBEAT);
        }
        let mut out = Vec::new();
        let mut change = |want: &mut HashMap<Arc<str>, Want>,
                          k: &Arc<str>,
                          params: Option<Vec<u8>>,
                          f: &mut dyn FnMut(&mut Want)| {
            let w = want.entry(k.clone()).or_default();
            let before = w.wanted();
            if let Some(p) = params {
                w.params = p;
            }
            f(w);
            match (before, w.wanted()) {
                (false, true) => out.push(SourceCmd::OpenKey(k.clone(), w.params.clone())),
                (true, false) => out.push(SourceCmd::CloseKey(k.clone())),
                _ => {}
            }
            if !w.wanted() {
                want.remove(k);
            }
        };
        match cmd {
            SourceCmd::OpenKey(k, p) => {
                cluster.announce_key(channel, &k, Some(&p));
                self.ended.remove(&k);
                change(&mut self.want, &k, Some(p), &mut |w| w.local = true);
            }
            SourceCmd::CloseKey(k) => {
                cluster.announce_key(channel, &k, None);
                if self.want.contains_key(&k) {
                    change(&mut self.want, &k, None, &mut |w| w.local = false);
                }
            }
            SourceCmd::Ended(k) => {
                if self.want.remove(&k).is_some() {
                    out.push(SourceCmd::CloseKey(k.clone()));
                }
                self.ended.insert(k, Instant::now());
            }
            SourceCmd::Remote(RemoteInterest::Open(inst, k, p)) => {
                self.ended.remove(&k);
                change(&mut self.want, &k, Some(p), &mut |w| {
                    w.remote.insert(inst.clone());
                });
            }
            SourceCmd::Remote(RemoteInterest::Close(inst, k)) => {
                if self.want.contains_key(&k) {
                    change(&mut self.want, &k, None, &mut |w| {
                        w.remote.remove(&inst);
                    });
                }
            }
            SourceCmd::Remote(RemoteInterest::Sync(inst, keys)) => {
                let listed: HashSet<&Arc<str>> = keys.iter().map(|(k, _)| k).collect();
                let dropped: Vec<Arc<str>> = self
                    .want
                    .iter()
                    .filter(|(k, w)| w.remote.contains(&inst) && !listed.contains(k))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in dropped {
                    change(&mut self.want, &k, None, &mut |w| {
                        w.remote.remove(&inst);
                    });
                }
                for (k, p) in keys {
                    if self.ended.contains_key(&k)
                        || self.want.get(&k).is_some_and(|w| w.remote.contains(&inst))
                    {
                        continue;
                    }
                    change(&mut self.want, &k, Some(p), &mut |w| {
                        w.remote.insert(inst.clone());
                    });
                }
            }
            SourceCmd::Remote(RemoteInterest::Gone(inst)) => {
                let keys: Vec<Arc<str>> = self
                    .want
                    .iter()
                    .filter(|(_, w)| w.remote.contains(&inst))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    change(&mut self.want, &k, None, &mut |w| {
                        w.remote.remove(&inst);
                    });
                }
            }
        }
        out
    }
}

/// Run the channel's plugin on whichever instance of the cluster holds its
/// lease: take the lease when it is free, run the source while renewing it,
/// stop the source when it cannot be renewed, give it up at shutdown.
#[allow(clippy::too_many_arguments)]
async fn leased(
    rt: Arc<ChannelRuntime>,
    plugin: Arc<LoadedPlugin>,
    tx: mpsc::Sender<SourceEvent>,
    mut cmds: mpsc::UnboundedReceiver<SourceCmd>,
    max_message: usize,
    stop: CancellationToken,
    cluster: Arc<Cluster>,
    tracker: TaskTracker,
) {
    let ch = rt.cfg.name.clone();
    let key = cluster.lease_key(&ch);
    let ttl = cluster.lease_ttl();
    // A free lease is noticed within this; a dead holder's lease expires
    // `ttl` after its last renewal.
    let retry = (ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let call = ttl / 4;
    let mut interest = Interest {
        want: HashMap::new(),
        ended: HashMap::new(),
    };
    let mut first = true;
    let mut failing = false;
    loop {
        // Standby: try to take the lease every `retry` (commands and
        // interest arriving meanwhile do not push the next try back).
        let mut rev = None;
        let mut next_try = tokio::time::Instant::now();
        while rev.is_none() {
            tokio::select! {
                _ = stop.cancelled() => return,
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { return };
                    interest.apply(cmd, &cluster, &ch);
                    continue;
                }
                _ = tokio::time::sleep_until(next_try) => {}
            }
            let sent = Instant::now();
            match tokio::time::timeout(call, cluster.lease_write(&key, 0)).await {
                Ok(Ok(r)) => rev = Some((r, sent)),
                Ok(Err(LeaseError::Held)) => {
                    failing = false;
                    if first {
                        tracing::info!(channel = %ch, "standby: another instance runs the source");
                        rt.set_standby();
                    }
                    first = false;
                }
                Ok(Err(LeaseError::Failed(e))) => {
                    // Not standby: nobody may be running the source.
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(channel = %ch, error = %e, "cannot take the source's lease: {e}");
                    }
                    // The streams may be gone with a NATS restart.
                    let _ = tokio::time::timeout(call, cluster.ensure_streams()).await;
                }
                Err(_) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(channel = %ch, "cannot take the source's lease: NATS did not answer in {call:?}");
                    }
                }
            }
            next_try = tokio::time::Instant::now() + retry;
        }
        failing = false;
        first = false;
        let (mut rev, mut renewed_at) = rev.unwrap_or((0, Instant::now()));
        // Holder.
        cluster.metrics.leases_acquired.fetch_add(1, Relaxed);
        rt.metrics.lease_held.store(true, Relaxed);
        tracing::info!(channel = %ch, instance = cluster.instance(), "took the lease: running the source here");
        let (sup_tx, sup_rx) = mpsc::unbounded_channel();
        for (k, w) in &interest.want {
            let _ = sup_tx.send(SourceCmd::OpenKey(k.clone(), w.params.clone()));
        }
        let term = stop.child_token();
        let running = tracker.spawn(supervise(
            rt.clone(),
            plugin.clone(),
            tx.clone(),
            sup_rx,
            max_message,
            term.clone(),
        ));
        let mut requests = cluster
            .client
            .subscribe(cluster.cmd_subject(&ch))
            .await
            .ok();
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + ttl / 3, ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Stop the source before the lease can expire: two thirds of `ttl`
        // after the last renewal that NATS took (counted from when it was
        // sent), whatever the renewals meanwhile are doing.
        let give_up =
            |renewed_at: Instant| tokio::time::Instant::from_std(renewed_at + ttl * 2 / 3);
        let lost = loop {
            let request = async {
                match requests.as_mut() {
                    Some(r) => futures_util::StreamExt::next(r).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break false,
                _ = tokio::time::sleep_until(give_up(renewed_at)) => break true,
                _ = renew.tick() => {
                    let sent = Instant::now();
                    let left = give_up(renewed_at).saturating_duration_since(tokio::time::Instant::now());
                    match tokio::time::timeout(call.min(left), cluster.lease_write(&key, rev)).await {
                        Ok(Ok(r)) => {
                            rev = r;
                            renewed_at = sent;
                        }
                        Ok(Err(LeaseError::Held)) => break true,
                        // Tried again at the next tick, until `give_up`.
                        _ => {}
                    }
                }
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { break false };
                    for c in interest.apply(cmd, &cluster, &ch) {
                        let _ = sup_tx.send(c);
                    }
                }
                req = request => {
                    let Some(req) = req else {
                        requests = None;
                        continue;
                    };
                    let Some(reply) = req.reply.clone() else { continue };
                    let (rt, client) = (rt.clone(), cluster.client.clone());
                    let timeout = req
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Gw-Timeout-Ms"))
                        .and_then(|v| v.as_str().parse().ok())
                        .map_or(Duration::from_secs(10), Duration::from_millis);
                    tokio::spawn(async move {
                        let answer = match rt.command(req.payload.to_vec(), timeout).await {
                            Ok(v) => [b"o".as_slice(), &v].concat(),
                            Err(CommandError::Failed(m)) => [b"f".as_slice(), m.as_bytes()].concat(),
                            Err(CommandError::Crashed(m)) => [b"c".as_slice(), m.as_bytes()].concat(),
                            Err(CommandError::Timeout) => b"t".to_vec(),
                            Err(CommandError::Unavailable) => b"u".to_vec(),
                            Err(CommandError::Busy) => b"b".to_vec(),
                        };
                        let _ = client.publish(reply, answer.into()).await;
                    });
                }
            }
        };
        drop(requests);
        term.cancel();
        drop(sup_tx);
        let _ = running.await;
        rt.metrics.lease_held.store(false, Relaxed);
        if stop.is_cancelled() || !lost {
            // Give the lease up: another instance starts at once.
            let _ = tokio::time::timeout(call, cluster.lease_release(&key, rev)).await;
            tracing::info!(channel = %ch, "gave up the source's lease");
            return;
        }
        cluster.metrics.leases_lost.fetch_add(1, Relaxed);
        // The source has stopped: what it made and NATS has not taken yet
        // is older than the next holder's messages.
        cluster.fence(&ch);
        tracing::warn!(channel = %ch, "lost the source's lease (not renewed in time): stopped the source here");
        rt.set_standby();
    }
}

fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    let d = exp.min(BACKOFF_MAX);
    // Full jitter in [d/2, d]: instances that failed together do not restart together.
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// Calls into a channel's plugin given up on after `source.call_timeout`
/// that may run on inside it at once: each holds a blocking thread, so the
/// supervisor creates no new instance while this many have not returned.
const MAX_ABANDONED_CALLS: u64 = 4;

/// The keyed streams of a channel's source: what its instance was asked to
/// open, and what subscribers asked for while a call into the plugin ran.
#[derive(Default)]
struct Keys {
    /// Open at the instance (the next instance opens them all), with their
    /// parameters.
    open: HashMap<Arc<str>, Vec<u8>>,
    /// Asked for while a call ran: the last wish per key (None: close). Kept
    /// per key, so a plugin call that hangs holds one entry per key, not
    /// every subscribe and unsubscribe meanwhile.
    pending: HashMap<Arc<str>, Option<Vec<u8>>>,
    /// Taken from `pending`, to tell the instance next, in order.
    ready: std::collections::VecDeque<SourceCmd>,
}

impl Keys {
    /// Keep `cmd` for when the call running now returns.
    fn defer(&mut self, cmd: SourceCmd) {
        match cmd {
            SourceCmd::OpenKey(k, p) => {
                self.pending.insert(k, Some(p));
            }
            SourceCmd::CloseKey(k) => {
                self.pending.insert(k, None);
            }
            SourceCmd::Ended(_) | SourceCmd::Remote(_) => {}
        }
    }

    /// Whether `defer` kept something `next` has not handed out.
    fn waiting(&self) -> bool {
        !self.ready.is_empty() || !self.pending.is_empty()
    }

    /// The next open or close kept by `defer` to tell the instance. A key
    /// closed and opened again meanwhile is closed and opened (its stream
    /// starts over); one opened and closed again is never told.
    fn next(&mut self) -> Option<SourceCmd> {
        if self.ready.is_empty() {
            // All at once: each key is in it once, so what `open` says of a
            // key now still holds when its turn comes.
            for (k, wish) in self.pending.drain() {
                let open = self.open.contains_key(&k);
                match wish {
                    Some(p) => {
                        if open {
                            self.ready.push_back(SourceCmd::CloseKey(k.clone()));
                        }
                        self.ready.push_back(SourceCmd::OpenKey(k, p));
                    }
                    None if open => self.ready.push_back(SourceCmd::CloseKey(k)),
                    None => {}
                }
            }
        }
        self.ready.pop_front()
    }

    /// The instance is gone: what was kept only changes which keys the next
    /// one opens.
    fn settle(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let ready = std::mem::take(&mut self.ready);
        let wishes = ready
            .into_iter()
            .filter_map(|c| match c {
                SourceCmd::OpenKey(k, p) => Some((k, Some(p))),
                SourceCmd::CloseKey(k) => Some((k, None)),
                SourceCmd::Ended(_) | SourceCmd::Remote(_) => None,
            })
            .chain(pending);
        for (k, wish) in wishes {
            match wish {
                Some(p) => self.open.insert(k, p),
                None => self.open.remove(&k),
            };
        }
    }
}

/// A call into the plugin is running, has returned, or was given up on.
const CALL_RUNNING: u8 = 0;
const CALL_RETURNED: u8 = 1;
const CALL_ABANDONED: u8 = 2;

/// The supervisor's calls into its plugin (create, start, poll, open_key,
/// close_key): each runs on a blocking thread and, with
/// `source.call_timeout`, is given up on when it runs past it.
struct Calls {
    rt: Arc<ChannelRuntime>,
    shutdown: CancellationToken,
}

impl Calls {
    /// Run `f` (the call `name`) on a blocking thread. While it runs, keyed
    /// opens and closes from `cmds` are kept in `keys`. An error when it ran
    /// past `call_timeout` (it is given up on and runs on: the caller
    /// revokes the instance, so what it emits from then on is refused), or
    /// when its thread failed.
    async fn run<T: Send + 'static>(
        &self,
        name: &'static str,
        cmds: &mut mpsc::UnboundedReceiver<SourceCmd>,
        keys: &mut Keys,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PluginFailure> {
        let metrics = self.rt.metrics.clone();
        let state = Arc::new(AtomicU8::new(CALL_RUNNING));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        {
            let (metrics, state) = (metrics.clone(), state.clone());
            tokio::task::spawn_blocking(move || {
                // Also when `f` unwinds: a call given up on is counted out
                // once it is over, whatever its end.
                let _over = CallOver { metrics, state };
                // Refused once the call was given up on: the result (an
                // instance `create` made, say) is dropped here.
                let _ = tx.send(f());
            });
        }
        // A source stopping (a reload, a lease lost) no longer speaks for
        // the channel.
        let stamp = (!self.shutdown.is_cancelled()).then(|| self.rt.call_began(name));
        let timeout = self.rt.cfg.source.call_timeout;
        let wait = tokio::time::sleep(timeout.unwrap_or(Duration::MAX));
        tokio::pin!(wait);
        let mut timed = timeout.is_some();
        let mut cmds_open = true;
        let result = loop {
            tokio::select! {
                biased;
                r = &mut rx => break r.map_err(|_| PluginFailure {
                    code: plugin_api::abi::GW_ERROR,
                    message: format!("the thread of the {name} call failed"),
                }),
                _ = &mut wait, if timed => {
                    timed = false;
                    // Counted before it is given up: the call may return at
                    // any moment, and counts itself out then.
                    metrics.plugin_calls_abandoned.fetch_add(1, Relaxed);
                    let given_up = state
                        .compare_exchange(CALL_RUNNING, CALL_ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                    if !given_up {
                        // It returned just now: take what it returned.
                        metrics.plugin_calls_abandoned.fetch_sub(1, Relaxed);
                        metrics.plugin_call_returned.notify_waiters();
                    } else {
                        // What the call returns from now on is dropped on its
                        // own thread (the send fails); what it sent since the
                        // swap, here, off the async workers: dropping an
                        // instance stops and destroys it.
                        rx.close();
                        if let Ok(late) = rx.try_recv() {
                            tokio::task::spawn_blocking(move || drop(late));
                        }
                        metrics.plugin_call_timeouts.fetch_add(1, Relaxed);
                        let t = timeout.unwrap_or_default();
                        break Err(PluginFailure {
                            code: plugin_api::abi::GW_ERROR,
                            message: format!(
                                "{name} did not return within {t:?} (source.call_timeout): the instance was given up; the call runs on in the plugin"
                            ),
                        });
                    }
                }
                cmd = cmds.recv(), if cmds_open => match cmd {
                    Some(cmd) => keys.defer(cmd),
                    // The runtime is gone; the caller sees it next.
                    None => cmds_open = false,
                },
            }
        };
        if let Some(ms) = stamp {
            self.rt.call_ended(ms);
        }
        result
    }

    /// Wait while `MAX_ABANDONED_CALLS` calls given up on still run in the
    /// plugin (also ones of the runtime a reload replaced: they share the
    /// channel's metrics), keeping keyed opens and closes meanwhile. False
    /// when the gateway stops or the runtime is gone.
    async fn wait_for_room(
        &self,
        cmds: &mut mpsc::UnboundedReceiver<SourceCmd>,
        keys: &mut Keys,
    ) -> bool {
        let m = &self.rt.metrics;
        let mut told = false;
        loop {
            let returned = m.plugin_call_returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            let stuck = m.plugin_calls_abandoned.load(Relaxed);
            if stuck < MAX_ABANDONED_CALLS {
                if told {
                    tracing::info!(channel = %self.rt.cfg.name, plugin = self.rt.cfg.source.name(), "a call given up on returned: starting the plugin again");
                }
                return true;
            }
            if !told {
                told = true;
                self.rt.set_stalled();
                tracing::error!(channel = %self.rt.cfg.name, plugin = self.rt.cfg.source.name(), calls = stuck, "calls into the plugin ran past source.call_timeout and have not returned: no new instance until one does");
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return false,
                _ = &mut returned => {}
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => {
                        keys.defer(cmd);
                        keys.settle();
                    }
                    None => return false,
                },
            }
        }
    }
}

/// Counts a call given up on out when it is over.
struct CallOver {
    metrics: Arc<ChannelMetrics>,
    state: Arc<AtomicU8>,
}

impl Drop for CallOver {
    fn drop(&mut self) {
        let was = self.state.swap(CALL_RETURNED, Ordering::AcqRel);
        if was == CALL_ABANDONED {
            self.metrics.plugin_calls_abandoned.fetch_sub(1, Relaxed);
            self.metrics.plugin_call_returned.notify_waiters();
        }
    }
}

/// Run the channel's plugin for as long as the gateway runs.
async fn supervise(
    rt: Arc<ChannelRuntime>,
    plugin: Arc<LoadedPlugin>,
    tx: mpsc::Sender<SourceEvent>,
    mut cmds: mpsc::UnboundedReceiver<SourceCmd>,
    max_message: usize,
    shutdown: CancellationToken,
) {
    let cfg = rt.cfg.clone();
    let (ch, pname) = (cfg.name.clone(), plugin.name.clone());
    let mut keys = Keys::default();
    let handle = tokio::runtime::Handle::current();
    let calls = Calls {
        rt: rt.clone(),
        shutdown: shutdown.clone(),
    };

    'outer: while !shutdown.is_cancelled() {
        if !calls.wait_for_room(&mut cmds, &mut keys).await {
            break;
        }
        let params = InstanceParams {
            channel: ch.clone(),
            config: cfg.source.config_json.clone(),
            tx: tx.clone(),
            max_message,
            metrics: rt.metrics.clone(),
            rt: handle.clone(),
        };
        let p2 = plugin.clone();
        let created = calls
            .run("create", &mut cmds, &mut keys, move || {
                Instance::create(p2, params)
            })
            .await
            .and_then(|r| r);
        let failure: Option<PluginFailure>;
        match created {
            Err(f) => failure = Some(f),
            Ok((inst, exited)) => {
                let inst = Arc::new(inst);
                // Re-open the keyed streams subscribers still want.
                let mut fail = None;
                for (k, p) in keys.open.clone() {
                    let i = inst.clone();
                    let r = calls
                        .run("open_key", &mut cmds, &mut keys, move || i.open_key(&k, &p))
                        .await;
                    if let Err(f) = r.and_then(|r| r) {
                        fail = Some(f);
                        break;
                    }
                }
                if fail.is_none() && cfg.source.mode == SourceMode::Push {
                    let i = inst.clone();
                    let r = calls
                        .run("start", &mut cmds, &mut keys, move || i.start())
                        .await;
                    fail = r.and_then(|r| r).err();
                }
                if fail.is_none() {
                    *rt.current.lock() = Some(inst.clone());
                    rt.set_up();
                    if !rt.started.swap(true, Relaxed) {
                        tracing::info!(channel = %ch, plugin = %pname, mode = %cfg.source.mode, "source started");
                    }
                    fail =
                        run_instance(&rt, &inst, exited, &mut cmds, &mut keys, &calls, &shutdown)
                            .await;
                    // A stopped channel's metrics belong to its successor (a
                    // reload that changed it) from now on.
                    if !shutdown.is_cancelled() {
                        rt.metrics.plugin_up.store(false, Relaxed);
                    }
                    *rt.current.lock() = None;
                }
                failure = fail;
                // Stop and free the instance off the async workers. A call
                // still running inside the plugin (a command, or one given
                // up on) holds a clone; the last holder frees it, but its
                // source ends now: what it hands over from here is refused,
                // as after a stop.
                inst.revoke();
                let _ = blocking(move || {
                    if let Ok(i) = Arc::try_unwrap(inst) {
                        i.shutdown();
                    }
                })
                .await;
            }
        }
        // What was asked for while the last calls ran goes to the next instance.
        keys.settle();
        let Some(f) = failure else { break 'outer };
        if shutdown.is_cancelled() {
            break;
        }
        // The backoff grows with the failures in a row before this one.
        let delay = backoff(rt.health.lock().consecutive_failures);
        let in_a_row = rt.set_failed(&f, delay);
        // One line per failure, and the failures slow down: at most one line
        // per BACKOFF_MAX / 2 once the delay is at its cap.
        if in_a_row >= KEEPS_FAILING {
            tracing::error!(channel = %ch, plugin = %pname, failures_in_a_row = in_a_row, retry_in = ?delay, "plugin keeps failing: {f}");
        } else {
            tracing::warn!(channel = %ch, plugin = %pname, failures_in_a_row = in_a_row, retry_in = ?delay, "plugin failed: {f}");
        }
        // Keyed streams opened and closed meanwhile change only what the
        // next instance opens: queued, every subscribe and unsubscribe of a
        // long backoff would wait in memory to be replayed at the plugin.
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'outer,
                _ = &mut wait => break,
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => {
                        keys.defer(cmd);
                        keys.settle();
                    }
                    // The runtime is gone.
                    None => break 'outer,
                },
            }
        }
        rt.metrics.plugin_restarts.fetch_add(1, Relaxed);
    }
}

/// Drive one instance until it fails (Some) or the gateway stops / a push
/// plugin finishes by itself (None).
async fn run_instance(
    rt: &Arc<ChannelRuntime>,
    inst: &Arc<Instance>,
    mut exited: tokio::sync::oneshot::Receiver<PluginFailure>,
    cmds: &mut mpsc::UnboundedReceiver<SourceCmd>,
    keys: &mut Keys,
    calls: &Calls,
    shutdown: &CancellationToken,
) -> Option<PluginFailure> {
    let cfg = &rt.cfg;
    let poll = cfg.source.mode == SourceMode::Poll;
    let mut tick = tokio::time::interval(cfg.source.interval.unwrap_or(Duration::from_secs(3600)));
    // A poll that overruns its interval delays the next one; polls never pile up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finished = false;
    let healthy = tokio::time::sleep(HEALTHY_AFTER);
    tokio::pin!(healthy);
    let mut proven = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            r = &mut exited, if !poll && !finished => {
                match r {
                    Ok(f) if f.code == 0 => {
                        tracing::info!(channel = %cfg.name, plugin = cfg.source.name(), "push plugin finished");
                        finished = true;
                        rt.set_finished();
                    }
                    Ok(f) => return Some(f),
                    Err(_) => {
                        finished = true;
                        rt.set_finished();
                    }
                }
            }
            _ = &mut healthy, if !proven => {
                proven = true;
                let failures = rt.set_healthy();
                if failures > 0 {
                    tracing::info!(channel = %cfg.name, plugin = cfg.source.name(), failures_in_a_row = failures, "plugin recovered: ran {HEALTHY_AFTER:?} without failing");
                }
            }
            // What was asked for while the last call ran, before what came
            // since.
            _ = std::future::ready(()), if keys.waiting() => {
                if let Some(cmd) = keys.next()
                    && let Some(f) = key_call(rt, inst, cmd, cmds, keys, calls).await
                {
                    return Some(f);
                }
            }
            cmd = cmds.recv() => {
                if let Some(f) = key_call(rt, inst, cmd?, cmds, keys, calls).await {
                    return Some(f);
                }
            }
            _ = tick.tick(), if poll => {
                let polled: Vec<Option<Arc<str>>> = if cfg.keyed {
                    keys.open.keys().cloned().map(Some).collect()
                } else {
                    vec![None]
                };
                let i = inst.clone();
                let r = calls.run("poll", cmds, keys, move || {
                    for k in polled {
                        i.poll(k.as_deref())?;
                    }
                    Ok::<(), PluginFailure>(())
                }).await;
                if let Err(f) = r.and_then(|r| r) {
                    return Some(f);
                }
            }
        }
    }
}

/// Tell the instance to open or close a keyed stream; Some when that failed
/// it.
async fn key_call(
    rt: &Arc<ChannelRuntime>,
    inst: &Arc<Instance>,
    cmd: SourceCmd,
    cmds: &mut mpsc::UnboundedReceiver<SourceCmd>,
    keys: &mut Keys,
    calls: &Calls,
) -> Option<PluginFailure> {
    let poll = rt.cfg.source.mode == SourceMode::Poll;
    match cmd {
        SourceCmd::OpenKey(k, params) => {
            keys.open.insert(k.clone(), params.clone());
            let i = inst.clone();
            let r = calls
                .run("open_key", cmds, keys, move || {
                    i.open_key(&k, &params)?;
                    // The first value now, not an interval later.
                    if poll { i.poll(Some(&k)) } else { Ok(()) }
                })
                .await;
            r.and_then(|r| r).err()
        }
        SourceCmd::CloseKey(k) => {
            keys.open.remove(&k);
            let i = inst.clone();
            match calls
                .run("close_key", cmds, keys, move || i.close_key(&k))
                .await
            {
                Ok(Ok(())) => None,
                Ok(Err(f)) => {
                    tracing::warn!(channel = %rt.cfg.name, "close_key failed: {f}");
                    None
                }
                Err(f) => Some(f),
            }
        }
        SourceCmd::Ended(_) | SourceCmd::Remote(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator() -> jsonschema::Validator {
        jsonschema::options()
            .should_validate_formats(true)
            .build(&serde_json::json!({"type":"object","required":["seq"],"properties":{"seq":{"type":"integer"},"at":{"format":"date-time"}}}))
            .unwrap()
    }

    fn msg(n: u8) -> Message {
        let (frame, header) = crate::ws::text_frame(format!("{{\"n\":{n}}}").as_bytes());
        Message::new(frame, header)
    }

    /// What `drain` hands out: (key, [n, ...]) per batch.
    fn drained(out: &mut Outbox) -> Vec<(Option<String>, Vec<String>)> {
        let mut got = Vec::new();
        out.drain(|k, msgs| {
            got.push((
                k.map(|k| k.to_string()),
                msgs.iter()
                    .map(|m| String::from_utf8_lossy(m.json()).into_owned())
                    .collect(),
            ))
        });
        got
    }

    #[tokio::test(start_paused = true)]
    async fn without_linger_what_is_held_is_due_at_once() {
        let mut out = Outbox::new(Duration::ZERO);
        assert_eq!(out.due(), None, "nothing held, nothing due");
        out.hold(None, msg(1));
        let now = tokio::time::Instant::now();
        assert_eq!(out.due(), Some(now));
        assert_eq!(drained(&mut out), [(None, vec![r#"{"n":1}"#.to_string()])]);
        out.hold(None, msg(2));
        assert_eq!(out.due(), Some(now), "right after a send, still at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_linger_holds_what_comes_soon_after_a_send_until_it_is_up() {
        let linger = Duration::from_millis(20);
        let mut out = Outbox::new(linger);
        let t0 = tokio::time::Instant::now();
        out.hold(None, msg(1));
        assert_eq!(out.due(), Some(t0), "the first message goes at once");
        drained(&mut out);
        tokio::time::advance(Duration::from_millis(5)).await;
        out.hold(None, msg(2));
        out.hold(None, msg(3));
        assert_eq!(out.due(), Some(t0 + linger), "held until the linger is up");
        assert_eq!(
            drained(&mut out),
            [(None, vec![r#"{"n":2}"#.into(), r#"{"n":3}"#.into()])],
            "sent together, in order"
        );
        // After a quiet spell longer than the linger, a message is due at once.
        tokio::time::advance(Duration::from_millis(30)).await;
        out.hold(None, msg(4));
        assert!(out.due().is_some_and(|t| t <= tokio::time::Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn each_run_of_one_key_is_one_batch_in_order() {
        let mut out = Outbox::new(Duration::ZERO);
        let a: Option<Arc<str>> = Some("a".into());
        let b: Option<Arc<str>> = Some("b".into());
        for (k, n) in [(&a, 1), (&a, 2), (&b, 3), (&a, 4)] {
            out.hold(k.clone(), msg(n));
        }
        let got = drained(&mut out);
        let keys: Vec<_> = got.iter().map(|(k, m)| (k.clone(), m.len())).collect();
        assert_eq!(
            keys,
            [
                (Some("a".to_string()), 2),
                (Some("b".to_string()), 1),
                (Some("a".to_string()), 1)
            ]
        );
        assert_eq!(got[2].1, [r#"{"n":4}"#]);
        assert_eq!(out.due(), None, "drained");
    }

    #[test]
    fn check_message_forwards_the_frame_built_at_the_boundary() {
        let (frame, header) = crate::ws::text_frame(br#"{"seq": 1}"#);
        let m = check_message(&validator(), frame.clone(), header).unwrap();
        assert_eq!(
            m.frame.as_ptr(),
            frame.as_ptr(),
            "no copy, no re-serialization"
        );
        assert_eq!(&m.frame[..], b"\x81\x0a{\"seq\": 1}");
    }

    #[test]
    fn check_message_drops_what_is_not_json_or_fails_the_schema() {
        let v = validator();
        for bad in [&b"{\"seq\": 1"[..], b"not json", b"{\"seq\": \"\xff\"}"] {
            let (frame, header) = crate::ws::text_frame(bad);
            assert!(
                matches!(check_message(&v, frame, header), Err(Dropped::NotJson(_))),
                "{bad:?}"
            );
        }
        let (frame, header) = crate::ws::text_frame(br#"{"seq": 1, "at": "yesterday"}"#);
        match check_message(&v, frame, header) {
            Err(Dropped::Invalid { instance_path, .. }) => assert_eq!(instance_path, "/at"),
            other => panic!("{other:?}"),
        }
        let (frame, header) = crate::ws::text_frame(b"[]");
        match check_message(&v, frame, header) {
            Err(Dropped::Invalid { instance_path, .. }) => assert_eq!(instance_path, "/"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("short", 512), "short");
        let long = "é".repeat(400);
        let cut = truncate(&long, 512);
        assert!(cut.len() <= 512, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(long.starts_with(cut.trim_end_matches('…')));
        assert_eq!(truncate("abcdef", 4), "a…");
    }

    /// What `next` tells the instance, applied to `open` as the
    /// supervisor does.
    fn told(keys: &mut Keys) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(c) = keys.next() {
            lines.push(match c {
                SourceCmd::OpenKey(k, p) => {
                    let line = format!("open {k} {}", String::from_utf8_lossy(&p));
                    keys.open.insert(k, p);
                    line
                }
                SourceCmd::CloseKey(k) => {
                    keys.open.remove(&k);
                    format!("close {k}")
                }
                _ => "other".into(),
            });
        }
        lines
    }

    #[test]
    fn keys_asked_for_during_a_call_keep_only_the_last_wish_per_key() {
        let open = |k: &str, p: &str| SourceCmd::OpenKey(k.into(), p.as_bytes().to_vec());
        let close = |k: &str| SourceCmd::CloseKey(k.into());
        let mut keys = Keys::default();
        keys.open.insert("was".into(), b"1".to_vec());
        keys.open.insert("again".into(), b"1".to_vec());
        for _ in 0..1000 {
            keys.defer(open("brief", "{}"));
            keys.defer(close("brief"));
        }
        keys.defer(close("was"));
        keys.defer(close("again"));
        keys.defer(open("again", "2"));
        keys.defer(open("new", "3"));
        assert_eq!(
            keys.pending.len(),
            4,
            "one entry per key, however many asks"
        );
        let mut got = told(&mut keys);
        // `again` is closed before it is opened with its new parameters.
        let i = got.iter().position(|l| l == "close again").unwrap();
        assert!(
            i < got.iter().position(|l| l == "open again 2").unwrap(),
            "{got:?}"
        );
        got.sort();
        assert_eq!(
            got,
            ["close again", "close was", "open again 2", "open new 3"]
        );
        assert_eq!(keys.next().map(|_| ()), None);
        let mut open_now: Vec<_> = keys.open.keys().map(|k| k.to_string()).collect();
        open_now.sort();
        assert_eq!(open_now, ["again", "new"]);

        // An instance gone: what was kept only changes what the next one opens.
        keys.defer(close("new"));
        keys.defer(open("later", "4"));
        // One is told (and applied to `open`, as the supervisor does before
        // the call), the other waits in `ready` when the instance fails.
        match keys.next() {
            Some(SourceCmd::OpenKey(k, p)) => {
                keys.open.insert(k, p);
            }
            Some(SourceCmd::CloseKey(k)) => {
                keys.open.remove(&k);
            }
            _ => panic!("an open or a close"),
        }
        assert_eq!(keys.ready.len(), 1);
        keys.defer(open("new", "5"));
        keys.settle();
        let mut open_now: Vec<_> = keys
            .open
            .iter()
            .map(|(k, p)| format!("{k} {}", String::from_utf8_lossy(p)))
            .collect();
        open_now.sort();
        assert_eq!(open_now, ["again 2", "later 4", "new 5"]);
        assert!(keys.pending.is_empty() && keys.ready.is_empty());
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let full = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_MAX);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }

    /// Under `conflate`, a message for a key whose older message is held
    /// waits behind it, even when the limiter has a slot again before the
    /// flush runs: it replaces the held one, and the flush sends it.
    #[test]
    fn a_newer_message_waits_behind_the_one_held_for_its_key() {
        let m = ChannelMetrics::default();
        let quota = Quota::per_hour(NonZeroU32::MIN);
        let mut g = RateGate::new(quota, OnRateLimit::Conflate);
        let k: Option<Arc<str>> = Some("k".into());
        assert!(g.admit(k.clone(), msg(1), &m).is_some(), "the first goes");
        assert!(g.admit(k.clone(), msg(2), &m).is_none(), "the second waits");
        assert!(g.flush_at.is_some());
        // The limit's time comes, and a newer message arrives before the
        // flush runs.
        g.lim = RateLimiter::direct(quota);
        assert!(
            g.admit(k.clone(), msg(3), &m).is_none(),
            "the newer message overtook the held one"
        );
        assert_eq!(m.rate_conflated.load(Relaxed), 1);
        // Another key is not held behind `k`.
        assert!(g.admit(Some("j".into()), msg(4), &m).is_some());
        g.lim = RateLimiter::direct(quota);
        let mut out = Outbox::new(Duration::ZERO);
        g.release(&mut out);
        assert_eq!(
            drained(&mut out),
            [(Some("k".into()), vec![r#"{"n":3}"#.into()])]
        );
        assert!(g.pending.is_empty() && g.flush_at.is_none());
    }
}
