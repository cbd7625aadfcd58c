//! Template contexts: the values replies, envelopes and HTTP bodies can use.

use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use crate::config::TimestampFormat;
use crate::metrics::Metrics;
use crate::state::{GatewayState, epoch_ms, iso};
use crate::template::{Context, VarPath, walk};

/// `now`, `now_iso`, `now_unix`, `now_unix_ms`.
pub fn time_value(root: &str, fmt: TimestampFormat) -> Option<Value> {
    let now = SystemTime::now();
    let ms = epoch_ms(now);
    Some(match root {
        "now" => match fmt {
            TimestampFormat::Iso8601 => Value::String(iso(now)),
            TimestampFormat::Unix => json!(ms / 1000),
            TimestampFormat::UnixMs => json!(ms),
        },
        "now_iso" => Value::String(iso(now)),
        "now_unix" => json!(ms / 1000),
        "now_unix_ms" => json!(ms),
        _ => return None,
    })
}

/// Figures every context can give: open connections, uptime, version.
pub fn gateway_basic(metrics: &Metrics, started: SystemTime, key: &str) -> Option<Value> {
    Some(match key {
        "connections" | "active_connections" | "total_connections" => {
            json!(metrics.connections.load(Relaxed).max(0))
        }
        "uptime_seconds" => json!(
            SystemTime::now()
                .duration_since(started)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
        "started_at" => Value::String(iso(started)),
        "version" => Value::String(env!("CARGO_PKG_VERSION").to_string()),
        _ => return None,
    })
}

/// Gateway state, listeners and clock, for replies and HTTP bodies.
pub struct GatewayCtx<'a> {
    /// The state.
    pub state: &'a GatewayState,
    /// `{{now}}` format.
    pub fmt: TimestampFormat,
}

impl GatewayCtx<'_> {
    /// One `gateway.*` figure.
    pub fn gateway(&self, key: &str) -> Option<Value> {
        let st = self.state;
        if let Some(v) = gateway_basic(&st.metrics, st.started, key) {
            return Some(v);
        }
        let live = st.live();
        Some(match key {
            "cluster" => st.cluster.as_ref().map_or(Value::Null, |c| c.summary(st)),
            "clients" => Value::Array(st.clients().iter().map(|c| c.to_json()).collect()),
            "subscription_counts" => {
                let mut m = Map::new();
                for c in &live.config.channels {
                    let n = live
                        .channels
                        .get(&c.name)
                        .map(|r| r.metrics.subscribers.load(Relaxed).max(0))
                        .unwrap_or(0);
                    m.insert(c.name.to_string(), json!(n));
                }
                Value::Object(m)
            }
            "channels" => Value::Array(
                live.config
                    .channels
                    .iter()
                    .map(|c| {
                        json!({
                            "name": &*c.name,
                            "description": c.description,
                            "groups": c.groups,
                            "mode": c.source.mode.to_string(),
                            "interval": c.source.interval.map(|d| humantime::format_duration(d).to_string()),
                            "interval_seconds": c.source.interval.map(|d| d.as_secs_f64()),
                            "subscribers": live.channels.get(&c.name).map(|r| r.metrics.subscribers.load(Relaxed).max(0)).unwrap_or(0),
                        })
                    })
                    .collect(),
            ),
            "endpoints" => Value::Array(
                live.config
                    .endpoints
                    .iter()
                    .flat_map(|e| {
                        let addr = st.addrs.get(&e.listener).copied();
                        let scheme = if self.tls(&e.listener) { "wss" } else { "ws" };
                        e.paths.iter().map(move |p| {
                            json!({
                                "path": p.as_str(),
                                "url": addr.map(|a| format!("{scheme}://{a}{}", p.as_str())),
                                "listener": e.listener,
                                "protocol": e.protocol.as_ref().map(|p| p.name.as_str()).unwrap_or("stream"),
                                "channels": e.channels.iter().map(|c| c.name.to_string()).collect::<Vec<_>>(),
                                "auto_subscribe": e.subscribe.iter().map(|c| c.name.to_string()).collect::<Vec<_>>(),
                            })
                        })
                    })
                    .collect(),
            ),
            "http" => Value::Array(
                live.config
                    .http
                    .iter()
                    .map(|h| {
                        let addr = st.addrs.get(&h.listener);
                        let scheme = if self.tls(&h.listener) { "https" } else { "http" };
                        json!({
                            "path": h.path.as_str(),
                            "method": h.method.as_str(),
                            "url": addr.map(|a| format!("{scheme}://{a}{}", h.path.as_str())),
                        })
                    })
                    .collect(),
            ),
            _ => return None,
        })
    }

    fn listeners(&self) -> Value {
        let mut m = Map::new();
        for (name, a) in &self.state.addrs {
            m.insert(
                name.clone(),
                json!({"host": a.ip().to_string(), "port": a.port(), "address": a.to_string(), "tls": self.tls(name)}),
            );
        }
        Value::Object(m)
    }

    /// Whether a listener serves TLS.
    fn tls(&self, listener: &str) -> bool {
        self.state.config().listener_tls(listener).is_some()
    }
}

impl Context for GatewayCtx<'_> {
    fn lookup(&self, p: &VarPath) -> Option<Value> {
        match p.root.as_str() {
            "gateway" => match p.rest.split_first() {
                Some((k, rest)) => walk(&self.gateway(k)?, rest),
                None => {
                    let keys = [
                        "connections",
                        "uptime_seconds",
                        "started_at",
                        "version",
                        "channels",
                        "endpoints",
                        "subscription_counts",
                    ];
                    let mut m = Map::new();
                    for k in keys {
                        if let Some(v) = self.gateway(k) {
                            m.insert(k.to_string(), v);
                        }
                    }
                    Some(Value::Object(m))
                }
            },
            "listeners" => walk(&self.listeners(), &p.rest),
            r => walk(&time_value(r, self.fmt)?, &p.rest),
        }
    }
}

/// What a channel envelope sees.
pub struct EnvelopeCtx<'a> {
    /// The plugin's message.
    pub data: &'a Value,
    /// Channel name.
    pub channel: &'a str,
    /// Stream key.
    pub key: Option<&'a str>,
    /// Metrics (for `gateway.connections`).
    pub metrics: &'a Metrics,
    /// Gateway start.
    pub started: SystemTime,
    /// `{{now}}` format.
    pub fmt: TimestampFormat,
}

impl Context for EnvelopeCtx<'_> {
    fn lookup(&self, p: &VarPath) -> Option<Value> {
        match p.root.as_str() {
            "data" => walk(self.data, &p.rest),
            "channel" => Some(Value::String(self.channel.to_string())),
            "key" => self.key.map(|k| Value::String(k.to_string())),
            "gateway" => {
                let (k, rest) = p.rest.split_first()?;
                walk(&gateway_basic(self.metrics, self.started, k)?, rest)
            }
            r => walk(&time_value(r, self.fmt)?, &p.rest),
        }
    }
}
