//! `http-poll`: polls an HTTP endpoint that answers JSON (poll mode).
//!
//! Each poll sends one request and emits the (extracted, reshaped) JSON
//! response on the channel's own stream:
//!
//! 1. send `method` to `url` with `headers`, the headers read from
//!    environment variables (`headers_env`, `basic_auth_env`) and, for POST,
//!    `body` as JSON; redirects are followed only when none of those three
//!    is set (the headers would go to the redirect's host too);
//! 2. a non-2xx status, a transport error, a timeout or a body that is not
//!    JSON is an **upstream error**: it is logged and nothing is emitted;
//! 3. `extract` (a JSON pointer, RFC 6901) selects a sub-value of the response;
//! 4. `fields` (output field → JSON pointer into the extracted value) builds a
//!    new object from picked values; a pointer that matches nothing leaves its
//!    field out;
//! 5. with `skip_unchanged` (default true), a message equal to the last one
//!    emitted is not emitted again.
//!
//! An upstream error never fails the instance (the poll returns `Ok`, so the
//! gateway does not restart anything). Instead the plugin backs off: after
//! `n` failures in a row it skips the next `min(2^(n-1), max_skip)` polls. A
//! success resets this. Failures are logged at warn level: the first at once,
//! later ones at most once every 10 s with a count; recovery is logged at
//! info level.
//!
//! Config (a JSON object; unknown keys are an error):
//! - `url` (string, required): `http://` or `https://` URL;
//! - `method` (`GET` | `POST`, default `GET`);
//! - `body` (any JSON, POST only): sent with `Content-Type: application/json`
//!   unless `headers` sets a content type;
//! - `headers` (map name → value);
//! - `headers_env` (map header name → environment variable name); every
//!   variable must be set when the instance is created;
//! - `basic_auth_env` (`{user, password}`: environment variable names): sends
//!   `Authorization: Basic …`;
//! - `timeout` (duration, default `10s`): for the whole request;
//! - `extract` (JSON pointer, e.g. `/data`); a response without it is an error;
//! - `fields` (map output field → JSON pointer);
//! - `skip_unchanged` (bool, default true);
//! - `max_skip` (integer, default 32): the most polls skipped after a failure;
//!   0 turns backoff off.
//!
//! Environment variables are read when the instance is created (at start and
//! after every restart). No `unsafe` here: the SDK holds all of it.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Map, Value};
use ureq::http::{HeaderName, HeaderValue, Uri};

/// The largest response body read (bytes).
const MAX_BODY: u64 = 16 << 20;
/// How much of an error body is quoted in a log line.
const QUOTE: usize = 200;
/// At most one failure log line per this long (after the first).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// HTTP method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Method {
    /// GET (no body).
    #[default]
    #[serde(rename = "GET")]
    Get,
    /// POST with `body` as JSON.
    #[serde(rename = "POST")]
    Post,
}

/// `basic_auth_env`: the names of the variables holding user and password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicAuthEnv {
    user: String,
    password: String,
}

/// The config as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    url: Option<String>,
    method: Method,
    body: Option<Value>,
    headers: BTreeMap<String, String>,
    headers_env: BTreeMap<String, String>,
    basic_auth_env: Option<BasicAuthEnv>,
    timeout: String,
    extract: Option<String>,
    fields: Option<BTreeMap<String, String>>,
    skip_unchanged: bool,
    max_skip: u32,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            url: None,
            method: Method::Get,
            body: None,
            headers: BTreeMap::new(),
            headers_env: BTreeMap::new(),
            basic_auth_env: None,
            timeout: "10s".into(),
            extract: None,
            fields: None,
            skip_unchanged: true,
            max_skip: 32,
        }
    }
}

/// The checked config, with environment variables resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// Request URL.
    pub url: String,
    /// What the logs show of the URL: no user info, no query.
    pub url_for_logs: String,
    /// Method.
    pub method: Method,
    /// POST body (serialized).
    pub body: Option<Vec<u8>>,
    /// Every request header, env-derived ones included.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether redirects are followed: not when the config sets headers
    /// (they could carry credentials, and the client would send them to
    /// whatever host a redirect names).
    pub follow_redirects: bool,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// JSON pointer selecting the message.
    pub extract: Option<String>,
    /// Output field → JSON pointer.
    pub fields: Option<BTreeMap<String, String>>,
    /// Don't emit a message equal to the last one.
    pub skip_unchanged: bool,
    /// Most polls skipped after failures.
    pub max_skip: u32,
}

fn err(msg: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("http-poll: {msg}"))
}

fn check_pointer(pointer: &str, what: &str) -> Result<(), PluginError> {
    if pointer.is_empty() || pointer.starts_with('/') {
        Ok(())
    } else {
        Err(err(format_args!(
            "{what} must be a JSON pointer: empty or starting with `/`, got {pointer:?}"
        )))
    }
}

