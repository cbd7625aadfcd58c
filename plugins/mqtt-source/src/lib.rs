//! `mqtt-source`: subscribes to MQTT topic filters and emits each message
//! (push, keyed). Library `libmqtt_source.so`. MQTT 3.1.1 through `rumqttc`.
//!
//! The run thread drives a `rumqttc` event loop on its own current-thread
//! tokio runtime. When the broker goes away the loop logs the loss, waits
//! with exponential backoff and jitter (`reconnect`), reconnects, subscribes
//! again and logs the recovery. The plugin's `stop` wakes the loop at once;
//! it then sends its pending acks and a DISCONNECT (at most 500 ms).
//!
//! Config (a JSON object; unknown keys are an error):
//! - `url` (string): `mqtt://host[:port]` (port 1883 by default); or
//! - `host` (string, default `127.0.0.1`) and `port` (integer, default 1883);
//! - `client_id` (string, default `gateway-<pid>-<time>-<n>`, unique per instance): required with
//!   `clean_session: false`;
//! - `clean_session` (bool, default true): false keeps the broker-side session
//!   (subscriptions and QoS 1/2 messages queued while disconnected);
//! - `username` or `username_env`, and `password_env`: credentials (the `_env`
//!   keys name environment variables, read when the instance is created);
//! - `topics` (list of topic filters, required; `+` and `#` wildcards);
//! - `qos` (0, 1 or 2, default 0): subscription QoS; QoS 1/2 messages are
//!   acknowledged after they were handed to the gateway;
//! - `keep_alive_secs` (integer ≥ 5, default 30);
//! - `max_packet_bytes` (integer, default 1048576): larger messages break the
//!   connection (rumqttc's limit), so keep it above your largest message;
//! - `non_json` (`drop` | `wrap`, default `drop`): a payload that is not JSON
//!   is dropped and logged, or wrapped as `{"topic": ..., "payload": "<text>"}`;
//! - `topic_field` (string): inject the topic into the message object under this name;
//! - `key` (object): keyed channels: `{segment: N}` / `{segments: [..]}` of
//!   the topic (separator `/`, numbered from 1), `{whole: true}`, or
//!   `{field: NAME}` of the payload;
//! - `reconnect` (`{initial_ms, max_ms}`, default 100 / 10000).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use plugin_api::{Emitter, Host, Plugin, PluginError, parse_config};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    SubscribeFilter,
};
use serde::Deserialize;
use serde_json::Value;
use source_common::{
    Backoff, Flow, NonJson, Pipeline, Reconnect, block_on_own_runtime, env_secret, parse_key,
};
use tokio::sync::Notify;

const NAME: &str = "mqtt-source";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    url: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    client_id: Option<String>,
    clean_session: bool,
    username: Option<String>,
    username_env: Option<String>,
    password_env: Option<String>,
    topics: Vec<String>,
    qos: u8,
    keep_alive_secs: u64,
    max_packet_bytes: usize,
    non_json: NonJson,
    topic_field: Option<String>,
    key: Option<Value>,
    reconnect: Reconnect,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            url: None,
            host: None,
            port: None,
            client_id: None,
            clean_session: true,
            username: None,
            username_env: None,
            password_env: None,
            topics: Vec::new(),
            qos: 0,
            keep_alive_secs: 30,
            max_packet_bytes: 1 << 20,
            non_json: NonJson::Drop,
            topic_field: None,
            key: None,
            reconnect: Reconnect::default(),
        }
    }
}

fn err(msg: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("{NAME}: {msg}"))
}

/// `mqtt://host[:port]` → (host, port).
fn parse_url(url: &str) -> Result<(String, u16), PluginError> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| {
            err(format!(
                "`url` must look like mqtt://host[:port], got {url:?} (TLS and WebSocket transports are not supported)"
            ))
        })?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(err(format!(
            "`url` must look like mqtt://host[:port], got {url:?} (credentials go in `username`/`password_env`)"
        )));
    }
    // [v6]:port, host:port or host
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| err(format!("`url`: unclosed `[` in {url:?}")))?;
        (h.to_owned(), p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (rest.to_owned(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| err(format!("`url`: bad port {p:?} in {url:?}")))?,
        None => 1883,
    };
    Ok((host, port))
}

fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains('#') && !other.contains('+'),
    })
}

/// The checked config.
#[derive(Debug)]
struct Config {
    options: MqttOptions,
    address: String,
    filters: Vec<SubscribeFilter>,
    qos: QoS,
    pipeline: Pipeline,
    reconnect: Reconnect,
}

impl Config {
    fn parse(config: Value) -> Result<Config, PluginError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let raw: RawConfig = parse_config(config).map_err(|e| err(e.message()))?;
        let (host, port) = match (&raw.url, &raw.host, raw.port) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(err("set either `url` or `host`/`port`, not both"));
            }
            (Some(url), None, None) => parse_url(url)?,
            (None, host, port) => (
                host.clone().unwrap_or_else(|| "127.0.0.1".into()),
                port.unwrap_or(1883),
            ),
        };
        if host.is_empty() {
            return Err(err("`host` must not be empty"));
        }
        if raw.topics.is_empty() {
            return Err(err("`topics` must list at least one topic filter"));
        }
        for t in &raw.topics {
            if !valid_filter(t) {
                return Err(err(format!(
                    "invalid topic filter {t:?}: `+` must fill a whole level and `#` must be the whole last level"
                )));
            }
        }
        let qos = match raw.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            n => return Err(err(format!("`qos` must be 0, 1 or 2, got {n}"))),
        };
        if raw.keep_alive_secs < 5 {
            return Err(err("`keep_alive_secs` must be at least 5"));
        }
        if raw.max_packet_bytes < 1024 {
            return Err(err("`max_packet_bytes` must be at least 1024"));
        }
        let client_id = match raw.client_id {
            Some(id) if id.is_empty() => return Err(err("`client_id` must not be empty")),
            Some(id) => id,
            None if !raw.clean_session => {
                return Err(err(
                    "`clean_session: false` needs a fixed `client_id` (the broker keeps the session under it)",
                ));
            }
            // Unique per instance: two clients with one id keep kicking each other off.
            None => format!(
                "gateway-{}-{:x}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
                N.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let username = match (raw.username, raw.username_env) {
            (Some(_), Some(_)) => return Err(err("set `username` or `username_env`, not both")),
            (Some(u), None) => Some(u),
            (None, Some(var)) => Some(env_secret(NAME, "username_env", &var)?),
            (None, None) => None,
        };
        let password = raw
            .password_env
            .map(|var| env_secret(NAME, "password_env", &var))
            .transpose()?;
        if raw.topic_field.as_deref() == Some("") {
            return Err(err("`topic_field` must not be empty"));
        }
        raw.reconnect.check(NAME)?;
        let key = parse_key(raw.key, NAME, "/")?;

        let mut options = MqttOptions::new(client_id, host.clone(), port);
        options
            .set_clean_session(raw.clean_session)
            .set_keep_alive(Duration::from_secs(raw.keep_alive_secs))
            .set_max_packet_size(raw.max_packet_bytes, raw.max_packet_bytes)
            .set_manual_acks(true);
        match (username, password) {
            (Some(u), p) => {
                options.set_credentials(u, p.unwrap_or_default());
            }
            (None, Some(_)) => {
                return Err(err("`password_env` needs `username` or `username_env`"));
            }
            (None, None) => {}
        }
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Config {
            options,
            address,
            filters: raw
                .topics
                .into_iter()
                .map(|t| SubscribeFilter::new(t, qos))
                .collect(),
            qos,
            pipeline: Pipeline::new(NAME, "topic", raw.non_json, raw.topic_field, key),
            reconnect: raw.reconnect,
        })
    }
}

