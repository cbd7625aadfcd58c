//! State shared by every listener and session of one running gateway.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::channel::{ChannelRuntime, PluginState};
use crate::config::Config;
use crate::metrics::Metrics;

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

/// Shared gateway state.
pub struct GatewayState {
    /// The configuration being served.
    pub config: Arc<Config>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Running channels by name.
    pub channels: HashMap<Arc<str>, Arc<ChannelRuntime>>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// Bound listener addresses by name.
    pub addrs: BTreeMap<String, SocketAddr>,
    /// When the gateway started.
    pub started: SystemTime,
    clients: Mutex<HashMap<u64, Arc<ClientInfo>>>,
    connections: Arc<Semaphore>,
    conn_ids: AtomicU64,
    id_salt: u64,
}

impl GatewayState {
    /// New state.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        channels: HashMap<Arc<str>, Arc<ChannelRuntime>>,
        broker: Arc<dyn Broker>,
        addrs: BTreeMap<String, SocketAddr>,
        shutdown: CancellationToken,
    ) -> GatewayState {
        let max = config.limits.max_connections;
        GatewayState {
            config,
            metrics,
            channels,
            broker,
            shutdown,
            addrs,
            started: SystemTime::now(),
            clients: Mutex::new(HashMap::new()),
            connections: Arc::new(Semaphore::new(max)),
            conn_ids: AtomicU64::new(1),
            id_salt: rand::random::<u64>(),
        }
    }

    /// A connection slot, or None at `limits.max_connections`.
    pub fn try_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
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
        self.clients.lock().insert(conn_id, info.clone());
        info
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
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// Channels whose plugin has not started yet.
    pub fn not_ready(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .channels
            .values()
            .filter(|c| c.health().state == PluginState::Starting)
            .map(|c| c.cfg.name.to_string())
            .collect();
        v.sort();
        v
    }

    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
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
        let mut runtimes: Vec<&Arc<ChannelRuntime>> = self.channels.values().collect();
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
                PluginState::Up | PluginState::Finished => None,
            };
            channels.insert(
                rt.cfg.name.to_string(),
                json!({
                    "plugin": rt.cfg.source.plugin.name,
                    "state": h.state.as_str(),
                    "consecutive_failures": h.consecutive_failures,
                    "last_error": h.last_error,
                    "last_failure": h.last_failure.map(iso),
                    "retry_in_ms": retry_in_ms,
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
