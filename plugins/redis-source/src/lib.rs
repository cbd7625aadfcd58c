//! `redis-source`: Redis pub/sub channels and patterns, or Redis streams
//! (push, keyed). Library `libredis_source.so`.
//!
//! One instance reads either pub/sub (`channels` and/or `patterns`: SUBSCRIBE
//! and PSUBSCRIBE on one connection) or streams (`streams`: XREAD BLOCK on
//! one or more stream keys). The run thread owns the connection; when Redis
//! goes away it logs the loss, retries with exponential backoff and jitter
//! (`reconnect`), subscribes again and logs the recovery. Streams resume after
//! the last entry read, so nothing the stream kept is missed; pub/sub has no
//! buffering, so messages published while disconnected are lost.
//!
//! Config (a JSON object; unknown keys are an error):
//! - `url` (string, default `redis://127.0.0.1:6379`): `redis://[user[:password]@]host[:port][/db]`;
//! - `url_env` (string): name of an environment variable holding the URL
//!   (overrides `url`; must be set);
//! - `password_env` (string): name of an environment variable holding the
//!   password (overrides one in the URL);
//! - `channels` (list of strings): SUBSCRIBE to these;
//! - `patterns` (list of strings): PSUBSCRIBE to these glob patterns (`*`, `?`, `[..]`);
//! - `streams` (object): read streams instead of pub/sub:
//!   - `keys` (list of strings, required): the stream keys;
//!   - `start` (string, default `$`): where to start when there is no
//!     checkpoint: `$` (only new entries), `0` (everything kept), or an entry id;
//!   - `checkpoint` (string): a Redis hash key; after each delivered entry the
//!     plugin does `HSET <checkpoint> <stream> <id>`, and a new instance (a
//!     restart, or the gateway restarted) resumes after the stored id;
//!   - `field` (string): the entry field holding the JSON message; without
//!     it the message is an object of all fields (values as strings);
//!   - `id_field` (string): inject the entry id into the message object under this name;
//!   - `count` (integer ≥ 1, default 100): entries per XREAD;
//! - `non_json` (`drop` | `wrap`, default `drop`): a payload that is not JSON
//!   is dropped and logged, or wrapped as `{"channel": ..., "payload": "<text>"}`;
//! - `channel_field` (string): inject the channel (or stream key) into the
//!   message object under this name;
//! - `key` (object): keyed channels: which key a message goes to, from the
//!   channel name (separator `:`) or a payload field (see `source-common`);
//! - `health_check_secs` (integer ≥ 1, default 30): pub/sub: after this long
//!   without a message the plugin sends PING; no answer within 5 s counts
//!   as a lost connection;
//! - `reconnect` (`{initial_ms, max_ms}`, default 100 / 10000).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use plugin_api::{Emitter, Host, Plugin, PluginError, parse_config};
use redis::streams::StreamReadOptions;
use redis::{Commands, ConnectionInfo, IntoConnectionInfo, RedisError};
use serde::Deserialize;
use serde_json::{Map, Value};
use source_common::{Backoff, Flow, NonJson, Pipeline, Reconnect, env_secret, parse_key};

const NAME: &str = "redis-source";

/// How long one blocking read waits before checking for stop.
const TICK: Duration = Duration::from_millis(250);
/// Timeout for connecting and for a command's reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    url: String,
    url_env: Option<String>,
    password_env: Option<String>,
    channels: Vec<String>,
    patterns: Vec<String>,
    streams: Option<RawStreams>,
    non_json: NonJson,
    channel_field: Option<String>,
    key: Option<Value>,
    health_check_secs: u64,
    reconnect: Reconnect,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            url: "redis://127.0.0.1:6379".into(),
            url_env: None,
            password_env: None,
            channels: Vec::new(),
            patterns: Vec::new(),
            streams: None,
            non_json: NonJson::Drop,
            channel_field: None,
            key: None,
            health_check_secs: 30,
            reconnect: Reconnect::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreams {
    keys: Vec<String>,
    #[serde(default = "dollar")]
    start: String,
    checkpoint: Option<String>,
    field: Option<String>,
    id_field: Option<String>,
    #[serde(default = "default_count")]
    count: usize,
}

fn dollar() -> String {
    "$".into()
}

fn default_count() -> usize {
    100
}

/// What to read.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    PubSub {
        channels: Vec<String>,
        patterns: Vec<String>,
    },
    Streams(Streams),
}

