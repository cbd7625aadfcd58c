//! Shared parts of the service source plugins (`mqtt-source`, `nats-source`,
//! `redis-source`, `postgres-source`). Not a plugin itself.
//!
//! - [`Reconnect`] / [`Backoff`]: the `reconnect` config block and the
//!   exponential backoff with jitter between connection attempts;
//! - [`KeyRule`]: the `key` config block, which turns a message's source name
//!   (topic, subject, channel) or a payload field into a keyed-stream key;
//! - [`Pipeline`]: per message, checks the payload is JSON (else drops it or
//!   wraps it), injects the source name if asked, picks the key, and emits;
//! - [`RateLimitedLog`]: at most one log line per second per kind of trouble.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plugin_api::{EmitError, Emitter, Host, PluginError};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The `reconnect` config block: delays between connection attempts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// First delay after a connection is lost or refused, in milliseconds.
    pub initial_ms: u64,
    /// Largest delay, in milliseconds.
    pub max_ms: u64,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect {
            initial_ms: 100,
            max_ms: 10_000,
        }
    }
}

impl Reconnect {
    /// Check the ranges; `plugin` prefixes the error.
    pub fn check(&self, plugin: &str) -> Result<(), PluginError> {
        if self.initial_ms == 0 {
            return Err(PluginError::new(format!(
                "{plugin}: `reconnect.initial_ms` must be at least 1"
            )));
        }
        if self.max_ms < self.initial_ms {
            return Err(PluginError::new(format!(
                "{plugin}: `reconnect.max_ms` ({}) must be at least `reconnect.initial_ms` ({})",
                self.max_ms, self.initial_ms
            )));
        }
        Ok(())
    }
}

impl Reconnect {
    /// The delay before attempt `attempt` (from 0) without keeping state:
    /// random in [d/2, d] with d = min(initial × 2ⁿ, max). For clients that
    /// count attempts themselves (async-nats' reconnect callback).
    pub fn delay(&self, attempt: usize) -> Duration {
        let mut b = Backoff::new(self);
        b.attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
        b.next_delay()
    }
}

/// Exponential backoff with jitter: attempt `n` (from 0) waits a random time
/// in [d/2, d] with d = min(initial × 2ⁿ, max).
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff for `config`.
    pub fn new(config: &Reconnect) -> Backoff {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let local = 0u8;
        let addr = std::ptr::addr_of!(local) as u64;
        Backoff {
            initial: Duration::from_millis(config.initial_ms),
            max: Duration::from_millis(config.max_ms),
            attempt: 0,
            rng: (seed ^ addr.rotate_left(32)) | 1,
        }
    }

    /// The delay before the next attempt; each call doubles the base delay.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        let d = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * frac)
    }

    /// A connection succeeded: start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// What to do with a payload that is not JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonJson {
    /// Drop it and log (rate-limited).
    #[default]
    Drop,
    /// Emit `{"<name field>": name, "payload": "<text>"}` (invalid UTF-8 is
    /// replaced by U+FFFD).
    Wrap,
}

/// The `key` config block as written: exactly one of its fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    segment: Option<usize>,
    segments: Option<Vec<usize>>,
    whole: Option<bool>,
    field: Option<String>,
    separator: Option<String>,
}

/// Where a message's key comes from (keyed channels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRule {
    /// Segments of the name (1-based), joined with `/`.
    Segments {
        /// 1-based segment numbers.
        segments: Vec<usize>,
        /// What separates segments in the name.
        separator: String,
    },
    /// The whole name.
    Whole,
    /// A top-level field of the JSON payload (string, number or bool).
    Field(String),
}

