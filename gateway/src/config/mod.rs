//! Configuration: parse, then validate, then compile into runtime objects.
//!
//! [`load`] reads `gateway.yaml` and every channel spec it names, checks
//! everything (schemas compile, plugins exist and speak our ABI, paths are
//! unique per listener, ...) and returns either a [`Config`] ready to serve or
//! every error found, each located as `file:line:col: field.path: message`.

mod error;
pub mod schema;
pub mod types;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;

pub use endpoints::{
    Action, ChannelSel, CommandCfg, EndpointCfg, HttpAnswer, HttpRouteCfg, ProtocolCfg, Replies,
};
use error::Sink;
pub use error::{ConfigError, ConfigErrors};
pub use types::{BuiltinAction, LogFormat, NotSubscribed, OnFull, SourceMode, TimestampFormat};
use types::{ChannelFile, GatewayFile};

pub mod endpoints;

use crate::auth::Auth;
use crate::filter::FilterRule;
use crate::limits::{ConnCounter, IpLimiter, LimiterPool, Prunable};
use crate::plugin::{LoadedPlugin, PluginRegistry};
use crate::template::Template;
use crate::tls::TlsFileError;

/// Overrides applied on top of the files (from the command line or tests).
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Replace `plugins.dirs` (paths used as given).
    pub plugin_dirs: Option<Vec<PathBuf>>,
    /// Replace listener bind addresses by name, e.g. `main` → `127.0.0.1:0`.
    pub listen: BTreeMap<String, String>,
    /// Take connection counters and rate limiters from this pool (a reload
    /// passes the running configuration's, so counts carry over).
    pub limiters: Option<Arc<LimiterPool>>,
}

/// Where a setting was written, for errors raised after loading (e.g. bind failures).
#[derive(Clone, Debug)]
pub struct Origin {
    /// File.
    pub file: PathBuf,
    /// Line.
    pub line: u64,
    /// Column.
    pub col: u64,
    /// Field path.
    pub field: String,
}

impl Origin {
    /// A located error at this origin.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            col: self.col,
            field: self.field.clone(),
            message: message.into(),
        }
    }

    fn of<T>(file: &Path, span: &Spanned<T>, field: impl Into<String>) -> Origin {
        Origin {
            file: file.to_path_buf(),
            line: span.referenced.line(),
            col: span.referenced.column(),
            field: field.into(),
        }
    }
}

/// A compiled, validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The gateway.yaml this came from.
    pub file: PathBuf,
    /// Listeners, sorted by name.
    pub listeners: Vec<ListenerCfg>,
    /// Listener serving `/healthz`, `/readyz`, `/metrics` (None: admin routes disabled).
    pub admin_listener: Option<String>,
    /// The HTML status page on the admin listener (`admin.status_page`).
    pub status_page: Option<StatusPageCfg>,
    /// Path of the AsyncAPI document on the admin listener (`admin.asyncapi`).
    pub asyncapi_path: Option<String>,
    /// Limits.
    pub limits: Limits,
    /// Log level filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Shutdown deadline.
    pub shutdown_deadline: Duration,
    /// Channels in load order.
    pub channels: Vec<Arc<ChannelCfg>>,
    /// WebSocket endpoints.
    pub endpoints: Vec<Arc<EndpointCfg>>,
    /// HTTP routes.
    pub http: Vec<Arc<HttpRouteCfg>>,
    /// Protocols by name.
    pub protocols: HashMap<String, Arc<ProtocolCfg>>,
    /// Keyed rate limiters, pruned periodically.
    pub prunable: Prunable,
    /// Non-fatal findings (e.g. a plugin built with `panic = "abort"`).
    pub warnings: Vec<String>,
    /// The options it was loaded with (a reload loads the same way).
    pub options: LoadOptions,
    /// Counters and limiters, shared with the configurations reloaded from this one.
    pub pool: Arc<LimiterPool>,
    /// Files (and directories of channel globs) whose change triggers a reload.
    pub watched: Vec<PathBuf>,
    /// Watch the files (`reload.watch`), checking this often.
    pub watch: Option<Duration>,
    /// The broker (`broker:`); fixed for the life of the process.
    pub broker: BrokerCfg,
}

/// The broker a gateway runs with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BrokerCfg {
    /// In this process.
    #[default]
    Memory,
    /// NATS: several instances as one (docs/cluster.md).
    Nats(Arc<NatsCfg>),
}

/// `broker: {kind: nats}`.
#[derive(Clone, Debug)]
pub struct NatsCfg {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Subject, stream and bucket prefix.
    pub prefix: String,
    /// Credentials, read from the environment at load.
    pub auth: NatsAuth,
    /// Lease lifetime without renewal.
    pub lease_ttl: Duration,
    /// Connection caps count every instance's connections.
    pub cluster_limits: bool,
    /// This instance's name.
    pub instance: String,
    /// Where `broker` was written (connection errors point here).
    pub origin: Origin,
}

/// The same settings, wherever they were written.
impl PartialEq for NatsCfg {
    fn eq(&self, o: &NatsCfg) -> bool {
        (
            &self.url,
            &self.prefix,
            &self.auth,
            self.lease_ttl,
            self.cluster_limits,
            &self.instance,
        ) == (
            &o.url,
            &o.prefix,
            &o.auth,
            o.lease_ttl,
            o.cluster_limits,
            &o.instance,
        )
    }
}
impl Eq for NatsCfg {}

/// NATS credentials. Debug never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// None.
    None,
    /// A token.
    Token(String),
    /// User and password.
    UserPassword(String, String),
    /// A `.creds` file.
    CredsFile(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatsAuth::None => "None",
            NatsAuth::Token(_) => "Token(***)",
            NatsAuth::UserPassword(..) => "UserPassword(***)",
            NatsAuth::CredsFile(_) => "CredsFile(***)",
        })
    }
}

/// Letters, digits, `-` and `_` only, not empty.
fn plain_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The value of environment variable `var`, written at `at`.
fn env_secret(sink: &mut Sink, at: &Spanned<String>, field: &str) -> Option<String> {
    match std::env::var(&at.value) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            sink.at(
                at,
                field,
                format!(
                    "environment variable {:?} is not set (or empty): set it, or remove `{}`",
                    at.value,
                    field.rsplit('.').next().unwrap_or(field)
                ),
            );
            None
        }
    }
}

/// Compile `broker:`.
fn compile_broker(sink: &mut Sink, b: &Spanned<types::BrokerFile>) -> BrokerCfg {
    let origin = Origin {
        file: sink.file.to_path_buf(),
        line: b.referenced.line(),
        col: b.referenced.column(),
        field: "broker".into(),
    };
    let f = &b.value;
    if f.kind == types::BrokerKind::Memory {
        let nats_only = [
            (&f.url, "url"),
            (&f.subject_prefix, "subject_prefix"),
            (&f.token_env, "token_env"),
            (&f.user_env, "user_env"),
            (&f.password_env, "password_env"),
            (&f.creds_env, "creds_env"),
            (&f.instance, "instance"),
        ];
        for (v, name) in nats_only {
            if let Some(v) = v {
                sink.at(
                    v,
                    format!("broker.{name}"),
                    "only the nats broker takes this: set `kind: nats`, or remove it",
                );
            }
        }
        if let Some(t) = &f.lease_ttl {
            sink.at(
                t,
                "broker.lease_ttl",
                "only the nats broker takes this: set `kind: nats`, or remove it",
            );
        }
        return BrokerCfg::Memory;
    }
    let url = f
        .url
        .as_ref()
        .map_or("nats://127.0.0.1:4222".to_string(), |u| u.value.clone());
    if let Some(u) = &f.url {
        for one in u.value.split(',') {
            let one = one.trim();
            if let Err(e) = one.parse::<async_nats::ServerAddr>() {
                sink.at(
                    u,
                    "broker.url",
                    format!("{one:?} is not a NATS server URL ({e}): write nats://HOST:PORT (several separated by commas)"),
                );
            }
        }
    }
    let prefix = f
        .subject_prefix
        .as_ref()
        .map_or("gateway".to_string(), |p| p.value.clone());
    if let Some(p) = &f.subject_prefix
        && !plain_token(&p.value)
    {
        sink.at(
            p,
            "broker.subject_prefix",
            format!(
                "{:?} cannot prefix NATS subjects, streams and buckets: use letters, digits, '-' and '_'",
                p.value
            ),
        );
    }
    let lease_ttl = f
        .lease_ttl
        .as_ref()
        .map_or(Duration::from_secs(6), |t| t.value.0);
    if let Some(t) = &f.lease_ttl
        && !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&t.value.0)
    {
        sink.at(
            t,
            "broker.lease_ttl",
            format!(
                "{:?} is out of range: a lease lives from 1s to 60s",
                t.value.0
            ),
        );
    }
    let auth = match (&f.token_env, &f.user_env, &f.password_env, &f.creds_env) {
        (None, None, None, None) => NatsAuth::None,
        (Some(t), None, None, None) => env_secret(sink, t, "broker.token_env")
            .map(NatsAuth::Token)
            .unwrap_or(NatsAuth::None),
        (None, Some(u), Some(p), None) => {
            match (
                env_secret(sink, u, "broker.user_env"),
                env_secret(sink, p, "broker.password_env"),
            ) {
                (Some(u), Some(p)) => NatsAuth::UserPassword(u, p),
                _ => NatsAuth::None,
            }
        }
        (None, None, None, Some(c)) => match env_secret(sink, c, "broker.creds_env") {
            Some(path) if Path::new(&path).is_file() => NatsAuth::CredsFile(path.into()),
            Some(path) => {
                sink.at(
                    c,
                    "broker.creds_env",
                    format!(
                        "{:?} names {path:?}, which is not a readable file: point it at a NATS .creds file",
                        c.value
                    ),
                );
                NatsAuth::None
            }
            None => NatsAuth::None,
        },
        _ => {
            sink.push(
                origin.line,
                origin.col,
                "broker",
                "choose one way to authenticate: token_env, user_env with password_env, or creds_env",
            );
            NatsAuth::None
        }
    };
    let instance = match &f.instance {
        Some(i) if !plain_token(&i.value) => {
            sink.at(
                i,
                "broker.instance",
                format!(
                    "{:?} is not a valid instance name: use letters, digits, '-' and '_'",
                    i.value
                ),
            );
            String::new()
        }
        Some(i) => i.value.clone(),
        None => {
            let host: String = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .unwrap_or_else(|| "gateway".into())
                .trim()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!(
                "{}-{}",
                if host.is_empty() { "gateway" } else { &host },
                std::process::id()
            )
        }
    };
    BrokerCfg::Nats(Arc::new(NatsCfg {
        url,
        prefix,
        auth,
        lease_ttl,
        cluster_limits: f.cluster_limits,
        instance,
        origin,
    }))
}

