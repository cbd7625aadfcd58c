//! What operators write: `gateway.yaml` and channel spec files, as serde types.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently
//! ignored setting. Fields that later checks must point at are `Spanned`, so
//! an error can name their line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
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

/// A duration, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationOrOff(pub Option<Duration>);

/// The words that turn a duration setting off.
const OFF: [&str; 3] = ["off", "none", "never"];

impl<'de> Deserialize<'de> for DurationOrOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        if OFF.contains(&t) {
            return Ok(DurationOrOff(None));
        }
        match humantime::parse_duration(t) {
            Ok(v) if !v.is_zero() => Ok(DurationOrOff(Some(v))),
            _ => Err(de::Error::custom(format!(
                "invalid duration {s:?}: write a number and a unit, e.g. 30s, 1m, or `off`"
            ))),
        }
    }
}

/// `write_interval`: a duration of at most [`MAX_WRITE_INTERVAL`], or `off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteInterval(pub Option<Duration>);

/// The longest `write_interval`: frames wait at most this long for a write.
pub const MAX_WRITE_INTERVAL: Duration = Duration::from_secs(1);

impl<'de> Deserialize<'de> for WriteInterval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        if OFF.contains(&t) {
            return Ok(WriteInterval(None));
        }
        let fix = "10ms to 20ms saves most of the CPU it can";
        match humantime::parse_duration(t) {
            Ok(v) if v.is_zero() => Err(de::Error::custom(format!(
                "{s:?} is no interval: write `off` to write at once, or a duration such as 15ms ({fix})"
            ))),
            Ok(v) if v > MAX_WRITE_INTERVAL => Err(de::Error::custom(format!(
                "{s} is too long: it is at most {MAX_WRITE_INTERVAL:?} ({fix}), or `off`"
            ))),
            Ok(v) => Ok(WriteInterval(Some(v))),
            Err(_) => Err(de::Error::custom(format!(
                "invalid duration {s:?}: write a number and a unit, e.g. 15ms, or `off`"
            ))),
        }
    }
}

/// A rate: `COUNT/PERIOD`, e.g. `100/s`, `10/1m`, `1000/min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per period (also the burst).
    pub count: u32,
    /// The period.
    pub per: Duration,
}

/// The longest period a rate may have: the limiter counts time in u64
/// nanoseconds (about 584 years), and a longer one made it panic.
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(100 * 31_557_600);

impl Rate {
    /// Parse `COUNT/PERIOD` (a period of at most [`MAX_RATE_PERIOD`]).
    pub fn parse(s: &str) -> Option<Rate> {
        let (n, p) = s.trim().split_once('/')?;
        let count: u32 = n.trim().parse().ok().filter(|c| *c > 0)?;
        let p = p.trim();
        let per = match p {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .ok()
                .filter(|d| !d.is_zero() && *d <= MAX_RATE_PERIOD)?,
        };
        Some(Rate { count, per })
    }

    /// As a governor quota: `count` at once, refilled evenly over `per`.
    pub fn quota(&self) -> governor::Quota {
        let burst = std::num::NonZeroU32::new(self.count).unwrap_or(std::num::NonZeroU32::MIN);
        let step = (self.per / self.count).max(Duration::from_nanos(1));
        governor::Quota::with_period(step)
            .unwrap_or_else(|| governor::Quota::per_second(burst))
            .allow_burst(burst)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid rate {s:?}: write COUNT/PERIOD with COUNT ≥ 1 and a PERIOD of at most 100 years, e.g. 100/s, 10/1m, 1000/min"
            ))
        })
    }
}

/// The request header a listener's trusted proxies name the client in.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIpHeader {
    /// `X-Forwarded-For: client, proxy1, ...`, each proxy appending the
    /// address it got the request from (nginx, HAProxy, Envoy, AWS ALB).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239), each proxy appending
    /// an element.
    Forwarded,
    /// `X-Real-IP: client`, one address, set (not appended) by the proxy in
    /// front (nginx `proxy_set_header X-Real-IP $remote_addr`).
    XRealIp,
}

/// What happens when a client sends faster than `inbound_messages` allows.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnInboundLimit {
    /// Close with 1008.
    #[default]
    Close,
    /// Drop the message and answer with the protocol's error reply (`rate_limited`).
    Error,
}

/// What a channel does with messages beyond its `rate_limit`.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnRateLimit {
    /// Keep only the latest and publish it when the rate allows.
    #[default]
    Conflate,
    /// Drop them (counted).
    Drop,
}

/// A channel's outbound rate limit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelRateFile {
    /// Most messages published per period.
    pub rate: Rate,
    /// `conflate` (default) or `drop`.
    #[serde(default)]
    pub on_exceed: OnRateLimit,
}

