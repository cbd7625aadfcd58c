//! A plugin-driven real-time WebSocket gateway.
//!
//! Map of the crate, in the order a message travels:
//! - [`config`]: `gateway.yaml` + channel specs → a validated [`config::Config`]
//!   (every error as `file:line:col: field.path: message`).
//! - [`plugin`]: loads source plugins (ABI v1, `plugin_api::abi`), checks the
//!   version handshake, and is the host side of every plugin call.
//! - [`channel`]: per channel, a supervisor drives the plugin (poll or push,
//!   restart with backoff) and a publisher parses, validates and frames each
//!   message once.
//! - [`broker`]: publish/subscribe between publishers and sessions
//!   (in-memory); [`cluster`]: the NATS broker, for several instances
//!   serving as one (sources run where their lease is).
//! - [`queue`]: the bounded per-session queue and its slow-consumer policy.
//! - [`server`]: listeners, HTTP routes (`/healthz`, `/readyz`, `/metrics`),
//!   auth ([`auth`]) and the WebSocket upgrade, routed by [`router`]; TLS
//!   listeners use the rustls configuration [`tls`] builds from PEM files.
//! - [`session`]: one task per connection, batched writes, Close codes.
//! - [`status`]: the builtin `status` source's snapshot of the gateway and
//!   the HTML status page that shows it.
//! - [`metrics`], [`state`], [`logging`]: shared plumbing.
//!
//! The library is in charge and `main` is thin: [`Gateway::start`] takes a
//! loaded config and serves it, which is also what the tests do (on port 0).

pub mod asyncapi;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod context;
pub mod control;
pub mod filter;
pub mod forwarded;
pub mod http_routes;
pub mod jwt;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod plugin;
pub mod proxy_protocol;
pub mod queue;
pub mod reload;
pub mod router;
pub mod server;
pub mod session;
pub mod state;
pub mod status;
pub mod template;
pub mod tls;
pub mod ws;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, MemoryBroker};
use crate::config::{Config, ConfigErrors};
use crate::metrics::Metrics;
use crate::reload::{ReloadReport, Reloader};
use crate::state::{GatewayState, Live};

/// Most connections waiting to be accepted per listener (the kernel caps it
/// at `net.core.somaxconn`). tokio's default of 1024 overflows under
/// connection bursts, and dropped SYNs are only retried after a second.
const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Lets a restarted gateway bind while old connections sit in TIME_WAIT;
    // a listener that is actually running still makes this fail.
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// A running gateway.
pub struct Gateway {
    addrs: BTreeMap<String, SocketAddr>,
    state: Arc<GatewayState>,
    tracker: TaskTracker,
    reloader: Arc<Reloader>,
}