/// The fixed admin routes.
const ADMIN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// Whether two listeners' addresses would take the same port: the same
/// address, or a wildcard of the other's family (an IPv6 wildcard takes the
/// IPv4 addresses too, dual-stack as Linux binds it). Port 0 picks a free
/// port: any number of listeners may ask for it.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, o: SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv6() || w.is_ipv4() == o.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// A `log.level`: comma-separated directives, each a level (`trace`,
/// `debug`, `info`, `warn`, `error`, `off`) or `target=level` (a bare word
/// that is no level would be read as a target name, and log nothing else).
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let hint = "write a level (trace, debug, info, warn, error, off) or directives like gateway=debug,info";
    for d in level.split(',').map(str::trim) {
        if d.is_empty() {
            return Err(format!("empty directive in {level:?}: {hint}"));
        }
        let bare = !d.contains(['=', '[']);
        if bare && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
            return Err(format!("unknown level {d:?}: {hint}"));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map(|_| ())
        .map_err(|e| format!("invalid directive in {level:?} ({e}): {hint}"))
}

/// Whether `p` is a literal URL path (a place for an admin page): it starts
/// with `/` and has no parameters, query or fragment.
fn literal_path(p: &str) -> bool {
    p.starts_with('/') && !p.contains(['{', '}', '?', '#'])
}

/// The HTTP error statuses the gateway answers with (docs/configuration.md).
const HTTP_ERRORS_SENT: &[u16] = &[400, 401, 403, 404, 405, 408, 413, 426, 429, 500, 503, 504];

impl Config {
    /// Listener `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerCfg> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The statuses listener `name` answers as others (`status_codes`).
    pub fn listener_status_codes(&self, name: &str) -> &[(u16, u16)] {
        self.listener(name).map_or(&[], |l| &l.status_codes)
    }

    /// The reverse proxies listener `name` believes (`trusted_proxies`) and
    /// the header they name the client in.
    pub fn listener_trusted_proxies(
        &self,
        name: &str,
    ) -> (&[crate::forwarded::Cidr], types::ClientIpHeader) {
        self.listener(name)
            .map_or((&[], types::ClientIpHeader::default()), |l| {
                (&l.trusted_proxies, l.client_ip_header)
            })
    }

    /// The TLS configuration of listener `name` (None: plain TCP, or no such listener).
    pub fn listener_tls(&self, name: &str) -> Option<&Arc<rustls::ServerConfig>> {
        self.listener(name).and_then(|l| l.tls.as_ref())
    }
}

/// The HTML status page (`admin.status_page`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusPageCfg {
    /// URL path of the page on the admin listener.
    pub path: String,
    /// Path of the WebSocket endpoint (on the admin listener) serving a
    /// channel with `source: {builtin: status}`.
    pub endpoint: String,
    /// The query parameter that endpoint takes its API key from.
    pub key_query: String,
}

/// One listener.
#[derive(Clone, Debug)]
pub struct ListenerCfg {
    /// Name.
    pub name: String,
    /// Address to bind.
    pub bind: SocketAddr,
    /// Where `bind` was written.
    pub origin: Origin,
    /// TLS (`tls:` in the file): the rustls configuration built from its
    /// certificate and key. None: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// HTTP error statuses answered as others (`status_codes`).
    pub status_codes: Vec<(u16, u16)>,
    /// The reverse proxies whose `client_ip_header` is believed (and, with
    /// `proxy_protocol`, the only addresses a connection is taken from).
    pub trusted_proxies: Vec<crate::forwarded::Cidr>,
    /// The header they name the client in (`client_ip_header`).
    pub client_ip_header: types::ClientIpHeader,
    /// Connections begin with a PROXY protocol header (`proxy_protocol`).
    pub proxy_protocol: bool,
}

/// Compiled limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Counts them.
    pub total: Arc<ConnCounter>,
    /// Largest inbound client message.
    pub max_message_size: usize,
    /// Frames queued per session.
    pub session_queue: usize,
    /// Frames per flush.
    pub write_batch: usize,
    /// Shortest time between two writes of queued frames to one connection.
    pub write_interval: Option<Duration>,
    /// Plugin → publisher buffer.
    pub source_buffer: usize,
    /// Gateway-wide per-IP connection counter.
    pub per_ip: Option<Arc<ConnCounter>>,
    /// Gateway-wide per-principal connection counter.
    pub per_principal: Option<Arc<ConnCounter>>,
    /// Gateway-wide new connections per IP.
    pub new_per_ip: Option<Arc<IpLimiter>>,
    /// Inbound messages per connection.
    pub inbound: Option<types::Rate>,
    /// What exceeding `inbound` does.
    pub on_inbound: types::OnInboundLimit,
    /// Longest connection lifetime.
    pub max_duration: Option<Duration>,
    /// Longest silence.
    pub idle_timeout: Option<Duration>,
    /// Server Ping interval.
    pub ping_interval: Option<Duration>,
    /// Pong deadline.
    pub pong_timeout: Duration,
    /// HTTP route requests per IP.
    pub http_per_ip: Option<Arc<IpLimiter>>,
}

impl Limits {
    /// The most a plugin's message (or one message to the publish API) may
    /// be: `max_message_size`, at least 1 MiB.
    pub fn max_plugin_message(&self) -> usize {
        self.max_message_size.max(1 << 20)
    }
}

/// A channel ready to run.
pub struct ChannelCfg {
    /// Name.
    pub name: Arc<str>,
    /// Description.
    pub description: String,
    /// Spec file.
    pub spec_file: PathBuf,
    /// Schema file.
    pub schema_file: PathBuf,
    /// The compiled schema.
    pub validator: jsonschema::Validator,
    /// The schema as written (JSON).
    pub schema: serde_json::Value,
    /// Sample messages (`examples`), each satisfying the schema.
    pub examples: Vec<serde_json::Value>,
    /// Source.
    pub source: SourceCfg,
    /// Slow-consumer policy.
    pub on_full: OnFull,
    /// Whether the channel is made of keyed streams (its endpoints have path parameters).
    pub keyed: bool,
    /// Groups it belongs to.
    pub groups: Vec<String>,
    /// Envelope around plugin messages.
    pub envelope: Option<Template>,
    /// `{{now}}` format in the envelope.
    pub timestamps: TimestampFormat,
    /// New subscribers get the latest message at once.
    pub last_value: bool,
    /// Subscribe filters by client name.
    pub filters: Vec<(String, FilterRule)>,
    /// Outbound rate limit.
    pub rate_limit: Option<(types::Rate, types::OnRateLimit)>,
    /// How long a message may wait to go out with the next ones.
    pub linger: Duration,
    /// Digest of everything the channel's runtime is made of (spec text,
    /// schema text, plugin, buffer sizes): a reload restarts the channel
    /// only when it changed.
    pub fingerprint: u64,
}