/// Connection limits that an endpoint may set for itself.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointLimitsFile {
    /// Most connections open at once on this endpoint.
    pub max_connections: Option<usize>,
    /// Most connections open at once per client IP on this endpoint.
    pub max_connections_per_ip: Option<usize>,
    /// Most connections open at once per principal on this endpoint.
    pub max_connections_per_principal: Option<usize>,
    /// New connections per client IP.
    pub new_connections_per_ip: Option<Rate>,
    /// Inbound messages per connection.
    pub inbound_messages: Option<Rate>,
    /// `close` or `error`.
    pub on_inbound_limit: Option<OnInboundLimit>,
    /// Largest inbound message.
    pub max_message_size: Option<ByteSize>,
    /// Longest a connection may live.
    pub max_connection_duration: Option<DurationOrOff>,
    /// Longest a connection may stay silent.
    #[schemars(with = "Option<DurationOrOff>")]
    pub idle_timeout: Option<Spanned<DurationOrOff>>,
    /// Server WebSocket Ping interval.
    #[schemars(with = "Option<DurationOrOff>")]
    pub ping_interval: Option<Spanned<DurationOrOff>>,
    /// How long a Pong may take.
    pub pong_timeout: Option<HumanDuration>,
    /// Shortest time between two writes of queued messages to one
    /// connection (`off`: write at once).
    pub write_interval: Option<WriteInterval>,
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
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Named listeners: each is one bind address serving WebSocket endpoints and HTTP routes.
    pub listeners: BTreeMap<String, ListenerFile>,
    /// Where plugin libraries are looked up.
    #[serde(default)]
    pub plugins: PluginsFile,
    /// Channel spec files to load: file globs, relative to this file.
    #[schemars(with = "Vec<String>")]
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
    /// Reloading the configuration while running.
    #[serde(default)]
    pub reload: ReloadFile,
    /// Named client control protocols, used by endpoints (`protocol: NAME`).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ProtocolFile>")]
    pub protocols: BTreeMap<String, Spanned<ProtocolFile>>,
    /// WebSocket endpoints serving several channels (single-channel ones
    /// may also sit in their channel spec).
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
    /// HTTP JSON routes.
    #[serde(default)]
    pub http: Vec<HttpRouteFile>,
    /// The HTTP publish API: `POST {path}/{channel}`.
    pub publish: Option<PublishFile>,
    /// The broker between publishers and sessions: `memory` (this process
    /// only, the default) or `nats` (several gateway instances as one).
    #[schemars(with = "Option<BrokerFile>")]
    pub broker: Option<Spanned<BrokerFile>>,
}

/// Which broker carries messages from publishers to sessions.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    /// In this process: one gateway instance.
    #[default]
    Memory,
    /// NATS with JetStream: every instance pointed at the same NATS and
    /// subject prefix serves as one gateway (docs/cluster.md).
    Nats,
}

/// `broker:` in gateway.yaml.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BrokerFile {
    /// `memory` (default) or `nats`.
    #[serde(default)]
    pub kind: BrokerKind,
    /// NATS server URL(s), comma-separated (default `nats://127.0.0.1:4222`).
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// First token of every subject, stream and bucket name this cluster
    /// uses (letters, digits, `-`, `_`; default `gateway`). Instances with
    /// the same prefix form one cluster.
    #[schemars(with = "Option<String>")]
    pub subject_prefix: Option<Spanned<String>>,
    /// Environment variable holding a NATS token.
    #[schemars(with = "Option<String>")]
    pub token_env: Option<Spanned<String>>,
    /// Environment variable holding a NATS user name (with `password_env`).
    #[schemars(with = "Option<String>")]
    pub user_env: Option<Spanned<String>>,
    /// Environment variable holding the NATS password (with `user_env`).
    #[schemars(with = "Option<String>")]
    pub password_env: Option<Spanned<String>>,
    /// Environment variable holding the path of a NATS `.creds` file.
    #[schemars(with = "Option<String>")]
    pub creds_env: Option<Spanned<String>>,
    /// A source's lease lives this long without renewal (renewed every
    /// third of it); another instance takes a source over at most about
    /// this long after its instance died (default 6s, from 1s to 60s).
    #[schemars(with = "Option<HumanDuration>")]
    pub lease_ttl: Option<Spanned<HumanDuration>>,
    /// Connection caps (`max_connections*`) count every instance's
    /// connections (default true); false: each instance counts its own.
    #[serde(default = "default_true")]
    pub cluster_limits: bool,
    /// This instance's name in logs, metrics and leases (default:
    /// `$HOSTNAME-<pid>`). Letters, digits, `-`, `_`.
    #[schemars(with = "Option<String>")]
    pub instance: Option<Spanned<String>>,
}

