//! `ticker`: numbered messages at a fixed rate (push + command).
//!
//! Emits on the channel's own stream, from its run thread:
//!
//! ```json
//! {"seq":1,"ts":1735732800123456789,"pad":"xxxx"}
//! ```
//!
//! `seq` starts at 1 and increases by one per message (a restarted instance
//! starts again at 1); `ts` is the time the message was due by the schedule
//! below, in nanoseconds since the UNIX epoch (integer), so that latency
//! measured from it includes any time the ticker fell behind (no coordinated
//! omission); `pad` is `pad` bytes of `x`, omitted when `pad` is 0. The
//! first message is sent at once; message `n` is due `(n - 1) / rate` seconds
//! after the start, and every due message is sent (late ones in a burst, so
//! the average rate does not drift, up to about 1e6 messages/s). The run loop
//! reacts to stop at once at any rate. The JSON Schema is
//! `channel-specs/schemas/ticker.json`.
//!
//! Config (a JSON object; every key optional, unknown keys are an error):
//! - `rate` (number > 0, default 1): messages per second, fractions allowed;
//! - `rate_env` (string): name of an environment variable that, when set when
//!   the instance is created, overrides `rate` (same rules);
//! - `pad` (integer 0 to 16 MiB, default 0): padding length;
//! - `limit` (integer ≥ 1): after that many messages the run loop finishes
//!   (reported to the host as a normal exit);
//! - `paused` (boolean, default false): the run loop waits for the `resume`
//!   command before its first message, and the rate's clock starts then (for
//!   tests and benchmarks that connect every client before the stream starts).
//!
//! Commands: `{"op":"status"}` answers `{"seq": <last emitted seq, 0 before
//! the first>, "paused": bool}`; `{"op":"resume"}` starts a paused instance
//! (no effect otherwise) and answers `{"resumed": true}`.

#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Value, json};

/// The plugin config as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    rate: f64,
    rate_env: Option<String>,
    pad: usize,
    limit: Option<u64>,
    paused: bool,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            rate: 1.0,
            rate_env: None,
            pad: 0,
            limit: None,
            paused: false,
        }
    }
}

/// Largest accepted padding (16 MiB: large enough for a message no socket
/// buffer holds, in tests of stalled clients).
const MAX_PAD: usize = 16 << 20;

/// The checked config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Messages per second (> 0, finite).
    pub rate: f64,
    /// Padding length.
    pub pad: usize,
    /// Stop after this many messages.
    pub limit: Option<u64>,
    /// Wait for the `resume` command before the first message.
    pub paused: bool,
}

fn check_rate(rate: f64, origin: &str) -> Result<f64, PluginError> {
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(PluginError::new(format!(
            "ticker: {origin} must be a number > 0, got {rate}"
        )))
    }
}

impl Config {
    /// Parse and check a config; `env` looks up environment variables.
    pub fn parse(
        config: Value,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(config)?;
        let mut rate = check_rate(raw.rate, "`rate`")?;
        if let Some(name) = &raw.rate_env {
            if name.is_empty() {
                return Err("ticker: `rate_env` must not be empty".into());
            }
            if let Some(value) = env(name) {
                let parsed: f64 = value.trim().parse().map_err(|_| {
                    PluginError::new(format!(
                        "ticker: environment variable {name}={value:?} (from `rate_env`) is not a number"
                    ))
                })?;
                rate = check_rate(parsed, &format!("environment variable {name} (`rate_env`)"))?;
            }
        }
        if raw.pad > MAX_PAD {
            return Err(PluginError::new(format!(
                "ticker: `pad` must be at most {MAX_PAD}, got {}",
                raw.pad
            )));
        }
        if raw.limit == Some(0) {
            return Err("ticker: `limit` must be at least 1".into());
        }
        Ok(Config {
            rate,
            pad: raw.pad,
            limit: raw.limit,
            paused: raw.paused,
        })
    }
}

/// One instance.
pub struct Ticker {
    config: Config,
    /// Last emitted seq.
    seq: AtomicU64,
    /// Waiting for the `resume` command.
    paused: AtomicBool,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Longest sleep between checks; stop wakes the sleep at once anyway.
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// How often a paused instance looks for `resume`.
const PAUSE_CHECK: Duration = Duration::from_millis(2);

impl Ticker {
    /// Messages due `elapsed` after the start (the first is due at once).
    fn due(&self, elapsed: Duration) -> u64 {
        let due = (elapsed.as_secs_f64() * self.config.rate).floor() + 1.0;
        let due = if due >= u64::MAX as f64 {
            u64::MAX
        } else {
            due as u64
        };
        self.config.limit.map_or(due, |limit| due.min(limit))
    }