impl std::fmt::Debug for ChannelCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelCfg")
            .field("name", &self.name)
            .field("spec_file", &self.spec_file)
            .field("schema_file", &self.schema_file)
            .field("source", &self.source)
            .field("on_full", &self.on_full)
            .field("keyed", &self.keyed)
            .finish()
    }
}

/// A channel's source.
#[derive(Debug)]
pub struct SourceCfg {
    /// What produces the messages.
    pub kind: SourceKind,
    /// Poll or push (builtin sources poll).
    pub mode: SourceMode,
    /// Poll interval.
    pub interval: Option<Duration>,
    /// Plugin config as JSON bytes.
    pub config_json: Vec<u8>,
    /// Plugin sources: the longest a call into the plugin may run
    /// (`source.call_timeout`); None waits as long as it takes.
    pub call_timeout: Option<Duration>,
}

/// What produces a channel's messages.
#[derive(Debug)]
pub enum SourceKind {
    /// A source plugin library.
    Plugin(Arc<LoadedPlugin>),
    /// A source built into the gateway.
    Builtin(Builtin),
}

/// The sources built into the gateway (`source: {builtin: NAME}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// A snapshot of the gateway's own state every `interval` (the status page's data).
    Status,
}

impl Builtin {
    /// Every builtin source.
    pub const ALL: [Builtin; 1] = [Builtin::Status];

    /// The name written after `builtin:`.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Status => "status",
        }
    }

    /// The builtin source called `name`.
    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == name)
    }
}

impl SourceCfg {
    /// The source's name as metrics and `/readyz` label it: the plugin's
    /// name, or `builtin:NAME`.
    pub fn name(&self) -> &str {
        match &self.kind {
            SourceKind::Plugin(p) => &p.name,
            SourceKind::Builtin(Builtin::Status) => "builtin:status",
        }
    }

    /// The plugin library, for plugin sources.
    pub fn plugin(&self) -> Option<&Arc<LoadedPlugin>> {
        match &self.kind {
            SourceKind::Plugin(p) => Some(p),
            SourceKind::Builtin(_) => None,
        }
    }

    /// The source in words, for messages: `plugin "ticker"`, `builtin source "status"`.
    pub fn describe(&self) -> String {
        match &self.kind {
            SourceKind::Plugin(p) => format!("plugin {:?}", p.name),
            SourceKind::Builtin(b) => format!("builtin source {:?}", b.name()),
        }
    }

    /// Whether the source has keyed streams.
    pub fn keyed(&self) -> bool {
        self.plugin().is_some_and(|p| p.keyed())
    }

    /// Whether the source answers commands.
    pub fn commands(&self) -> bool {
        self.plugin().is_some_and(|p| p.commands())
    }

    /// What the source supports, as words (`poll, command`).
    pub fn modes_text(&self) -> String {
        match &self.kind {
            SourceKind::Plugin(p) => p.modes_text(),
            SourceKind::Builtin(_) => "poll".into(),
        }
    }
}

/// Parse one YAML document strictly, locating any error.
fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let mut track = serde_path_to_error::Track::new();
    let opts = serde_saphyr::options! { with_snippet: false };
    let res = serde_saphyr::with_deserializer_from_str_with_options(text, opts, |de| {
        T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
    });
    res.map_err(|e| {
        let (line, col) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let mut message = e.to_string();
        // serde-saphyr appends the location we already print in front; strip
        // exactly that suffix, never text the operator wrote.
        let suffix = format!(" at line {line}, column {col}");
        if message.ends_with(&suffix) {
            message.truncate(message.len() - suffix.len());
        }
        if let Some(better) = friendlier_message(&e, text, line, col) {
            message = better;
        }
        let field = field_path(&track.path());
        ConfigError {
            file: file.to_path_buf(),
            line,
            col,
            field,
            message,
        }
    })
}

/// The dotted field path of a parse error, without the `value` step that
/// `Spanned<T>` adds (`source.mode`, not `source.mode.value`). Inside the
/// free-form `source.config` a key named `value` is kept.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key == "value" && !out.starts_with("source.config") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    if out.is_empty() || out == "?" {
        out = ".".into();
    }
    out
}

/// Rewrite serde-saphyr's terse type errors ("invalid u64", "expected string
/// scalar") as "expected <what>, got <what was written>", and say so when a
/// file is empty (instead of "unexpected end of input").
fn friendlier_message(e: &serde_saphyr::Error, text: &str, line: u64, col: u64) -> Option<String> {
    use serde_saphyr::Error as E;
    let mut e = e;
    while let E::WithSnippet { error, .. } = e {
        e = error;
    }
    let expected = match e {
        E::InvalidScalar { ty, .. } => match *ty {
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer",
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
            "floating point" | "f32" | "f64" => "a number",
            "boolean" => "true or false",
            _ => return None,
        },
        // A duration, a name, a path: any text met `~` or nothing (where
        // the parser puts an empty list item is not the value's place).
        E::NullIntoString { .. } => {
            return Some("expected a value, got an empty value".into());
        }
        E::Unexpected { expected, .. } => match *expected {
            // Any scalar target (string, number, boolean) met a list or mapping.
            "string scalar" | "scalar" => "a single value",
            "sequence start" => "a list",
            "mapping start" => "a mapping",
            _ => return None,
        },
        E::Eof { .. }
            if text
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) =>
        {
            return Some("the file is empty".into());
        }
        _ => return None,
    };
    Some(match value_at(text, line, col) {
        Some(got) => format!("expected {expected}, got {got}"),
        None => format!("expected {expected}"),
    })
}

/// Describe the YAML value written at `line:col` (1-based): "a list",
/// "a mapping" or the scalar as written, in backticks.
fn value_at(text: &str, line: u64, col: u64) -> Option<String> {
    let l = text
        .lines()
        .nth(usize::try_from(line.checked_sub(1)?).ok()?)?;
    let skip = usize::try_from(col.checked_sub(1)?).ok()?;
    let before: String = l.chars().take(skip).collect();
    let rest: String = l.chars().skip(skip).collect();
    let rest = rest.trim_end();
    let first = rest.chars().next()?;
    // An empty value is located at the colon after its key.
    if rest == ":" || rest.starts_with(": #") {
        return Some("an empty value".into());
    }
    if first == '[' || rest == "-" || rest.starts_with("- ") {
        return Some("a list".into());
    }
    if first == '{' {
        return Some("a mapping".into());
    }
    if first == '"' || first == '\'' {
        let end = rest[1..].find(first)? + 2;
        return Some(format!("`{}`", &rest[..end]));
    }
    let mut scalar = rest;
    if let Some(i) = scalar.find(" #") {
        scalar = &scalar[..i];
    }
    // In a flow collection the scalar ends at the next `,`, `]` or `}`.
    if before.contains(['[', '{'])
        && let Some(i) = scalar.find([',', ']', '}'])
    {
        scalar = &scalar[..i];
    }
    let scalar = scalar.trim();
    if scalar.ends_with(':') || scalar.contains(": ") {
        return Some("a mapping".into());
    }
    if scalar.is_empty() || matches!(scalar, "~" | "null" | "Null" | "NULL") {
        return Some("an empty value".into());
    }
    Some(format!("`{scalar}`"))
}

fn read_text(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        line: 0,
        col: 0,
        field: ".".into(),
        message: format!("cannot read file: {e}"),
    })
}