/// The HTTP publish API.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishFile {
    /// Path prefix (default `/publish`): messages are POSTed to `{path}/{channel}`.
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    /// Listener (may be omitted when there is only one).
    #[schemars(with = "Option<String>")]
    pub listener: Option<Spanned<String>>,
    /// Who may publish: required, write `{mode: none}` to let anyone.
    #[schemars(with = "AuthFile")]
    pub auth: Spanned<AuthFile>,
    /// Channels that accept published messages (default all).
    #[schemars(with = "Option<ChannelSelFile>")]
    pub channels: Option<Spanned<ChannelSelFile>>,
    /// Largest request body (default 1MiB).
    pub max_body: Option<ByteSize>,
    /// Requests per client IP (default `limits.http_requests_per_ip`).
    pub requests_per_ip: Option<Rate>,
}

/// One listener.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Socket address to bind, e.g. `127.0.0.1:8080` (port 0 picks a free port).
    #[schemars(with = "String")]
    pub bind: Spanned<String>,
    /// Serve TLS (`wss://`, `https://`) with this certificate and key.
    pub tls: Option<TlsFile>,
    /// HTTP error statuses answered as others on this listener, e.g.
    /// `{405: 404, 429: 503}`, for APIs that document a fixed set.
    #[schemars(with = "Option<BTreeMap<u16, u16>>")]
    pub status_codes: Option<Spanned<BTreeMap<u16, u16>>>,
    /// The reverse proxies in front of this listener, as addresses
    /// (`10.0.0.5`) or networks (`10.0.0.0/8`, `fd00::/8`): for a connection
    /// from one of them, the client's address is the rightmost
    /// `X-Forwarded-For` (or `client_ip_header`) entry that is not one of
    /// them. Per-IP limits, logs
    /// and `client.peer` use that address. Empty (default): the socket's.
    /// With `proxy_protocol`, also the only addresses a connection is taken
    /// from.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// The header `trusted_proxies` name the client in: `x-forwarded-for`
    /// (default), `forwarded` (RFC 7239) or `x-real-ip`. Only this one is
    /// read; the others are anybody's to write.
    #[schemars(with = "Option<ClientIpHeader>")]
    pub client_ip_header: Option<Spanned<ClientIpHeader>>,
    /// Every connection begins with a PROXY protocol header (version 1 or
    /// 2), written by a TCP load balancer in front (HAProxy `send-proxy`,
    /// AWS NLB): its source address is the client's. A connection without
    /// one, or from an address not in `trusted_proxies` (required with
    /// this), is closed. Default false.
    #[schemars(with = "Option<bool>")]
    pub proxy_protocol: Option<Spanned<bool>>,
}

/// A listener's certificate and private key, PEM files relative to gateway.yaml.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The server certificate, then any intermediates.
    #[schemars(with = "String")]
    pub cert: Spanned<String>,
    /// The certificate's private key (PKCS#8, PKCS#1/RSA or SEC1/EC), unencrypted.
    #[schemars(with = "String")]
    pub key: Spanned<String>,
}

/// Plugin lookup.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginsFile {
    /// Directories searched in order for `lib<name>.so` (dashes become underscores),
    /// relative to gateway.yaml. Only these directories are ever loaded from.
    #[serde(default = "default_plugin_dirs")]
    #[schemars(with = "Vec<String>")]
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

/// Where `/healthz`, `/readyz`, `/metrics` (and the AsyncAPI document) are served.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Listener serving the admin routes (default: the first listener by name).
    #[schemars(with = "Option<String>")]
    pub listener: Option<Spanned<String>>,
    /// Set to false to serve no admin routes at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The HTML status page (off when absent).
    #[schemars(with = "Option<StatusPageFile>")]
    pub status_page: Option<Spanned<StatusPageFile>>,
    /// Serve the configuration's AsyncAPI 3.0 document (JSON) at this path
    /// on the admin listener, e.g. `/asyncapi.json`. Absent: not served.
    #[schemars(with = "Option<String>")]
    pub asyncapi: Option<Spanned<String>>,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            listener: None,
            enabled: true,
            status_page: None,
            asyncapi: None,
        }
    }
}

/// The HTML status page, served on the admin listener: it shows what the
/// WebSocket endpoint `endpoint` (a channel with `source: {builtin: status}`)
/// sends.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusPageFile {
    /// URL path of the page (default `/status`).
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    /// Path of the endpoint serving the status channel, on the admin listener.
    #[schemars(with = "String")]
    pub endpoint: Spanned<String>,
}

fn default_true() -> bool {
    true
}