#[derive(Debug, Clone, PartialEq)]
struct Streams {
    keys: Vec<String>,
    start: String,
    checkpoint: Option<String>,
    field: Option<String>,
    id_field: Option<String>,
    count: usize,
}

/// The checked config.
#[derive(Debug)]
struct Config {
    info: ConnectionInfo,
    /// For log lines (no password).
    address: String,
    source: Source,
    pipeline: Pipeline,
    /// Pub/sub: silence after which the plugin sends PING.
    health_check: Duration,
    reconnect: Reconnect,
}

fn err(msg: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("{NAME}: {msg}"))
}

fn valid_id(id: &str) -> bool {
    if id == "$" || id == "0" {
        return true;
    }
    let mut parts = id.splitn(2, '-');
    let ms = parts.next().unwrap_or("");
    let ok_num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    ok_num(ms) && parts.next().is_none_or(ok_num)
}

impl Config {
    fn parse(config: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(config).map_err(|e| err(e.message()))?;
        let url = match &raw.url_env {
            Some(var) => env_secret(NAME, "url_env", var)?,
            None => raw.url.clone(),
        };
        let mut info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| err(format!("invalid `url`: {e}")))?;
        let address = info.addr().to_string();
        if let Some(var) = &raw.password_env {
            let password = env_secret(NAME, "password_env", var)?;
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        let source = match raw.streams {
            Some(s) => {
                if !raw.channels.is_empty() || !raw.patterns.is_empty() {
                    return Err(err(
                        "`streams` cannot be combined with `channels`/`patterns` in one channel (use two channels)",
                    ));
                }
                if s.keys.is_empty() || s.keys.iter().any(String::is_empty) {
                    return Err(err("`streams.keys` must list at least one non-empty key"));
                }
                if !valid_id(&s.start) {
                    return Err(err(format!(
                        "`streams.start` must be `$`, `0` or an entry id like 1700000000000-0, got {:?}",
                        s.start
                    )));
                }
                if s.count == 0 {
                    return Err(err("`streams.count` must be at least 1"));
                }
                for (name, v) in [
                    ("checkpoint", &s.checkpoint),
                    ("field", &s.field),
                    ("id_field", &s.id_field),
                ] {
                    if v.as_deref() == Some("") {
                        return Err(err(format!("`streams.{name}` must not be empty")));
                    }
                }
                Source::Streams(Streams {
                    keys: s.keys,
                    start: s.start,
                    checkpoint: s.checkpoint,
                    field: s.field,
                    id_field: s.id_field,
                    count: s.count,
                })
            }
            None => {
                if raw.channels.is_empty() && raw.patterns.is_empty() {
                    return Err(err(
                        "nothing to read: set `channels` and/or `patterns` (pub/sub), or `streams`",
                    ));
                }
                if raw
                    .channels
                    .iter()
                    .chain(&raw.patterns)
                    .any(String::is_empty)
                {
                    return Err(err(
                        "`channels` and `patterns` must not contain empty names",
                    ));
                }
                Source::PubSub {
                    channels: raw.channels,
                    patterns: raw.patterns,
                }
            }
        };
        if raw.channel_field.as_deref() == Some("") {
            return Err(err("`channel_field` must not be empty"));
        }
        if raw.health_check_secs == 0 {
            return Err(err("`health_check_secs` must be at least 1"));
        }
        raw.reconnect.check(NAME)?;
        let key = parse_key(raw.key, NAME, ":")?;
        Ok(Config {
            info,
            address,
            source,
            pipeline: Pipeline::new(NAME, "channel", raw.non_json, raw.channel_field, key),
            health_check: Duration::from_secs(raw.health_check_secs),
            reconnect: raw.reconnect,
        })
    }
}

/// One instance.
pub struct RedisSource {
    config: Config,
}

/// Why a session with Redis ended.
enum End {
    /// The instance is stopping.
    Stopped,
    /// The connection failed; reconnect.
    Lost(RedisError),
}

impl From<RedisError> for End {
    fn from(e: RedisError) -> End {
        End::Lost(e)
    }
}

impl RedisSource {
    fn connect(&self) -> Result<redis::Connection, RedisError> {
        let client = redis::Client::open(self.config.info.clone())?;
        let con = client.get_connection_with_timeout(IO_TIMEOUT)?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(con)
    }

