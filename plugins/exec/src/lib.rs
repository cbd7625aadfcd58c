//! `exec`: runs a command and emits its JSON output.
//!
//! Two styles, chosen by the config's `mode` (it must match the channel's
//! `source.mode`):
//!
//! - **`mode: stream`** (`source.mode: push`): the command runs once per
//!   channel instance. Each stdout line is one message: a line that is JSON
//!   is emitted as is; any other line is emitted as `{"line": "<text>"}` when
//!   `wrap_lines` is true, and otherwise dropped with a log line. Empty lines
//!   are ignored. When the command exits (whatever its status) it is started
//!   again after a delay of 100 ms, doubling up to 30 s; a run that lasted
//!   30 s or more resets the delay.
//! - **`mode: interval`** (`source.mode: poll`): every poll runs the command
//!   to completion; its whole stdout is one JSON message. A non-zero exit, a
//!   timeout or output that is not JSON emits nothing and is logged. The poll
//!   still succeeds, so the gateway does not restart the instance.
//!
//! In both styles stderr lines go to the gateway log at warn level, and every
//! log line the plugin writes about the command's output is rate-limited
//! (10 lines per 10 s, then a count of the suppressed ones).
//!
//! The command is run directly (no shell): `command[0]` is the program,
//! looked up in `PATH`, and the rest are its arguments. It gets the gateway's
//! environment plus `env`, stdin from `/dev/null`, and runs in its own process
//! group. Stopping it (instance stop, gateway shutdown, interval timeout)
//! sends SIGTERM to the group, waits up to 1 s, sends SIGKILL to the group
//! and reaps the child: no zombie is left, and neither is any process the
//! command started in its group. A process that leaves the group (`setsid`)
//! is out of reach, and a gateway killed with SIGKILL can't stop anything.
//!
//! Config (a JSON object; unknown keys are an error):
//! - `mode` (`stream` | `interval`, required);
//! - `command` (list of strings, required, non-empty);
//! - `env` (map name → value): added to the environment;
//! - `cwd` (string): working directory; must exist when the instance is created;
//! - `wrap_lines` (bool, default false; stream only);
//! - `timeout` (duration, default `10s`; interval only).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions, kill_process_group, waitid};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

/// How long a stopped command gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(1);
/// First restart delay in stream mode.
const RESTART_MIN: Duration = Duration::from_millis(100);
/// Longest restart delay in stream mode.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A stream run at least this long resets the restart delay.
const RESTART_RESET: Duration = Duration::from_secs(30);
/// Largest stdout line (stream) or output (interval) kept, in bytes.
const MAX_OUTPUT: usize = 16 << 20;
/// The longest `timeout` (a much longer one would overflow the deadline).
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Stream mode: stdout lines read ahead of the emitting loop.
const LINE_QUEUE: usize = 64;
/// Longest stderr line logged (longer ones are cut).
const MAX_LOG_LINE: usize = 4096;
/// Log rate limit: this many lines per window.
const LOG_BURST: u32 = 10;
/// Log rate limit window.
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The config's `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Push: a long-running command, one message per stdout line.
    Stream,
    /// Poll: one run per poll, the whole stdout is one message.
    Interval,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    mode: Option<Mode>,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    wrap_lines: Option<bool>,
    timeout: Option<String>,
}

/// The checked config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Stream or interval.
    pub mode: Mode,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Stream: wrap non-JSON lines as `{"line": …}`.
    pub wrap_lines: bool,
    /// Interval: longest run.
    pub timeout: Duration,
}

fn err(msg: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("exec: {msg}"))
}

impl Config {
    /// Parse and check a config.
    pub fn parse(config: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(config).map_err(err)?;
        let mode = raw
            .mode
            .ok_or_else(|| err("`mode` is required: `stream` (push) or `interval` (poll)"))?;
        match raw.command.first() {
            None => return Err(err("`command` is required: [program, args...]")),
            Some(p) if p.is_empty() => return Err(err("`command[0]` (the program) is empty")),
            Some(_) => {}
        }
        for name in raw.env.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(err(format_args!("`env`: invalid variable name {name:?}")));
            }
        }
        if let Some(cwd) = &raw.cwd
            && !cwd.is_dir()
        {
            return Err(err(format_args!(
                "`cwd` {} is not a directory",
                cwd.display()
            )));
        }
        if mode == Mode::Stream && raw.timeout.is_some() {
            return Err(err("`timeout` applies to `mode: interval` only"));
        }
        if mode == Mode::Interval && raw.wrap_lines.is_some() {
            return Err(err("`wrap_lines` applies to `mode: stream` only"));
        }
        let timeout = match &raw.timeout {
            None => Duration::from_secs(10),
            Some(t) => {
                let d = humantime::parse_duration(t).map_err(|e| {
                    err(format_args!(
                        "`timeout` {t:?} is not a duration like 5s or 500ms: {e}"
                    ))
                })?;
                if d.is_zero() {
                    return Err(err("`timeout` must be more than 0"));
                }
                if d > MAX_TIMEOUT {
                    return Err(err(format_args!(
                        "`timeout` {t:?} is more than a day; use a shorter one"
                    )));
                }
                d
            }
        };
        Ok(Config {
            mode,
            command: raw.command,
            env: raw.env,
            cwd: raw.cwd,
            wrap_lines: raw.wrap_lines.unwrap_or(false),
            timeout,
        })
    }
}