/// Room in the client's request queue (it is allocated as it fills). The
/// event loop sends queued acknowledgements only between the packets it has
/// already read, so with a backlog (a persistent session coming back) the
/// acks of a whole burst wait there. The broker can have at most one message
/// in flight per packet id, so one ack per id, and a few more requests
/// (subscribe, disconnect), always fit: an ack is never refused.
const REQUEST_QUEUE: usize = u16::MAX as usize + 16;

/// How long a stopping instance may take to send its pending acks.
const STOP_FLUSH: Duration = Duration::from_millis(500);

/// One instance.
pub struct MqttSource {
    config: Config,
    /// Woken by `stop`.
    wake: Notify,
}

impl MqttSource {
    async fn run_loop(&self, out: &Emitter) -> Result<(), PluginError> {
        let host = out.host();
        let c = &self.config;
        let (client, mut events): (AsyncClient, EventLoop) =
            AsyncClient::new(c.options.clone(), REQUEST_QUEUE);
        let topics: Vec<&str> = c.filters.iter().map(|f| f.path.as_str()).collect();
        let mut backoff = Backoff::new(&c.reconnect);
        let mut ever_connected = false;
        let mut connected = false;
        loop {
            if out.is_stopped() {
                break;
            }
            let event = tokio::select! {
                e = events.poll() => e,
                () = self.wake.notified() => continue,
            };
            match event {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    if ever_connected {
                        host.info(&format!(
                            "{NAME}: reconnected to {} after {} attempt(s) (session present: {}); subscribing to {topics:?} again",
                            c.address,
                            backoff.attempts(),
                            ack.session_present
                        ));
                    } else {
                        host.info(&format!(
                            "{NAME}: connected to {}; subscribing to {topics:?} at QoS {}",
                            c.address, c.qos as u8
                        ));
                    }
                    ever_connected = true;
                    connected = true;
                    backoff.reset();
                    client
                        .try_subscribe_many(c.filters.iter().cloned())
                        .map_err(|e| err(format!("subscribe: {e}")))?;
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|r| matches!(r, rumqttc::SubscribeReasonCode::Failure))
                    {
                        host.error(&format!(
                            "{NAME}: the broker at {} refused a subscription to {topics:?} ({:?})",
                            c.address, ack.return_codes
                        ));
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let flow = c.pipeline.deliver(out, &p.topic, &p.payload)?;
                    if flow == Flow::Stop {
                        break;
                    }
                    if p.qos != QoS::AtMostOnce {
                        client.try_ack(&p).map_err(|e| err(format!("ack: {e}")))?;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if out.is_stopped() {
                        connected = false;
                        break;
                    }
                    let delay = backoff.next_delay();
                    if connected {
                        host.warn(&format!(
                            "{NAME}: connection to {} lost: {}; reconnecting in {delay:?}",
                            c.address,
                            describe(&e)
                        ));
                    } else {
                        host.warn(&format!(
                            "{NAME}: cannot connect to {}: {}; retry {} in {delay:?}",
                            c.address,
                            describe(&e),
                            backoff.attempts()
                        ));
                    }
                    connected = false;
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.wake.notified() => {}
                    }
                }
            }
        }
        if connected {
            // Acks handed to the client go out only when the event loop is
            // polled again; without this the broker would send the last
            // messages handed to the gateway again to the next session.
            // Queued behind them, a DISCONNECT: once it is out, so are they.
            // Messages read meanwhile are not handed over (nor acked).
            let _ = client.try_disconnect();
            let flush = async {
                loop {
                    match events.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            if tokio::time::timeout(STOP_FLUSH, flush).await.is_err() {
                host.warn(&format!(
                    "{NAME}: pending acknowledgements not sent to {} within {STOP_FLUSH:?} of the stop; the broker will send those messages again",
                    c.address
                ));
            }
        }
        Ok(())
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("refused by the broker ({code:?})"),
        other => other.to_string(),
    }
}

impl Plugin for MqttSource {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        Ok(MqttSource {
            config: Config::parse(config)?,
            wake: Notify::new(),
        })
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        block_on_own_runtime(NAME, self.run_loop(&out))
    }