fn header(name: &str, value: &str, origin: &str) -> Result<(HeaderName, HeaderValue), PluginError> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| err(format_args!("{origin}: invalid header name {name:?}")))?;
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| err(format_args!("{origin}: invalid value for header {name:?}")))?;
    v.set_sensitive(true);
    Ok((n, v))
}

/// A tiny standard base64 encoder (for Basic auth).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Config {
    /// Parse and check a config; `env` looks up environment variables.
    pub fn parse(
        config: Value,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(config).map_err(err)?;
        let url = raw.url.ok_or_else(|| err("`url` is required"))?;
        let uri: Uri = url
            .parse()
            .map_err(|e| err(format_args!("`url` {url:?} is not a valid URL: {e}")))?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(err(format_args!(
                "`url` {url:?} must be absolute (http://host/...)"
            )));
        };
        if scheme != "http" && scheme != "https" {
            return Err(err(format_args!(
                "`url` scheme must be http or https, got {scheme:?}"
            )));
        }
        let host = authority.as_str().rsplit('@').next().unwrap_or_default();
        let url_for_logs = format!("{scheme}://{host}{}", uri.path());

        let body = match (raw.method, raw.body) {
            (Method::Get, Some(_)) => return Err(err("`body` needs `method: POST`")),
            (_, body) => body.map(|b| serde_json::to_vec(&b).unwrap_or_default()),
        };
        let follow_redirects =
            raw.headers.is_empty() && raw.headers_env.is_empty() && raw.basic_auth_env.is_none();
        let mut headers = Vec::new();
        for (name, value) in &raw.headers {
            headers.push(header(name, value, "`headers`")?);
        }
        let var = |name: &str, origin: &str| {
            if name.is_empty() {
                return Err(err(format_args!("{origin}: empty variable name")));
            }
            env(name).ok_or_else(|| {
                err(format_args!(
                    "environment variable {name} ({origin}) is not set"
                ))
            })
        };
        for (name, var_name) in &raw.headers_env {
            let origin = format!("`headers_env.{name}`");
            let value = var(var_name, &origin)?;
            headers.push(header(name, value.trim(), &origin)?);
        }
        if let Some(auth) = &raw.basic_auth_env {
            let user = var(&auth.user, "`basic_auth_env.user`")?;
            let password = var(&auth.password, "`basic_auth_env.password`")?;
            let value = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
            headers.push(header("authorization", &value, "`basic_auth_env`")?);
        }
        if body.is_some()
            && !headers
                .iter()
                .any(|(n, _)| *n == ureq::http::header::CONTENT_TYPE)
        {
            headers.push((
                ureq::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ));
        }
        let timeout = humantime::parse_duration(&raw.timeout).map_err(|e| {
            err(format_args!(
                "`timeout` {:?} is not a duration like 5s or 500ms: {e}",
                raw.timeout
            ))
        })?;
        if timeout.is_zero() {
            return Err(err("`timeout` must be more than 0"));
        }
        if let Some(p) = &raw.extract {
            check_pointer(p, "`extract`")?;
        }
        if let Some(fields) = &raw.fields {
            if fields.is_empty() {
                return Err(err("`fields` must name at least one field"));
            }
            for (name, p) in fields {
                check_pointer(p, &format!("`fields.{name}`"))?;
            }
        }
        Ok(Config {
            url,
            url_for_logs,
            method: raw.method,
            body,
            headers,
            follow_redirects,
            timeout,
            extract: raw.extract,
            fields: raw.fields,
            skip_unchanged: raw.skip_unchanged,
            max_skip: raw.max_skip,
        })
    }
}

/// Turn a response value into the message: `extract`, then `fields`.
pub fn shape(config: &Config, response: Value) -> Result<Value, String> {
    let value = match &config.extract {
        None => response,
        Some(p) => match response.pointer(p) {
            Some(v) => v.clone(),
            None => return Err(format!("the response has nothing at `extract` {p:?}")),
        },
    };
    let Some(fields) = &config.fields else {
        return Ok(value);
    };
    let mut out = Map::new();
    for (name, p) in fields {
        if let Some(v) = value.pointer(p) {
            out.insert(name.clone(), v.clone());
        }
    }
    Ok(Value::Object(out))
}

/// Failure bookkeeping: backoff and rate-limited logging.
#[derive(Debug, Default)]
struct Health {
    /// Failures in a row.
    failures: u32,
    /// Polls still to skip.
    skip: u32,
    /// When a failure was last logged.
    last_log: Option<Instant>,
    /// Failures since then that were not logged.
    unlogged: u32,
}

