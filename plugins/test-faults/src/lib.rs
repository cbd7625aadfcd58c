//! `test-faults`: a test-only plugin that fails on demand (poll, push, keyed,
//! command), for the gateway's fault tests. Not used by the default gateway.yaml.
//!
//! Messages on the channel's own stream are `{"seq":n}` (n ≥ 1, counted per
//! instance). Keyed streams get `{"key":k,"step":i,"params":{...},"final":bool}`
//! for i = 1..=steps, then the stream is ended.
//!
//! Config (a JSON object; every key optional, unknown keys are an error; every
//! "every"/count value is an integer ≥ 1 unless said otherwise):
//! - `fail_create` (string): `create` fails with that message;
//! - `panic_every` (N): poll mode: every Nth poll panics with
//!   `test-faults: planned panic at poll N`; push mode: the run thread panics
//!   with `test-faults: planned panic after N messages` once it has emitted N
//!   unkeyed messages;
//! - `error_every` (N): poll mode: every Nth poll returns the error
//!   `test-faults: planned error at poll N`; push mode: the run loop returns the
//!   error `test-faults: planned error after N messages` once it has emitted N
//!   unkeyed messages;
//! - `invalid_every` (N): every Nth unkeyed message is schema-invalid,
//!   `{"seq":"<n>"}` (it still consumes its seq number);
//! - `burst` (integer ≥ 0, default 1): unkeyed messages per poll (push: per tick);
//! - `interval_ms` (integer ≥ 1, default 10): push mode tick interval;
//! - `steps` (integer ≥ 1, default 3): steps of a keyed stream;
//! - `limit` (N): push mode: the run loop returns Ok (a normal exit) once it has
//!   emitted N unkeyed messages;
//! - `error_while_exists` (string, a file path): while that file exists,
//!   `create` and every poll (push mode: every tick) fail with
//!   `test-faults: <path> exists`.
//!   It outlives restarts, so a test can make a channel fail for a while and
//!   then recover.
//! - `block_while_exists` (string, a file path): while that file exists,
//!   `create`, every poll and every `open_key` wait at their start (checking
//!   every 5 ms, at most 60 s), in every instance: a plugin call that hangs,
//!   for as long as a test wants.
//!
//! Polls (keyed or not) share one counter for `panic_every`/`error_every`; a
//! panicking or failing poll emits nothing.
//!
//! Keyed streams: `open_key(key, params)` (re)opens `key` at step 0;
//! `poll(key)` emits its next step (nothing once it has ended; an error for a
//! key that is not open) and, after the final step, ends the stream. In push
//! mode each tick emits the next step of every open key instead. `close_key`
//! forgets the key.
//!
//! Commands: `{"op":"echo",...}` answers the request itself; `{"op":"panic"}`
//! panics (`test-faults: planned command panic`); `{"op":"fail"}` fails with
//! `test-faults: planned command failure`; `{"op":"status"}` answers
//! `{"polls":p,"seq":s,"open_keys":[...],"opens":o}` (`opens`: the
//! `open_key` calls this instance has had); `{"op":"emit","messages":[...]}`
//! queues those messages, emitted as they are on the unkeyed stream at the
//! next tick (push) or poll, and answers `{"queued":n}`; `{"op":"hold"}` makes
//! every poll that starts from then on wait at its start until
//! `{"op":"release"}` (both answer `{"held":bool}`; a held poll stops waiting
//! after 60 s, though the hold stays on); `{"op":"wait"}` waits while held,
//! like a poll, then answers `{"waited":true}`. `status` also reports
//! `"in_poll"`, the polls running now, and `"most_in_poll"`, the most that
//! ever ran at once.

#![forbid(unsafe_code)]

/// The longest a held poll or `wait` command waits for `release`.
const HOLD_MAX: Duration = Duration::from_secs(60);

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Value, json};

/// The plugin config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `create` fails with this message.
    pub fail_create: Option<String>,
    /// Every Nth poll panics (push: panic after N messages).
    pub panic_every: Option<u64>,
    /// Every Nth poll fails (push: fail after N messages).
    pub error_every: Option<u64>,
    /// Every Nth message is schema-invalid.
    pub invalid_every: Option<u64>,
    /// Unkeyed messages per poll / tick.
    pub burst: u64,
    /// Push mode tick interval.
    pub interval_ms: u64,
    /// Steps of a keyed stream.
    pub steps: u64,
    /// Push mode: finish after N messages.
    pub limit: Option<u64>,
    /// Fail `create` and every poll / tick while this file exists.
    pub error_while_exists: Option<std::path::PathBuf>,
    /// `create`, polls and `open_key` wait while this file exists.
    pub block_while_exists: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            fail_create: None,
            panic_every: None,
            error_every: None,
            invalid_every: None,
            burst: 1,
            interval_ms: 10,
            steps: 3,
            limit: None,
            error_while_exists: None,
            block_while_exists: None,
        }
    }
}