impl KeyRule {
    /// Parse a `key` block. `plugin` prefixes errors; `default_separator`
    /// is the source's own (`/` for MQTT topics, `.` for NATS subjects).
    pub fn parse(
        value: Value,
        plugin: &str,
        default_separator: &str,
    ) -> Result<KeyRule, PluginError> {
        let raw: RawKey = serde_json::from_value(value)
            .map_err(|e| PluginError::new(format!("{plugin}: invalid `key`: {e}")))?;
        let chosen = [
            raw.segment.is_some(),
            raw.segments.is_some(),
            raw.whole.is_some(),
            raw.field.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if chosen != 1 {
            return Err(PluginError::new(format!(
                "{plugin}: `key` needs exactly one of `segment`, `segments`, `whole: true`, `field`"
            )));
        }
        if raw.separator.is_some() && raw.segment.is_none() && raw.segments.is_none() {
            return Err(PluginError::new(format!(
                "{plugin}: `key.separator` only goes with `segment` or `segments`"
            )));
        }
        let separator = raw
            .separator
            .unwrap_or_else(|| default_separator.to_owned());
        if separator.is_empty() {
            return Err(PluginError::new(format!(
                "{plugin}: `key.separator` must not be empty"
            )));
        }
        let segments = match (raw.segment, raw.segments) {
            (Some(n), None) => Some(vec![n]),
            (None, Some(list)) => Some(list),
            _ => None,
        };
        if let Some(segments) = segments {
            if segments.is_empty() || segments.contains(&0) {
                return Err(PluginError::new(format!(
                    "{plugin}: `key` segments are numbered from 1 and at least one is needed"
                )));
            }
            return Ok(KeyRule::Segments {
                segments,
                separator,
            });
        }
        if let Some(whole) = raw.whole {
            if !whole {
                return Err(PluginError::new(format!(
                    "{plugin}: `key.whole` can only be true"
                )));
            }
            return Ok(KeyRule::Whole);
        }
        match raw.field {
            Some(f) if !f.is_empty() => Ok(KeyRule::Field(f)),
            _ => Err(PluginError::new(format!(
                "{plugin}: `key.field` must not be empty"
            ))),
        }
    }

    /// The key of a message named `name` with parsed payload `payload`.
    /// `None` when the name has too few segments or the field is missing.
    pub fn key(&self, name: &str, payload: Option<&Value>) -> Option<String> {
        match self {
            KeyRule::Whole => Some(name.to_owned()),
            KeyRule::Segments {
                segments,
                separator,
            } => {
                let parts: Vec<&str> = name.split(separator.as_str()).collect();
                let mut key = String::new();
                for (i, n) in segments.iter().enumerate() {
                    let part = parts.get(n - 1)?;
                    if i > 0 {
                        key.push('/');
                    }
                    key.push_str(part);
                }
                (!key.is_empty()).then_some(key)
            }
            KeyRule::Field(field) => match payload?.get(field)? {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            },
        }
    }

    /// Whether the payload must be parsed to find the key.
    pub fn needs_payload(&self) -> bool {
        matches!(self, KeyRule::Field(_))
    }
}

/// Logs one line per `every` at most for one kind of event, counting the
/// ones it held back.
#[derive(Debug)]
pub struct RateLimitedLog {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Log `msg` at warning level unless a line went out less than `every` ago.
    pub fn warn(&self, host: &Host, msg: impl FnOnce() -> String) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if state
            .0
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            state.1 += 1;
            return;
        }
        let held = std::mem::take(&mut state.1);
        state.0 = Some(now);
        drop(state);
        let mut line = msg();
        if held > 0 {
            line.push_str(&format!(" ({held} similar messages not logged)"));
        }
        host.warn(&line);
    }
}

/// How messages become emits: JSON check, wrap, name injection, key.
#[derive(Debug)]
pub struct Pipeline {
    plugin: &'static str,
    /// The field name used for the source name when wrapping (`topic`, ...).
    name_label: &'static str,
    non_json: NonJson,
    name_field: Option<String>,
    key: Option<KeyRule>,
    open: Mutex<HashSet<String>>,
    dropped: RateLimitedLog,
    unkeyed: RateLimitedLog,
}

/// What the run loop does after a delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Delivered or dropped: go on.
    Continue,
    /// The instance is stopping: return from `run`.
    Stop,
}

impl Pipeline {
    /// `plugin`: name for log lines; `name_label`: what the source calls a
    /// message's name (`topic`, `subject`, `channel`, `stream`).
    pub fn new(
        plugin: &'static str,
        name_label: &'static str,
        non_json: NonJson,
        name_field: Option<String>,
        key: Option<KeyRule>,
    ) -> Pipeline {
        Pipeline {
            plugin,
            name_label,
            non_json,
            name_field,
            key,
            open: Mutex::new(HashSet::new()),
            dropped: RateLimitedLog::new(Duration::from_secs(1)),
            unkeyed: RateLimitedLog::new(Duration::from_secs(1)),
        }
    }

    fn open(&self) -> MutexGuard<'_, HashSet<String>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a `key` rule is configured (the channel is meant to be keyed).
    pub fn keyed(&self) -> bool {
        self.key.is_some()
    }

    /// A subscriber opened `key`.
    pub fn open_key(&self, key: &str) {
        self.open().insert(key.to_owned());
    }

    /// Nobody wants `key` any more.
    pub fn close_key(&self, key: &str) {
        self.open().remove(key);
    }