    /// When message `seq + 1` is due, relative to the start.
    fn next_due(&self, seq: u64) -> Duration {
        Duration::try_from_secs_f64(seq as f64 / self.config.rate).unwrap_or(Duration::MAX)
    }
}

impl Plugin for Ticker {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        let config = Config::parse(config, |name| std::env::var(name).ok())?;
        Ok(Ticker {
            paused: AtomicBool::new(config.paused),
            config,
            seq: AtomicU64::new(0),
        })
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        while self.paused.load(Ordering::Acquire) {
            if out.wait_stopped(PAUSE_CHECK) {
                return Ok(());
            }
        }
        out.host().info(&format!(
            "emitting {} messages per second",
            self.config.rate
        ));
        let pad = "x".repeat(self.config.pad);
        let mut buf: Vec<u8> = Vec::with_capacity(64 + pad.len());
        let start = Instant::now();
        let start_ns = now_ns();
        let mut seq = 0u64;
        loop {
            let due = self.due(start.elapsed());
            while seq < due {
                seq += 1;
                buf.clear();
                // Writing into a Vec cannot fail.
                // `ts` is when the message was due, not when it was built:
                // a source that falls behind shows in the latency measured
                // from it (no coordinated omission).
                let ts = start_ns.saturating_add(
                    u64::try_from(self.next_due(seq - 1).as_nanos()).unwrap_or(u64::MAX),
                );
                let _ = write!(buf, "{{\"seq\":{seq},\"ts\":{ts}");
                if !pad.is_empty() {
                    let _ = write!(buf, ",\"pad\":\"{pad}\"");
                }
                buf.push(b'}');
                match out.emit("", &buf) {
                    Ok(()) => self.seq.store(seq, Ordering::Relaxed),
                    Err(EmitError::Stopped) => return Ok(()),
                    Err(e) => return Err(PluginError::new(format!("ticker: emit failed: {e}"))),
                }
            }
            if self.config.limit.is_some_and(|limit| seq >= limit) {
                return Ok(());
            }
            let wait = self
                .next_due(seq)
                .saturating_sub(start.elapsed())
                .min(MAX_SLEEP);
            if out.wait_stopped(wait) {
                return Ok(());
            }
        }
    }

    fn command(&self, request: Value) -> Result<Value, PluginError> {
        match request.get("op").and_then(Value::as_str) {
            Some("status") => Ok(json!({
                "seq": self.seq.load(Ordering::Relaxed),
                "paused": self.paused.load(Ordering::Acquire),
            })),
            Some("resume") => {
                self.paused.store(false, Ordering::Release);
                Ok(json!({ "resumed": true }))
            }
            _ => Err(PluginError::new(format!(
                "ticker: unknown command {request}; expected {{\"op\":\"status\"}} or {{\"op\":\"resume\"}}"
            ))),
        }
    }
}