/// Load, validate and compile `gateway.yaml` and everything it names.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let text = read_text(path).map_err(|e| ConfigErrors(vec![e]))?;
    let gw: GatewayFile = parse_yaml(path, &text).map_err(|e| ConfigErrors(vec![e]))?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut sink = Sink {
        file: path,
        errors: &mut errors,
    };

    // Listeners.
    let mut listeners = Vec::new();
    let mut watched = vec![path.to_path_buf()];
    for (name, l) in &gw.listeners {
        if let Some(t) = &l.tls {
            // A renewed certificate is picked up by a reload.
            watched.push(base.join(&t.cert.value));
            watched.push(base.join(&t.key.value));
        }
        let field = format!("listeners.{name}.bind");
        let origin = Origin::of(path, &l.bind, &field);
        let text = opts.listen.get(name).unwrap_or(&l.bind.value);
        let tls = l.tls.as_ref().and_then(|t| {
            crate::tls::server_config(&base.join(&t.cert.value), &base.join(&t.key.value))
                .map_err(|e| match e {
                    TlsFileError::Cert(m) => {
                        sink.at(&t.cert, format!("listeners.{name}.tls.cert"), m)
                    }
                    TlsFileError::Key(m) => sink.at(&t.key, format!("listeners.{name}.tls.key"), m),
                })
                .ok()
        });
        let status_codes = match &l.status_codes {
            None => Vec::new(),
            Some(sc) => endpoints::code_map(
                &sc.value,
                HTTP_ERRORS_SENT,
                |s| (400..=599).contains(&s),
                "answer an error status, 400-599",
            )
            .map_err(|m| sink.at(sc, format!("listeners.{name}.status_codes"), m))
            .unwrap_or_default(),
        };
        let mut trusted_proxies = Vec::new();
        for (i, p) in l.trusted_proxies.iter().enumerate() {
            match crate::forwarded::Cidr::parse(&p.value) {
                Ok(c) => trusted_proxies.push(c),
                Err(m) => sink.at(p, format!("listeners.{name}.trusted_proxies[{i}]"), m),
            }
        }
        if let Some(h) = &l.client_ip_header
            && l.trusted_proxies.is_empty()
        {
            sink.at(
                h,
                format!("listeners.{name}.client_ip_header"),
                "client_ip_header says which header the proxies in trusted_proxies name the client in, and this listener trusts none, so no header is read: list the proxies, e.g. `trusted_proxies: [10.0.1.23]`, or remove client_ip_header",
            );
        }
        if let Some(pp) = &l.proxy_protocol
            && pp.value
            && l.trusted_proxies.is_empty()
        {
            sink.at(
                pp,
                format!("listeners.{name}.proxy_protocol"),
                "proxy_protocol needs trusted_proxies, the addresses of the load balancers that write the header: without it any client that reaches the port could write one naming any address; list them, e.g. `trusted_proxies: [10.0.1.23, 10.0.2.23]`",
            );
        }
        match resolve_addr(text) {
            Ok(bind)
                if let Some(other) = listeners
                    .iter()
                    .find(|o: &&ListenerCfg| binds_overlap(o.bind, bind)) =>
            {
                sink.at(
                    &l.bind,
                    field,
                    format!(
                        "{bind} overlaps listener {:?} ({}, line {}): two listeners cannot bind one port; give this one another port",
                        other.name, other.bind, other.origin.line
                    ),
                )
            }
            Ok(bind) => listeners.push(ListenerCfg {
                name: name.clone(),
                bind,
                origin,
                tls,
                status_codes,
                trusted_proxies,
                client_ip_header: l.client_ip_header.as_ref().map(|h| h.value).unwrap_or_default(),
                proxy_protocol: l.proxy_protocol.as_ref().is_some_and(|p| p.value),
            }),
            Err(m) => sink.at(&l.bind, field, m),
        }
    }
    if gw.listeners.is_empty() {
        sink.push(
            1,
            1,
            "listeners",
            "at least one listener is needed, e.g. `listeners: {main: {bind: \"127.0.0.1:8080\"}}`",
        );
    }
    for name in opts.listen.keys() {
        if !gw.listeners.contains_key(name) {
            sink.push(
                0,
                0,
                format!("listeners.{name}"),
                format!(
                    "--listen names listener {name:?}, which {} does not define",
                    path.display()
                ),
            );
        }
    }
    let listener_names: Vec<&str> = gw.listeners.keys().map(String::as_str).collect();

    let admin_listener = if !gw.admin.enabled {
        None
    } else if let Some(l) = &gw.admin.listener {
        if !gw.listeners.contains_key(&l.value) {
            sink.at(
                l,
                "admin.listener",
                unknown_listener(&l.value, &listener_names),
            );
        }
        Some(l.value.clone())
    } else {
        listener_names.first().map(|s| s.to_string())
    };

    let asyncapi_path = match (&admin_listener, &gw.admin.asyncapi) {
        (Some(_), Some(p)) => {
            let v = &p.value;
            if !literal_path(v) {
                sink.at(
                    p,
                    "admin.asyncapi",
                    format!(
                        "invalid path {v:?}: write a path starting with '/', without parameters, e.g. /asyncapi.json"
                    ),
                );
            } else if ADMIN_PATHS.contains(&v.as_str()) {
                sink.at(
                    p,
                    "admin.asyncapi",
                    format!(
                        "path {v:?} is an admin route already; choose another, e.g. /asyncapi.json"
                    ),
                );
            }
            Some(v.clone())
        }
        _ => None,
    };

    let gl = &gw.limits;
    let pool = opts.limiters.clone().unwrap_or_default();
    let mut prunable = Prunable::default();
    let new_per_ip = gl
        .new_connections_per_ip
        .map(|r| pool.rate("limits.new_connections_per_ip", r));
    let http_per_ip = gl
        .http_requests_per_ip
        .map(|r| pool.rate("limits.http_requests_per_ip", r));
    prunable.limiters.extend(new_per_ip.iter().cloned());
    prunable.limiters.extend(http_per_ip.iter().cloned());
    let limits = Limits {
        max_connections: gl.max_connections,
        total: pool.counter("limits.max_connections", gl.max_connections, "gateway"),
        max_message_size: gl.max_message_size.0,
        session_queue: gl.session_queue.max(1),
        write_batch: gl.write_batch.max(1),
        write_interval: gl.write_interval.0,
        source_buffer: gl.source_buffer.max(1),
        per_ip: gl
            .max_connections_per_ip
            .map(|n| pool.counter("limits.max_connections_per_ip", n, "client IP")),
        per_principal: gl
            .max_connections_per_principal
            .map(|n| pool.counter("limits.max_connections_per_principal", n, "principal")),
        new_per_ip,
        inbound: gl.inbound_messages,
        on_inbound: gl.on_inbound_limit,
        max_duration: gl.max_connection_duration.and_then(|d| d.0),
        idle_timeout: gl.idle_timeout.as_ref().and_then(|d| d.value.0),
        ping_interval: gl
            .ping_interval
            .as_ref()
            .map_or(Some(types::DEFAULT_PING_INTERVAL), |d| d.value.0),
        pong_timeout: gl.pong_timeout.0,
        http_per_ip,
    };

    // Plugin directories.
    let plugin_dirs: Vec<PathBuf> = match &opts.plugin_dirs {
        Some(d) => d.clone(),
        None => gw
            .plugins
            .dirs
            .iter()
            .map(|d| base.join(&d.value))
            .collect(),
    };
    if plugin_dirs.is_empty() {
        sink.push(
            0,
            0,
            "plugins.dirs",
            "no plugin directory configured; add e.g. `plugins: {dirs: [target/release]}`",
        );
    }
    // None of them exists: said once, here, rather than as a missing plugin
    // in every channel spec.
    let plugin_dirs = if !plugin_dirs.is_empty() && plugin_dirs.iter().all(|d| !d.is_dir()) {
        let listed: Vec<String> = plugin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let msg = format!(
            "no plugin directory exists ({}): build the plugins (cargo build --release) or correct the path (relative to this file)",
            listed.join(", ")
        );
        match (&opts.plugin_dirs, gw.plugins.dirs.first()) {
            (None, Some(d)) => sink.at(d, "plugins.dirs", msg),
            _ => sink.push(0, 0, "--plugin-dir", msg),
        }
        Vec::new()
    } else {
        plugin_dirs
    };

    // Channel spec files.
    let mut spec_files = Vec::new();
    for (i, pat) in gw.channels.iter().enumerate() {
        let full = base.join(&pat.value);
        // A file added to or removed from a globbed directory changes the
        // directory's modification time.
        if let Some(dir) = full.parent()
            && !dir.to_string_lossy().contains(['*', '?', '['])
            && !watched.iter().any(|w| w == dir)
        {
            watched.push(dir.to_path_buf());
        }
        let full_s = full.to_string_lossy();
        match glob::glob(&full_s) {
            Err(e) => sink.at(
                pat,
                format!("channels[{i}]"),
                format!("invalid glob {:?}: {e}", pat.value),
            ),
            Ok(paths) => {
                let mut found: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
                found.sort();
                if found.is_empty() {
                    sink.at(
                        pat,
                        format!("channels[{i}]"),
                        format!("no file matches {full_s:?}"),
                    );
                }
                for f in found {
                    if !spec_files.contains(&f) {
                        spec_files.push(f);
                    }
                }
            }
        }
    }

    let mut warnings = Vec::new();
    let mut channels: Vec<Arc<ChannelCfg>> = Vec::new();
    let mut channel_origin: HashMap<String, Origin> = HashMap::new();
    let mut endpoints: Vec<Arc<EndpointCfg>> = Vec::new();
    let mut path_origin: HashMap<(String, String), (String, Origin)> = HashMap::new();
    let mut spec_endpoints = Vec::new();

    for spec_path in &spec_files {
        let text = match read_text(spec_path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let spec: ChannelFile = match parse_yaml(spec_path, &text) {
            Ok(s) => s,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let mut sink = Sink {
            file: spec_path,
            errors: &mut errors,
        };
        let spec_dir = spec_path.parent().unwrap_or(Path::new(""));
        let name = spec.channel.value.clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            sink.at(
                &spec.channel,
                "channel",
                format!("invalid channel name {name:?}: use letters, digits, '-', '_' and '.'"),
            );
        }
        if let Some(prev) = channel_origin.get(&name) {
            sink.at(
                &spec.channel,
                "channel",
                format!(
                    "channel {name:?} is already defined at {}:{}:{}",
                    prev.file.display(),
                    prev.line,
                    prev.col
                ),
            );
        } else {
            channel_origin.insert(
                name.clone(),
                Origin::of(spec_path, &spec.channel, "channel"),
            );
        }

        let schema_file = spec_dir.join(&spec.schema.value);
        watched.push(spec_path.clone());
        watched.push(schema_file.clone());
        let (validator, schema_json) = match compile_schema_json(&schema_file) {
            Ok((v, j)) => {
                check_examples(&mut sink, &spec.examples, &v, &spec.schema.value);
                (Some(v), j)
            }
            Err(m) => {
                sink.at(&spec.schema, "schema", m);
                (None, serde_json::Value::Null)
            }
        };

        // Source.
        let kind = compile_source(&mut sink, &spec.source, &plugin_dirs, &mut warnings);
        let src = &spec.source.value;
        let config_json = serde_json::to_vec(
            src.config
                .as_ref()
                .unwrap_or(&serde_json::Value::Object(Default::default())),
        )
        .unwrap_or_else(|_| b"{}".to_vec());

        // Channel options.
        let keyed = spec.endpoints.iter().any(|e| e.path.value.contains('{'));
        let envelope = spec.envelope.as_ref().and_then(|e| {
            Template::compile(&e.value, endpoints::ENVELOPE_ROOTS)
                .map_err(|m| sink.at(e, "envelope", m))
                .ok()
        });
        let linger = spec.linger.as_ref().map_or(Duration::ZERO, |l| l.value.0);
        if let Some(l) = &spec.linger
            && l.value.0 > MAX_LINGER
        {
            sink.at(
                l,
                "linger",
                format!("{:?} is too long: a channel lingers at most 1s", l.value.0),
            );
        }
        let mut filters = Vec::new();
        for (fname, fr) in &spec.filters {
            match FilterRule::compile(&fr.value) {
                Ok(r) => filters.push((fname.clone(), r)),
                Err(m) => sink.at(fr, format!("filters.{fname}"), m),
            }
        }
        let mut groups = Vec::new();
        for (i, g) in spec.groups.iter().enumerate() {
            if g.value.is_empty()
                || !g
                    .value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                sink.at(
                    g,
                    format!("groups[{i}]"),
                    format!(
                        "invalid group name {:?}: use letters, digits, '-', '_' and '.'",
                        g.value
                    ),
                );
            }
            groups.push(g.value.clone());
        }

        if let (Some(validator), Some((kind, mode, interval))) = (validator, kind) {
            let fingerprint = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                text.hash(&mut h);
                std::fs::read(&schema_file).unwrap_or_default().hash(&mut h);
                match &kind {
                    SourceKind::Plugin(p) => p.path.hash(&mut h),
                    SourceKind::Builtin(b) => b.name().hash(&mut h),
                }
                (limits.source_buffer, limits.max_message_size).hash(&mut h);
                h.finish()
            };
            let ch = Arc::new(ChannelCfg {
                name: name.clone().into(),
                description: spec.description.clone(),
                spec_file: spec_path.clone(),
                schema_file,
                validator,
                schema: schema_json,
                examples: spec.examples.iter().map(|e| e.value.clone()).collect(),
                source: SourceCfg {
                    kind,
                    mode,
                    interval,
                    config_json,
                    call_timeout: src.call_timeout.as_ref().and_then(|t| t.value.0),
                },
                on_full: spec.queue.on_full,
                keyed,
                groups,
                envelope,
                timestamps: spec.timestamps,
                last_value: spec.last_value,
                filters,
                rate_limit: spec.rate_limit.as_ref().map(|r| (r.rate, r.on_exceed)),
                linger,
                fingerprint,
            });
            spec_endpoints.push((
                spec_path.clone(),
                spec.endpoints,
                name.clone(),
                Some(ch.clone()),
            ));
            channels.push(ch);
        } else {
            spec_endpoints.push((spec_path.clone(), spec.endpoints, name.clone(), None));
        }
    }

    // Protocols, endpoints and HTTP routes, once every channel is known.
    let mut sink = Sink {
        file: path,
        errors: &mut errors,
    };
    let protocols = endpoints::compile_protocols(&mut sink, base, &gw.protocols, &channels);
    let mut lk = endpoints::Lookup {
        channels: &channels,
        protocols: &protocols,
        broken_protocols: gw
            .protocols
            .keys()
            .filter(|k| !protocols.contains_key(*k))
            .cloned()
            .collect(),
        listener_names: &listener_names,
        paths: &mut path_origin,
        limits: &limits,
        prunable: &mut prunable,
        pool: &pool,
    };
    for (spec_path, eps, ch_name, ch) in &spec_endpoints {
        let mut sink = Sink {
            file: spec_path,
            errors: &mut errors,
        };
        let dir = spec_path.parent().unwrap_or(Path::new(""));
        for (i, ep) in eps.iter().enumerate() {
            if let Some(e) = endpoints::compile_endpoint(
                &mut sink,
                spec_path,
                dir,
                &format!("endpoints[{i}]"),
                ep,
                ch.as_ref(),
                Some(ch_name),
                &mut lk,
            ) {
                endpoints.push(Arc::new(e));
            }
        }
    }
    let mut sink = Sink {
        file: path,
        errors: &mut errors,
    };
    for (i, ep) in gw.endpoints.iter().enumerate() {
        if let Some(e) = endpoints::compile_endpoint(
            &mut sink,
            path,
            base,
            &format!("endpoints[{i}]"),
            ep,
            None,
            None,
            &mut lk,
        ) {
            endpoints.push(Arc::new(e));
        }
    }
    let mut http = Vec::new();
    for (i, r) in gw.http.iter().enumerate() {
        if let Some(h) = endpoints::compile_http(&mut sink, path, base, i, r, &mut lk) {
            http.push(Arc::new(h));
        }
    }
    if let Some(p) = &gw.publish
        && let Some(h) = endpoints::compile_publish(&mut sink, path, base, p, &mut lk)
    {
        http.push(Arc::new(h));
    }
    let status_page = gw.admin.status_page.as_ref().and_then(|sp| {
        // An endpoint declared at that path but refused (its own errors are
        // reported) is not "no endpoint"; an HTTP route there is.
        let declared = admin_listener.as_ref().is_some_and(|l| {
            crate::router::PathPattern::parse(&sp.value.endpoint.value).is_ok_and(|pat| {
                lk.paths
                    .get(&(l.clone(), pat.shape()))
                    .is_some_and(|(what, _)| {
                        what.starts_with("channel ") || what.starts_with("endpoint ")
                    })
            })
        });
        compile_status_page(
            &mut sink,
            sp,
            admin_listener.as_deref(),
            &endpoints,
            &http,
            asyncapi_path.as_deref(),
            declared,
        )
    });
    // Commands need a plugin that answers them.
    let check_cmd = |c: &CommandCfg, where_: String, sink: &mut Sink| {
        if let Some(ch) = channels.iter().find(|x| x.name == c.channel)
            && !ch.source.commands()
        {
            sink.push(
                c.line,
                c.col,
                where_,
                format!(
                    "channel {:?}: {} answers no commands (it supports: {})",
                    ch.name,
                    ch.source.describe(),
                    ch.source.modes_text()
                ),
            );
        }
    };
    for (name, p) in &protocols {
        for (a, act) in &p.actions {
            if let Action::Command(c) = act {
                check_cmd(c, format!("protocols.{name}.actions.{a}"), &mut sink);
            }
        }
    }
    for (i, h) in http.iter().enumerate() {
        if let HttpAnswer::Command(c, _) = &h.answer {
            check_cmd(c, format!("http[{i}].command"), &mut sink);
        }
    }

    // The AsyncAPI document is routed before the admin listener's endpoints.
    if let (Some(l), Some(p), Some(a)) = (&admin_listener, &asyncapi_path, &gw.admin.asyncapi)
        && let Ok(pat) = crate::router::PathPattern::parse(p)
        && let Some((other, prev)) = path_origin.get(&(l.clone(), pat.shape()))
    {
        sink.at(
            a,
            "admin.asyncapi",
            format!(
                "path {p:?} on listener {l:?} is already served by {other} ({}:{}:{})",
                prev.file.display(),
                prev.line,
                prev.col
            ),
        );
    }

    let log_level = match &gw.log.level {
        None => types::default_log_level(),
        Some(l) => {
            if let Err(m) = check_log_level(&l.value) {
                sink.at(l, "log.level", m);
            }
            l.value.clone()
        }
    };

    // The admin routes are answered first on the admin listener: an
    // endpoint or HTTP route at one of their paths would never be reached.
    if let Some(l) = &admin_listener {
        for p in ADMIN_PATHS {
            if let Ok(pat) = crate::router::PathPattern::parse(p)
                && let Some((other, prev)) = path_origin.get(&(l.clone(), pat.shape()))
            {
                sink.errors.push(prev.error(format!(
                    "path {p:?} on listener {l:?} is an admin route, answered before {other}, which would never be reached: choose another path, or serve the admin routes on another listener (admin.listener)"
                )));
            }
        }
    }

    let broker = match &gw.broker {
        Some(b) => compile_broker(&mut sink, b),
        None => BrokerCfg::Memory,
    };

    if !errors.is_empty() {
        // File by file (in the order files were read), top to bottom.
        let mut order: Vec<PathBuf> = vec![path.to_path_buf()];
        for e in &errors {
            if !order.contains(&e.file) {
                order.push(e.file.clone());
            }
        }
        errors.sort_by_key(|e| (order.iter().position(|f| *f == e.file), e.line, e.col));
        return Err(ConfigErrors(errors));
    }
    // Pongs count as the client's sign of life: with Pings rarer than the
    // idle timeout (or none), a client that only listens is closed as idle.
    // The warning names where idle_timeout was written (the endpoint's spec
    // or gateway.yaml), and where ping_interval was, if elsewhere.
    let gw_idle =
        (gw.limits.idle_timeout.as_ref()).map(|s| Origin::of(path, s, "limits.idle_timeout"));
    let gw_ping =
        (gw.limits.ping_interval.as_ref()).map(|s| Origin::of(path, s, "limits.ping_interval"));
    for ep in &endpoints {
        let l = &ep.limits;
        if let Some(idle) = l.idle_timeout
            && l.ping_interval.is_none_or(|p| p >= idle)
            && let Some(idle_at) = ep.idle_at.as_ref().or(gw_idle.as_ref())
        {
            let ping_at = match ep.ping_at.as_ref().or(gw_ping.as_ref()) {
                None => ", the default".to_string(),
                Some(o) if o.file == idle_at.file => format!(", line {}", o.line),
                Some(o) => format!(", {}:{}", o.file.display(), o.line),
            };
            let pings = match l.ping_interval {
                Some(p) => format!("ping_interval ({p:?}{ping_at}) is not shorter"),
                None => format!("ping_interval is off ({})", &ping_at[2..]),
            };
            warnings.push(format!(
                "{}:{}: {}: endpoint {}: idle_timeout is {idle:?} and {pings}: a client that only listens sends nothing but Pongs, and is closed as idle; make ping_interval shorter than idle_timeout",
                idle_at.file.display(),
                idle_at.line,
                idle_at.field,
                ep.paths.first().map(|p| p.as_str()).unwrap_or("?"),
            ));
        }
    }
    // What auth settings call for (a JWT secret written in the config file
    // or shorter than its algorithm needs, short API keys): once per
    // finding, at the first place its `auth` is written, naming every
    // endpoint and route it applies to and where the others' is. (Only a
    // written `auth` can have findings.)
    let mut auth_findings: Vec<(&str, Vec<(String, &Origin)>)> = Vec::new();
    let auths = endpoints
        .iter()
        .filter_map(|ep| {
            let p = ep.paths.first().map(|p| p.as_str()).unwrap_or("?");
            let what = format!("endpoint {p} on {}", ep.listener);
            Some((what, ep.auth_at.as_ref()?, &ep.auth))
        })
        .chain(http.iter().filter_map(|h| {
            let what = format!("{} {} on {}", h.method, h.path.as_str(), h.listener);
            Some((what, h.auth_at.as_ref()?, &h.auth))
        }));
    for (what, origin, auth) in auths {
        for w in auth.warnings() {
            match auth_findings.iter_mut().find(|(f, _)| *f == w.as_str()) {
                Some((_, on)) => on.push((what.clone(), origin)),
                None => auth_findings.push((w, vec![(what.clone(), origin)])),
            }
        }
    }
    for (w, on) in auth_findings {
        let first = on[0].1;
        let places: Vec<String> = on
            .iter()
            .enumerate()
            .map(|(k, (what, o))| match k {
                0 => what.clone(),
                _ if o.file == first.file => format!("{what} (line {})", o.line),
                _ => format!("{what} ({}:{})", o.file.display(), o.line),
            })
            .collect();
        warnings.push(format!(
            "{}:{}: {}: {w}",
            first.file.display(),
            first.line,
            places.join(", ")
        ));
    }
    Ok(Config {
        file: path.to_path_buf(),
        listeners,
        admin_listener,
        status_page,
        asyncapi_path,
        limits,
        log_level,
        log_format: gw.log.format,
        shutdown_deadline: gw.shutdown.deadline.0,
        channels,
        endpoints,
        http,
        protocols,
        prunable,
        warnings,
        options: LoadOptions {
            limiters: Some(pool.clone()),
            ..opts.clone()
        },
        pool,
        watched,
        watch: gw.reload.watch.then_some(gw.reload.interval.0),
        broker,
    })
}