/// Process-wide limits.
#[derive(Debug, Deserialize, JsonSchema)]
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
    /// Shortest time between two writes of queued messages to one
    /// connection: messages that come sooner wait and go out together, at
    /// most this long (`off`, the default: write at once; at most `1s`).
    #[serde(default)]
    pub write_interval: WriteInterval,
    /// Messages buffered between a plugin and its channel's publisher; a full
    /// buffer blocks the plugin's `emit` (backpressure).
    #[serde(default = "default_source_buffer")]
    pub source_buffer: usize,
    /// Most connections open at once per client IP.
    pub max_connections_per_ip: Option<usize>,
    /// Most connections open at once per principal (JWT subject, API key).
    pub max_connections_per_principal: Option<usize>,
    /// New connections per client IP (refused with 429 and Retry-After).
    pub new_connections_per_ip: Option<Rate>,
    /// Inbound messages per connection.
    pub inbound_messages: Option<Rate>,
    /// `close` (1008) or `error` (an error reply).
    #[serde(default)]
    pub on_inbound_limit: OnInboundLimit,
    /// Longest a connection may live.
    pub max_connection_duration: Option<DurationOrOff>,
    /// Longest a connection may stay silent (no frame at all from the client).
    #[schemars(with = "Option<DurationOrOff>")]
    pub idle_timeout: Option<Spanned<DurationOrOff>>,
    /// Server WebSocket Ping interval (`off` to disable; default 30s).
    #[serde(default, deserialize_with = "written")]
    #[schemars(with = "DurationOrOff")]
    pub ping_interval: Option<Spanned<DurationOrOff>>,
    /// How long a Pong may take before the connection is closed.
    #[serde(default = "default_pong_timeout")]
    pub pong_timeout: HumanDuration,
    /// HTTP route requests per client IP (refused with 429 and Retry-After).
    pub http_requests_per_ip: Option<Rate>,
}

/// A field with a default that, once written, must hold a value: `key: ~`
/// or an empty value is that value's error, as before the field kept where
/// it was written (not the default).
fn written<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The server Ping interval when none is written.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
fn default_pong_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_connections: default_max_connections(),
            max_message_size: default_max_message_size(),
            session_queue: default_session_queue(),
            write_batch: default_write_batch(),
            write_interval: WriteInterval::default(),
            source_buffer: default_source_buffer(),
            max_connections_per_ip: None,
            max_connections_per_principal: None,
            new_connections_per_ip: None,
            inbound_messages: None,
            on_inbound_limit: OnInboundLimit::Close,
            max_connection_duration: None,
            idle_timeout: None,
            ping_interval: None,
            pong_timeout: default_pong_timeout(),
            http_requests_per_ip: None,
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
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// Level or filter (`info`, `debug`, `gateway=debug,info`); `RUST_LOG` wins when set.
    #[schemars(with = "String", default = "default_log_level")]
    pub level: Option<Spanned<String>>,
    /// `text` (human) or `json` (one object per line).
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            level: None,
            format: LogFormat::Text,
        }
    }
}

pub(crate) fn default_log_level() -> String {
    "info".into()
}

/// Log format.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Reloading the configuration while running.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadFile {
    /// Reload when gateway.yaml, a channel spec or a schema changes on disk
    /// (SIGHUP always reloads).
    #[serde(default = "default_true")]
    pub watch: bool,
    /// How often the files are checked for changes.
    #[serde(default = "default_watch_interval")]
    pub interval: HumanDuration,
}

impl Default for ReloadFile {
    fn default() -> Self {
        ReloadFile {
            watch: true,
            interval: default_watch_interval(),
        }
    }
}

fn default_watch_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// Graceful shutdown.
#[derive(Debug, Deserialize, JsonSchema)]
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
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelFile {
    /// Channel name, unique in the gateway.
    #[schemars(with = "String")]
    pub channel: Spanned<String>,
    /// What the channel carries (shown in docs and listings).
    #[serde(default)]
    pub description: String,
    /// JSON Schema every outbound message must satisfy (path relative to this file).
    #[schemars(with = "String")]
    pub schema: Spanned<String>,
    /// Where the data comes from.
    #[schemars(with = "SourceFile")]
    pub source: Spanned<SourceFile>,
    /// What happens when a subscriber's queue is full.
    #[serde(default)]
    pub queue: QueueFile,
    /// WebSocket endpoints serving this channel.
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
    /// Groups the channel belongs to (endpoints can serve a group).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub groups: Vec<Spanned<String>>,
    /// Wrap each plugin message in this template (`{{data}}` is the plugin's message).
    #[schemars(with = "Option<serde_json::Value>")]
    pub envelope: Option<Spanned<serde_json::Value>>,
    /// How `{{now}}` renders in the envelope.
    #[serde(default)]
    pub timestamps: TimestampFormat,
    /// New subscribers get the channel's latest message at once.
    #[serde(default)]
    pub last_value: bool,
    /// Filters a subscribe message may set, by the name the client uses.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, FilterFile>")]
    pub filters: BTreeMap<String, Spanned<FilterFile>>,
    /// Most messages published per period.
    pub rate_limit: Option<ChannelRateFile>,
    /// Hold a message that comes sooner than this after the channel's last
    /// send, and send everything held together when it is up (at most
    /// `1s`; default: send at once). Fewer, larger socket writes for a
    /// delay of at most this much.
    #[schemars(with = "Option<HumanDuration>")]
    pub linger: Option<Spanned<HumanDuration>>,
    /// Sample messages, as subscribers receive them (with the envelope, if
    /// any): each must satisfy the channel's schema.
    #[serde(default)]
    #[schemars(with = "Vec<serde_json::Value>")]
    pub examples: Vec<Spanned<serde_json::Value>>,
}

