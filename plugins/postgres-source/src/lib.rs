//! `postgres-source`: LISTEN on PostgreSQL channels and emit each NOTIFY
//! payload (push, keyed). Library `libpostgres_source.so`. Uses
//! `tokio-postgres` on a current-thread tokio runtime that lives on the
//! plugin's run thread; the plugin's `stop` wakes it at once.
//!
//! When the connection fails the run loop logs the loss, reconnects with
//! exponential backoff and jitter (`reconnect`), LISTENs again and logs the
//! recovery. PostgreSQL keeps no notifications for a session that is not
//! listening, so a NOTIFY sent while the plugin is disconnected is lost.
//! Every `health_check_secs` the plugin sends an empty query; no answer
//! within 5 s counts as a lost connection (a server or path gone silent).
//! Connecting, including the startup exchange and LISTEN, is bounded by the
//! connect timeout plus 5 s. Ending a session closes its socket at once.
//!
//! Config (a JSON object; unknown keys are an error):
//! - `connection` (string, default `host=127.0.0.1 user=postgres`): a libpq
//!   style connection string (`host=... port=... user=... dbname=...`) or URL
//!   (`postgresql://user@host:port/db`);
//! - `connection_env` (string): name of an environment variable holding the
//!   connection string (overrides `connection`; must be set);
//! - `password_env` (string): name of an environment variable holding the password;
//! - `channels` (list of strings, required): the channels to LISTEN on (any
//!   name; quoted for you, so case is kept);
//! - `non_json` (`drop` | `wrap`, default `drop`): a payload that is not JSON
//!   is dropped and logged, or wrapped as `{"channel": ..., "payload": "<text>"}`;
//! - `channel_field` (string): inject the channel into the message object under this name;
//! - `key` (object): keyed channels: `{field: NAME}` of the payload, or
//!   `{segment: N}` / `{segments: [..]}` / `{whole: true}` of the channel
//!   name (separator `.`);
//! - `health_check_secs` (integer ≥ 1, default 30);
//! - `reconnect` (`{initial_ms, max_ms}`, default 100 / 10000).

#![forbid(unsafe_code)]

use std::time::Duration;

use futures_util::StreamExt;
use plugin_api::{Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::Value;
use source_common::{
    Backoff, Flow, NonJson, Pipeline, Reconnect, block_on_own_runtime, env_secret, parse_key,
    unless_woken,
};
use tokio::sync::{Notify, mpsc};
use tokio_postgres::{AsyncMessage, NoTls, Notification};

const NAME: &str = "postgres-source";

/// How long the server may take to answer (startup, LISTEN, health check).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Notifications read from the socket ahead of the gateway. When they are
/// not taken, the plugin stops reading and the server keeps the rest.
const READ_AHEAD: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    connection: String,
    connection_env: Option<String>,
    password_env: Option<String>,
    channels: Vec<String>,
    non_json: NonJson,
    channel_field: Option<String>,
    key: Option<Value>,
    health_check_secs: u64,
    reconnect: Reconnect,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            connection: "host=127.0.0.1 user=postgres".into(),
            connection_env: None,
            password_env: None,
            channels: Vec::new(),
            non_json: NonJson::Drop,
            channel_field: None,
            key: None,
            health_check_secs: 30,
            reconnect: Reconnect::default(),
        }
    }
}

fn err(msg: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("{NAME}: {msg}"))
}

/// `LISTEN "name"` with the name quoted as an identifier.
fn listen_sql(channels: &[String]) -> String {
    channels
        .iter()
        .map(|c| format!("LISTEN \"{}\";", c.replace('"', "\"\"")))
        .collect()
}

#[derive(Debug)]
struct Config {
    pg: tokio_postgres::Config,
    address: String,
    channels: Vec<String>,
    pipeline: Pipeline,
    health_check: Duration,
    reconnect: Reconnect,
}

