//! `nats-source`: subscribes to NATS subjects, or reads a JetStream durable
//! consumer, and emits each message (push, keyed). Library
//! `libnats_source.so`. Uses `async-nats` on a current-thread tokio runtime
//! that lives on the plugin's run thread; the plugin's `stop` wakes it at once.
//!
//! Core NATS: `async-nats` reconnects by itself (delays from `reconnect`:
//! exponential with jitter) and subscribes again; the plugin logs each loss
//! and recovery. Core NATS keeps nothing for a disconnected subscriber, so
//! messages published meanwhile are lost.
//!
//! JetStream (`jetstream` block): a durable pull consumer on an existing
//! stream; each message is acknowledged after it was handed to the gateway,
//! so a restarted instance (or gateway) resumes after the last acknowledged
//! message, and messages published while it was away are delivered then.
//! Delivery is at least once: after a lost connection, a message that was in
//! flight comes again after `ack_wait_secs` (behind newer ones). On stop the
//! plugin flushes its acks, then drains its connection (unsubscribe; at most
//! 500 ms in all); a message it could not pass on gets a negative ack.
//!
//! Config (a JSON object; unknown keys are an error):
//! - `url` (string, default `nats://127.0.0.1:4222`); `url_env` (string): an
//!   environment variable holding it (overrides `url`);
//! - `user` and `password_env`, or `token_env`: credentials (`_env` keys name
//!   environment variables, read when the instance is created);
//! - `subjects` (list of strings): core NATS: subscribe to these (`*` one
//!   token, `>` the rest); JetStream: at most one, the consumer's filter subject;
//! - `jetstream` (object): read a durable consumer instead:
//!   - `stream` (string, required): an existing stream;
//!   - `durable` (string, required): the durable consumer's name (created on
//!     first use with `deliver_policy` and explicit acks; kept by the server);
//!   - `deliver_policy` (`all` | `new` | `last` | `last_per_subject`, or
//!     `{start_sequence: N}`; default `all`): where a new consumer starts;
//!   - `ack_wait_secs` (integer ≥ 1, default 30): redelivery after this long without ack;
//! - `non_json` (`drop` | `wrap`, default `drop`): a payload that is not JSON
//!   is dropped and logged, or wrapped as `{"subject": ..., "payload": "<text>"}`;
//! - `subject_field` (string): inject the subject into the message object under this name;
//! - `key` (object): keyed channels: `{segment: N}` / `{segments: [..]}` of
//!   the subject (separator `.`, numbered from 1), `{whole: true}`, or
//!   `{field: NAME}` of the payload;
//! - `reconnect` (`{initial_ms, max_ms}`, default 100 / 10000).

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::{ConnectOptions, Event};
use futures_util::StreamExt;
use plugin_api::{Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::Value;
use source_common::{
    Backoff, Flow, NonJson, Pipeline, RateLimitedLog, Reconnect, block_on_own_runtime, env_secret,
    parse_key, unless_woken,
};
use tokio::sync::Notify;

const NAME: &str = "nats-source";

/// How long a stopping instance may take to send its pending acks and drain.
const STOP_FLUSH: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    url: String,
    url_env: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    token_env: Option<String>,
    subjects: Vec<String>,
    jetstream: Option<RawJetStream>,
    non_json: NonJson,
    subject_field: Option<String>,
    key: Option<Value>,
    reconnect: Reconnect,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            url: "nats://127.0.0.1:4222".into(),
            url_env: None,
            user: None,
            password_env: None,
            token_env: None,
            subjects: Vec::new(),
            jetstream: None,
            non_json: NonJson::Drop,
            subject_field: None,
            key: None,
            reconnect: Reconnect::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJetStream {
    stream: String,
    durable: String,
    #[serde(default)]
    deliver_policy: Option<Value>,
    #[serde(default = "default_ack_wait")]
    ack_wait_secs: u64,
}

fn default_ack_wait() -> u64 {
    30
}

/// `deliver_policy`: a name, or `{start_sequence: N}`.
fn deliver_policy(v: Option<Value>) -> Result<DeliverPolicy, PluginError> {
    let bad = |v: &Value| {
        err(format!(
            "`jetstream.deliver_policy` must be all, new, last, last_per_subject or {{start_sequence: N}} (N >= 1), got {v}"
        ))
    };
    match v {
        None => Ok(DeliverPolicy::All),
        Some(Value::String(s)) => match s.as_str() {
            "all" => Ok(DeliverPolicy::All),
            "new" => Ok(DeliverPolicy::New),
            "last" => Ok(DeliverPolicy::Last),
            "last_per_subject" => Ok(DeliverPolicy::LastPerSubject),
            _ => Err(bad(&Value::String(s))),
        },
        Some(Value::Object(o)) if o.len() == 1 => {
            match o.get("start_sequence").and_then(Value::as_u64) {
                Some(n) if n >= 1 => Ok(DeliverPolicy::ByStartSequence { start_sequence: n }),
                _ => Err(bad(&Value::Object(o))),
            }
        }
        Some(other) => Err(bad(&other)),
    }
}

#[derive(Debug, Clone)]
struct JetStream {
    stream: String,
    durable: String,
    filter: Option<String>,
    deliver: DeliverPolicy,
    ack_wait: Duration,
}

#[derive(Debug)]
struct Config {
    url: String,
    auth: Auth,
    subjects: Vec<String>,
    jetstream: Option<JetStream>,
    pipeline: Pipeline,
    reconnect: Reconnect,
}

#[derive(Debug, Clone)]
enum Auth {
    None,
    UserPassword(String, String),
    Token(String),
}

fn err(msg: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("{NAME}: {msg}"))
}