/// What `unsubscribe` from a channel the client does not follow answers.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NotSubscribed {
    /// The `error` reply, code `not_subscribed`.
    #[default]
    Error,
    /// The `unsubscribed` reply: unsubscribing is idempotent.
    Confirm,
}

/// How `{{now}}` renders.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// `2026-11-23T12:00:00.123Z`.
    #[default]
    Iso8601,
    /// Whole seconds since the epoch, a number.
    Unix,
    /// Milliseconds since the epoch, a number.
    UnixMs,
}

/// One subscribe filter of a channel.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterFile {
    /// Keep messages whose field at this dotted path equals the client's
    /// value (or any of the client's list).
    #[serde(rename = "match")]
    pub match_field: Option<String>,
    /// Keep only the keys the client lists of the object at this path.
    pub project: Option<String>,
    /// The client's value is a period (`30s`) or `real-time`: at most one
    /// message per period per `key`, the latest.
    #[serde(default)]
    pub frequency: bool,
    /// Dotted path of the field that separates conflation streams (frequency only).
    pub key: Option<String>,
}

/// A client control protocol.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtocolFile {
    /// Field of a client message that names its action.
    #[serde(default = "default_action_field")]
    pub action_field: String,
    /// Field that names the channel of subscribe/unsubscribe.
    #[serde(default = "default_channel_field")]
    pub channel_field: String,
    /// Where subscribe filters may be: `top_level`, `filters` (the field
    /// named by `filters_field`), or both.
    #[serde(default = "default_filters_at")]
    pub filters_at: Vec<FiltersAt>,
    /// The field holding filters when `filters_at` has `filters`.
    #[serde(default = "default_filters_field")]
    pub filters_field: String,
    /// A top-level subscribe/unsubscribe field (e.g. `device_id`) whose
    /// value makes a subscription of its own: subscribing with several values
    /// follows each, and unsubscribing with one ends only that one.
    pub subscription_key: Option<String>,
    /// What `unsubscribe` from a channel the client does not follow
    /// answers: `error` (`not_subscribed`) or `confirm` (the `unsubscribed`
    /// reply, as if it had followed it).
    #[serde(default)]
    pub not_subscribed: NotSubscribed,
    /// How `{{now}}` renders in replies.
    #[serde(default)]
    pub timestamps: TimestampFormat,
    /// Client action name → what it does: `subscribe`, `unsubscribe`,
    /// `ping`, `status`, or `{command: {channel, request}}`.
    #[schemars(with = "Option<BTreeMap<String, ActionFile>>")]
    pub actions: Option<BTreeMap<String, Spanned<ActionFile>>>,
    /// Reply templates.
    #[serde(default)]
    pub replies: RepliesFile,
    /// JSON Schema every reply must satisfy (optional).
    #[schemars(with = "Option<String>")]
    pub schema: Option<Spanned<String>>,
    /// Names a client may subscribe to that stand for several channels
    /// (`all`, `{group: NAME}`, a list) or none (`none`).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ChannelSelFile>")]
    pub channel_sets: BTreeMap<String, Spanned<ChannelSelFile>>,
}

fn default_action_field() -> String {
    "type".into()
}
fn default_channel_field() -> String {
    "channel".into()
}
fn default_filters_field() -> String {
    "filters".into()
}
fn default_filters_at() -> Vec<FiltersAt> {
    vec![FiltersAt::Filters]
}

/// Where a subscribe message may carry filters.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FiltersAt {
    /// Beside the action and channel fields.
    TopLevel,
    /// Inside the `filters_field` object.
    Filters,
}

/// What a client action does.
#[derive(Debug)]
pub enum ActionFile {
    /// A built-in action.
    Builtin(BuiltinAction),
    /// A plugin command that answers.
    Command(CommandAction),
}

/// A client action answered by a plugin command.
#[derive(Debug)]
pub struct CommandAction {
    /// Channel whose plugin answers.
    pub channel: String,
    /// Request template.
    pub request: Option<serde_json::Value>,
    /// Longest wait.
    pub timeout: Option<Duration>,
}