impl Gateway {
    /// Bind every listener, start every channel and serve. Bind failures are
    /// reported like configuration errors, pointing at the listener's `bind`.
    pub async fn start(config: Config) -> Result<Gateway, ConfigErrors> {
        let mut bound = HashMap::new();
        let mut errors = Vec::new();
        for l in &config.listeners {
            match bind(l.bind) {
                Ok(t) => {
                    bound.insert(l.name.clone(), t);
                }
                Err(e) => errors.push(l.origin.error(format!("cannot listen on {}: {e}", l.bind))),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let cluster = match &config.broker {
            config::BrokerCfg::Memory => None,
            config::BrokerCfg::Nats(n) => Some(
                cluster::Cluster::connect(n.clone())
                    .await
                    .map_err(|e| ConfigErrors(vec![n.origin.error(e.0)]))?,
            ),
        };
        let broker: Arc<dyn Broker> = match &cluster {
            Some(c) => c.clone(),
            None => Arc::new(MemoryBroker::new()),
        };
        let mut addrs = BTreeMap::new();
        let mut listeners = Vec::new();
        for (name, listener) in bound {
            let addr = listener.local_addr().map_err(|e| {
                ConfigErrors(vec![
                    config
                        .listeners
                        .iter()
                        .find(|l| l.name == name)
                        .map(|l| l.origin.error(e.to_string()))
                        .unwrap_or_else(|| config::ConfigError {
                            file: config.file.clone(),
                            line: 0,
                            col: 0,
                            field: "listeners".into(),
                            message: e.to_string(),
                        }),
                ])
            })?;
            let tls = config.listener_tls(&name).is_some();
            tracing::info!(listener = %name, %addr, tls, "listening");
            addrs.insert(name.clone(), addr);
            listeners.push((name, listener));
        }
        // The runtime's size: all cores by default, `TOKIO_WORKER_THREADS`
        // to set it (docs/operations.md).
        tracing::info!(
            workers = tokio::runtime::Handle::current().metrics().num_workers(),
            "started"
        );
        metrics.config_loaded_at.store(
            state::epoch_ms(std::time::SystemTime::now()) / 1000,
            std::sync::atomic::Ordering::Relaxed,
        );
        // Channels get the state weakly: builtin sources report on it.
        let state = Arc::new_cyclic(|weak| {
            let mut channels = HashMap::new();
            for ch in &config.channels {
                let rt = channel::start(
                    ch.clone(),
                    &config.limits,
                    &metrics,
                    broker.clone(),
                    &tracker,
                    shutdown.clone(),
                    weak.clone(),
                    cluster.as_ref(),
                    None,
                );
                channels.insert(ch.name.clone(), rt);
            }
            GatewayState::new(
                Live::new(config.clone(), channels, 1),
                metrics,
                broker,
                cluster.clone(),
                addrs.clone(),
                shutdown.clone(),
            )
        });
        // Forget keyed rate-limiter state of clients gone quiet.
        {
            let st = state.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
                loop {
                    tokio::select! {
                        _ = tick.tick() => st.config().prunable.prune(),
                        _ = stop.cancelled() => break,
                    }
                }
            });
        }
        if let (Some(c), config::BrokerCfg::Nats(n)) = (&cluster, &config.broker) {
            // Serve once the other instances' retained messages are here.
            c.start(Arc::downgrade(&state), &tracker, shutdown.clone())
                .await
                .map_err(|e| ConfigErrors(vec![n.origin.error(e.0)]))?;
        }
        let reloader = Arc::new(Reloader::new(state.clone(), tracker.clone()));
        tracker.spawn(reloader.clone().watch(shutdown.clone()));
        for (name, listener) in listeners {
            tracker.spawn(server::serve_listener(
                listener,
                name.into(),
                state.clone(),
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        Ok(Gateway {
            addrs,
            state,
            tracker,
            reloader,
        })
    }

    /// Load the configuration files again and serve them (what SIGHUP and a
    /// change of the files do); on any error the running configuration stays
    /// and the errors are returned. See [`reload`].
    pub async fn reload(&self) -> Result<ReloadReport, ConfigErrors> {
        self.reloader.reload().await
    }

    /// The bound address of a listener.
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs.get(listener).copied()
    }

    /// Every bound address by listener name.
    pub fn addrs(&self) -> &BTreeMap<String, SocketAddr> {
        &self.addrs
    }

    /// Shared state (metrics, channels).
    pub fn state(&self) -> &Arc<GatewayState> {
        &self.state
    }

    /// Shut down: every client gets Close 1001, plugins are stopped. Returns
    /// false if tasks were still running at the configured deadline.
    pub async fn shutdown(self) -> bool {
        let deadline = self.state.config().shutdown_deadline;
        tracing::info!(?deadline, "shutting down");
        // No new WebSocket sessions from now on (503 `shutting_down`), and
        // `/readyz` says `stopping`; HTTP and admin routes still answer.
        self.state.stop_accepting();
        // Sources first: what they hand over until they have stopped is
        // published, and reaches the clients before their Close (at most
        // half the deadline; a plugin that does not stop delays no more).
        let channels: Vec<_> = self.state.live().channels.values().cloned().collect();
        let published =
            futures_util::future::join_all(channels.iter().map(|rt| rt.stop_source_and_publish()));
        if tokio::time::timeout(deadline / 2, published).await.is_err() {
            tracing::warn!(
                "sources still running at half the shutdown deadline; closing the clients anyway"
            );
        }
        self.state.begin_shutdown();
        self.tracker.close();
        let done = tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                remaining_tasks = self.tracker.len(),
                "shutdown deadline reached; exiting anyway"
            );
        }
        done
    }
}
