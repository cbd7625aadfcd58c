//! Helpers of the service-backed suite: reachability checks, unique names,
//! private server processes for outage tests, a gating TCP forwarder, and
//! WebSocket reads that skip warm-up messages.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::common::{PATIENCE, Ws, eventually, next_json};

pub const REDIS: &str = "127.0.0.1:6379";
pub const MQTT: &str = "127.0.0.1:1883";
pub const NATS: &str = "127.0.0.1:4222";
pub const POSTGRES: &str = "127.0.0.1:5432";

/// Fail (never skip) when `service` does not accept connections at `addr`.
pub async fn require(service: &str, addr: &str) {
    match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!(
            "{service} is not reachable at {addr}: {e}. The service-backed suite needs it running \
             (see /work/.library/env or the README's test section)"
        ),
        Err(_) => panic!("{service} at {addr} did not accept a connection within 3 s"),
    }
}

/// A name no other run or test uses: `<prefix>_<pid>_<nanos>_<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A permissive schema for the tests' channels.
pub const OBJECT_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object"
}"#;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Wait until something accepts connections on `addr`.
pub async fn wait_listening(what: &str, addr: SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until nothing accepts connections on `addr`.
pub async fn wait_closed(what: &str, addr: SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if TcpStream::connect(addr).await.is_err() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} still listens on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Delete JetStream streams from the shared NATS server, from a thread of
/// its own (callable from `Drop`, on a runtime thread or after the test's
/// runtime is gone). Streams that do not exist are skipped.
pub fn delete_nats_streams(names: Vec<String>) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(c) = async_nats::connect(NATS).await {
                let js = async_nats::jetstream::new(c);
                for name in &names {
                    let _ = js.delete_stream(name).await;
                }
            }
        });
    })
    .join();
}

/// A private server process (redis-server or mosquitto) on its own port,
/// which a test may stop and start again. Killed on drop, so a failing test
/// leaves nothing running; the shared services are never touched.
pub struct PrivateServer {
    what: &'static str,
    program: &'static str,
    args: Vec<String>,
    pub addr: SocketAddr,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl PrivateServer {
    /// `redis-server` without persistence on a free port.
    pub async fn redis() -> PrivateServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.path().display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        Self::launch("redis-server", "redis-server", args, port, dir).await
    }

    /// `mosquitto` (anonymous, no persistence) on a free port.
    pub async fn mosquitto() -> PrivateServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf: PathBuf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("write mosquitto.conf");
        let args = vec!["-c".to_owned(), conf.display().to_string()];
        Self::launch("mosquitto", "mosquitto", args, port, dir).await
    }

    /// `nats-server` with JetStream (memory and a temporary store) on a
    /// free port, plus `extra` arguments (e.g. `--user`/`--pass`).
    pub async fn nats(extra: &[&str]) -> PrivateServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut args = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-sd",
            &dir.path().display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::launch("nats-server", "nats-server", args, port, dir).await
    }

    async fn launch(
        what: &'static str,
        program: &'static str,
        args: Vec<String>,
        port: u16,
        dir: tempfile::TempDir,
    ) -> PrivateServer {
        let mut s = PrivateServer {
            what,
            program,
            args,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            _dir: dir,
        };
        s.start().await;
        s
    }

    /// Start the process (again) and wait until it listens.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.what);
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (`{}`): {e}; the outage tests need the {} binary installed",
                    self.what, self.program, self.program
                )
            });
        self.child = Some(child);
        wait_listening(self.what, self.addr).await;
    }

    /// Kill the process and wait until its port is closed.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_closed(self.what, self.addr).await;
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a [`Gate`] does with connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GateState {
    /// Accept and close at once.
    Closed,
    /// Forward.
    Open,
    /// Keep every connection open and forward nothing either way: a server
    /// (or the path to it) gone silent.
    Frozen,
}