/// One instance (one channel).
pub struct HttpPoll {
    config: Config,
    agent: ureq::Agent,
    host: Host,
    health: Mutex<Health>,
    last: Mutex<Option<Vec<u8>>>,
    log_every: Duration,
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(QUOTE) {
        Some((i, _)) => format!("{:?}…", &text[..i]),
        None => format!("{text:?}"),
    }
}

impl HttpPoll {
    /// An instance for a checked config.
    pub fn new(config: Config, host: Host) -> HttpPoll {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .max_redirects(if config.follow_redirects { 10 } else { 0 })
            .user_agent(concat!("gateway-http-poll/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        HttpPoll {
            config,
            agent,
            host,
            health: Mutex::new(Health::default()),
            last: Mutex::new(None),
            log_every: LOG_EVERY,
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One request: the response body as JSON, or why not.
    fn fetch(&self) -> Result<Value, String> {
        let c = &self.config;
        let result = match c.method {
            Method::Get => {
                let mut req = self.agent.get(&c.url);
                for (n, v) in &c.headers {
                    req = req.header(n, v);
                }
                req.call()
            }
            Method::Post => {
                let mut req = self.agent.post(&c.url);
                for (n, v) in &c.headers {
                    req = req.header(n, v);
                }
                match &c.body {
                    Some(body) => req.send(&body[..]),
                    None => req.send_empty(),
                }
            }
        };
        let mut response = result.map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| format!("HTTP {status}: reading the body failed: {e}"))?;
        if status.is_redirection() && !c.follow_redirects {
            let to = response
                .headers()
                .get(ureq::http::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
                .unwrap_or_default();
            let to = to.split('?').next().unwrap_or_default();
            return Err(format!(
                "HTTP {status}: the redirect to {to:?} is not followed because the config sets request headers (`headers`, `headers_env`, `basic_auth_env`), which would go there too; set `url` to the final address"
            ));
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}; body: {}", quote(&body)));
        }
        serde_json::from_slice(&body).map_err(|e| {
            format!(
                "HTTP {status} but the body is not JSON ({e}); body: {}",
                quote(&body)
            )
        })
    }

    fn failed(&self, why: &str) {
        let mut h = self.health();
        h.failures = h.failures.saturating_add(1);
        let exp = h.failures.saturating_sub(1).min(31);
        h.skip = (1u32 << exp).min(self.config.max_skip);
        let now = Instant::now();
        let due = h
            .last_log
            .is_none_or(|t| now.duration_since(t) >= self.log_every);
        if due {
            let more = match h.unlogged {
                0 => String::new(),
                n => format!(" ({n} more failures since the last report)"),
            };
            let n = h.failures;
            let skip = h.skip;
            h.last_log = Some(now);
            h.unlogged = 0;
            drop(h);
            self.host.warn(&format!(
                "{} {}: {why}{more}; failure {n} in a row, skipping the next {skip} polls",
                method_name(self.config.method),
                self.config.url_for_logs
            ));
        } else {
            h.unlogged += 1;
        }
    }

    fn succeeded(&self) {
        let mut h = self.health();
        if h.failures > 0 {
            let n = h.failures;
            // The log's rate limit outlives the recovery: a source that
            // fails every other poll still logs one line per 10 s.
            *h = Health {
                last_log: h.last_log,
                ..Health::default()
            };
            drop(h);
            self.host.info(&format!(
                "{} {}: recovered after {n} failed polls",
                method_name(self.config.method),
                self.config.url_for_logs
            ));
        }
    }
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Post => "POST",
    }
}

impl Plugin for HttpPoll {
    fn create(config: Value, host: Host) -> Result<Self, PluginError> {
        let config = Config::parse(config, |name| std::env::var(name).ok())?;
        Ok(HttpPoll::new(config, host))
    }

    fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        {
            let mut h = self.health();
            if h.skip > 0 {
                h.skip -= 1;
                return Ok(());
            }
        }
        let message = match self.fetch().and_then(|v| shape(&self.config, v)) {
            Ok(m) => m,
            Err(why) => {
                self.failed(&why);
                return Ok(());
            }
        };
        let bytes = serde_json::to_vec(&message).unwrap_or_default();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if self.config.skip_unchanged && last.as_deref() == Some(&bytes[..]) {
            drop(last);
            self.succeeded();
            return Ok(());
        }
        // A success only once the gateway took the message: one it refuses
        // every time is a failure in a row like any other.
        match out.emit("", &bytes) {
            Ok(()) => {
                *last = Some(bytes);
                drop(last);
                self.succeeded();
            }
            Err(EmitError::Stopped) => {}
            Err(e) => {
                drop(last);
                self.failed(&format!("the gateway refused the message: {e}"));
            }
        }
        Ok(())
    }
}

plugin_api::export_plugin!(HttpPoll, name = "http-poll", modes = [poll]);

#[cfg(test)]
mod tests;