    fn open_key(&self, key: &str, _params: Value) -> Result<(), PluginError> {
        self.config.pipeline.open_key(key);
        Ok(())
    }

    fn close_key(&self, key: &str) {
        self.config.pipeline.close_key(key);
    }

    fn stop(&self) {
        self.wake.notify_one();
    }
}

plugin_api::export_plugin!(MqttSource, name = "mqtt-source", modes = [push, keyed]);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testing::TestHost;
    use serde_json::json;

    fn parse_err(v: Value) -> String {
        Config::parse(v).unwrap_err().message().to_owned()
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("mqtt://h").unwrap(), ("h".into(), 1883));
        assert_eq!(parse_url("mqtt://h:1884/").unwrap(), ("h".into(), 1884));
        assert_eq!(parse_url("tcp://[::1]:1").unwrap(), ("::1".into(), 1));
        assert!(parse_url("mqtts://h").is_err());
        assert!(parse_url("mqtt://u:p@h").is_err());
        assert!(parse_url("mqtt://h:x").is_err());
    }

    #[test]
    fn filters() {
        for ok in ["a", "a/+/c", "#", "a/#", "+", "+/+"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/c", "a+", "a/b#", "a/+b"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn config_parses() {
        let c = Config::parse(json!({"topics": ["a/+"], "qos": 1, "key": {"segment": 2}})).unwrap();
        assert_eq!(c.address, "127.0.0.1:1883");
        assert_eq!(c.qos, QoS::AtLeastOnce);
        assert!(c.pipeline.keyed());
        let c = Config::parse(json!({"url": "mqtt://broker:1999", "topics": ["#"],
            "client_id": "gw", "clean_session": false}))
        .unwrap();
        assert_eq!(c.address, "broker:1999");
        assert_eq!(c.options.client_id(), "gw");
        assert!(!c.options.clean_session());
    }

    #[test]
    fn config_errors() {
        for (v, expect) in [
            (json!({}), "`topics` must list"),
            (json!({"topics": ["a/#/b"]}), "invalid topic filter"),
            (
                json!({"topics": ["a"], "qos": 3}),
                "`qos` must be 0, 1 or 2",
            ),
            (
                json!({"topics": ["a"], "topic": "x"}),
                "unknown field `topic`",
            ),
            (
                json!({"topics": ["a"], "url": "mqtt://h", "port": 1}),
                "not both",
            ),
            (json!({"topics": ["a"], "url": "http://h"}), "mqtt://host"),
            (
                json!({"topics": ["a"], "clean_session": false}),
                "fixed `client_id`",
            ),
            (
                json!({"topics": ["a"], "keep_alive_secs": 1}),
                "keep_alive_secs",
            ),
            (
                json!({"topics": ["a"], "password_env": "PATH"}),
                "needs `username`",
            ),
            (
                json!({"topics": ["a"], "username_env": "GW_TEST_UNSET_VAR_XYZ"}),
                "environment variable GW_TEST_UNSET_VAR_XYZ",
            ),
            (
                json!({"topics": ["a"], "key": {"segments": [0]}}),
                "numbered from 1",
            ),
            (
                json!({"topics": ["a"], "non_json": "keep"}),
                "unknown variant",
            ),
            (json!({"topics": "a"}), "invalid type"),
        ] {
            let e = parse_err(v.clone());
            assert!(e.contains(expect), "{v}: {e}");
            assert!(e.starts_with("mqtt-source: "), "{e}");
        }
    }

    #[test]
    fn stops_promptly_while_the_broker_is_unreachable() {
        // Port 9 (discard) on loopback: nothing listens, connecting fails at once.
        let host = TestHost::new();
        let plugin = MqttSource::create(
            json!({"port": 9, "topics": ["a"], "reconnect": {"initial_ms": 10000, "max_ms": 10000}}),
            host.host(),
        )
        .unwrap();
        let out = host.emitter();
        std::thread::scope(|s| {
            let run = s.spawn(|| plugin.run(out));
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !host
                .logs()
                .iter()
                .any(|(_, l)| l.contains("cannot connect"))
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