fn valid_subject(s: &str) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    !s.is_empty()
        && !s.contains(char::is_whitespace)
        && tokens.iter().enumerate().all(|(i, t)| match *t {
            "" => false,
            ">" => i == tokens.len() - 1,
            "*" => true,
            other => !other.contains('*') && !other.contains('>'),
        })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

impl Config {
    fn parse(config: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(config).map_err(|e| err(e.message()))?;
        let url = match &raw.url_env {
            Some(var) => env_secret(NAME, "url_env", var)?,
            None => raw.url.clone(),
        };
        let other_scheme = url.contains("://") && !url.starts_with("nats://");
        if other_scheme || url.contains('@') {
            return Err(err(format!(
                "`url` must look like nats://host[:port], got {url:?} (credentials go in `user`/`password_env`/`token_env`; TLS is not supported)"
            )));
        }
        let auth = match (raw.user, raw.password_env, raw.token_env) {
            (None, None, None) => Auth::None,
            (Some(u), Some(p), None) => {
                Auth::UserPassword(u, env_secret(NAME, "password_env", &p)?)
            }
            (None, None, Some(t)) => Auth::Token(env_secret(NAME, "token_env", &t)?),
            _ => {
                return Err(err(
                    "credentials: set `user` with `password_env`, or `token_env` alone",
                ));
            }
        };
        for s in &raw.subjects {
            if !valid_subject(s) {
                return Err(err(format!(
                    "invalid subject {s:?}: tokens are separated by `.`, `*` fills one token, `>` only the last"
                )));
            }
        }
        let jetstream = match raw.jetstream {
            Some(js) => {
                if !valid_name(&js.stream) {
                    return Err(err(format!("invalid `jetstream.stream` {:?}", js.stream)));
                }
                if !valid_name(&js.durable) {
                    return Err(err(format!("invalid `jetstream.durable` {:?}", js.durable)));
                }
                if raw.subjects.len() > 1 {
                    return Err(err(
                        "with `jetstream`, `subjects` holds at most one filter subject",
                    ));
                }
                if js.ack_wait_secs == 0 {
                    return Err(err("`jetstream.ack_wait_secs` must be at least 1"));
                }
                let deliver = deliver_policy(js.deliver_policy)?;
                Some(JetStream {
                    stream: js.stream,
                    durable: js.durable,
                    filter: raw.subjects.first().cloned(),
                    deliver,
                    ack_wait: Duration::from_secs(js.ack_wait_secs),
                })
            }
            None => {
                if raw.subjects.is_empty() {
                    return Err(err(
                        "nothing to read: set `subjects`, or a `jetstream` consumer",
                    ));
                }
                None
            }
        };
        if raw.subject_field.as_deref() == Some("") {
            return Err(err("`subject_field` must not be empty"));
        }
        raw.reconnect.check(NAME)?;
        let key = parse_key(raw.key, NAME, ".")?;
        Ok(Config {
            url,
            auth,
            subjects: raw.subjects,
            jetstream,
            pipeline: Pipeline::new(NAME, "subject", raw.non_json, raw.subject_field, key),
            reconnect: raw.reconnect,
        })
    }
}

/// One instance.
pub struct NatsSource {
    config: Config,
    wake: Notify,
    /// Notified when the client has closed its connection (after a drain).
    closed: Arc<Notify>,
}