    /// Turn one message into (key, JSON bytes), or `None` to drop it (logged).
    pub fn prepare(&self, host: &Host, name: &str, payload: &[u8]) -> Option<(String, Vec<u8>)> {
        let needs_value = self.name_field.is_some()
            || self.key.as_ref().is_some_and(KeyRule::needs_payload)
            || self.non_json == NonJson::Wrap;
        let mut value: Option<Value> = None;
        let mut bytes: Option<Vec<u8>> = None;
        if needs_value {
            match serde_json::from_slice::<Value>(payload) {
                Ok(v) => value = Some(v),
                Err(e) => match self.non_json {
                    NonJson::Wrap => {
                        let mut obj = Map::new();
                        obj.insert(self.name_label.to_owned(), Value::String(name.to_owned()));
                        obj.insert(
                            "payload".to_owned(),
                            Value::String(String::from_utf8_lossy(payload).into_owned()),
                        );
                        value = Some(Value::Object(obj));
                    }
                    NonJson::Drop => {
                        self.drop_non_json(host, name, &e);
                        return None;
                    }
                },
            }
        } else if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
            self.drop_non_json(host, name, &e);
            return None;
        } else {
            bytes = Some(payload.to_vec());
        }
        let key = match &self.key {
            None => String::new(),
            Some(rule) => match rule.key(name, value.as_ref()) {
                Some(k) => {
                    if !self.open().contains(&k) {
                        // Nobody subscribes to this key: skip the work.
                        return None;
                    }
                    k
                }
                None => {
                    self.unkeyed.warn(host, || {
                        format!(
                            "{}: dropped a message on {} {name:?}: no key in it ({:?})",
                            self.plugin, self.name_label, rule
                        )
                    });
                    return None;
                }
            },
        };
        if let (Some(field), Some(Value::Object(obj))) = (&self.name_field, value.as_mut()) {
            obj.insert(field.clone(), Value::String(name.to_owned()));
        }
        let bytes = match bytes {
            Some(b) => b,
            // Serializing a Value cannot fail.
            None => serde_json::to_vec(&value.unwrap_or(Value::Null)).unwrap_or_default(),
        };
        Some((key, bytes))
    }

    fn drop_non_json(&self, host: &Host, name: &str, e: &serde_json::Error) {
        self.dropped.warn(host, || {
            format!(
                "{}: dropped a message on {} {name:?}: payload is not JSON ({e})",
                self.plugin, self.name_label
            )
        });
    }

    /// [`prepare`](Pipeline::prepare) and emit. A message the host rejects
    /// (too large) is logged and skipped; `Err` only for an unexpected host status.
    pub fn deliver(&self, out: &Emitter, name: &str, payload: &[u8]) -> Result<Flow, PluginError> {
        let Some((key, bytes)) = self.prepare(out.host(), name, payload) else {
            return Ok(if out.is_stopped() {
                Flow::Stop
            } else {
                Flow::Continue
            });
        };
        match out.emit(&key, &bytes) {
            Ok(()) => Ok(Flow::Continue),
            Err(EmitError::Stopped) => Ok(Flow::Stop),
            Err(EmitError::Rejected) => {
                self.dropped.warn(out.host(), || {
                    format!(
                        "{}: the gateway rejected a message on {} {name:?} ({} bytes; too large?)",
                        self.plugin,
                        self.name_label,
                        bytes.len()
                    )
                });
                Ok(Flow::Continue)
            }
            Err(e) => Err(PluginError::new(format!(
                "{}: emit failed: {e}",
                self.plugin
            ))),
        }
    }
}

/// Read a secret from the environment variable `var` (named in the config
/// under `option`). Missing or non-UTF-8 is an error naming both.
pub fn env_secret(plugin: &str, option: &str, var: &str) -> Result<String, PluginError> {
    if var.is_empty() {
        return Err(PluginError::new(format!(
            "{plugin}: `{option}` must name an environment variable"
        )));
    }
    std::env::var(var).map_err(|e| {
        PluginError::new(format!(
            "{plugin}: environment variable {var} (from `{option}`): {e}"
        ))
    })
}

/// Parse an optional `key` block.
pub fn parse_key(
    value: Option<Value>,
    plugin: &str,
    default_separator: &str,
) -> Result<Option<KeyRule>, PluginError> {
    value
        .map(|v| KeyRule::parse(v, plugin, default_separator))
        .transpose()
}