/// The status page: its path on the admin listener, and the endpoint
/// there whose `builtin: status` channel it shows.
fn compile_status_page(
    sink: &mut Sink,
    sp: &Spanned<types::StatusPageFile>,
    admin: Option<&str>,
    endpoints: &[Arc<EndpointCfg>],
    http: &[Arc<HttpRouteCfg>],
    asyncapi: Option<&str>,
    endpoint_declared: bool,
) -> Option<StatusPageCfg> {
    let Some(admin) = admin else {
        sink.at(
            sp,
            "admin.status_page",
            "the status page is an admin route: remove `admin.enabled: false` or the status page",
        );
        return None;
    };
    let mut ok = true;
    let path = match &sp.value.path {
        None => "/status".to_string(),
        Some(p) => {
            if !literal_path(&p.value) {
                sink.at(
                    p,
                    "admin.status_page.path",
                    format!(
                        "invalid path {:?}: write a literal URL path starting with /, e.g. /status",
                        p.value
                    ),
                );
                ok = false;
            }
            p.value.clone()
        }
    };
    let taken = ADMIN_PATHS.contains(&path.as_str())
        || asyncapi == Some(path.as_str())
        || endpoints
            .iter()
            .any(|e| e.listener == admin && e.paths.iter().any(|p| p.as_str() == path))
        || http
            .iter()
            .any(|h| h.listener == admin && h.path.as_str() == path);
    if taken {
        let at = sp
            .value
            .path
            .as_ref()
            .map_or((sp.referenced.line(), sp.referenced.column()), |p| {
                (p.referenced.line(), p.referenced.column())
            });
        sink.push(
            at.0,
            at.1,
            "admin.status_page.path",
            format!(
                "path {path:?} is already served on the admin listener {admin:?}; pick another"
            ),
        );
        ok = false;
    }
    let ep_path = &sp.value.endpoint;
    let field = "admin.status_page.endpoint";
    let Some(ep) = endpoints
        .iter()
        .find(|e| e.listener == admin && e.paths.iter().any(|p| p.as_str() == ep_path.value))
    else {
        if !endpoint_declared {
            sink.at(
                ep_path,
                field,
                format!(
                    "no endpoint {:?} on the admin listener {admin:?}: the page connects back to the host it was loaded from; serve a channel with `source: {{builtin: status}}` there",
                    ep_path.value
                ),
            );
        }
        return None;
    };
    if ep.protocol.is_some() || ep.channels.len() != 1 {
        sink.at(
            ep_path,
            field,
            format!(
                "endpoint {:?} must stream exactly one channel (no `protocol`): the one with `source: {{builtin: status}}`",
                ep_path.value
            ),
        );
        return None;
    }
    let ch = &ep.channels[0];
    if !matches!(ch.source.kind, SourceKind::Builtin(Builtin::Status)) {
        sink.at(
            ep_path,
            field,
            format!(
                "endpoint {:?} serves channel {:?}, whose source is {}, not `builtin: status`",
                ep_path.value,
                ch.name,
                ch.source.describe()
            ),
        );
        return None;
    }
    let key_query = match &ep.auth {
        Auth::ApiKey { query: Some(q), .. } => q.clone(),
        Auth::ApiKey { query: None, .. } => {
            sink.at(
                ep_path,
                field,
                format!(
                    "endpoint {:?} takes its API key from a header only: add e.g. `query: api_key` (a browser sends the key in the URL)",
                    ep_path.value
                ),
            );
            return None;
        }
        other => {
            sink.at(
                ep_path,
                field,
                format!(
                    "endpoint {:?} has auth mode {}: the status page needs `mode: api_key` with a `query` parameter (a browser sends the key in the URL)",
                    ep_path.value,
                    other.mode()
                ),
            );
            return None;
        }
    };
    ok.then(|| StatusPageCfg {
        path,
        endpoint: ep_path.value.clone(),
        key_query,
    })
}