impl NatsSource {
    fn options(&self, host: &Host) -> ConnectOptions {
        let c = &self.config;
        let mut opts = match &c.auth {
            Auth::None => ConnectOptions::new(),
            Auth::UserPassword(u, p) => {
                ConnectOptions::with_user_and_password(u.clone(), p.clone())
            }
            Auth::Token(t) => ConnectOptions::with_token(t.clone()),
        };
        let reconnect = c.reconnect.clone();
        let host = host.clone();
        let url = c.url.clone();
        let was_connected = Arc::new(AtomicBool::new(false));
        // The client reports each message it drops: one line a second.
        let slow = Arc::new(RateLimitedLog::new(Duration::from_secs(1)));
        let closed = self.closed.clone();
        opts = opts
            .name("gateway nats-source")
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .reconnect_delay_callback(move |attempts| {
                // async-nats counts the attempt about to be made (from 1):
                // the first goes at once, then the backoff applies.
                if attempts <= 1 {
                    Duration::ZERO
                } else {
                    reconnect.delay(attempts - 2)
                }
            })
            .event_callback(move |event| {
                let host = host.clone();
                let url = url.clone();
                let was_connected = was_connected.clone();
                let slow = slow.clone();
                let closed = closed.clone();
                async move {
                    match event {
                        Event::Connected => {
                            if was_connected.swap(true, Ordering::SeqCst) {
                                host.info(&format!(
                                    "{NAME}: reconnected to {url}; subscriptions restored"
                                ));
                            } else {
                                host.info(&format!("{NAME}: connected to {url}"));
                            }
                        }
                        Event::Disconnected => host.warn(&format!(
                            "{NAME}: connection to {url} lost; reconnecting with backoff"
                        )),
                        Event::ClientError(e) => {
                            host.warn(&format!("{NAME}: {url}: {e} (retrying with backoff)"))
                        }
                        Event::ServerError(e) => {
                            host.warn(&format!("{NAME}: {url}: server error: {e}"))
                        }
                        Event::SlowConsumer(_) => slow.warn(&host, || format!(
                            "{NAME}: {url}: messages dropped by the client: the gateway's channel does not keep up (slow consumer)"
                        )),
                        Event::Closed => closed.notify_one(),
                        other => host.debug(&format!("{NAME}: {url}: {other}")),
                    }
                }
            });
        opts
    }

    async fn run_loop(&self, out: &Emitter) -> Result<(), PluginError> {
        let c = &self.config;
        let host = out.host().clone();
        let client = tokio::select! {
            r = self.options(&host).connect(c.url.as_str()) => r.map_err(|e| err(format!("connect to {}: {e}", c.url)))?,
            () = self.wake.notified() => return Ok(()),
        };
        let result = match &c.jetstream {
            None => self.core(&client, out).await,
            Some(js) => self.jetstream(&client, js, out).await,
        };
        // Leave cleanly while connected. Acks are only queued for the
        // client's connection task (on this runtime, which ends with `run`):
        // `flush` waits until they are written. Then unsubscribe, so the
        // server sends nothing more into this connection (e.g. to a JetStream
        // pull request), and wait for the connection to close. Bounded, so
        // stop stays prompt.
        if client.connection_state() == State::Connected {
            let leave = async {
                let _ = client.flush().await;
                // The connection's state stays "connected" after a drain;
                // its end is reported as an event.
                if client.drain().await.is_ok() {
                    self.closed.notified().await;
                }
            };
            if tokio::time::timeout(STOP_FLUSH, leave).await.is_err() {
                host.warn(&format!(
                    "{NAME}: the connection to {} did not drain within {STOP_FLUSH:?} of the stop; unacknowledged messages come again after their ack wait",
                    c.url
                ));
            }
        }
        drop(client);
        result
    }

