//! What operators write: `gateway.yaml` and channel spec files, as serde types.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently
//! ignored setting. Fields that later checks must point at are `Spanned`, so
//! an error can name their line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_saphyr::Spanned;

/// A duration written as humans write it: `250ms`, `5s`, `1m`, `24h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match humantime::parse_duration(s.trim()) {
            Ok(v) if !v.is_zero() => Ok(HumanDuration(v)),
            Ok(_) => Err(de::Error::custom(format!(
                "invalid duration {s:?}: must be greater than zero"
            ))),
            Err(_) => Err(de::Error::custom(format!(
                "invalid duration {s:?}: write a number and a unit, e.g. 250ms, 5s, 1m, 24h"
            ))),
        }
    }
}

/// A size in bytes: a plain integer or a number with a unit (`64KiB`, `1MiB`, `512B`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl ByteSize {
    fn parse(s: &str) -> Option<usize> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num.parse().ok()?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1024,
            "MB" => 1000 * 1000,
            "MiB" => 1024 * 1024,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1024 * 1024 * 1024,
            _ => return None,
        };
        n.checked_mul(mult)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ByteSize::parse(&s).map(ByteSize).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid size {s:?}: write bytes as an integer or with a unit, e.g. 4096, 64KiB, 1MiB"
            ))
        })
    }
}

/// `gateway.yaml`: the process-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Named listeners: each is one bind address serving WebSocket endpoints and HTTP routes.
    pub listeners: BTreeMap<String, ListenerFile>,
    /// Where plugin libraries are looked up.
    #[serde(default)]
    pub plugins: PluginsFile,
    /// Channel spec files to load: file globs, relative to this file.
    pub channels: Vec<Spanned<String>>,
    /// Health, readiness and metrics routes.
    #[serde(default)]
    pub admin: AdminFile,
    /// Process-wide limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Logging.
    #[serde(default)]
    pub log: LogFile,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownFile,
}

/// One listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Socket address to bind, e.g. `127.0.0.1:8080` (port 0 picks a free port).
    pub bind: Spanned<String>,
}

/// Plugin lookup.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsFile {
    /// Directories searched in order for `lib<name>.so` (dashes become underscores),
    /// relative to gateway.yaml. Only these directories are ever loaded from.
    #[serde(default = "default_plugin_dirs")]
    pub dirs: Vec<Spanned<String>>,
}

impl Default for PluginsFile {
    fn default() -> Self {
        PluginsFile {
            dirs: default_plugin_dirs(),
        }
    }
}

fn default_plugin_dirs() -> Vec<Spanned<String>> {
    Vec::new()
}

/// Where `/healthz`, `/readyz` and `/metrics` are served.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Listener serving the admin routes (default: the first listener by name).
    pub listener: Option<Spanned<String>>,
    /// Set to false to serve no admin routes at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            listener: None,
            enabled: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Process-wide limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Most WebSocket connections open at once; further upgrades get HTTP 503.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest message a client may send (bytes or `64KiB`); larger closes with 1009.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: ByteSize,
    /// Frames queued per session before the channel's `on_full` policy applies.
    #[serde(default = "default_session_queue")]
    pub session_queue: usize,
    /// Most frames written to one socket per flush.
    #[serde(default = "default_write_batch")]
    pub write_batch: usize,
    /// Messages buffered between a plugin and its channel's publisher; a full
    /// buffer blocks the plugin's `emit` (backpressure).
    #[serde(default = "default_source_buffer")]
    pub source_buffer: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_connections: default_max_connections(),
            max_message_size: default_max_message_size(),
            session_queue: default_session_queue(),
            write_batch: default_write_batch(),
            source_buffer: default_source_buffer(),
        }
    }
}

fn default_max_connections() -> usize {
    10_000
}
fn default_max_message_size() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_session_queue() -> usize {
    1024
}
fn default_write_batch() -> usize {
    64
}
fn default_source_buffer() -> usize {
    1024
}

/// Log output.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// Level or filter (`info`, `debug`, `gateway=debug,info`); `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` (human) or `json` (one object per line).
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// Log format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Graceful shutdown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// How long to wait for sessions and plugins after SIGINT/SIGTERM before exiting anyway.
    #[serde(default = "default_shutdown_deadline")]
    pub deadline: HumanDuration,
}

impl Default for ShutdownFile {
    fn default() -> Self {
        ShutdownFile {
            deadline: default_shutdown_deadline(),
        }
    }
}

fn default_shutdown_deadline() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// A channel spec file: one channel, its source, schema and endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelFile {
    /// Channel name, unique in the gateway.
    pub channel: Spanned<String>,
    /// What the channel carries (shown in docs and listings).
    #[serde(default)]
    pub description: String,
    /// JSON Schema every outbound message must satisfy (path relative to this file).
    pub schema: Spanned<String>,
    /// Where the data comes from.
    pub source: SourceFile,
    /// What happens when a subscriber's queue is full.
    #[serde(default)]
    pub queue: QueueFile,
    /// WebSocket endpoints serving this channel.
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
}

/// How a channel's source runs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceMode {
    /// The gateway calls the plugin every `interval`.
    Poll,
    /// The plugin runs its own threads and emits when it has data.
    Push,
}

impl fmt::Display for SourceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceMode::Poll => "poll",
            SourceMode::Push => "push",
        })
    }
}

/// A channel's source plugin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// Plugin name (looked up as `lib<name>.so` in `plugins.dirs`).
    pub plugin: Spanned<String>,
    /// `poll` or `push`.
    pub mode: Spanned<SourceMode>,
    /// Poll sources: time between polls.
    pub interval: Option<Spanned<HumanDuration>>,
    /// Plugin configuration, passed to the plugin as JSON.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// Per-subscriber queue policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueFile {
    /// `drop_oldest` (default) or `close` (code 1008).
    #[serde(default)]
    pub on_full: OnFull,
}

/// What to do when a subscriber's queue is full.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Drop the oldest queued frame to make room (counted as a slow-consumer drop).
    #[default]
    DropOldest,
    /// Close the connection with 1008 "slow consumer".
    Close,
}

/// A WebSocket endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// URL path; `{name}` segments are path parameters that select a keyed stream.
    pub path: Spanned<String>,
    /// Listener name (may be omitted when there is only one listener).
    pub listener: Option<Spanned<String>>,
    /// Who may connect.
    /// Omitted: `mode: none`.
    pub auth: Option<Spanned<AuthFile>>,
}

/// Authentication before the WebSocket upgrade.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "snake_case")]
pub enum AuthFile {
    /// Anyone may connect.
    #[default]
    None,
    /// A key from a query parameter and/or a header, compared in constant time.
    ApiKey {
        /// Query parameter carrying the key, e.g. `api_key`.
        query: Option<String>,
        /// Header carrying the key, e.g. `X-Api-Key`.
        header: Option<String>,
        /// Environment variable holding accepted keys, comma-separated.
        keys_env: Option<String>,
        /// File holding accepted keys, one per line (relative to the spec).
        keys_file: Option<String>,
    },
}