/// A channel's source: its kind, mode and interval (None: an error was
/// reported, or there is no plugin directory to look in).
fn compile_source(
    sink: &mut Sink,
    source: &Spanned<types::SourceFile>,
    plugin_dirs: &[PathBuf],
    warnings: &mut Vec<String>,
) -> Option<(SourceKind, SourceMode, Option<Duration>)> {
    let src = &source.value;
    let kind = match (&src.plugin, &src.builtin) {
        (Some(_), Some(b)) => {
            sink.at(
                b,
                "source.builtin",
                "give either `plugin` (a source plugin) or `builtin` (a source of the gateway's own), not both",
            );
            return None;
        }
        (None, None) => {
            sink.at(
                source,
                "source",
                "name what produces the messages: `plugin: NAME` (a source plugin) or `builtin: status`",
            );
            return None;
        }
        (None, Some(b)) => {
            let Some(builtin) = Builtin::from_name(&b.value) else {
                let known: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
                sink.at(
                    b,
                    "source.builtin",
                    format!(
                        "unknown builtin source {:?}; the builtin sources are: {}",
                        b.value,
                        known.join(", ")
                    ),
                );
                return None;
            };
            if let Some(m) = &src.mode
                && m.value != SourceMode::Poll
            {
                sink.at(
                    m,
                    "source.mode",
                    format!(
                        "builtin source {:?} publishes every `interval`: remove `mode` or write `mode: poll`",
                        b.value
                    ),
                );
            }
            if src.config.is_some() {
                sink.at(
                    b,
                    "source.config",
                    format!("builtin source {:?} takes no `config`; remove it", b.value),
                );
            }
            if let Some(t) = &src.call_timeout {
                sink.at(
                    t,
                    "source.call_timeout",
                    format!(
                        "builtin source {:?} makes no plugin calls: remove `call_timeout`",
                        b.value
                    ),
                );
            }
            let Some(interval) = &src.interval else {
                sink.at(
                    b,
                    "source.interval",
                    format!(
                        "builtin source {:?} needs an interval, e.g. `interval: 1s`",
                        b.value
                    ),
                );
                return None;
            };
            return Some((
                SourceKind::Builtin(builtin),
                SourceMode::Poll,
                Some(interval.value.0),
            ));
        }
        (Some(p), None) => p,
    };
    let Some(mode_s) = &src.mode else {
        sink.at(
            source,
            "source.mode",
            "plugin sources need a mode: `mode: poll` (with an interval) or `mode: push`",
        );
        return None;
    };
    let mode = mode_s.value;
    // With no plugin directory (reported already) there is nowhere to look.
    let plugin = match PluginRegistry::global().find(&kind.value, plugin_dirs) {
        Ok(p) => Some(p),
        Err(_) if plugin_dirs.is_empty() => None,
        Err(m) => {
            sink.at(kind, "source.plugin", m);
            None
        }
    };
    if let Some(p) = &plugin {
        if !p.supports(mode) {
            sink.at(
                mode_s,
                "source.mode",
                format!(
                    "plugin {:?} does not support {mode} mode (it supports: {})",
                    p.name,
                    p.modes_text()
                ),
            );
        }
        if !p.panic_unwind {
            let w = format!(
                "{}: plugin {:?} ({}) was built with panic = \"abort\": a panic in it ends the whole gateway; build it with panic = \"unwind\"",
                sink.file.display(),
                p.name,
                p.path.display()
            );
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
    }
    let interval = match (mode, &src.interval) {
        (SourceMode::Poll, None) => {
            sink.at(
                mode_s,
                "source.interval",
                "poll sources need an interval, e.g. `interval: 5s`",
            );
            None
        }
        (SourceMode::Poll, Some(i)) => Some(i.value.0),
        (SourceMode::Push, Some(i)) => {
            sink.at(
                i,
                "source.interval",
                "interval applies to poll sources only; remove it or use `mode: poll`",
            );
            None
        }
        (SourceMode::Push, None) => None,
    };
    Some((SourceKind::Plugin(plugin?), mode, interval))
}

fn unknown_listener(name: &str, known: &[&str]) -> String {
    format!("no listener named {name:?}; defined: {}", known.join(", "))
}

fn resolve_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    match text.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("{text:?} resolves to no address")),
        Err(_) => Err(format!(
            "invalid address {text:?}: write host:port, e.g. 127.0.0.1:8080"
        )),
    }
}