impl Config {
    /// Parse and check a config.
    pub fn parse(config: Value) -> Result<Config, PluginError> {
        let c: Config = parse_config(config)?;
        for (name, value) in [
            ("panic_every", c.panic_every),
            ("error_every", c.error_every),
            ("invalid_every", c.invalid_every),
            ("limit", c.limit),
            ("interval_ms", Some(c.interval_ms)),
            ("steps", Some(c.steps)),
        ] {
            if value == Some(0) {
                return Err(PluginError::new(format!(
                    "test-faults: `{name}` must be at least 1"
                )));
            }
        }
        Ok(c)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a poll as running while it lives.
struct InPoll<'a>(&'a Mutex<(u64, u64)>);

impl<'a> InPoll<'a> {
    fn enter(m: &'a Mutex<(u64, u64)>) -> InPoll<'a> {
        let mut g = lock(m);
        g.0 += 1;
        g.1 = g.1.max(g.0);
        InPoll(m)
    }
}

impl Drop for InPoll<'_> {
    fn drop(&mut self) {
        lock(self.0).0 -= 1;
    }
}

/// Wait while `path` exists, at most `HOLD_MAX`.
fn wait_while_exists(path: Option<&std::path::Path>) {
    let Some(path) = path else {
        return;
    };
    let until = std::time::Instant::now() + HOLD_MAX;
    while path.exists() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True when `n` is a multiple of `every`.
fn hits(every: Option<u64>, n: u64) -> bool {
    every.is_some_and(|every| n.is_multiple_of(every))
}

#[derive(Debug)]
struct KeyState {
    params: Value,
    /// Last emitted step.
    step: u64,
}

/// One instance.
pub struct TestFaults {
    config: Config,
    polls: AtomicU64,
    /// `open_key` calls.
    opens: AtomicU64,
    /// Polls running now, and the most that ever ran at once.
    in_poll: Mutex<(u64, u64)>,
    /// Polls wait at their start while this is true.
    held: Mutex<bool>,
    released: Condvar,
    /// Last used seq.
    seq: AtomicU64,
    keys: Mutex<BTreeMap<String, KeyState>>,
    /// Messages queued by the `emit` command.
    pending: Mutex<Vec<Value>>,
}

impl TestFaults {
    /// Emit what the `emit` command queued.
    fn emit_pending(&self, out: &Emitter) -> Result<(), EmitError> {
        let pending = std::mem::take(&mut *lock(&self.pending));
        for m in pending {
            out.emit_json("", &m)?;
        }
        Ok(())
    }

    fn keys(&self) -> MutexGuard<'_, BTreeMap<String, KeyState>> {
        lock(&self.keys)
    }

    /// The `error_while_exists` failure, if its file exists now.
    fn planned_file_error(&self) -> Option<PluginError> {
        let path = self.config.error_while_exists.as_ref()?;
        path.exists()
            .then(|| PluginError::new(format!("test-faults: {} exists", path.display())))
    }

    /// Wait while the `block_while_exists` file exists, at most `HOLD_MAX`.
    fn wait_unblocked(&self) {
        wait_while_exists(self.config.block_while_exists.as_deref());
    }

    /// Wait while held (the `hold` command), at most `HOLD_MAX`: a test
    /// that fails before its `release` then fails, instead of hanging on a
    /// poll that never returns (a runtime waits for its blocking threads).
    fn wait_released(&self) {
        let until = std::time::Instant::now() + HOLD_MAX;
        let mut held = lock(&self.held);
        while *held {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            held = self
                .released
                .wait_timeout(held, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn set_held(&self, hold: bool) -> Value {
        *lock(&self.held) = hold;
        self.released.notify_all();
        json!({ "held": hold })
    }

    /// Emit one unkeyed message; returns its seq.
    fn emit_seq(&self, out: &Emitter) -> Result<u64, EmitError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let message = if hits(self.config.invalid_every, n) {
            json!({ "seq": n.to_string() })
        } else {
            json!({ "seq": n })
        };
        out.emit_json("", &message)?;
        Ok(n)
    }

    /// Emit the next step of `key` (ending the stream after the last one).
    /// Returns false when the key is not open.
    fn step_key(&self, key: &str, out: &Emitter) -> Result<bool, EmitError> {
        let message = {
            let mut keys = self.keys();
            let Some(state) = keys.get_mut(key) else {
                return Ok(false);
            };
            if state.step >= self.config.steps {
                return Ok(true);
            }
            state.step += 1;
            json!({
                "key": key,
                "step": state.step,
                "params": state.params,
                "final": state.step == self.config.steps,
            })
        };
        out.emit_json(key, &message)?;
        if message["final"] == json!(true) {
            out.end_stream(key)?;
        }
        Ok(true)
    }
}

impl Plugin for TestFaults {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        let config = Config::parse(config)?;
        wait_while_exists(config.block_while_exists.as_deref());
        if let Some(msg) = &config.fail_create {
            return Err(msg.as_str().into());
        }
        if let Some(path) = config.error_while_exists.as_ref().filter(|p| p.exists()) {
            return Err(PluginError::new(format!(
                "test-faults: {} exists",
                path.display()
            )));
        }
        Ok(TestFaults {
            config,
            polls: AtomicU64::new(0),
            opens: AtomicU64::new(0),
            in_poll: Mutex::new((0, 0)),
            held: Mutex::new(false),
            released: Condvar::new(),
            seq: AtomicU64::new(0),
            keys: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(Vec::new()),
        })
    }

    fn poll(&self, key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        let _in_poll = InPoll::enter(&self.in_poll);
        let n = self.polls.fetch_add(1, Ordering::Relaxed) + 1;
        self.wait_unblocked();
        self.wait_released();
        if let Some(e) = self.planned_file_error() {
            return Err(e);
        }
        if hits(self.config.panic_every, n) {
            panic!("test-faults: planned panic at poll {n}");
        }
        if hits(self.config.error_every, n) {
            return Err(PluginError::new(format!(
                "test-faults: planned error at poll {n}"
            )));
        }
        match key {
            None => {
                self.emit_pending(out)?;
                for _ in 0..self.config.burst {
                    self.emit_seq(out)?;
                }
            }
            Some(key) => {
                if !self.step_key(key, out)? {
                    return Err(PluginError::new(format!(
                        "test-faults: key `{key}` is not open"
                    )));
                }
            }
        }
        Ok(())
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        let interval = Duration::from_millis(self.config.interval_ms);
        let mut emitted = 0u64;
        loop {
            if let Some(e) = self.planned_file_error() {
                return Err(e);
            }
            match self.emit_pending(&out) {
                Ok(()) => {}
                Err(EmitError::Stopped) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            for _ in 0..self.config.burst {
                match self.emit_seq(&out) {
                    Ok(_) => emitted += 1,
                    Err(EmitError::Stopped) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
                if self.config.panic_every == Some(emitted) {
                    panic!("test-faults: planned panic after {emitted} messages");
                }
                if self.config.error_every == Some(emitted) {
                    return Err(PluginError::new(format!(
                        "test-faults: planned error after {emitted} messages"
                    )));
                }
                if self.config.limit == Some(emitted) {
                    return Ok(());
                }
            }
            let open: Vec<String> = self.keys().keys().cloned().collect();
            for key in open {
                match self.step_key(&key, &out) {
                    Ok(_) => {}
                    Err(EmitError::Stopped) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
            if out.wait_stopped(interval) {
                return Ok(());
            }
        }
    }

    fn open_key(&self, key: &str, params: Value) -> Result<(), PluginError> {
        self.opens.fetch_add(1, Ordering::Relaxed);
        self.wait_unblocked();
        self.keys()
            .insert(key.to_owned(), KeyState { params, step: 0 });
        Ok(())
    }

    fn close_key(&self, key: &str) {
        self.keys().remove(key);
    }

    fn command(&self, request: Value) -> Result<Value, PluginError> {
        match request.get("op").and_then(Value::as_str) {
            Some("echo") => Ok(request),
            Some("panic") => panic!("test-faults: planned command panic"),
            Some("fail") => Err("test-faults: planned command failure".into()),
            Some("emit") => match request.get("messages") {
                Some(Value::Array(m)) => {
                    let n = m.len();
                    lock(&self.pending).extend(m.iter().cloned());
                    Ok(json!({ "queued": n }))
                }
                _ => Err("test-faults: `emit` needs `messages`: a list".into()),
            },
            Some("hold") => Ok(self.set_held(true)),
            Some("release") => Ok(self.set_held(false)),
            Some("wait") => {
                self.wait_released();
                Ok(json!({ "waited": true }))
            }
            Some("status") => {
                let (in_poll, most_in_poll) = *lock(&self.in_poll);
                Ok(json!({
                    "polls": self.polls.load(Ordering::Relaxed),
                    "in_poll": in_poll,
                    "most_in_poll": most_in_poll,
                    "seq": self.seq.load(Ordering::Relaxed),
                    "open_keys": self.keys().keys().collect::<Vec<_>>(),
                    "opens": self.opens.load(Ordering::Relaxed),
                }))
            }
            _ => Err(PluginError::new(format!(
                "test-faults: unknown command {request}"
            ))),
        }
    }
}

plugin_api::export_plugin!(
    TestFaults,
    name = "test-faults",
    modes = [poll, push, keyed, command]
);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::abi::{GW_ERROR, GW_OK, GW_PANIC};
    use plugin_api::testing::{Loaded, TestHost};

    const WAIT: Duration = Duration::from_secs(5);

    fn create(host: &TestHost, config: Value) -> TestFaults {
        TestFaults::create(config, host.host()).unwrap()
    }

    fn seqs(host: &TestHost) -> Vec<Value> {
        host.json_messages()
            .into_iter()
            .filter(|(k, _)| k.is_empty())
            .map(|(_, m)| m["seq"].clone())
            .collect()
    }

    #[test]
    fn config_parsing() {
        assert_eq!(Config::parse(Value::Null).unwrap(), Config::default());
        let c = Config::parse(json!({
            "panic_every": 3, "error_every": 4, "invalid_every": 5,
            "burst": 0, "interval_ms": 7, "steps": 2, "limit": 9,
            "error_while_exists": "/tmp/x"
        }))
        .unwrap();
        assert_eq!(c.error_while_exists, Some("/tmp/x".into()));
        assert_eq!(
            (c.panic_every, c.error_every, c.invalid_every),
            (Some(3), Some(4), Some(5))
        );
        assert_eq!(
            (c.burst, c.interval_ms, c.steps, c.limit),
            (0, 7, 2, Some(9))
        );
        for (config, expect) in [
            (
                json!({"panic_every": 0}),
                "`panic_every` must be at least 1",
            ),
            (json!({"steps": 0}), "`steps` must be at least 1"),
            (
                json!({"interval_ms": 0}),
                "`interval_ms` must be at least 1",
            ),
            (json!({"burst": -1}), "invalid value"),
            (json!({"burts": 2}), "unknown field `burts`"),
            (json!("x"), "expected a JSON object"),
        ] {
            let err = Config::parse(config.clone()).unwrap_err();
            assert!(err.message().contains(expect), "{config}: {err}");
        }
        let host = TestHost::new();
        let err = TestFaults::create(json!({"fail_create": "no way"}), host.host())
            .err()
            .unwrap();
        assert_eq!(err.message(), "no way");
    }

    #[test]
    fn poll_burst_and_invalid_every() {
        let host = TestHost::new();
        let p = create(&host, json!({"burst": 2, "invalid_every": 3}));
        let out = host.emitter();
        p.poll(None, &out).unwrap();
        p.poll(None, &out).unwrap();
        assert_eq!(seqs(&host), vec![json!(1), json!(2), json!("3"), json!(4)]);
    }

    #[test]
    fn poll_panic_and_error_every() {
        let host = TestHost::new();
        let loaded = Loaded::of::<TestFaults>();
        let inst = loaded
            .create(&host, r#"{"panic_every":3,"error_every":2}"#)
            .unwrap();
        assert_eq!(inst.poll("").0, GW_OK);
        assert_eq!(
            inst.poll(""),
            (GW_ERROR, "test-faults: planned error at poll 2".to_owned())
        );
        assert_eq!(
            inst.poll(""),
            (GW_PANIC, "test-faults: planned panic at poll 3".to_owned())
        );
        assert_eq!(
            inst.poll(""),
            (GW_ERROR, "test-faults: planned error at poll 4".to_owned())
        );
        assert_eq!(inst.poll("").0, GW_OK);
        assert_eq!(seqs(&host), vec![json!(1), json!(2)]);
    }

    #[test]
    fn keyed_poll_steps_then_end() {
        let host = TestHost::new();
        let p = create(&host, json!({"steps": 2}));
        let out = host.emitter();
        let err = p.poll(Some("job-1"), &out).unwrap_err();
        assert!(err.message().contains("not open"), "{err}");
        p.open_key("job-1", json!({"job_id": "1"})).unwrap();
        for _ in 0..3 {
            p.poll(Some("job-1"), &out).unwrap();
        }
        let messages = host.json_messages();
        assert_eq!(
            messages,
            vec![
                (
                    "job-1".to_owned(),
                    json!({"key":"job-1","step":1,"params":{"job_id":"1"},"final":false})
                ),
                (
                    "job-1".to_owned(),
                    json!({"key":"job-1","step":2,"params":{"job_id":"1"},"final":true})
                ),
            ]
        );
        assert_eq!(host.ended(), vec!["job-1".to_owned()]);
        p.close_key("job-1");
        assert!(p.poll(Some("job-1"), &out).is_err());
    }

    #[test]
    fn push_mode_emits_and_steps_keys() {
        let host = TestHost::new();
        let loaded = Loaded::of::<TestFaults>();
        let inst = loaded
            .create(&host, r#"{"interval_ms":2,"steps":3}"#)
            .unwrap();
        assert_eq!(inst.open_key("k", r#"{"a":1}"#).0, GW_OK);
        assert_eq!(inst.start().0, GW_OK);
        assert!(host.wait_until(WAIT, |r| r.ended == ["k"]));
        assert!(host.wait_for_messages(6, WAIT));
        inst.stop();
        assert!(host.exits().is_empty());
        let keyed: Vec<Value> = host
            .json_messages()
            .into_iter()
            .filter(|(k, _)| k == "k")
            .map(|(_, m)| m["step"].clone())
            .collect();
        assert_eq!(keyed, vec![json!(1), json!(2), json!(3)]);
        let unkeyed = seqs(&host);
        assert!(unkeyed.len() >= 3);
        for (i, s) in unkeyed.iter().enumerate() {
            assert_eq!(s, &json!(i + 1));
        }
        assert_eq!(inst.close_key("k"), GW_OK);
    }

    #[test]
    fn push_mode_faults_are_reported() {
        let loaded = Loaded::of::<TestFaults>();
        for (config, status, msg, count) in [
            (
                r#"{"interval_ms":1,"panic_every":4}"#,
                GW_PANIC,
                "test-faults: planned panic after 4 messages",
                4,
            ),
            (
                r#"{"interval_ms":1,"error_every":3,"burst":2}"#,
                GW_ERROR,
                "test-faults: planned error after 3 messages",
                3,
            ),
            (r#"{"interval_ms":1,"limit":5}"#, GW_OK, "", 5),
        ] {
            let host = TestHost::new();
            let inst = loaded.create(&host, config).unwrap();
            assert_eq!(inst.start().0, GW_OK);
            assert_eq!(
                host.wait_for_exit(WAIT),
                Some((status, msg.to_owned())),
                "{config}"
            );
            assert_eq!(host.message_count(), count, "{config}");
        }
    }

    #[test]
    fn commands() {
        let host = TestHost::new();
        let inst = Loaded::of::<TestFaults>().create(&host, "").unwrap();
        let (status, reply) = inst.command(r#"{"op":"echo","x":1}"#);
        assert_eq!(status, GW_OK);
        assert_eq!(
            serde_json::from_str::<Value>(&reply).unwrap(),
            json!({"op":"echo","x":1})
        );
        assert_eq!(
            inst.command(r#"{"op":"panic"}"#),
            (GW_PANIC, "test-faults: planned command panic".to_owned())
        );
        assert_eq!(
            inst.command(r#"{"op":"fail"}"#),
            (GW_ERROR, "test-faults: planned command failure".to_owned())
        );
        assert_eq!(inst.poll("").0, GW_OK);
        assert_eq!(inst.open_key("a", "").0, GW_OK);
        let (status, reply) = inst.command(r#"{"op":"status"}"#);
        assert_eq!(status, GW_OK);
        assert_eq!(
            serde_json::from_str::<Value>(&reply).unwrap(),
            json!({"polls":1,"in_poll":0,"most_in_poll":1,"seq":1,"open_keys":["a"],"opens":1})
        );
        assert_eq!(inst.command(r#"{"op":"x"}"#).0, GW_ERROR);
    }

    #[test]
    fn error_while_exists_fails_creates_polls_and_ticks_while_the_file_is_there() {
        let path = std::env::temp_dir().join(format!("test-faults-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = json!({"error_while_exists": path, "interval_ms": 1});
        let expected = format!("test-faults: {} exists", path.display());
        let host = TestHost::new();
        let p = create(&host, config.clone());
        let out = host.emitter();
        p.poll(None, &out).unwrap();
        let loaded = Loaded::of::<TestFaults>();
        let push_host = TestHost::new();
        let inst = loaded.create(&push_host, &config.to_string()).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert_eq!(p.poll(None, &out).unwrap_err().message(), expected);
        assert_eq!(p.poll(None, &out).unwrap_err().message(), expected);
        // A new instance cannot even be made meanwhile.
        let err = TestFaults::create(config.clone(), host.host())
            .err()
            .expect("create fails while the file exists");
        assert_eq!(err.message(), expected);
        // Push mode: the run loop fails at its next tick.
        assert_eq!(inst.start().0, GW_OK);
        assert_eq!(push_host.wait_for_exit(WAIT), Some((GW_ERROR, expected)));
        std::fs::remove_file(&path).unwrap();
        p.poll(None, &out).unwrap();
        assert_eq!(seqs(&host), vec![json!(1), json!(2)]);
    }

    #[test]
    fn hold_keeps_polls_waiting_until_release() {
        let host = TestHost::new();
        let p = create(&host, json!({}));
        let out = host.emitter();
        assert_eq!(
            p.command(json!({"op": "hold"})).unwrap(),
            json!({"held": true})
        );
        std::thread::scope(|s| {
            let poll = s.spawn(|| p.poll(None, &out));
            let status = |p: &TestFaults| p.command(json!({"op": "status"})).unwrap();
            let deadline = std::time::Instant::now() + WAIT;
            while status(&p)["in_poll"] != json!(1) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the poll never started"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // Held: nothing emitted, however long it waits.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(host.message_count(), 0);
            assert_eq!(status(&p)["polls"], json!(1));
            assert_eq!(
                p.command(json!({"op": "release"})).unwrap(),
                json!({"held": false})
            );
            poll.join().unwrap().unwrap();
            assert_eq!(status(&p)["in_poll"], json!(0));
            assert_eq!(status(&p)["most_in_poll"], json!(1));
        });
        assert_eq!(seqs(&host), vec![json!(1)]);
    }

    #[test]
    fn block_while_exists_holds_polls_and_opens_until_the_file_goes() {
        let dir = std::env::temp_dir().join(format!("test-faults-block-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("block");
        let host = TestHost::new();
        let p = create(&host, json!({"block_while_exists": file}));
        std::fs::write(&file, "").unwrap();
        let out = host.emitter();
        std::thread::scope(|s| {
            let poll = s.spawn(|| p.poll(None, &out));
            let open = s.spawn(|| p.open_key("k", json!({})));
            let status = |p: &TestFaults| p.command(json!({"op": "status"})).unwrap();
            let deadline = std::time::Instant::now() + WAIT;
            while status(&p)["in_poll"] != json!(1) || status(&p)["opens"] != json!(1) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the calls never started"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // Blocked: nothing emitted, the key not open yet.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(host.message_count(), 0);
            assert_eq!(status(&p)["open_keys"], json!([]));
            std::fs::remove_file(&file).unwrap();
            poll.join().unwrap().unwrap();
            open.join().unwrap().unwrap();
        });
        assert_eq!(seqs(&host), vec![json!(1)]);
        assert_eq!(
            p.command(json!({"op": "status"})).unwrap()["open_keys"],
            json!(["k"])
        );
        // `create` waits too.
        std::fs::write(&file, "").unwrap();
        std::thread::scope(|s| {
            let created = s.spawn(|| {
                TestFaults::create(json!({"block_while_exists": file}), host.host()).is_ok()
            });
            std::thread::sleep(Duration::from_millis(20));
            assert!(!created.is_finished());
            std::fs::remove_file(&file).unwrap();
            assert!(created.join().unwrap());
        });
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn create_failure_through_the_abi() {
        let host = TestHost::new();
        let loaded = Loaded::of::<TestFaults>();
        assert_eq!(
            loaded
                .create(&host, r#"{"fail_create":"planned"}"#)
                .unwrap_err(),
            "planned"
        );
        assert_eq!(
            loaded.table().modes,
            plugin_api::abi::GW_MODE_POLL
                | plugin_api::abi::GW_MODE_PUSH
                | plugin_api::abi::GW_MODE_KEYED
                | plugin_api::abi::GW_MODE_COMMAND
        );
    }
}