impl<'de> Deserialize<'de> for ActionFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        const HINT: &str = "an action is `subscribe`, `unsubscribe`, `ping`, `status` or `{command: {channel: NAME, request: {...}}}`";
        let v = Value::deserialize(d)?;
        match v {
            Value::String(s) => match s.as_str() {
                "subscribe" => Ok(ActionFile::Builtin(BuiltinAction::Subscribe)),
                "unsubscribe" => Ok(ActionFile::Builtin(BuiltinAction::Unsubscribe)),
                "ping" => Ok(ActionFile::Builtin(BuiltinAction::Ping)),
                "status" => Ok(ActionFile::Builtin(BuiltinAction::Status)),
                other => Err(de::Error::custom(format!(
                    "unknown action {other:?}: {HINT}"
                ))),
            },
            Value::Object(mut m) => {
                let Some(Value::Object(mut c)) = m.remove("command") else {
                    return Err(de::Error::custom(HINT));
                };
                if let Some(k) = m.keys().next() {
                    return Err(de::Error::custom(format!("unknown field `{k}`: {HINT}")));
                }
                let channel = match c.remove("channel") {
                    Some(Value::String(s)) => s,
                    _ => {
                        return Err(de::Error::custom(
                            "`command.channel` must name the channel whose plugin answers",
                        ));
                    }
                };
                let request = c.remove("request");
                let timeout = match c.remove("timeout") {
                    None => None,
                    Some(Value::String(t)) => match humantime::parse_duration(t.trim()) {
                        Ok(d) if !d.is_zero() => Some(d),
                        _ => {
                            return Err(de::Error::custom(format!(
                                "invalid duration {t:?} in `command.timeout`: write e.g. 5s"
                            )));
                        }
                    },
                    Some(other) => {
                        return Err(de::Error::custom(format!(
                            "invalid duration {other} in `command.timeout`: write e.g. 5s"
                        )));
                    }
                };
                if let Some(k) = c.keys().next() {
                    return Err(de::Error::custom(format!(
                        "unknown field `command.{k}`, expected one of channel, request, timeout"
                    )));
                }
                Ok(ActionFile::Command(CommandAction {
                    channel,
                    request,
                    timeout,
                }))
            }
            other => Err(de::Error::custom(format!("invalid action {other}: {HINT}"))),
        }
    }
}

/// Built-in client actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinAction {
    /// Subscribe to a channel.
    Subscribe,
    /// Unsubscribe from a channel.
    Unsubscribe,
    /// Answer with the `pong` reply.
    Ping,
    /// Answer with the `status` reply.
    Status,
}

/// A call to a channel's plugin command.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandFile {
    /// Channel whose plugin answers.
    #[schemars(with = "String")]
    pub channel: Spanned<String>,
    /// Request sent to the plugin (a template).
    #[serde(default)]
    pub request: Option<serde_json::Value>,
    /// Longest wait for the answer.
    pub timeout: Option<HumanDuration>,
}

/// Reply templates of a protocol.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepliesFile {
    /// Sent on connect (after in-band auth, if any), in order.
    #[schemars(with = "Option<OneOrMany>")]
    pub connected: Option<Spanned<OneOrMany>>,
    /// Confirms a subscribe.
    #[schemars(with = "Option<serde_json::Value>")]
    pub subscribed: Option<Spanned<serde_json::Value>>,
    /// Confirms an unsubscribe.
    #[schemars(with = "Option<serde_json::Value>")]
    pub unsubscribed: Option<Spanned<serde_json::Value>>,
    /// Answers a ping.
    #[schemars(with = "Option<serde_json::Value>")]
    pub pong: Option<Spanned<serde_json::Value>>,
    /// Answers a status request.
    #[schemars(with = "Option<serde_json::Value>")]
    pub status: Option<Spanned<serde_json::Value>>,
    /// Reports an error.
    #[schemars(with = "Option<serde_json::Value>")]
    pub error: Option<Spanned<serde_json::Value>>,
    /// Wraps a plugin command's answer (`{{result}}`).
    #[schemars(with = "Option<serde_json::Value>")]
    pub command: Option<Spanned<serde_json::Value>>,
}

/// One template or a list of them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// Several.
    Many(Vec<serde_json::Value>),
    /// One.
    One(serde_json::Value),
}

/// Which channels an endpoint serves or subscribes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ChannelSelFile {
    /// `all`, or one channel name.
    Name(String),
    /// Channel names.
    List(Vec<String>),
    /// `{group: NAME}` or `{groups: [..]}`.
    Group(GroupSelFile),
}

/// Channels by group.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSelFile {
    /// One group.
    pub group: Option<String>,
    /// Several groups.
    pub groups: Option<Vec<String>>,
}