/// The longest a channel may hold messages back (`linger`).
const MAX_LINGER: Duration = Duration::from_secs(1);

/// Read and compile a JSON Schema with format checks on.
pub fn compile_schema(file: &Path) -> Result<jsonschema::Validator, String> {
    compile_schema_json(file).map(|(v, _)| v)
}

/// [`compile_schema`], also returning the schema as written.
pub fn compile_schema_json(
    file: &Path,
) -> Result<(jsonschema::Validator, serde_json::Value), String> {
    let text =
        std::fs::read(file).map_err(|e| format!("cannot read schema {}: {e}", file.display()))?;
    let schema: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("schema {} is not valid JSON: {e}", file.display()))?;
    // A misspelt keyword or format is not an error to a JSON Schema
    // validator (it is an annotation): the check it names silently does not
    // happen. Both are refused here.
    if let Some(uses) = misspelt(&schema, "") {
        return Err(format!("schema {} {uses}", file.display()));
    }
    // The same for every schema file it refers to, and they to, by a
    // relative `$ref` ("common.json#/$defs/price").
    referenced_keywords(file, &schema)?;
    // Relative `$ref`s ("other.json") resolve next to the schema file.
    let base = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .with_base_uri(format!("file://{}", base.display()))
        .build(&schema)
        .map_err(|e| {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            format!(
                "schema {} is not a valid JSON Schema: {e} (at {at})",
                file.display()
            )
        })?;
    Ok((validator, schema))
}

/// The keywords of JSON Schema (2020-12, and the draft-07 ones it replaced).
const SCHEMA_KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "$ref",
    "$anchor",
    "$dynamicRef",
    "$dynamicAnchor",
    "$vocabulary",
    "$comment",
    "$defs",
    "$recursiveRef",
    "$recursiveAnchor",
    "definitions",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "prefixItems",
    "items",
    "contains",
    "properties",
    "patternProperties",
    "additionalProperties",
    "propertyNames",
    "additionalItems",
    "dependencies",
    "unevaluatedItems",
    "unevaluatedProperties",
    "type",
    "enum",
    "const",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxContains",
    "minContains",
    "maxProperties",
    "minProperties",
    "required",
    "dependentRequired",
    "title",
    "description",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "examples",
    "format",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
];

/// Call `f` with every (sub)schema object in `v` and where it is (a JSON
/// Pointer; "" for `v`), following the keywords whose values are schemas;
/// data (`enum`, `const`, `default`, `examples`) is not entered.
fn each_subschema(
    v: &serde_json::Value,
    at: &str,
    f: &mut impl FnMut(&serde_json::Map<String, serde_json::Value>, &str),
) {
    use serde_json::Value;
    let Value::Object(m) = v else { return };
    f(m, at);
    // One JSON Pointer step (RFC 6901).
    let step = |at: &str, k: &str| format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
    for (k, sub) in m {
        let here = step(at, k);
        match k.as_str() {
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas"
            | "dependencies" => {
                if let Value::Object(children) = sub {
                    for (name, s) in children {
                        each_subschema(s, &step(&here, name), f);
                    }
                }
            }
            "allOf" | "anyOf" | "oneOf" | "prefixItems" | "items" if sub.is_array() => {
                for (i, s) in sub.as_array().into_iter().flatten().enumerate() {
                    each_subschema(s, &format!("{here}/{i}"), f);
                }
            }
            "not"
            | "if"
            | "then"
            | "else"
            | "contains"
            | "propertyNames"
            | "items"
            | "additionalProperties"
            | "additionalItems"
            | "unevaluatedItems"
            | "unevaluatedProperties"
            | "contentSchema" => each_subschema(sub, &here, f),
            _ => {}
        }
    }
}

/// Every key of a (sub)schema in `v` that is no JSON Schema keyword, as
/// "`key` at /pointer" (with the keyword it may have meant). Keys starting
/// with `x-` are custom annotations, and left alone.
fn unknown_keywords(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    each_subschema(v, at, &mut |m, at| {
        for k in m.keys() {
            if SCHEMA_KEYWORDS.contains(&k.as_str()) || k.starts_with("x-") {
                continue;
            }
            let near = SCHEMA_KEYWORDS
                .iter()
                .filter(|w| edit_distance(&w.to_ascii_lowercase(), &k.to_ascii_lowercase()) <= 2)
                .min_by_key(|w| edit_distance(w, k));
            let at = if at.is_empty() { "/" } else { at };
            out.push(match near {
                Some(w) => format!("unknown keyword `{k}` at {at} (did you mean `{w}`?)"),
                None => format!("unknown keyword `{k}` at {at}"),
            });
        }
    });
}

