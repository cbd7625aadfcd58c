//! State shared by every listener and session of one running gateway.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::channel::{ChannelRuntime, PluginState};
use crate::config::Config;
use crate::limits::CountGuard;
use crate::metrics::Metrics;
use crate::queue::SessionQueue;
use crate::router::Router;
use crate::ws::close;

/// What the gateway knows about one connected client (for status replies
/// and the clients listing).
pub struct ClientInfo {
    /// Client id, as shown to clients.
    pub id: String,
    /// When it connected.
    pub connected_at: SystemTime,
    /// Last message from the client, ms since the epoch.
    pub last_activity_ms: AtomicU64,
    /// Endpoint path it connected to.
    pub path: Arc<str>,
    /// Client address.
    pub peer: SocketAddr,
    /// Authenticated principal.
    pub principal: Mutex<Option<String>>,
    /// Channels subscribed, in order.
    pub subscriptions: Mutex<Vec<Arc<str>>>,
}

/// Milliseconds since the epoch.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// ISO-8601 UTC with milliseconds.
pub fn iso(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl ClientInfo {
    /// Mark activity now.
    pub fn touch(&self) {
        self.last_activity_ms
            .store(epoch_ms(SystemTime::now()), Relaxed);
    }

    /// As JSON, for templates.
    pub fn to_json(&self) -> Value {
        let last = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_millis(self.last_activity_ms.load(Relaxed));
        json!({
            "id": self.id,
            "client_id": self.id,
            "connected_at": iso(self.connected_at),
            "last_activity": iso(last),
            "subscriptions": self.subscriptions.lock().iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "principal": *self.principal.lock(),
            "path": &*self.path,
            "peer": self.peer.to_string(),
        })
    }
}

/// What a reload replaces: the configuration, the channels running it and
/// the routes of every listener. Requests and new subscriptions take the
/// current one; connections keep the endpoint they were accepted on.
pub struct Live {
    /// The configuration being served.
    pub config: Arc<Config>,
    /// Running channels by name.
    pub channels: HashMap<Arc<str>, Arc<ChannelRuntime>>,
    /// Routes by listener name.
    pub routers: HashMap<String, Arc<Router>>,
    /// 1 for the configuration started with, +1 per successful reload.
    pub generation: u64,
}

impl Live {
    /// Routes for every listener of `config`.
    pub fn new(
        config: Arc<Config>,
        channels: HashMap<Arc<str>, Arc<ChannelRuntime>>,
        generation: u64,
    ) -> Live {
        let routers = config
            .listeners
            .iter()
            .map(|l| {
                let r = Router::new(
                    config
                        .endpoints
                        .iter()
                        .filter(|e| e.listener == l.name)
                        .cloned()
                        .collect(),
                    config
                        .http
                        .iter()
                        .filter(|h| h.listener == l.name)
                        .cloned()
                        .collect(),
                );
                (l.name.clone(), Arc::new(r))
            })
            .collect();
        Live {
            config,
            channels,
            routers,
            generation,
        }
    }
}

/// The reason of the Close 1001 every session gets at shutdown.
const SHUTTING_DOWN: &str = "server shutting down";

/// A session in the registry: what `/clients` shows, and its queue (for the
/// Close at shutdown).
type Registered = (Arc<ClientInfo>, Arc<SessionQueue>);

/// Shared gateway state.
pub struct GatewayState {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    live: RwLock<Arc<Live>>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// The cluster this instance belongs to (`broker: {kind: nats}`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Cancelled when shutdown begins: new WebSocket sessions are refused
    /// (503 `shutting_down`) and `/readyz` answers `stopping`.
    closing: CancellationToken,
    /// Cancelled when the sources have stopped and the clients are being
    /// closed: the listeners close, and every task ends.
    pub shutdown: CancellationToken,
    /// Bound listener addresses by name.
    pub addrs: BTreeMap<String, SocketAddr>,
    /// When the gateway started.
    pub started: SystemTime,
    /// Each session's client info and queue, by connection id.
    clients: Mutex<HashMap<u64, Registered>>,
    conn_ids: AtomicU64,
    id_salt: u64,
}

impl GatewayState {
    /// New state.
    pub fn new(
        live: Live,
        metrics: Arc<Metrics>,
        broker: Arc<dyn Broker>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        addrs: BTreeMap<String, SocketAddr>,
        shutdown: CancellationToken,
    ) -> GatewayState {
        GatewayState {
            live: RwLock::new(Arc::new(live)),
            metrics,
            broker,
            cluster,
            closing: CancellationToken::new(),
            shutdown,
            addrs,
            started: SystemTime::now(),
            clients: Mutex::new(HashMap::new()),
            conn_ids: AtomicU64::new(1),
            id_salt: rand::random::<u64>(),
        }
    }

    /// What is being served now.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().clone()
    }

    /// The configuration being served now.
    pub fn config(&self) -> Arc<Config> {
        self.live.read().config.clone()
    }

    /// Serve `live` from now on; returns what it replaced.
    pub fn replace(&self, live: Live) -> Arc<Live> {
        std::mem::replace(&mut *self.live.write(), Arc::new(live))
    }

    /// A connection slot, or None at `limits.max_connections`.
    pub fn try_connection(&self) -> Option<CountGuard> {
        self.live.read().config.limits.total.try_acquire("")
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Relaxed)
    }

    /// Register a connected client; it is listed until `unregister`.
    pub fn register(
        &self,
        conn_id: u64,
        path: Arc<str>,
        peer: SocketAddr,
        principal: Option<String>,
        queue: &Arc<SessionQueue>,
    ) -> Arc<ClientInfo> {
        let now = SystemTime::now();
        // Not guessable from the connection count, unique per process.
        let mixed = (conn_id ^ self.id_salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let info = Arc::new(ClientInfo {
            id: format!("{mixed:016x}"),
            connected_at: now,
            last_activity_ms: AtomicU64::new(epoch_ms(now)),
            path,
            peer,
            principal: Mutex::new(principal),
            subscriptions: Mutex::new(Vec::new()),
        });
        self.clients
            .lock()
            .insert(conn_id, (info.clone(), queue.clone()));
        // Registered after `begin_shutdown` swept the sessions: close now.
        // (Shutdown is flagged before the sweep takes the lock, so a session
        // the sweep missed sees the flag here.) A session admitted just
        // before `stop_accepting` is served until then, like the others.
        if self.shutdown.is_cancelled() {
            queue.close(close::GOING_AWAY, SHUTTING_DOWN);
        }
        info
    }

    /// Begin shutdown: flag it (new connections are refused, tasks stop)
    /// and queue a Close 1001 to every session. Sessions learn of shutdown
    /// through their queue, so none of them waits on the shutdown token.
    pub fn begin_shutdown(&self) {
        self.closing.cancel();
        self.shutdown.cancel();
        for (_, queue) in self.clients.lock().values() {
            queue.close(close::GOING_AWAY, SHUTTING_DOWN);
        }
    }

    /// Forget a client.
    pub fn unregister(&self, conn_id: u64) {
        self.clients.lock().remove(&conn_id);
    }

    /// Connected clients, oldest first.
    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<(u64, Arc<ClientInfo>)> = self
            .clients
            .lock()
            .iter()
            .map(|(k, (info, _))| (*k, info.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// Stop taking WebSocket sessions (the first step of shutdown): new ones
    /// get 503 `shutting_down`, `/readyz` answers `stopping`. Clients already
    /// connected are served until [`begin_shutdown`](Self::begin_shutdown).
    pub fn stop_accepting(&self) {
        self.closing.cancel();
    }

    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// The `/readyz` answer: whether to send traffic here (200) or not
    /// (503), and the body with every channel's plugin health.
    ///
    /// - `stopping` (503): shutdown has begun.
    /// - `starting` (503): some channel's plugin never ran yet (`waiting_for`).
    /// - `degraded` (200): every plugin ran, but some are failing now
    ///   (restarting). The other channels are served; failing readiness
    ///   would take every replica out of service when a shared upstream is
    ///   down.
    /// - `ready` (200): every plugin is up, or finished by itself.
    pub fn readiness(&self) -> (bool, Value) {
        let now = std::time::Instant::now();
        let live = self.live();
        let mut runtimes: Vec<&Arc<ChannelRuntime>> = live.channels.values().collect();
        runtimes.sort_by(|a, b| a.cfg.name.cmp(&b.cfg.name));
        let mut channels = serde_json::Map::new();
        let mut waiting = Vec::new();
        let mut degraded = false;
        for rt in runtimes {
            let h = rt.health();
            if h.state == PluginState::Starting {
                waiting.push(rt.cfg.name.to_string());
            }
            degraded |= !h.state.healthy();
            let retry_in_ms = match h.state {
                PluginState::Starting | PluginState::Restarting => h
                    .retry_at
                    .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                PluginState::Up
                | PluginState::Finished
                | PluginState::Standby
                | PluginState::Stalled => None,
            };
            let call = h.call.map(|(name, since)| {
                json!({"name": name, "running_ms": now.saturating_duration_since(since).as_millis() as u64})
            });
            channels.insert(
                rt.cfg.name.to_string(),
                json!({
                    "plugin": rt.cfg.source.name(),
                    "state": h.state.as_str(),
                    "consecutive_failures": h.consecutive_failures,
                    "last_error": h.last_error,
                    "last_failure": h.last_failure.map(iso),
                    "retry_in_ms": retry_in_ms,
                    "call": call,
                    "abandoned_calls": rt.metrics.plugin_calls_abandoned.load(std::sync::atomic::Ordering::Relaxed),
                }),
            );
        }
        let (ok, mut body) = if self.shutting_down() {
            (false, json!({"status": "stopping"}))
        } else if !waiting.is_empty() {
            (false, json!({"status": "starting", "waiting_for": waiting}))
        } else if degraded {
            (true, json!({"status": "degraded"}))
        } else {
            (true, json!({"status": "ready"}))
        };
        body["channels"] = Value::Object(channels);
        (ok, body)
    }
}