    /// Subscribe and relay until stopped or the connection fails.
    fn pubsub(
        &self,
        con: &mut redis::Connection,
        channels: &[String],
        patterns: &[String],
        out: &Emitter,
        connected: &mut dyn FnMut(),
    ) -> Result<End, PluginError> {
        let mut ps = con.as_pubsub();
        let subscribed = (|| -> Result<(), RedisError> {
            // Bounded from the start: a server that stops answering now
            // must not hold the thread (and the stop) for good.
            ps.set_read_timeout(Some(IO_TIMEOUT))?;
            if !channels.is_empty() {
                ps.subscribe(channels)?;
            }
            if !patterns.is_empty() {
                ps.psubscribe(patterns)?;
            }
            ps.set_read_timeout(Some(TICK))
        })();
        if let Err(e) = subscribed {
            return Ok(End::Lost(e));
        }
        connected();
        let mut heard = Instant::now();
        loop {
            if out.is_stopped() {
                return Ok(End::Stopped);
            }
            match ps.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    if self.config.pipeline.deliver(
                        out,
                        msg.get_channel_name(),
                        msg.get_payload_bytes(),
                    )? == Flow::Stop
                    {
                        return Ok(End::Stopped);
                    }
                }
                Err(e) if e.is_timeout() => {
                    // Nothing for a while: make sure the connection is
                    // alive (a dropped path or a frozen server says nothing).
                    if heard.elapsed() >= self.config.health_check {
                        let alive = (|| -> Result<(), RedisError> {
                            ps.set_read_timeout(Some(IO_TIMEOUT))?;
                            let _: redis::Value = ps.ping()?;
                            ps.set_read_timeout(Some(TICK))
                        })();
                        if let Err(e) = alive {
                            // Dropping the subscription sends UNSUBSCRIBE and
                            // reads the answer: don't wait for it here.
                            let _ = ps.set_read_timeout(Some(Duration::from_millis(1)));
                            return Ok(End::Lost(RedisError::from((
                                redis::ErrorKind::Io,
                                "health check (PING) failed",
                                e.to_string(),
                            ))));
                        }
                        heard = Instant::now();
                    }
                }
                Err(e) => return Ok(End::Lost(e)),
            }
        }
    }

    /// Read the stored ids of a checkpoint hash.
    fn load_checkpoint(
        con: &mut redis::Connection,
        checkpoint: &str,
        keys: &[String],
    ) -> Result<Vec<Option<String>>, RedisError> {
        let ids: Vec<Option<String>> = redis::cmd("HMGET").arg(checkpoint).arg(keys).query(con)?;
        Ok(ids)
    }

    /// Read streams until stopped or the connection fails. `ids` is the last
    /// id read per stream (kept across reconnects).
    fn streams(
        &self,
        con: &mut redis::Connection,
        s: &Streams,
        ids: &mut Option<Vec<String>>,
        out: &Emitter,
        connected: &mut dyn FnMut(),
    ) -> Result<End, PluginError> {
        if let Err(e) = con.set_read_timeout(Some(TICK + IO_TIMEOUT)) {
            return Ok(End::Lost(e));
        }
        if ids.is_none() {
            let mut start: Vec<String> = vec![s.start.clone(); s.keys.len()];
            if let Some(cp) = &s.checkpoint {
                let stored = match Self::load_checkpoint(con, cp, &s.keys) {
                    Ok(stored) => stored,
                    Err(e) => return Ok(End::Lost(e)),
                };
                for (slot, id) in start.iter_mut().zip(stored) {
                    if let Some(id) = id {
                        *slot = id;
                    }
                }
            }
            // Resolve `$` to the current last id once, so entries added while
            // reconnecting are not skipped later.
            for (key, slot) in s.keys.iter().zip(start.iter_mut()) {
                if slot == "$" {
                    let last: redis::Value = match redis::cmd("XREVRANGE")
                        .arg(key)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query(con)
                    {
                        Ok(v) => v,
                        Err(e) => return Ok(End::Lost(e)),
                    };
                    *slot = first_entry_id(&last).unwrap_or_else(|| "0".into());
                    // Store where `$` was: an instance stopped before the
                    // first entry would otherwise resolve `$` again next
                    // time and skip what was added in between.
                    if let Some(cp) = &s.checkpoint
                        && let Err(e) = con.hset_nx::<_, _, _, ()>(cp, key, &*slot)
                    {
                        return Ok(End::Lost(e));
                    }
                }
            }
            *ids = Some(start);
        }
        // Announced (and the backoff reset) after the first read that
        // worked: an error that comes back on every read (a key of the wrong
        // type, a missing permission) then retries with a growing delay.
        let mut announced = false;
        let opts = StreamReadOptions::default()
            .block(TICK.as_millis() as usize)
            .count(s.count);
        loop {
            if out.is_stopped() {
                return Ok(End::Stopped);
            }
            let current = ids.as_mut().expect("ids set above");
            // Read as a raw value: redis' own reply type fails the whole
            // reply on a field name that is not UTF-8, which would stick the
            // stream on that entry for good.
            let reply: redis::Value = match con.xread_options(&s.keys, current, &opts) {
                Ok(r) => r,
                Err(e) => return Ok(End::Lost(e)),
            };
            if !announced {
                announced = true;
                connected();
            }
            for (key, entries) in xread_entries(reply) {
                let Some(pos) = s.keys.iter().position(|k| *k == key) else {
                    continue;
                };
                for (id, map) in entries {
                    match entry_payload(s, &id, &map) {
                        Some(payload) => {
                            if self.config.pipeline.deliver(out, &key, &payload)? == Flow::Stop {
                                return Ok(End::Stopped);
                            }
                        }
                        None => out.host().warn(&format!(
                            "{NAME}: stream {key:?} entry {id}: no field {:?}; skipped",
                            s.field.as_deref().unwrap_or("")
                        )),
                    }
                    current[pos] = id.clone();
                    if let Some(cp) = &s.checkpoint
                        && let Err(e) = con.hset::<_, _, _, ()>(cp, &key, &id)
                    {
                        return Ok(End::Lost(e));
                    }
                }
            }
        }
    }
}