impl Config {
    fn parse(config: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(config).map_err(|e| err(e.message()))?;
        let text = match &raw.connection_env {
            Some(var) => env_secret(NAME, "connection_env", var)?,
            None => raw.connection.clone(),
        };
        let mut pg: tokio_postgres::Config = text
            .parse()
            .map_err(|e| err(format!("invalid `connection`: {e}")))?;
        if let Some(var) = &raw.password_env {
            pg.password(env_secret(NAME, "password_env", var)?);
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        if pg.get_user().is_none() {
            return Err(err("`connection` names no user (add user=...)"));
        }
        if pg.get_hosts().is_empty() {
            return Err(err("`connection` names no host (add host=...)"));
        }
        if raw.channels.is_empty() || raw.channels.iter().any(String::is_empty) {
            return Err(err(
                "`channels` must list at least one non-empty channel name",
            ));
        }
        if raw.channel_field.as_deref() == Some("") {
            return Err(err("`channel_field` must not be empty"));
        }
        if raw.health_check_secs == 0 {
            return Err(err("`health_check_secs` must be at least 1"));
        }
        raw.reconnect.check(NAME)?;
        let key = parse_key(raw.key, NAME, ".")?;
        let host = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let address = format!(
            "{host}:{port} (user {}, database {})",
            pg.get_user().unwrap_or(""),
            pg.get_dbname().or(pg.get_user()).unwrap_or("")
        );
        Ok(Config {
            pg,
            address,
            channels: raw.channels,
            pipeline: Pipeline::new(NAME, "channel", raw.non_json, raw.channel_field, key),
            health_check: Duration::from_secs(raw.health_check_secs),
            reconnect: raw.reconnect,
        })
    }
}

/// One instance.
pub struct PostgresSource {
    config: Config,
    /// Woken by `stop`.
    wake: Notify,
}

enum End {
    Stopped,
    Lost(String),
}

impl PostgresSource {
    /// `f`, or None if the instance is stopped first.
    async fn unless_stopped<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        unless_woken(&self.wake, f).await
    }

    /// Connect, LISTEN and relay until stopped or the connection fails.
    /// Returning drops the client and the connection: the socket is closed
    /// at once, whatever the server does.
    async fn session(
        &self,
        out: &Emitter,
        connected: &mut dyn FnMut(),
    ) -> Result<End, PluginError> {
        let c = &self.config;
        let limit =
            c.pg.get_connect_timeout()
                .copied()
                .unwrap_or(ANSWER_TIMEOUT)
                + ANSWER_TIMEOUT;
        let (client, mut connection) = match self
            .unless_stopped(tokio::time::timeout(limit, c.pg.connect(NoTls)))
            .await
        {
            None => return Ok(End::Stopped),
            Some(Err(_)) => return Ok(End::Lost(format!("no answer within {limit:?}"))),
            Some(Ok(Err(e))) => return Ok(End::Lost(e.to_string())),
            Some(Ok(Ok(pair))) => pair,
        };
        // The connection is driven by its own task: it reads notifications
        // (and the answers to the client's queries) off the socket.
        let (tx, mut rx) = mpsc::channel::<Result<Notification, String>>(READ_AHEAD);
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                let item = match m {
                    Ok(AsyncMessage::Notification(n)) => Ok(n),
                    Ok(_) => continue,
                    Err(e) => Err(e.to_string()),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        let end = self.listen(&client, &mut rx, out, connected).await;
        driver.abort();
        end
    }

    async fn listen(
        &self,
        client: &tokio_postgres::Client,
        rx: &mut mpsc::Receiver<Result<Notification, String>>,
        out: &Emitter,
        connected: &mut dyn FnMut(),
    ) -> Result<End, PluginError> {
        let c = &self.config;
        let sql = listen_sql(&c.channels);
        let listen = tokio::time::timeout(ANSWER_TIMEOUT, client.batch_execute(&sql));
        match self.unless_stopped(listen).await {
            None => return Ok(End::Stopped),
            Some(Err(_)) => {
                return Ok(End::Lost(format!(
                    "LISTEN: no answer within {ANSWER_TIMEOUT:?}"
                )));
            }
            Some(Ok(Err(e))) => return Ok(End::Lost(e.to_string())),
            Some(Ok(Ok(()))) => {}
        }
        connected();
        let mut health = tokio::time::interval(c.health_check);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await;
        loop {
            if out.is_stopped() {
                return Ok(End::Stopped);
            }
            tokio::select! {
                () = self.wake.notified() => continue,
                n = rx.recv() => match n {
                    Some(Ok(n)) => {
                        if c.pipeline.deliver(out, n.channel(), n.payload().as_bytes())? == Flow::Stop {
                            return Ok(End::Stopped);
                        }
                    }
                    Some(Err(e)) => return Ok(End::Lost(e)),
                    None => return Ok(End::Lost("the server closed the connection".into())),
                },
                _ = health.tick() => {
                    let check = tokio::time::timeout(ANSWER_TIMEOUT, client.simple_query(""));
                    match self.unless_stopped(check).await {
                        None => return Ok(End::Stopped),
                        Some(Err(_)) => {
                            return Ok(End::Lost(format!(
                                "health check: no answer within {ANSWER_TIMEOUT:?}"
                            )));
                        }
                        Some(Ok(Err(e))) => return Ok(End::Lost(format!("health check failed: {e}"))),
                        Some(Ok(Ok(_))) => {}
                    }
                }
            }
        }
    }

    async fn run_loop(&self, out: &Emitter) -> Result<(), PluginError> {
        let host = out.host().clone();
        let c = &self.config;
        let mut backoff = Backoff::new(&c.reconnect);
        let mut ever_connected = false;
        loop {
            if out.is_stopped() {
                return Ok(());
            }
            let mut connected = || {
                if ever_connected {
                    host.info(&format!(
                        "{NAME}: reconnected to {} after {} attempt(s); listening on {:?} again",
                        c.address,
                        backoff.attempts(),
                        c.channels
                    ));
                } else {
                    host.info(&format!(
                        "{NAME}: connected to {}; listening on {:?}",
                        c.address, c.channels
                    ));
                }
                ever_connected = true;
                backoff.reset();
            };
            let failure = match self.session(out, &mut connected).await? {
                End::Stopped => return Ok(()),
                End::Lost(e) => e,
            };
            if out.is_stopped() {
                return Ok(());
            }
            let delay = backoff.next_delay();
            if backoff.attempts() == 1 && ever_connected {
                host.warn(&format!(
                    "{NAME}: connection to {} lost: {failure}; reconnecting in {delay:?}",
                    c.address
                ));
            } else {
                host.warn(&format!(
                    "{NAME}: cannot connect to {}: {failure}; retry {} in {delay:?}",
                    c.address,
                    backoff.attempts()
                ));
            }
            if self
                .unless_stopped(tokio::time::sleep(delay))
                .await
                .is_none()
            {
                return Ok(());
            }
        }
    }
}

impl Plugin for PostgresSource {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        Ok(PostgresSource {
            config: Config::parse(config)?,
            wake: Notify::new(),
        })
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        block_on_own_runtime(NAME, self.run_loop(&out))
    }