/// A TCP forwarder to a real service that refuses connections (accepts and
/// closes them) until opened, and cuts every forwarded connection when
/// closed again. Lets a test connect its WebSocket client before the plugin
/// can reach the service, and freeze a connection to play a silent server.
pub struct Gate {
    pub addr: SocketAddr,
    state: watch::Sender<GateState>,
    /// Forwarded connections still open.
    active: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn new(target: &str) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let addr = listener.local_addr().expect("gate addr");
        let (state, rx) = watch::channel(GateState::Closed);
        let target = target.to_owned();
        let active = Arc::new(AtomicUsize::new(0));
        let count = active.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = rx.clone();
                let target = target.clone();
                count.fetch_add(1, Ordering::SeqCst);
                let count = count.clone();
                tokio::spawn(async move {
                    Gate::serve(&mut inbound, &target, &mut rx).await;
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Gate {
            addr,
            state,
            active,
            task,
        }
    }

    async fn serve(inbound: &mut TcpStream, target: &str, rx: &mut watch::Receiver<GateState>) {
        let mut outbound = None;
        loop {
            let now = *rx.borrow_and_update();
            match now {
                GateState::Closed => return,
                GateState::Frozen => {
                    // Hold both sides, silent, until the state changes; a
                    // frozen connection is not resumed (it is cut).
                    let _ = rx.changed().await;
                    if outbound.is_some() {
                        return;
                    }
                }
                GateState::Open => {
                    let out = match &mut outbound {
                        Some(out) => out,
                        None => match TcpStream::connect(target).await {
                            Ok(out) => outbound.insert(out),
                            Err(_) => return,
                        },
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(inbound, out) => return,
                        _ = rx.changed() => {}
                    }
                }
            }
        }
    }

    pub fn open(&self) {
        self.state.send_replace(GateState::Open);
    }

    /// Refuse new connections and cut the forwarded ones.
    pub fn close(&self) {
        self.state.send_replace(GateState::Closed);
    }

    /// Forward nothing more, either way, and hold new connections silent;
    /// `open` or `close` cuts what was frozen.
    pub fn freeze(&self) {
        self.state.send_replace(GateState::Frozen);
    }

    /// Connections the gate holds (forwarded or frozen).
    pub fn connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Wait until every forwarded connection has ended by itself: both sides
    /// closed, so what the client wrote before closing reached the service.
    /// (`close` cuts connections at once and could drop those last bytes.)
    pub async fn wait_idle(&self) {
        eventually("the gate's forwarded connections to end", || async {
            (self.active.load(Ordering::SeqCst) == 0).then_some(())
        })
        .await;
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
        self.task.abort();
    }
}

/// The next message within `wait`, or None.
pub async fn try_next_json(ws: &mut Ws, wait: Duration) -> Option<Value> {
    tokio::time::timeout(wait, next_json(ws)).await.ok()
}

/// Publish `{"warmup": n}` (through `publish`) until one reaches `ws`: the
/// plugin is then subscribed. Later warm-ups are skipped by [`next_data`].
pub async fn warm_up<F, Fut>(ws: &mut Ws, mut publish: F)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = Instant::now() + PATIENCE;
    let mut n = 0;
    loop {
        publish(n).await;
        n += 1;
        if let Some(v) = try_next_json(ws, Duration::from_millis(200)).await {
            assert!(
                v.get("warmup").is_some(),
                "expected a warm-up message, got {v}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no message reached the WebSocket client in time (is the plugin subscribed?)"
        );
    }
}

/// The next message that is not a warm-up.
pub async fn next_data(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws).await;
        if v.get("warmup").is_none() {
            return v;
        }
    }
}

/// Assert that no data message (warm-ups aside) arrives within `wait`.
pub async fn assert_quiet(ws: &mut Ws, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, next_json(ws)).await {
            Err(_) => return,
            Ok(v) if v.get("warmup").is_some() => continue,
            Ok(v) => panic!("expected no message, got {v}"),
        }
    }
}

/// A gateway spec for one push channel on `plugin` with `config` (JSON),
/// schema `schemas/object.json`, at `path`.
pub fn spec(channel: &str, plugin: &str, config: &Value, path: &str) -> String {
    format!(
        "channel: {channel}\nschema: schemas/object.json\nsource:\n  plugin: {plugin}\n  mode: push\n  config: {config}\nendpoints:\n  - path: {path}\n"
    )
}

/// Drop the test's clients (so no session waits for a Close reply), shut
/// the gateway down and check its plugins stopped promptly (their run threads
/// are joined before shutdown returns).
pub async fn shutdown_promptly<const N: usize>(gw: gateway::Gateway, clients: [Ws; N]) {
    drop(clients);
    let t0 = Instant::now();
    let done = gw.shutdown().await;
    let took = t0.elapsed();
    assert!(done, "gateway shutdown hit its deadline");
    assert!(
        took < Duration::from_secs(2),
        "gateway shutdown took {took:?}: a plugin did not stop promptly"
    );
}

/// Every log line of this test binary (the gateway's `tracing` output,
/// including what plugins log through the host), captured from the first call on.
fn log_buffer() -> &'static std::sync::Mutex<Vec<u8>> {
    static BUF: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    BUF.get_or_init(|| {
        let buf: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || LogWriter(buf))
            .try_init();
        buf
    })
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Start capturing log lines (call before starting the gateway).
pub fn capture_logs() {
    log_buffer();
}

/// The first captured log line that contains every one of `parts` now.
fn log_line(parts: &[&str]) -> Option<String> {
    String::from_utf8_lossy(&log_buffer().lock().unwrap())
        .lines()
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
}

/// Whether a captured log line contains every one of `parts` now.
pub fn logged(parts: &[&str]) -> bool {
    log_line(parts).is_some()
}

/// Wait until a captured log line contains every one of `parts`; returns it.
pub async fn wait_for_log(parts: &[&str]) -> String {
    eventually(&format!("a log line with {parts:?}"), || {
        std::future::ready(log_line(parts))
    })
    .await
}

/// The suite's own guard: an unreachable service fails, naming it and its address.
#[tokio::test]
#[should_panic(expected = "Redis is not reachable at 127.0.0.1:9")]
async fn an_unreachable_service_fails_the_test_naming_it() {
    require("Redis", "127.0.0.1:9").await;
}

/// Wait until the gateway counts `n` subscribers on `channel` (the
/// WebSocket handshake completes a little before the subscription is made).
pub async fn wait_subscribed(addr: SocketAddr, channel: &str, plugin: &str, n: usize) {
    let series = format!("gateway_subscribers{{channel=\"{channel}\",plugin=\"{plugin}\"}}");
    eventually(&format!("{n} subscriber(s) on {channel}"), || async {
        crate::common::metric(addr, &series)
            .await
            .filter(|v| *v >= n as f64)
            .map(|_| ())
    })
    .await;
}