/// "uses unknown keyword `k` at /p, …: validation would ignore it; correct
/// it (…)" for the unknown keywords of the schema `v` at `at`, if any.
fn misspelt(v: &serde_json::Value, at: &str) -> Option<String> {
    let mut unknown = Vec::new();
    unknown_keywords(v, at, &mut unknown);
    let it = match unknown.len() {
        0 => return None,
        1 => "it",
        _ => "them",
    };
    Some(format!(
        "uses {}: validation would ignore {it}; correct {it} (a custom annotation: prefix it with x-)",
        unknown.join(", ")
    ))
}

/// [`unknown_keywords`] for what `schema` (read from `file`) refers to by a
/// `$ref` to another file (relative, or `file:`), and what that refers to in
/// turn: the schema a `#/json/pointer` fragment points at (with what it
/// refers to within its own file), or the whole file. The first with a
/// misspelt keyword is an error naming it and the `$ref`s that led there.
/// Not followed, as the validator may resolve them otherwise: a document
/// with an `$id` anywhere (its `$ref`s resolve against that, not the file's
/// place), an anchor (`#name`), a `$ref` with another scheme (`https:`,
/// `urn:`); nor a file that is not there or not JSON, which the validator
/// refuses itself.
fn referenced_keywords(file: &Path, schema: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    // Where a `$ref` leads is joined as the validator joins URIs: onto the
    // referring file's path as written (its base is the channel schema's
    // real path), with `.` and `..` taken out, symlinks left alone. The
    // real path only tells files apart.
    fn lexical(p: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        out
    }
    let base = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    // Each file read: (real path, document).
    let mut docs: Vec<(PathBuf, std::borrow::Cow<'_, Value>)> =
        vec![(base.clone(), std::borrow::Cow::Borrowed(schema))];
    // Each schema checked: (real path, JSON Pointer in it); "" is the whole
    // file.
    let mut seen: Vec<(PathBuf, String)> = vec![(base.clone(), String::new())];
    // (the referring file as joined, its real path, the pointer of the schema
    // there, the chain of `$ref`s that led to it)
    let mut todo = vec![(base.clone(), base, String::new(), String::new())];
    while let Some((from, from_real, pointer, chain)) = todo.pop() {
        let Some((_, doc)) = docs.iter().find(|(p, _)| *p == from_real) else {
            continue;
        };
        if has_key(doc, "$id") {
            continue;
        }
        let Some(sub) = doc.pointer(&pointer) else {
            continue;
        };
        let mut refs = Vec::new();
        each_subschema(sub, &pointer, &mut |m, at| {
            if let Some(Value::String(r)) = m.get("$ref") {
                refs.push((format!("{at}/$ref"), r.clone()));
            }
        });
        for (at, r) in refs {
            let (target, fragment) = r.split_once('#').unwrap_or((&r, ""));
            // A JSON Pointer fragment picks one schema; none (or `#`) the
            // whole file; an anchor is the validator's to find.
            let fragment = match fragment.strip_prefix('/') {
                Some(p) => {
                    let p = percent_encoding::percent_decode_str(p).decode_utf8_lossy();
                    format!("/{p}")
                }
                None if fragment.is_empty() => String::new(),
                None => continue,
            };
            let path = if target.is_empty() {
                from.clone()
            } else if let Some(rest) = target.strip_prefix("file:") {
                let rest = (rest.strip_prefix("//localhost"))
                    .or_else(|| rest.strip_prefix("//"))
                    .unwrap_or(rest);
                lexical(Path::new(rest))
            } else if target
                .split_once(':')
                .is_some_and(|(s, _)| !s.is_empty() && !s.contains('/'))
            {
                continue;
            } else {
                let Some(dir) = from.parent() else { continue };
                lexical(&dir.join(target))
            };
            let Ok(real) = std::fs::canonicalize(&path) else {
                continue;
            };
            if seen
                .iter()
                .any(|(p, f)| *p == real && (f.is_empty() || *f == fragment))
            {
                continue;
            }
            seen.push((real.clone(), fragment.clone()));
            if !docs.iter().any(|(p, _)| *p == real) {
                let Ok(text) = std::fs::read(&real) else {
                    continue;
                };
                let Ok(doc) = serde_json::from_slice::<Value>(&text) else {
                    continue;
                };
                docs.push((real.clone(), std::borrow::Cow::Owned(doc)));
            }
            let Some((_, doc)) = docs.iter().find(|(p, _)| *p == real) else {
                continue;
            };
            let Some(schema) = doc.pointer(&fragment) else {
                continue;
            };
            let step = if real == from_real {
                let to = if fragment.is_empty() { "/" } else { &fragment };
                format!("{chain}, whose `$ref` at {at} points to {to}")
            } else {
                format!(
                    "{chain}, which refers to {} (`$ref` at {at})",
                    path.display()
                )
            };
            if let Some(uses) = misspelt(schema, &fragment) {
                return Err(format!(
                    "schema {}{step}: {} {uses}",
                    file.display(),
                    path.display()
                ));
            }
            todo.push((path, real, fragment, step));
        }
    }
    Ok(())
}

/// Whether any object in `v`, at any depth, has the key `key`.
fn has_key(v: &serde_json::Value, key: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => m.contains_key(key) || m.values().any(|v| has_key(v, key)),
        serde_json::Value::Array(a) => a.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Check a channel's `examples` against its schema: one error per mismatch,
/// naming the example and the instance path.
fn check_examples(
    sink: &mut Sink,
    examples: &[Spanned<serde_json::Value>],
    validator: &jsonschema::Validator,
    schema: &str,
) {
    for (i, ex) in examples.iter().enumerate() {
        for e in validator.iter_errors(&ex.value) {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            sink.at(
                ex,
                format!("examples[{i}]"),
                format!(
                    "the example does not satisfy schema {schema} at {at}: {e}; correct the example or the schema"
                ),
            );
        }
    }
}

/// API keys shorter than this are warned about.
const MIN_API_KEY_LEN: usize = 16;

pub(crate) fn compile_api_key(
    query: &Option<String>,
    header: &Option<String>,
    keys_env: &Option<String>,
    keys_file: &Option<String>,
    spec_dir: &Path,
) -> Result<Auth, String> {
    {
        {
            if query.is_none() && header.is_none() {
                return Err(
                    "api_key needs `query` (e.g. api_key), `header` (e.g. X-Api-Key) or both"
                        .into(),
                );
            }
            let header = match header {
                Some(h) => Some(
                    http::HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| format!("invalid header name {h:?}"))?,
                ),
                None => None,
            };
            let mut keys: Vec<String> = Vec::new();
            if keys_env.is_none() && keys_file.is_none() {
                return Err("api_key needs `keys_env` (an environment variable holding comma-separated keys) or `keys_file`".into());
            }
            if let Some(var) = keys_env {
                match std::env::var(var) {
                    Ok(v) => keys.extend(
                        v.split(',')
                            .map(str::trim)
                            .filter(|k| !k.is_empty())
                            .map(str::to_string),
                    ),
                    Err(_) => {
                        return Err(format!(
                            "environment variable {var} is not set; it should hold the accepted API keys, comma-separated"
                        ));
                    }
                }
            }
            if let Some(f) = keys_file {
                let p = spec_dir.join(f);
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| format!("cannot read keys_file {}: {e}", p.display()))?;
                keys.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|k| !k.is_empty() && !k.starts_with('#'))
                        .map(str::to_string),
                );
            }
            if keys.is_empty() {
                return Err(
                    "api_key has no keys: the configured keys_env/keys_file hold none".into(),
                );
            }
            // A key's principal is a hash of it, in logs and plugin
            // requests: a key that can be guessed can be checked against it
            // offline, as against the gateway online.
            let short = keys.iter().filter(|k| k.len() < MIN_API_KEY_LEN).count();
            let warnings = if short > 0 {
                vec![format!(
                    "{short} of its {} API key(s) are shorter than {MIN_API_KEY_LEN} bytes: a short key can be guessed, by trying it here or against its principal (a hash of the key, in logs and plugin requests); use random keys, e.g. `openssl rand -hex 16`",
                    keys.len()
                )]
            } else {
                Vec::new()
            };
            Ok(Auth::ApiKey {
                query: query.clone(),
                header,
                keys: keys
                    .iter()
                    .map(|k| crate::auth::ApiKey::new(k.as_bytes()))
                    .collect(),
                warnings,
            })
        }
    }
}
