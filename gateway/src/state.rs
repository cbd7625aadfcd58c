//! State shared by every listener and session of one running gateway.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::channel::ChannelRuntime;
use crate::config::Config;
use crate::metrics::Metrics;

/// Shared gateway state.
pub struct GatewayState {
    /// The configuration being served.
    pub config: Arc<Config>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Running channels by name.
    pub channels: HashMap<Arc<str>, Arc<ChannelRuntime>>,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    connections: Arc<Semaphore>,
    conn_ids: AtomicU64,
}

impl GatewayState {
    /// New state.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        channels: HashMap<Arc<str>, Arc<ChannelRuntime>>,
        shutdown: CancellationToken,
    ) -> GatewayState {
        let max = config.limits.max_connections;
        GatewayState {
            config,
            metrics,
            channels,
            shutdown,
            connections: Arc::new(Semaphore::new(max)),
            conn_ids: AtomicU64::new(1),
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

    /// Channels whose plugin has not started yet.
    pub fn not_ready(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .channels
            .values()
            .filter(|c| !c.started.load(Relaxed))
            .map(|c| c.cfg.name.to_string())
            .collect();
        v.sort();
        v
    }

    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}