plugin_api::export_plugin!(Ticker, name = "ticker", modes = [push, command]);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::abi::{GW_ERROR, GW_OK, GW_REJECTED};
    use plugin_api::testing::{Loaded, TestHost};

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn ticker(config: Value) -> Ticker {
        let config = Config::parse(config, no_env).unwrap();
        Ticker {
            paused: AtomicBool::new(config.paused),
            config,
            seq: AtomicU64::new(0),
        }
    }

    fn validator() -> jsonschema::Validator {
        let schema: Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../channel-specs/schemas/ticker.json"
        )))
        .unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    }

    #[test]
    fn config_defaults_and_errors() {
        let c = Config::parse(Value::Null, no_env).unwrap();
        assert_eq!(
            c,
            Config {
                rate: 1.0,
                pad: 0,
                limit: None,
                paused: false,
            }
        );
        let c = Config::parse(
            json!({"rate": 2.5, "pad": 3, "limit": 7, "paused": true}),
            no_env,
        )
        .unwrap();
        assert_eq!((c.rate, c.pad, c.limit, c.paused), (2.5, 3, Some(7), true));
        for (config, expect) in [
            (json!({"rate": 0}), "`rate` must be a number > 0"),
            (json!({"rate": -1}), "`rate` must be a number > 0"),
            (json!({"rate": "fast"}), "invalid type"),
            (json!({"pad": -1}), "invalid value"),
            (json!({"pad": 20_000_000}), "`pad` must be at most"),
            (json!({"limit": 0}), "`limit` must be at least 1"),
            (json!({"rate_env": ""}), "`rate_env` must not be empty"),
            (json!({"speed": 1}), "unknown field `speed`"),
            (json!([1]), "expected a JSON object"),
        ] {
            let err = Config::parse(config.clone(), no_env).unwrap_err();
            assert!(err.message().contains(expect), "{config}: {err}");
        }
    }

    #[test]
    fn rate_env_overrides_rate() {
        let env = |name: &str| (name == "TICKER_RATE").then(|| " 250 ".to_owned());
        let c = Config::parse(json!({"rate": 2, "rate_env": "TICKER_RATE"}), env).unwrap();
        assert_eq!(c.rate, 250.0);
        let c = Config::parse(json!({"rate": 2, "rate_env": "UNSET_VAR"}), env).unwrap();
        assert_eq!(c.rate, 2.0);
        let bad = |_: &str| Some("lots".to_owned());
        let err = Config::parse(json!({"rate_env": "R"}), bad).unwrap_err();
        assert!(err.message().contains("R=\"lots\""), "{err}");
        let zero = |_: &str| Some("0".to_owned());
        let err = Config::parse(json!({"rate_env": "R"}), zero).unwrap_err();
        assert!(err.message().contains("must be a number > 0"), "{err}");
    }

    #[test]
    fn messages_are_numbered_and_valid() {
        let host = TestHost::new();
        let t = ticker(json!({"rate": 1000, "limit": 50, "pad": 5}));
        t.run(host.emitter()).unwrap();
        let validator = validator();
        let messages = host.json_messages();
        assert_eq!(messages.len(), 50);
        let mut last_ts = 0;
        for (i, (key, m)) in messages.iter().enumerate() {
            assert_eq!(key, "");
            assert!(validator.is_valid(m), "{m}");
            assert_eq!(m["seq"], json!(i + 1));
            assert_eq!(m["pad"], json!("xxxxx"));
            let ts = m["ts"].as_u64().unwrap();
            assert!(ts >= last_ts);
            last_ts = ts;
        }
        assert_eq!(
            t.command(json!({"op": "status"})).unwrap(),
            json!({"seq": 50, "paused": false})
        );
    }

    /// `ts` is each message's due time by the schedule, not when it was
    /// built: at 1000/s they are exactly 1 ms apart, however the thread ran.
    #[test]
    fn ts_is_the_due_time() {
        let host = TestHost::new();
        ticker(json!({"rate": 1000, "limit": 30}))
            .run(host.emitter())
            .unwrap();
        let ts: Vec<u64> = host
            .json_messages()
            .iter()
            .map(|(_, m)| m["ts"].as_u64().unwrap())
            .collect();
        assert_eq!(ts.len(), 30);
        for (n, t) in ts.iter().enumerate() {
            let off = (t - ts[0]) as i64 - n as i64 * 1_000_000;
            assert!(
                off.abs() <= 1,
                "message {}: {off} ns off its due time",
                n + 1
            );
        }
    }

    #[test]
    fn pad_omitted_when_zero() {
        let host = TestHost::new();
        ticker(json!({"rate": 100, "limit": 1}))
            .run(host.emitter())
            .unwrap();
        let (_, text) = &host.messages()[0];
        assert!(text.starts_with(r#"{"seq":1,"ts":"#), "{text}");
        assert!(!text.contains("pad"));
        assert!(validator().is_valid(&serde_json::from_str(text).unwrap()));
    }

    #[test]
    fn pacing_is_accurate() {
        let host = TestHost::new();
        // 200 messages at 1000/s: the last is due at 199 ms.
        let t0 = Instant::now();
        ticker(json!({"rate": 1000, "limit": 200}))
            .run(host.emitter())
            .unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(195), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(host.message_count(), 200);
    }

    #[test]
    fn high_rate_does_not_drift() {
        let host = TestHost::new();
        // 100k messages at 1e6/s: due within 100 ms; allow for a slow debug build.
        let t0 = Instant::now();
        ticker(json!({"rate": 1e6, "limit": 100_000}))
            .run(host.emitter())
            .unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(99), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(host.message_count(), 100_000);
    }

    #[test]
    fn paused_waits_for_resume_and_starts_its_clock_then() {
        let host = TestHost::new();
        let t = ticker(json!({"rate": 1000, "limit": 5, "paused": true}));
        let out = host.emitter();
        std::thread::scope(|s| {
            let run = s.spawn(|| t.run(out));
            // Nothing while paused, however long it waits (an absence check).
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(host.message_count(), 0);
            assert_eq!(
                t.command(json!({"op": "status"})).unwrap(),
                json!({"seq": 0, "paused": true})
            );
            assert_eq!(
                t.command(json!({"op": "resume"})).unwrap(),
                json!({"resumed": true})
            );
            run.join().unwrap().unwrap();
        });
        let seqs: Vec<Value> = host
            .json_messages()
            .into_iter()
            .map(|(_, m)| m["seq"].clone())
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5].map(|n| json!(n)));
        assert_eq!(
            t.command(json!({"op": "status"})).unwrap(),
            json!({"seq": 5, "paused": false})
        );
    }

    #[test]
    fn a_paused_instance_stops_at_once() {
        let host = TestHost::new();
        let t = ticker(json!({"paused": true}));
        let out = host.emitter();
        std::thread::scope(|s| {
            let run = s.spawn(|| t.run(out));
            std::thread::sleep(Duration::from_millis(10));
            host.stop();
            run.join().unwrap().unwrap();
        });
        assert_eq!(host.message_count(), 0);
    }

    #[test]
    fn slow_rate_reacts_to_stop_quickly() {
        let host = TestHost::new();
        let t = ticker(json!({"rate": 0.01}));
        let out = host.emitter();
        std::thread::scope(|s| {
            let run = s.spawn(|| t.run(out));
            assert!(host.wait_for_messages(1, Duration::from_secs(5)));
            std::thread::sleep(Duration::from_millis(30));
            let t0 = Instant::now();
            host.stop();
            run.join().unwrap().unwrap();
            assert!(
                t0.elapsed() < Duration::from_millis(50),
                "{:?}",
                t0.elapsed()
            );
        });
        assert_eq!(host.message_count(), 1);
    }

    #[test]
    fn through_the_abi() {
        let host = TestHost::new();
        let loaded = Loaded::of::<Ticker>();
        assert_eq!(loaded.name(), "ticker");
        let inst = loaded.create(&host, r#"{"rate":2000}"#).unwrap();
        assert_eq!(inst.poll("").0, plugin_api::abi::GW_UNSUPPORTED);
        assert_eq!(inst.start(), (GW_OK, String::new()));
        assert!(host.wait_for_messages(20, Duration::from_secs(5)));
        let t0 = Instant::now();
        inst.stop();
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        let count = host.message_count() as u64;
        // Stopped: no exit reported, nothing emitted afterwards.
        assert!(host.exits().is_empty());
        let (status, reply) = inst.command(r#"{"op":"status"}"#);
        assert_eq!(status, GW_OK);
        assert_eq!(
            serde_json::from_str::<Value>(&reply).unwrap(),
            json!({"seq": count, "paused": false})
        );
        let (status, msg) = inst.command(r#"{"op":"nope"}"#);
        assert_eq!(status, GW_ERROR);
        assert!(msg.contains("unknown command"), "{msg}");

        // With a limit the run loop finishes by itself: exited(GW_OK).
        let host = TestHost::new();
        let inst = loaded.create(&host, r#"{"rate":1000,"limit":3}"#).unwrap();
        assert_eq!(inst.start().0, GW_OK);
        assert_eq!(
            host.wait_for_exit(Duration::from_secs(5)),
            Some((GW_OK, String::new()))
        );
        assert_eq!(host.message_count(), 3);

        // A rejected message fails the run loop.
        let host = TestHost::new();
        host.set_emit_status(GW_REJECTED);
        let inst = loaded.create(&host, "{}").unwrap();
        assert_eq!(inst.start().0, GW_OK);
        let (status, msg) = host.wait_for_exit(Duration::from_secs(5)).unwrap();
        assert_eq!(status, GW_ERROR);
        assert!(msg.contains("rejected"), "{msg}");
        drop(inst);

        assert!(loaded.create(&host, r#"{"rate":0}"#).is_err());
    }
}