/// An HTTP JSON route.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRouteFile {
    /// URL path (no parameters).
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    /// Listener name (may be omitted when there is only one listener).
    #[schemars(with = "Option<String>")]
    pub listener: Option<Spanned<String>>,
    /// `GET` (default) or `POST`.
    #[schemars(with = "Option<String>")]
    pub method: Option<Spanned<String>>,
    /// Who may call it (`none`, `api_key`, or `jwt` by header/query).
    #[schemars(with = "Option<AuthFile>")]
    pub auth: Option<Spanned<AuthFile>>,
    /// Answer with this template (gateway state, request, `{{result}}`).
    #[schemars(with = "Option<serde_json::Value>")]
    pub body: Option<Spanned<serde_json::Value>>,
    /// Answer with a channel's latest message.
    #[schemars(with = "Option<String>")]
    pub latest: Option<Spanned<String>>,
    /// Ask a plugin command; its answer is the body (or `{{result}}` in `body`).
    pub command: Option<CommandFile>,
    /// Success status (default 200).
    pub status: Option<u16>,
    /// Largest request body (default 1MiB).
    pub max_body: Option<ByteSize>,
    /// Requests per client IP (overrides `limits.http_requests_per_ip`).
    pub requests_per_ip: Option<Rate>,
}

/// How a channel's source runs.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
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

/// A channel's source: a plugin, or a source built into the gateway.
/// Exactly one of `plugin` and `builtin` is given (checked after parsing,
/// so the error can say so).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{"required": ["plugin"]}, {"required": ["builtin"]}]))]
pub struct SourceFile {
    /// Plugin name (looked up as `lib<name>.so` in `plugins.dirs`).
    #[schemars(with = "Option<String>")]
    pub plugin: Option<Spanned<String>>,
    /// A source built into the gateway, e.g. `status` (the gateway's own state).
    #[schemars(with = "Option<String>")]
    pub builtin: Option<Spanned<String>>,
    /// `poll` or `push` (plugins: required; builtin sources poll).
    #[schemars(with = "Option<SourceMode>")]
    pub mode: Option<Spanned<SourceMode>>,
    /// Poll sources: time between polls.
    #[schemars(with = "Option<HumanDuration>")]
    pub interval: Option<Spanned<HumanDuration>>,
    /// Plugin configuration, passed to the plugin as JSON.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Plugin sources: the longest a call into the plugin (create, start,
    /// poll, open_key, close_key) may run; past it the instance is given up
    /// and a new one started. `off` (the default) waits as long as it takes.
    #[schemars(with = "Option<DurationOrOff>")]
    pub call_timeout: Option<Spanned<DurationOrOff>>,
}

/// Per-subscriber queue policy.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueFile {
    /// `drop_oldest` (default) or `close` (code 1008).
    #[serde(default)]
    pub on_full: OnFull,
}

/// What to do when a subscriber's queue is full.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Drop the oldest queued frame to make room (counted as a slow-consumer drop).
    #[default]
    DropOldest,
    /// Close the connection with 1008 "slow consumer".
    Close,
}

/// A WebSocket endpoint.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// URL path; `{name}` segments are path parameters that select a keyed stream.
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    /// Listener name (may be omitted when there is only one listener).
    #[schemars(with = "Option<String>")]
    pub listener: Option<Spanned<String>>,
    /// Who may connect.
    /// Omitted: `mode: none`.
    #[schemars(with = "Option<AuthFile>")]
    pub auth: Option<Spanned<AuthFile>>,
    /// More paths serving the same endpoint.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub aliases: Vec<Spanned<String>>,
    /// Allowed `Origin` header values (absent: any).
    pub origins: Option<Vec<String>>,
    /// WebSocket subprotocols spoken here (`Sec-WebSocket-Protocol`): the
    /// first a client offers that is listed is selected; a client offering
    /// only others is refused (400).
    #[serde(default)]
    pub subprotocols: Vec<String>,
    /// `stream` (default) or the name of a protocol in gateway.yaml.
    #[schemars(with = "Option<String>")]
    pub protocol: Option<Spanned<String>>,
    /// Channels served (gateway.yaml endpoints): a name, a list, `all`, or `{group: NAME}`.
    #[schemars(with = "Option<ChannelSelFile>")]
    pub channels: Option<Spanned<ChannelSelFile>>,
    /// Channels subscribed on connect (subscribe protocols): same forms, or `none`.
    #[schemars(with = "Option<ChannelSelFile>")]
    pub subscribe: Option<Spanned<ChannelSelFile>>,
    /// Replaces the protocol's `connected` replies.
    #[schemars(with = "Option<OneOrMany>")]
    pub on_connect: Option<Spanned<OneOrMany>>,
    /// Limits of this endpoint (override `limits` of gateway.yaml).
    #[schemars(with = "Option<EndpointLimitsFile>")]
    pub limits: Option<Spanned<EndpointLimitsFile>>,
    /// Close codes sent as others on this endpoint, e.g. `{1009: 1003}`,
    /// for APIs that document a fixed set.
    #[schemars(with = "Option<BTreeMap<u16, u16>>")]
    pub close_codes: Option<Spanned<BTreeMap<u16, u16>>>,
}