    /// `f`, or None if the instance is stopped first.
    async fn unless_stopped<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        unless_woken(&self.wake, f).await
    }

    async fn core(&self, client: &async_nats::Client, out: &Emitter) -> Result<(), PluginError> {
        let c = &self.config;
        let mut subs = Vec::new();
        for s in &c.subjects {
            let sub = client
                .subscribe(s.clone())
                .await
                .map_err(|e| err(format!("subscribe to {s}: {e}")))?;
            subs.push(sub);
        }
        out.host()
            .info(&format!("{NAME}: subscribed to {:?}", c.subjects));
        let mut all = futures_util::stream::select_all(subs);
        loop {
            if out.is_stopped() {
                return Ok(());
            }
            let msg = tokio::select! {
                m = all.next() => m,
                () = self.wake.notified() => continue,
            };
            let Some(msg) = msg else {
                return Err(err("the subscriptions ended (connection closed)"));
            };
            if c.pipeline
                .deliver(out, msg.subject.as_str(), &msg.payload)?
                == Flow::Stop
            {
                return Ok(());
            }
        }
    }

    async fn jetstream(
        &self,
        client: &async_nats::Client,
        js: &JetStream,
        out: &Emitter,
    ) -> Result<(), PluginError> {
        let c = &self.config;
        let host = out.host();
        let ctx = async_nats::jetstream::new(client.clone());
        let mut backoff = Backoff::new(&c.reconnect);
        loop {
            if out.is_stopped() {
                return Ok(());
            }
            let problem = match self.consume(&ctx, js, out, &mut backoff).await? {
                None => return Ok(()),
                Some(problem) => problem,
            };
            if out.is_stopped() {
                return Ok(());
            }
            let delay = backoff.next_delay();
            host.warn(&format!(
                "{NAME}: JetStream consumer {}/{}: {problem}; retry {} in {delay:?}",
                js.stream,
                js.durable,
                backoff.attempts()
            ));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Read the durable consumer until stopped (`None`) or a problem to retry after.
    async fn consume(
        &self,
        ctx: &async_nats::jetstream::Context,
        js: &JetStream,
        out: &Emitter,
        backoff: &mut Backoff,
    ) -> Result<Option<String>, PluginError> {
        let c = &self.config;
        // Each request below waits up to the client's request timeout (10 s)
        // while the server is unreachable; a stop does not wait for it.
        let Some(stream) = self.unless_stopped(ctx.get_stream(&js.stream)).await else {
            return Ok(None);
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => return Ok(Some(format!("stream {:?}: {e}", js.stream))),
        };
        let config = pull::Config {
            durable_name: Some(js.durable.clone()),
            deliver_policy: js.deliver,
            ack_policy: AckPolicy::Explicit,
            ack_wait: js.ack_wait,
            filter_subject: js.filter.clone().unwrap_or_default(),
            ..Default::default()
        };
        let Some(consumer) = self
            .unless_stopped(stream.get_or_create_consumer(&js.durable, config))
            .await
        else {
            return Ok(None);
        };
        let consumer = match consumer {
            Ok(c) => c,
            Err(e) => return Ok(Some(format!("cannot create or find it: {e}"))),
        };
        // An existing durable consumer is used as the server has it: a
        // changed filter or ack wait in the config would be ignored.
        let have = &consumer.cached_info().config;
        let want_filter = js.filter.as_deref().unwrap_or("");
        if have.filter_subject != want_filter || have.ack_wait != js.ack_wait {
            return Ok(Some(format!(
                "the server's durable consumer has filter subject {:?} and ack wait {:?}, the config {:?} and {:?}; delete the consumer (`nats consumer rm {} {}`) to have it created again, or name another `durable`",
                have.filter_subject, have.ack_wait, want_filter, js.ack_wait, js.stream, js.durable
            )));
        }
        let Some(messages) = self.unless_stopped(consumer.messages()).await else {
            return Ok(None);
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => return Ok(Some(format!("cannot pull: {e}"))),
        };
        out.host().info(&format!(
            "{NAME}: reading JetStream consumer {}/{}",
            js.stream, js.durable
        ));
        let mut healthy = false;
        loop {
            if out.is_stopped() {
                return Ok(None);
            }
            let item = tokio::select! {
                m = messages.next() => m,
                () = self.wake.notified() => continue,
            };
            match item {
                None => return Ok(Some("the message stream ended".into())),
                Some(Err(e)) => return Ok(Some(e.to_string())),
                Some(Ok(msg)) => {
                    if !healthy {
                        healthy = true;
                        backoff.reset();
                    }
                    if c.pipeline
                        .deliver(out, msg.subject.as_str(), &msg.payload)?
                        == Flow::Stop
                    {
                        // Not taken (the instance is stopping): a negative
                        // ack sends it again at once, to the next instance,
                        // instead of after the ack wait.
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return Ok(None);
                    }
                    if let Err(e) = msg.ack().await {
                        out.host().warn(&format!(
                            "{NAME}: ack failed ({e}); the message may be delivered again"
                        ));
                    }
                }
            }
        }
    }
}

impl Plugin for NatsSource {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        Ok(NatsSource {
            config: Config::parse(config)?,
            wake: Notify::new(),
            closed: Arc::new(Notify::new()),
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

plugin_api::export_plugin!(NatsSource, name = "nats-source", modes = [push, keyed]);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subjects() {
        for ok in ["a", "a.b", "a.*.c", "a.>", ">", "*"] {
            assert!(valid_subject(ok), "{ok}");
        }
        for bad in ["", "a..b", "a.>.c", "a b", "a*", "a.b>"] {
            assert!(!valid_subject(bad), "{bad}");
        }
    }

    #[test]
    fn config_parses() {
        let c = Config::parse(json!({"subjects": ["a.*"], "key": {"segment": 2}})).unwrap();
        assert_eq!(c.url, "nats://127.0.0.1:4222");
        assert!(c.jetstream.is_none());
        assert!(c.pipeline.keyed());
        let c = Config::parse(json!({
            "subjects": ["orders.>"],
            "jetstream": {"stream": "ORDERS", "durable": "gw", "deliver_policy": {"start_sequence": 5}}
        }))
        .unwrap();
        let js = c.jetstream.unwrap();
        assert_eq!(js.filter.as_deref(), Some("orders.>"));
        assert_eq!(
            js.deliver,
            DeliverPolicy::ByStartSequence { start_sequence: 5 }
        );
        let c = Config::parse(
            json!({"jetstream": {"stream": "S", "durable": "d", "deliver_policy": "new"}}),
        )
        .unwrap();
        assert_eq!(c.jetstream.unwrap().deliver, DeliverPolicy::New);
    }

    #[test]
    fn config_errors() {
        for (v, expect) in [
            (json!({}), "nothing to read"),
            (json!({"subjects": ["a..b"]}), "invalid subject"),
            (
                json!({"subjects": ["a"], "subject": "x"}),
                "unknown field `subject`",
            ),
            (json!({"subjects": ["a"], "url": "http://x"}), "nats://host"),
            (
                json!({"subjects": ["a"], "url": "nats://u:p@x"}),
                "nats://host",
            ),
            (json!({"subjects": ["a"], "user": "u"}), "credentials"),
            (
                json!({"subjects": ["a"], "token_env": "GW_TEST_UNSET_VAR_XYZ"}),
                "GW_TEST_UNSET_VAR_XYZ",
            ),
            (
                json!({"jetstream": {"stream": "S"}}),
                "missing field `durable`",
            ),
            (
                json!({"jetstream": {"stream": "a.b", "durable": "d"}}),
                "jetstream.stream",
            ),
            (
                json!({"subjects": ["a", "b"], "jetstream": {"stream": "S", "durable": "d"}}),
                "at most one filter",
            ),
            (
                json!({"jetstream": {"stream": "S", "durable": "d", "deliver_policy": "first"}}),
                "`jetstream.deliver_policy` must be",
            ),
            (
                json!({"jetstream": {"stream": "S", "durable": "d", "deliver_policy": {"start_sequence": 0}}}),
                "`jetstream.deliver_policy` must be",
            ),
            (
                json!({"jetstream": {"stream": "S", "durable": "d", "ack_wait_secs": 0}}),
                "ack_wait_secs",
            ),
        ] {
            let e = Config::parse(v.clone()).unwrap_err().message().to_owned();
            assert!(e.contains(expect), "{v}: {e}");
            assert!(e.starts_with("nats-source: "), "{e}");
        }
    }

    #[test]
    fn logs_the_failure_and_stops_promptly_while_the_service_is_unreachable() {
        stops_promptly_while_unreachable(json!({"subjects": ["a"]}));
    }

    /// JetStream's setup requests wait up to 10 s each for an unreachable
    /// server; a stop does not wait for them.
    #[test]
    fn jetstream_stops_promptly_while_the_service_is_unreachable() {
        stops_promptly_while_unreachable(json!({"jetstream": {"stream": "S", "durable": "d"}}));
    }

    fn stops_promptly_while_unreachable(mut config: Value) {
        // Port 9 (discard) on loopback: nothing listens, connecting fails at once.
        config["url"] = json!("nats://127.0.0.1:9");
        config["reconnect"] = json!({"initial_ms": 10000, "max_ms": 10000});
        let host = plugin_api::testing::TestHost::new();
        let plugin = NatsSource::create(config, host.host()).unwrap();
        let out = host.emitter();
        std::thread::scope(|s| {
            let run = s.spawn(|| plugin.run(out));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !host.logs().iter().any(|(_, l)| l.contains("127.0.0.1:9")) {
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