/// One stream's entries in an XREAD reply.
type StreamEntries = (String, Vec<(String, HashMap<String, redis::Value>)>);

/// The entries of an XREAD reply (RESP2 arrays or a RESP3 map), per stream:
/// (id, fields). Names and ids are decoded lossily; anything else that is
/// not the expected shape is left out.
fn xread_entries(reply: redis::Value) -> Vec<StreamEntries> {
    let streams: Vec<(redis::Value, redis::Value)> = match reply {
        redis::Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                redis::Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    Some((pair.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        redis::Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|(key, entries)| {
            let key = value_text(&key)?;
            let redis::Value::Array(entries) = entries else {
                return None;
            };
            let entries = entries
                .into_iter()
                .filter_map(|entry| {
                    let redis::Value::Array(mut entry) = entry else {
                        return None;
                    };
                    if entry.len() != 2 {
                        return None;
                    }
                    let fields = entry.pop()?;
                    let id = value_text(&entry.pop()?)?;
                    let mut map = HashMap::new();
                    if let redis::Value::Array(fields) = fields {
                        let mut it = fields.into_iter();
                        while let (Some(name), Some(value)) = (it.next(), it.next()) {
                            if let Some(name) = value_text(&name) {
                                map.insert(name, value);
                            }
                        }
                    }
                    Some((id, map))
                })
                .collect();
            Some((key, entries))
        })
        .collect()
}

fn first_entry_id(v: &redis::Value) -> Option<String> {
    let redis::Value::Array(entries) = v else {
        return None;
    };
    let redis::Value::Array(entry) = entries.first()? else {
        return None;
    };
    match entry.first()? {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn value_text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The JSON bytes of one stream entry, `None` if `field` is missing.
fn entry_payload(s: &Streams, id: &str, map: &HashMap<String, redis::Value>) -> Option<Vec<u8>> {
    match &s.field {
        Some(field) => {
            let raw = match map.get(field)? {
                redis::Value::BulkString(b) => b.clone(),
                other => value_text(other)?.into_bytes(),
            };
            match &s.id_field {
                // Inject the id only into a JSON object; anything else passes as is.
                Some(id_field) => match serde_json::from_slice::<Value>(&raw) {
                    Ok(Value::Object(mut obj)) => {
                        obj.insert(id_field.clone(), Value::String(id.to_owned()));
                        serde_json::to_vec(&obj).ok()
                    }
                    _ => Some(raw),
                },
                None => Some(raw),
            }
        }
        None => {
            let mut obj = Map::new();
            let mut fields: Vec<(&String, &redis::Value)> = map.iter().collect();
            fields.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in fields {
                if let Some(text) = value_text(v) {
                    obj.insert(k.clone(), Value::String(text));
                }
            }
            if let Some(id_field) = &s.id_field {
                obj.insert(id_field.clone(), Value::String(id.to_owned()));
            }
            serde_json::to_vec(&obj).ok()
        }
    }
}

impl Plugin for RedisSource {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        Ok(RedisSource {
            config: Config::parse(config)?,
        })
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        let host = out.host().clone();
        let address = &self.config.address;
        let what = match &self.config.source {
            Source::PubSub { channels, patterns } => {
                format!("channels {channels:?}, patterns {patterns:?}")
            }
            Source::Streams(s) => format!("streams {:?}", s.keys),
        };
        let mut backoff = Backoff::new(&self.config.reconnect);
        let mut ever_connected = false;
        let mut ids: Option<Vec<String>> = None;
        loop {
            if out.is_stopped() {
                return Ok(());
            }
            let failure = match self.connect() {
                Ok(mut con) => {
                    let mut connected = || {
                        if ever_connected {
                            host.info(&format!(
                                "{NAME}: reconnected to {address} after {} attempt(s); reading {what} again",
                                backoff.attempts()
                            ));
                        } else {
                            host.info(&format!("{NAME}: connected to {address}; reading {what}"));
                        }
                        ever_connected = true;
                        backoff.reset();
                    };
                    let end = match &self.config.source {
                        Source::PubSub { channels, patterns } => {
                            self.pubsub(&mut con, channels, patterns, &out, &mut connected)?
                        }
                        Source::Streams(s) => {
                            self.streams(&mut con, s, &mut ids, &out, &mut connected)?
                        }
                    };
                    match end {
                        End::Stopped => return Ok(()),
                        End::Lost(e) => e,
                    }
                }
                Err(e) => e,
            };
            if out.is_stopped() {
                return Ok(());
            }
            let delay = backoff.next_delay();
            if backoff.attempts() == 1 && ever_connected {
                host.warn(&format!(
                    "{NAME}: connection to {address} lost: {failure}; reconnecting in {delay:?}"
                ));
            } else {
                host.warn(&format!(
                    "{NAME}: cannot connect to {address}: {failure}; retry {} in {delay:?}",
                    backoff.attempts()
                ));
            }
            if out.wait_stopped(delay) {
                return Ok(());
            }
        }
    }

    fn open_key(&self, key: &str, _params: Value) -> Result<(), PluginError> {
        self.pipeline().open_key(key);
        Ok(())
    }

    fn close_key(&self, key: &str) {
        self.pipeline().close_key(key);
    }
}

impl RedisSource {
    fn pipeline(&self) -> &Pipeline {
        &self.config.pipeline
    }
}

plugin_api::export_plugin!(RedisSource, name = "redis-source", modes = [push, keyed]);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_err(v: Value) -> String {
        Config::parse(v).unwrap_err().message().to_owned()
    }

    #[test]
    fn config_parses() {
        let c = Config::parse(json!({"channels": ["a"], "patterns": ["b:*"]})).unwrap();
        assert_eq!(
            c.source,
            Source::PubSub {
                channels: vec!["a".into()],
                patterns: vec!["b:*".into()]
            }
        );
        assert_eq!(c.address, "127.0.0.1:6379");
        let c = Config::parse(json!({
            "url": "redis://10.1.2.3:7000/2",
            "streams": {"keys": ["s1"], "start": "0", "checkpoint": "cp", "field": "json"},
            "key": {"field": "id"},
            "reconnect": {"initial_ms": 50, "max_ms": 500}
        }))
        .unwrap();
        assert_eq!(c.address, "10.1.2.3:7000");
        let Source::Streams(s) = c.source else {
            panic!()
        };
        assert_eq!((s.start.as_str(), s.count), ("0", 100));
        assert!(c.pipeline.keyed());
    }

    #[test]
    fn config_errors() {
        for (v, expect) in [
            (json!({}), "nothing to read"),
            (
                json!({"channels": ["a"], "chanels": 1}),
                "unknown field `chanels`",
            ),
            (json!({"channels": [""]}), "must not contain empty names"),
            (
                json!({"channels": ["a"], "health_check_secs": 0}),
                "`health_check_secs` must be at least 1",
            ),
            (
                json!({"url": "http://x", "channels": ["a"]}),
                "invalid `url`",
            ),
            (
                json!({"channels": ["a"], "streams": {"keys": ["s"]}}),
                "cannot be combined",
            ),
            (json!({"streams": {"keys": []}}), "at least one"),
            (
                json!({"streams": {"keys": ["s"], "start": "x"}}),
                "`streams.start`",
            ),
            (
                json!({"streams": {"keys": ["s"], "count": 0}}),
                "`streams.count`",
            ),
            (
                json!({"streams": {"keys": ["s"], "field": ""}}),
                "`streams.field`",
            ),
            (
                json!({"streams": {"keys": ["s"], "bogus": 1}}),
                "unknown field `bogus`",
            ),
            (
                json!({"channels": ["a"], "url_env": "GW_TEST_UNSET_VAR_XYZ"}),
                "GW_TEST_UNSET_VAR_XYZ",
            ),
            (
                json!({"channels": ["a"], "non_json": "keep"}),
                "unknown variant `keep`",
            ),
            (
                json!({"channels": ["a"], "key": {"segment": 0}}),
                "numbered from 1",
            ),
            (
                json!({"channels": ["a"], "reconnect": {"initial_ms": 0}}),
                "initial_ms",
            ),
        ] {
            let e = parse_err(v.clone());
            assert!(e.contains(expect), "{v}: {e}");
            assert!(e.starts_with("redis-source: "), "{e}");
        }
    }

    #[test]
    fn ids() {
        for ok in ["$", "0", "1700000000000-0", "1700000000000"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", "-", "a-1", "1-", "1-2-3", ">"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn xread_replies_in_both_shapes_and_odd_names() {
        use redis::Value::{Array, BulkString, Map, Nil};
        let b = |s: &[u8]| BulkString(s.to_vec());
        let entries = || {
            Array(vec![
                Array(vec![
                    b(b"1-0"),
                    Array(vec![b(b"\xffx"), b(b"1"), b(b"json"), b(b"{}")]),
                ]),
                Array(vec![b(b"2-0")]),
                Nil,
            ])
        };
        let resp2 = Array(vec![Array(vec![b(b"s"), entries()]), Nil]);
        let resp3 = Map(vec![(b(b"s"), entries())]);
        for reply in [resp2, resp3] {
            let got = xread_entries(reply);
            assert_eq!(got.len(), 1);
            let (key, entries) = &got[0];
            assert_eq!(key, "s");
            assert_eq!(entries.len(), 1, "{entries:?}");
            let (id, map) = &entries[0];
            assert_eq!(id, "1-0");
            assert_eq!(map.get("json"), Some(&b(b"{}")));
            assert_eq!(map.get("\u{fffd}x"), Some(&b(b"1")));
        }
        assert!(xread_entries(Nil).is_empty());
    }

    #[test]
    fn entry_payloads() {
        let s = |field: Option<&str>, id_field: Option<&str>| Streams {
            keys: vec!["s".into()],
            start: "$".into(),
            checkpoint: None,
            field: field.map(Into::into),
            id_field: id_field.map(Into::into),
            count: 1,
        };
        let mut map = HashMap::new();
        map.insert(
            "json".to_owned(),
            redis::Value::BulkString(br#"{"a":1}"#.to_vec()),
        );
        map.insert("n".to_owned(), redis::Value::BulkString(b"5".to_vec()));
        let v = |b: Vec<u8>| serde_json::from_slice::<Value>(&b).unwrap();
        assert_eq!(
            v(entry_payload(&s(Some("json"), None), "1-0", &map).unwrap()),
            json!({"a": 1})
        );
        assert_eq!(
            v(entry_payload(&s(Some("json"), Some("id")), "1-0", &map).unwrap()),
            json!({"a": 1, "id": "1-0"})
        );
        assert_eq!(
            v(entry_payload(&s(None, Some("id")), "1-0", &map).unwrap()),
            json!({"json": "{\"a\":1}", "n": "5", "id": "1-0"})
        );
        assert!(entry_payload(&s(Some("missing"), None), "1-0", &map).is_none());
    }

    #[test]
    fn logs_the_failure_and_stops_promptly_while_the_service_is_unreachable() {
        // Port 9 (discard) on loopback: nothing listens, connecting fails at once.
        let host = plugin_api::testing::TestHost::new();
        let plugin = RedisSource::create(json!({"url": "redis://127.0.0.1:9", "channels": ["a"], "reconnect": {"initial_ms": 10000, "max_ms": 10000}}), host.host()).unwrap();
        let out = host.emitter();
        std::thread::scope(|s| {
            let run = s.spawn(|| plugin.run(out));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !host
                .logs()
                .iter()
                .any(|(_, l)| l.contains("cannot connect to 127.0.0.1:9"))
            {
                assert!(std::time::Instant::now() < deadline, "{:?}", host.logs());
                std::thread::sleep(Duration::from_millis(5));
            }
            let t0 = std::time::Instant::now();
            host.stop();
            plugin.stop();
            run.join().unwrap().unwrap();
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "{:?}",
                t0.elapsed()
            );
        });
    }
}