/// Authentication before the WebSocket upgrade.
#[allow(clippy::large_enum_variant)] // parsed once at load time
#[derive(Debug, Default, Deserialize, JsonSchema)]
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
    /// A signed JWT, from a header, a query parameter or a first message.
    Jwt {
        /// Pinned algorithm, e.g. HS256, RS256, ES256.
        algorithm: String,
        /// HS*: environment variable holding the secret.
        secret_env: Option<String>,
        /// HS*: secret used when `secret_env` is unset (demos only).
        secret_default: Option<String>,
        /// RS*/ES*: PEM public key file.
        public_key_file: Option<String>,
        /// RS*/ES*: JWKS file.
        jwks_file: Option<String>,
        /// Required `iss`.
        issuer: Option<String>,
        /// Accepted `aud` values.
        audience: Option<Vec<String>>,
        /// Clock skew allowed for `exp`/`nbf`.
        leeway: Option<String>,
        /// Refuse tokens without `exp` (default true).
        require_exp: Option<bool>,
        /// Close a connection when its token expires (default false).
        close_at_exp: Option<bool>,
        /// Claim naming the principal (default `sub`).
        principal_claim: Option<String>,
        /// Take the token from `Authorization: Bearer` (default true).
        #[serde(default = "default_true")]
        bearer: bool,
        /// Take the token from this query parameter.
        query: Option<String>,
        /// Take the token from a first message.
        message: Option<InbandFile>,
    },
    /// An in-band first message with required fields.
    Handshake {
        /// The handshake message.
        message: InbandFile,
    },
}

/// An in-band first message (JWT or handshake).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InbandFile {
    /// Fields (and values) that identify the message, e.g. `{type: auth}`.
    #[serde(rename = "match", default)]
    pub match_fields: serde_json::Map<String, serde_json::Value>,
    /// JWT: field holding the token.
    pub token_field: Option<String>,
    /// Handshake: fields that must be present.
    #[serde(default)]
    pub required: Vec<String>,
    /// Reply on success (template).
    pub reply: Option<serde_json::Value>,
    /// Reply on failure (template with `{{error.code}}`, `{{error.message}}`).
    pub error_reply: Option<serde_json::Value>,
    /// JSON Schema both replies must satisfy (relative to the file).
    pub schema: Option<String>,
    /// Time allowed to send it; then close 1008.
    pub timeout: Option<HumanDuration>,
    /// Client actions still answered before it (e.g. `ping`).
    #[serde(default)]
    pub allow_before: Vec<String>,
}

// JSON Schemas of the values parsed by hand (`gateway schema`).

/// A string schema with a pattern and a description.
fn string_schema(description: &str, pattern: &str) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "pattern": pattern,
        "description": description,
    })
}

/// Number and unit, repeatable: `250ms`, `5 sec`, `1m 30s`.
const DURATION_PATTERN: &str = r"^\s*([0-9]+\s*[A-Za-zµ]+\s*)+$";

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        string_schema(
            "A duration with a unit, greater than zero: 250ms, 5s, 1m, 24h, 1m 30s.",
            DURATION_PATTERN,
        )
    }
}

impl JsonSchema for DurationOrOff {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DurationOrOff".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration with a unit (30s, 1m, 24h), or `off`.",
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "string", "enum": OFF},
            ],
        })
    }
}

impl JsonSchema for WriteInterval {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "WriteInterval".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration with a unit of at most 1s (15ms), or `off`.",
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "string", "enum": OFF},
            ],
        })
    }
}

impl JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        string_schema(
            "COUNT/PERIOD with COUNT ≥ 1: 100/s, 10/1m, 1000/min, 5/10s.",
            r"^\s*[0-9]+\s*/\s*\S+\s*$",
        )
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Bytes: an integer, or an integer with a unit B, KB, KiB, MB, MiB, GB, GiB (4096, 64KiB, 1MiB).",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*[0-9]+\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$"},
            ],
        })
    }
}

impl JsonSchema for ActionFile {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Action".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "What a client action does: a built-in action, or a plugin command that answers.",
            "anyOf": [
                {"type": "string", "enum": ["subscribe", "unsubscribe", "ping", "status"]},
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["command"],
                    "properties": {
                        "command": {
                            "type": "object",
                            "additionalProperties": false,
                            "required": ["channel"],
                            "properties": {
                                "channel": {"type": "string", "description": "Channel whose plugin answers."},
                                "request": {"description": "Request sent to the plugin (a template)."},
                                "timeout": {"type": "string", "pattern": DURATION_PATTERN, "description": "Longest wait for the answer."},
                            },
                        },
                    },
                },
            ],
        })
    }
}