/// At most [`LOG_BURST`] lines per [`LOG_WINDOW`], then a summary.
#[derive(Debug)]
struct Limiter {
    window: Instant,
    count: u32,
    suppressed: u64,
}

impl Limiter {
    fn new() -> Limiter {
        Limiter {
            window: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }
}

/// A host handle whose warnings are rate-limited.
#[derive(Clone)]
struct Log {
    host: Host,
    limiter: std::sync::Arc<Mutex<Limiter>>,
}

impl Log {
    fn new(host: Host) -> Log {
        Log {
            host,
            limiter: std::sync::Arc::new(Mutex::new(Limiter::new())),
        }
    }

    fn warn(&self, msg: &str) {
        let mut l = self.limiter.lock().unwrap_or_else(PoisonError::into_inner);
        if l.window.elapsed() >= LOG_WINDOW {
            if l.suppressed > 0 {
                self.host.warn(&format!(
                    "{} log lines suppressed in the last {}s",
                    l.suppressed,
                    LOG_WINDOW.as_secs()
                ));
            }
            *l = Limiter::new();
        }
        if l.count < LOG_BURST {
            l.count += 1;
            drop(l);
            self.host.warn(msg);
        } else {
            l.suppressed += 1;
        }
    }
}

/// Cut `bytes` to at most `max` bytes and decode it lossily.
fn text(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < bytes.len() {
        s.push('…');
    }
    s
}

fn trim_line(line: &[u8]) -> &[u8] {
    line.trim_ascii()
}

/// What a stdout reader thread reports in stream mode.
enum Event {
    Line(Vec<u8>),
    TooLong(usize),
    Eof,
    Wake,
}

/// One running command and its reader threads.
struct Running {
    child: Child,
    pid: Option<Pid>,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    /// True once the child has exited (without reaping it, so its process
    /// group id can't be reused before we signal the group).
    fn exited(&self) -> bool {
        match self.pid {
            Some(pid) => matches!(
                waitid(
                    WaitId::Pid(pid),
                    WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG
                ),
                Ok(Some(_)) | Err(_)
            ),
            None => true,
        }
    }

    fn signal_group(&self, sig: Signal) {
        if let Some(pid) = self.pid {
            // ESRCH: nobody left in the group.
            let _ = kill_process_group(pid, sig);
        }
    }

    /// Stop the whole process group (TERM, grace, KILL) unless the child
    /// already exited, reap the child and join the reader threads.
    fn finish(mut self, terminate: bool, log: &Log) -> Option<ExitStatus> {
        if terminate && !self.exited() {
            self.signal_group(Signal::TERM);
            let deadline = Instant::now() + KILL_GRACE;
            while !self.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Anything left in the group (the child, or what it started) goes.
        self.signal_group(Signal::KILL);
        let status = self.child.wait().ok();
        let deadline = Instant::now() + KILL_GRACE;
        for t in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log.warn(
                    "a process outside the command's process group keeps its output open; not waiting for it",
                );
            }
        }
        status
    }
}

/// One instance (one channel).
pub struct Exec {
    config: Config,
    log: Log,
    /// Wakes the stream loop (set while a command runs).
    wake: Mutex<Option<SyncSender<Event>>>,
}

impl Exec {
    /// An instance for a checked config.
    pub fn new(config: Config, host: Host) -> Exec {
        Exec {
            config,
            log: Log::new(host),
            wake: Mutex::new(None),
        }
    }