/// Run a plugin's async run loop on a current-thread tokio runtime of its
/// own, on the run thread. Tasks it spawned (a client's connection) end
/// with the runtime, on this thread, within 1 s.
pub fn block_on_own_runtime(
    plugin: &str,
    run: impl std::future::Future<Output = Result<(), PluginError>>,
) -> Result<(), PluginError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PluginError::new(format!("{plugin}: cannot start a runtime: {e}")))?;
    let result = rt.block_on(run);
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// `f`, or None if `wake` (notified by the plugin's `stop`) comes first.
pub async fn unless_woken<T>(
    wake: &tokio::sync::Notify,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        r = f => Some(r),
        () = wake.notified() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testing::TestHost;
    use serde_json::json;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(&Reconnect {
            initial_ms: 100,
            max_ms: 1000,
        });
        for expect in [100u64, 200, 400, 800, 1000, 1000, 1000] {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(expect / 2) && d <= Duration::from_millis(expect),
                "{d:?} not in [{}, {expect}] ms",
                expect / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let r = Reconnect {
            initial_ms: 100,
            max_ms: 1000,
        };
        let d = r.delay(2);
        assert!(
            d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
            "{d:?}"
        );
        assert!(r.delay(usize::MAX) <= Duration::from_secs(1));
        // Many attempts do not overflow.
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
    }

    #[test]
    fn reconnect_checks() {
        let r = |i, m| Reconnect {
            initial_ms: i,
            max_ms: m,
        };
        assert!(r(100, 100).check("p").is_ok());
        assert!(
            r(0, 100)
                .check("p")
                .unwrap_err()
                .message()
                .contains("initial_ms")
        );
        assert!(
            r(100, 50)
                .check("p")
                .unwrap_err()
                .message()
                .contains("max_ms")
        );
    }

    #[test]
    fn key_rules() {
        let rule = |v: Value| KeyRule::parse(v, "p", "/").unwrap();
        assert_eq!(
            rule(json!({"segment": 2})).key("a/b/c", None),
            Some("b".into())
        );
        assert_eq!(
            rule(json!({"segments": [3, 1]})).key("a/b/c", None),
            Some("c/a".into())
        );
        assert_eq!(rule(json!({"segment": 4})).key("a/b/c", None), None);
        assert_eq!(
            rule(json!({"segment": 2, "separator": ":"})).key("x:y:z", None),
            Some("y".into())
        );
        assert_eq!(
            rule(json!({"whole": true})).key("a/b", None),
            Some("a/b".into())
        );
        let f = rule(json!({"field": "id"}));
        assert!(f.needs_payload());
        assert_eq!(f.key("t", Some(&json!({"id": "x"}))), Some("x".into()));
        assert_eq!(f.key("t", Some(&json!({"id": 7}))), Some("7".into()));
        assert_eq!(f.key("t", Some(&json!({"id": null}))), None);
        assert_eq!(f.key("t", Some(&json!([1]))), None);
        for (v, expect) in [
            (json!({}), "exactly one of"),
            (json!({"segment": 1, "field": "x"}), "exactly one of"),
            (json!({"segment": 0}), "numbered from 1"),
            (json!({"segments": []}), "numbered from 1"),
            (json!({"whole": false}), "only be true"),
            (json!({"field": ""}), "must not be empty"),
            (json!({"field": "a", "separator": "."}), "only goes with"),
            (json!({"segment": 1, "separator": ""}), "must not be empty"),
            (json!({"segmnt": 1}), "unknown field `segmnt`"),
            (json!("topic"), "invalid `key`"),
        ] {
            let err = KeyRule::parse(v.clone(), "p", "/").unwrap_err();
            assert!(err.message().contains(expect), "{v}: {err}");
        }
    }

    #[test]
    fn pipeline_passes_json_through_and_drops_the_rest() {
        let host = TestHost::new();
        let p = Pipeline::new("p", "topic", NonJson::Drop, None, None);
        assert_eq!(
            p.prepare(&host.host(), "t", br#"{"a": 1}"#),
            Some((String::new(), br#"{"a": 1}"#.to_vec()))
        );
        assert_eq!(p.prepare(&host.host(), "t", b"not json"), None);
        assert_eq!(p.prepare(&host.host(), "t", b"also not"), None);
        let logs = host.logs();
        assert_eq!(logs.len(), 1, "rate-limited: {logs:?}");
        assert!(logs[0].1.contains("not JSON"), "{logs:?}");
    }

    #[test]
    fn pipeline_wraps_injects_and_keys() {
        let host = TestHost::new();
        let p = Pipeline::new("p", "topic", NonJson::Wrap, Some("from".into()), None);
        let (_, b) = p.prepare(&host.host(), "a/b", b"21.5").unwrap();
        assert_eq!(b, b"21.5");
        let (_, b) = p.prepare(&host.host(), "a/b", b"hello").unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            json!({"topic": "a/b", "payload": "hello", "from": "a/b"})
        );
        let (_, b) = p.prepare(&host.host(), "a/b", br#"{"x":1}"#).unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, json!({"x": 1, "from": "a/b"}));

        let rule = KeyRule::parse(json!({"segment": 2}), "p", "/").unwrap();
        let p = Pipeline::new("p", "topic", NonJson::Drop, None, Some(rule));
        assert_eq!(
            p.prepare(&host.host(), "s/k1/t", b"{}"),
            None,
            "k1 not open"
        );
        p.open_key("k1");
        assert_eq!(
            p.prepare(&host.host(), "s/k1/t", b"{}"),
            Some(("k1".into(), b"{}".to_vec()))
        );
        p.close_key("k1");
        assert_eq!(p.prepare(&host.host(), "s/k1/t", b"{}"), None);
    }
}