    fn stop(&self) {
        self.wake.notify_one();
    }

    fn open_key(&self, key: &str, _params: Value) -> Result<(), PluginError> {
        self.config.pipeline.open_key(key);
        Ok(())
    }

    fn close_key(&self, key: &str) {
        self.config.pipeline.close_key(key);
    }
}

plugin_api::export_plugin!(
    PostgresSource,
    name = "postgres-source",
    modes = [push, keyed]
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listen_quotes_names() {
        assert_eq!(
            listen_sql(&["a".into(), "My \"X\"".into()]),
            "LISTEN \"a\";LISTEN \"My \"\"X\"\"\";"
        );
    }

    #[test]
    fn config_parses() {
        let c = Config::parse(json!({"channels": ["events"]})).unwrap();
        assert_eq!(
            c.address,
            "127.0.0.1:5432 (user postgres, database postgres)"
        );
        let c = Config::parse(json!({
            "connection": "postgresql://app@db.example:6432/shop",
            "channels": ["orders"],
            "key": {"field": "customer"}
        }))
        .unwrap();
        assert_eq!(c.address, "db.example:6432 (user app, database shop)");
        assert!(c.pipeline.keyed());
    }

    #[test]
    fn config_errors() {
        for (v, expect) in [
            (json!({}), "`channels` must list"),
            (json!({"channels": [""]}), "`channels` must list"),
            (
                json!({"channels": ["a"], "connection": "host=h"}),
                "names no user",
            ),
            (
                json!({"channels": ["a"], "connection": "bogus"}),
                "invalid `connection`",
            ),
            (
                json!({"channels": ["a"], "chanels": ["a"]}),
                "unknown field `chanels`",
            ),
            (
                json!({"channels": ["a"], "connection_env": "GW_TEST_UNSET_VAR_XYZ"}),
                "GW_TEST_UNSET_VAR_XYZ",
            ),
            (
                json!({"channels": ["a"], "health_check_secs": 0}),
                "health_check_secs",
            ),
            (json!({"channels": ["a"], "key": {}}), "exactly one of"),
        ] {
            let e = Config::parse(v.clone()).unwrap_err().message().to_owned();
            assert!(e.contains(expect), "{v}: {e}");
            assert!(e.starts_with("postgres-source: "), "{e}");
        }
    }

    #[test]
    fn logs_the_failure_and_stops_promptly_while_the_service_is_unreachable() {
        // Port 9 (discard) on loopback: nothing listens, connecting fails at once.
        let host = plugin_api::testing::TestHost::new();
        let plugin = PostgresSource::create(json!({"connection": "host=127.0.0.1 port=9 user=postgres", "channels": ["a"], "reconnect": {"initial_ms": 10000, "max_ms": 10000}}), host.host()).unwrap();
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