    fn wake(&self) -> MutexGuard<'_, Option<SyncSender<Event>>> {
        self.wake.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn command(&self) -> Command {
        let c = &self.config;
        let mut cmd = Command::new(&c.command[0]);
        cmd.args(&c.command[1..])
            .envs(&c.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &c.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }

    fn program(&self) -> &str {
        &self.config.command[0]
    }

    /// Start the command with a thread logging its stderr.
    fn spawn(&self) -> Result<Running, String> {
        let mut child = self
            .command()
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", self.program()))?;
        let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
        let mut threads = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            let log = self.log.clone();
            let program = self.program().to_owned();
            let spawned = std::thread::Builder::new()
                .name("exec-stderr".into())
                .spawn(move || {
                    let mut r = BufReader::new(stderr);
                    let mut line = Vec::new();
                    loop {
                        match next_log_line(&mut r, &mut line) {
                            None => return,
                            Some(()) => {
                                let l = trim_line(&line);
                                if !l.is_empty() {
                                    log.warn(&format!(
                                        "{program} stderr: {}",
                                        text(l, MAX_LOG_LINE)
                                    ));
                                }
                            }
                        }
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => self.log.warn(&format!("cannot start a thread: {e}")),
            }
        }
        Ok(Running {
            child,
            pid,
            threads,
        })
    }

    /// Stream mode: run the command once. Returns Ok(true) when the instance
    /// is stopping, Ok(false) when the command ended by itself.
    fn stream_once(&self, out: &Emitter) -> Result<bool, String> {
        let mut running = self.spawn()?;
        // Bounded: while emit waits (backpressure), the reader stops reading
        // and the command blocks on a full pipe instead of filling memory.
        let (tx, rx) = mpsc::sync_channel(LINE_QUEUE);
        *self.wake() = Some(tx.clone());
        if let Some(stdout) = running.child.stdout.take() {
            let spawned = std::thread::Builder::new()
                .name("exec-stdout".into())
                .spawn(move || read_lines(stdout, &tx));
            match spawned {
                Ok(t) => running.threads.push(t),
                Err(e) => {
                    *self.wake() = None;
                    running.finish(true, &self.log);
                    return Err(format!("cannot start a thread: {e}"));
                }
            }
        }
        let stopped = loop {
            if out.is_stopped() {
                break true;
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::Line(line)) => match self.line(out, &line) {
                    Err(EmitError::Stopped) => break true,
                    Err(e) => self.log.warn(&format!("a message was not accepted: {e}")),
                    Ok(()) => {}
                },
                Ok(Event::TooLong(n)) => self
                    .log
                    .warn(&format!("dropped a stdout line of more than {n} bytes")),
                Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => break false,
                Ok(Event::Wake) | Err(RecvTimeoutError::Timeout) => {}
            }
        };
        *self.wake() = None;
        // A reader blocked on the full queue gets an error and ends.
        drop(rx);
        if stopped {
            running.finish(true, &self.log);
            return Ok(true);
        }
        // stdout is closed: wait for the child to exit, or for stop.
        while !running.exited() {
            if out.wait_stopped(Duration::from_millis(20)) {
                running.finish(true, &self.log);
                return Ok(true);
            }
        }
        let status = running.finish(false, &self.log);
        self.log.warn(&format!(
            "{} exited ({})",
            self.program(),
            status.map_or_else(|| "status unknown".to_owned(), |s| s.to_string())
        ));
        Ok(false)
    }

    /// Stream mode: handle one stdout line.
    fn line(&self, out: &Emitter, line: &[u8]) -> Result<(), EmitError> {
        let line = trim_line(line);
        if line.is_empty() {
            return Ok(());
        }
        if is_json(line) {
            return out.emit("", line);
        }
        if self.config.wrap_lines {
            let text = String::from_utf8_lossy(line);
            return out.emit_json("", &json!({ "line": text }));
        }
        self.log.warn(&format!(
            "dropped a stdout line that is not JSON (set wrap_lines to keep it): {}",
            text(line, 200)
        ));
        Ok(())
    }

    /// Interval mode: run the command to completion; its stdout, or why not.
    fn run_once(&self) -> Result<Vec<u8>, String> {
        let mut running = self.spawn()?;
        let stdout = running.child.stdout.take();
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            let t = std::thread::Builder::new()
                .name("exec-stdout".into())
                .spawn(move || {
                    let mut stdout = stdout;
                    let mut buf = Vec::new();
                    let r = (&mut stdout)
                        .take(MAX_OUTPUT as u64 + 1)
                        .read_to_end(&mut buf)
                        .map(|_| buf);
                    // Drain the rest so the command isn't blocked on a full pipe.
                    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
                    let _ = tx.send(r);
                });
            match t {
                Ok(t) => running.threads.push(t),
                Err(e) => {
                    running.finish(true, &self.log);
                    return Err(format!("cannot start a thread: {e}"));
                }
            }
        }
        let deadline = Instant::now() + self.config.timeout;
        let mut pause = Duration::from_millis(1);
        while !running.exited() {
            if Instant::now() >= deadline {
                running.finish(true, &self.log);
                return Err(format!(
                    "timed out after {}; killed",
                    humantime::format_duration(self.config.timeout)
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        let status = running.finish(false, &self.log);
        let output = rx
            .recv_timeout(Duration::ZERO)
            .map_err(|_| "stdout was not read to its end".to_owned())?
            .map_err(|e| format!("reading stdout failed: {e}"))?;
        match status {
            Some(s) if s.success() => {}
            Some(s) => return Err(format!("{} ({s})", self.program_exit())),
            None => return Err(self.program_exit()),
        }
        if output.len() > MAX_OUTPUT {
            return Err(format!("its output is larger than {MAX_OUTPUT} bytes"));
        }
        let output = trim_line(&output);
        if !is_json(output) {
            return Err(format!("its output is not JSON: {}", text(output, 200)));
        }
        Ok(output.to_vec())
    }

    fn program_exit(&self) -> String {
        format!("{} failed", self.program())
    }
}

/// Stream mode: send each stdout line (without the newline), then Eof.
/// Whether `b` is one JSON value in UTF-8. (Skipping a value with
/// `IgnoredAny` alone does not check the UTF-8 inside its strings; the
/// gateway would then refuse the message as not JSON.)
fn is_json(b: &[u8]) -> bool {
    std::str::from_utf8(b).is_ok() && serde_json::from_slice::<IgnoredAny>(b).is_ok()
}

/// The next line of `r` into `line`, keeping at most `max` bytes of it
/// and a newline: the rest of a longer line is read and skipped, never kept
/// (output without newlines, such as a progress meter, costs no memory).
/// None at the end of the output; `Some(true)` for a line longer than `max`.
fn next_line(r: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> Option<bool> {
    line.clear();
    match r.take(max as u64 + 1).read_until(b'\n', line) {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            let long = line.len() > max && line.last() != Some(&b'\n');
            if long {
                let _ = r.skip_until(b'\n');
            }
            Some(long)
        }
    }
}

/// The next stderr line into `line`, at most `MAX_LOG_LINE` bytes of it.
/// None at the end of the output.
fn next_log_line(r: &mut impl BufRead, line: &mut Vec<u8>) -> Option<()> {
    next_line(r, line, MAX_LOG_LINE)?;
    line.truncate(MAX_LOG_LINE);
    Some(())
}

fn read_lines(stdout: impl Read, tx: &SyncSender<Event>) {
    let mut r = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        let event = match next_line(&mut r, &mut line, MAX_OUTPUT) {
            None => {
                let _ = tx.send(Event::Eof);
                return;
            }
            Some(true) => Event::TooLong(MAX_OUTPUT),
            Some(false) => Event::Line(std::mem::take(&mut line)),
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

impl Plugin for Exec {
    fn create(config: Value, host: Host) -> Result<Self, PluginError> {
        Ok(Exec::new(Config::parse(config)?, host))
    }

    fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        if self.config.mode != Mode::Interval {
            return Err(err(
                "`mode: stream` runs as a push source: set `source.mode: push`",
            ));
        }
        match self.run_once() {
            Ok(output) => match out.emit("", &output) {
                Ok(()) | Err(EmitError::Stopped) => {}
                Err(e) => self.log.warn(&format!("the message was not accepted: {e}")),
            },
            Err(why) => self.log.warn(&why),
        }
        Ok(())
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        if self.config.mode != Mode::Stream {
            return Err(err(
                "`mode: interval` runs as a poll source: set `source.mode: poll` and an `interval`",
            ));
        }
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            match self.stream_once(&out) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(why) => self.log.warn(&why),
            }
            if started.elapsed() >= RESTART_RESET {
                attempt = 0;
            }
            let delay = RESTART_MIN
                .saturating_mul(1 << attempt.min(16))
                .min(RESTART_MAX);
            attempt = attempt.saturating_add(1);
            self.log.warn(&format!(
                "restarting {} in {}",
                self.program(),
                humantime::format_duration(delay)
            ));
            if out.wait_stopped(delay) {
                return Ok(());
            }
        }
    }

    fn stop(&self) {
        if let Some(tx) = self.wake().as_ref() {
            // A full queue: the loop is busy and checks the stop flag anyway.
            let _ = tx.try_send(Event::Wake);
        }
    }
}

plugin_api::export_plugin!(Exec, name = "exec", modes = [poll, push]);

#[cfg(test)]
mod tests;
