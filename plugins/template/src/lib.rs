//! `template`: a plugin to copy. It works in both source modes and emits
//! `{"greeting": "<config.greeting>", "count": <n>}`:
//!
//! - poll mode: one message per poll;
//! - push mode: one message every `every` (a duration), from the run thread.
//!
//! To start a plugin of your own:
//! 1. copy `plugins/template` to `plugins/<your-name>`;
//! 2. in its `Cargo.toml`, set `name` (the library becomes `lib<name>.so`,
//!    dashes turned into underscores) and `description`;
//! 3. add `"plugins/<your-name>"` to `members` in the root `Cargo.toml`;
//! 4. rename the type, change `name = "template"` in `export_plugin!` below
//!    to the same name, and keep only the modes you implement;
//! 5. replace `Config` and the message; keep the tests running
//!    (`cargo test -p <your-name>`), then `cargo build -p <your-name>` and
//!    point a channel spec's `source.plugin` at it.
//!
//! Config (a JSON object; every key optional, unknown keys are an error):
//! - `greeting` (string, default `"hello"`);
//! - `every` (duration, default `1s`; push mode only).

// The SDK holds all the `unsafe` code; a plugin needs none.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Value, json};

/// The config as written in the channel spec's `source.config`.
/// `deny_unknown_fields` turns a typo into a loud `create` error; `default`
/// fills keys that are missing from `Default` below.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    greeting: String,
    every: String,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            greeting: "hello".into(),
            every: "1s".into(),
        }
    }
}

/// The checked config: do checks serde can't express here, once, in `create`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Text put in every message.
    pub greeting: String,
    /// Push mode: time between messages.
    pub every: Duration,
}

impl Config {
    /// Parse and check a config.
    pub fn parse(config: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(config)?;
        let every = humantime::parse_duration(&raw.every).map_err(|e| {
            PluginError::new(format!(
                "template: `every` {:?} is not a duration like 500ms or 2s: {e}",
                raw.every
            ))
        })?;
        if every.is_zero() {
            return Err("template: `every` must be more than 0".into());
        }
        Ok(Config {
            greeting: raw.greeting,
            every,
        })
    }
}

/// One instance, created for one channel. Methods take `&self` and may run
/// on different threads at once, so mutable state lives in atomics or a
/// `Mutex`.
pub struct Template {
    config: Config,
    /// Messages emitted so far.
    count: AtomicU64,
    /// For logging (`host.info`, `host.warn`, ...); optional.
    host: Host,
}

impl Template {
    fn next_message(&self) -> Value {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        json!({ "greeting": self.config.greeting, "count": n })
    }
}

impl Plugin for Template {
    /// Called once per channel (and again after every restart). A returned
    /// error is logged by the gateway and the instance is retried with backoff.
    fn create(config: Value, host: Host) -> Result<Self, PluginError> {
        let config = Config::parse(config)?;
        host.debug(&format!("template: created with {config:?}"));
        Ok(Template {
            config,
            count: AtomicU64::new(0),
            host,
        })
    }

    /// Poll mode: the gateway calls this every `source.interval`, on a
    /// blocking thread (blocking I/O is fine). Emit zero or more messages.
    /// Returning `Err` counts as a plugin failure and restarts the instance:
    /// for an upstream problem, log it and return `Ok(())` instead.
    fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        match out.emit_json("", &self.next_message()) {
            // Stopped: the gateway is stopping this instance; just return.
            Ok(()) | Err(EmitError::Stopped) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Push mode: runs once, on a thread the SDK owns. Return soon after a
    /// stop: `wait_stopped` sleeps but wakes at once on stop, and `emit`
    /// answers `Err(Stopped)`. Returning `Ok` by itself ends the channel's
    /// source for good; `Err` restarts it with backoff.
    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        self.host.info("template: push loop started");
        loop {
            match out.emit_json("", &self.next_message()) {
                Ok(()) => {}
                Err(EmitError::Stopped) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            if out.wait_stopped(self.config.every) {
                return Ok(());
            }
        }
    }
}

// Exports the C entry symbol `gw_plugin_entry_v1`. `name` is what channel
// specs put in `source.plugin`; list exactly the modes implemented above.
plugin_api::export_plugin!(Template, name = "template", modes = [poll, push]);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::abi::GW_OK;
    use plugin_api::testing::{Loaded, TestHost};

    #[test]
    fn config_defaults_and_errors() {
        let c = Config::parse(Value::Null).unwrap();
        assert_eq!(c.greeting, "hello");
        assert_eq!(c.every, Duration::from_secs(1));
        let c = Config::parse(json!({"every": "250ms", "greeting": "hi"})).unwrap();
        assert_eq!(c.every, Duration::from_millis(250));
        for (config, expect) in [
            (json!({"every": "soon"}), "is not a duration"),
            (json!({"every": "0s"}), "must be more than 0"),
            (json!({"greting": "typo"}), "unknown field `greting`"),
        ] {
            let e = Config::parse(config).unwrap_err();
            assert!(e.message().contains(expect), "{e}");
        }
    }

    /// Poll: call the trait method directly with a `TestHost` emitter.
    #[test]
    fn each_poll_emits_one_counted_message() {
        let host = TestHost::new();
        let p = Template::create(json!({"greeting": "hi"}), host.host()).unwrap();
        p.poll(None, &host.emitter()).unwrap();
        p.poll(None, &host.emitter()).unwrap();
        let got: Vec<Value> = host.json_messages().into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            got,
            [
                json!({"greeting": "hi", "count": 1}),
                json!({"greeting": "hi", "count": 2})
            ]
        );
    }

    /// Push: drive the exported table through the real ABI shims, as the
    /// gateway does: start, wait for messages, stop.
    #[test]
    fn push_emits_until_stopped() {
        let host = TestHost::new();
        let inst = Loaded::of::<Template>()
            .create(&host, r#"{"every":"10ms"}"#)
            .unwrap();
        assert_eq!(inst.start(), (GW_OK, String::new()));
        assert!(host.wait_for_messages(3, Duration::from_secs(20)));
        inst.stop();
        let n = host.message_count();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(host.message_count(), n, "nothing is emitted after stop");
        assert!(host.exits().is_empty(), "a stop is not an exit");
    }
}
