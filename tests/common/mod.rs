//! Test harness: builds the real plugins, writes configs into a temp dir,
//! starts the real gateway on 127.0.0.1:0 and talks to it with real clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::Gateway;
use gateway::config::{self, LoadOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Generous bound for anything that should happen "soon"; reaching it fails
/// the test, it never paces it.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// target/<profile>, where cargo puts the plugin libraries and the binary.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML file shipped in the repository (hidden directories, `target/`
/// and the benchmark runner's `*.tmp` directories aside), sorted.
pub fn shipped_yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                // `*.tmp`: the benchmark runner's generated files (git-ignored).
                if !name.starts_with('.') && name != "target" && !name.ends_with(".tmp") {
                    walk(&p, out);
                }
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root(), &mut out);
    out.sort();
    out
}

/// Build the gateway binary and every plugin the tests load, once per test
/// binary.
///
/// `--workspace --lib --bins --examples` resolves features as `cargo test
/// --workspace` does (building an example brings in the dev-dependencies'
/// features), so after that command's own build this is a no-op instead of a
/// second build of the dependencies with other features. The variables cargo
/// sets for a running test (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...) are
/// removed: a crate whose build depends on one (ring does) would otherwise be
/// rebuilt here, and again by the next `cargo test`.
pub fn build_plugins() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = target_dir();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(repo_root()).args([
                "build",
                "-q",
                "--workspace",
                "--lib",
                "--bins",
                "--examples",
            ]);
            for (key, _) in std::env::vars_os() {
                let key = key.to_string_lossy();
                let set_by_cargo_for_tests = [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&key.as_ref())
                    || key.starts_with("CARGO_PKG_")
                    || key.starts_with("CARGO_BIN_");
                if set_by_cargo_for_tests {
                    cmd.env_remove(key.as_ref());
                }
            }
            if dir.file_name().and_then(|s| s.to_str()) == Some("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "building plugins failed");
            dir
        })
        .clone()
}

/// A directory holding a gateway.yaml, channel specs and schemas.
pub struct Deployment {
    pub dir: tempfile::TempDir,
}

impl Deployment {
    pub fn new() -> Deployment {
        build_plugins();
        Deployment {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> &Self {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, text).expect("write");
        self
    }

    /// Copy a schema shipped in channel-specs/schemas.
    pub fn shipped_schema(&self, name: &str) -> &Self {
        let text = std::fs::read_to_string(repo_root().join("channel-specs/schemas").join(name))
            .expect("read shipped schema");
        self.write(&format!("specs/schemas/{name}"), &text)
    }

    /// A gateway.yaml with one listener `main` on port 0 loading specs/*.yaml.
    pub fn gateway_yaml(&self, extra: &str) -> &Self {
        self.write(
            "gateway.yaml",
            &format!(
                "listeners:\n  main:\n    bind: 127.0.0.1:0\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n{extra}",
                target_dir().display()
            ),
        )
    }

    pub fn load(&self) -> Result<config::Config, config::ConfigErrors> {
        config::load(&self.path("gateway.yaml"), &LoadOptions::default())
    }

    pub async fn start(&self) -> Gateway {
        let cfg = self
            .load()
            .unwrap_or_else(|e| panic!("config should load:\n{e}"));
        Gateway::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("gateway should start:\n{e}"))
    }
}

/// The gateway binary serving `config` with JSON logs (and `env` added to
/// its environment); killed when dropped.
pub struct GatewayProcess {
    pub child: std::process::Child,
    /// The address it logged as `listening` (port 0 picks one).
    pub addr: SocketAddr,
    /// Its log lines after `listening`.
    pub logs: std::sync::mpsc::Receiver<String>,
}

impl GatewayProcess {
    /// Start it and wait until it logs `listening`; every line before must
    /// be JSON.
    pub fn spawn(config: &Path, env: &[(&str, &str)]) -> GatewayProcess {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(target_dir().join("gateway"))
            .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start gateway binary");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut p = GatewayProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
        };
        let v = p.wait_log("listening");
        p.addr = v["addr"].as_str().unwrap().parse().unwrap();
        p
    }

    /// The next log line with this `message` (each line must be JSON).
    pub fn wait_log(&self, message: &str) -> Value {
        loop {
            let line = self
                .logs
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("the gateway did not log {message:?} in time"));
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("log line is not JSON: {line}"));
            if v["message"] == message {
                return v;
            }
        }
    }

    /// Send it a signal (`TERM`, `HUP`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Kill it (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The schema test-faults messages satisfy: `{"seq": integer >= 1}` plus keyed fields.
pub const SEQ_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["seq"],
  "properties": { "seq": { "type": "integer", "minimum": 1 } }
}"#;

pub async fn connect(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    ws
}

/// The next text message as JSON (skipping pings).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("no message in time")
            .expect("stream ended")
            .expect("read error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("server sent JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Read until the server closes; returns the close code (None: no Close frame).
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("no close in time");
        match msg {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// The close code and reason the server sends next (skipping data).
pub async fn close_frame(ws: &mut Ws) -> Option<(u16, String)> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(f))) => {
                return f.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send");
}

/// A plain HTTP/1.1 request; returns (status, headers, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    split_response(&buf)
}

/// Read one metric sample, e.g. `gateway_validation_failures_total{channel="x",plugin="y"}`.
pub async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, _, body) = http(addr, "GET", "/metrics", &[]).await;
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// Wait until `series` on `/metrics` reads `value`, failing after PATIENCE.
pub async fn metric_becomes(addr: SocketAddr, series: &str, value: f64) {
    eventually(&format!("{series} == {value}"), || async {
        (metric(addr, series).await == Some(value)).then_some(())
    })
    .await;
}

/// Poll `check` until it returns Some, failing after PATIENCE.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connect with a tiny socket receive buffer, so a client that stops reading
/// pushes back on the gateway after kilobytes instead of megabytes.
pub async fn connect_stalling(addr: SocketAddr, path: &str) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = sock.connect(addr).await.expect("connect");
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    ws
}

/// [`connect_stalling`], then the bare TCP stream, to write frames by hand.
pub async fn connect_stalling_raw(addr: SocketAddr, path: &str) -> TcpStream {
    match connect_stalling(addr, path).await.into_inner() {
        MaybeTlsStream::Plain(s) => s,
        _ => unreachable!("plain ws:// connection"),
    }
}

/// A plain HTTP/1.1 request with a body; returns (status, headers, body).
pub async fn http_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    split_response(&buf)
}

/// Connect with extra request headers; Err carries the HTTP status of a refusal.
/// An upgrade request for `ws://{addr}{path}` with extra `headers`.
pub fn ws_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

pub async fn try_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, (u16, String)> {
    let req = ws_request(addr, path, headers);
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((r.status().as_u16(), body))
        }
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// Send a JSON value as a text message.
pub async fn send_json(ws: &mut Ws, v: &Value) {
    send_text(ws, &v.to_string()).await;
}

/// Assert that nothing arrives within `wait` (an absence check: it can only
/// pass wrongly, never fail wrongly, on a slow machine).
pub async fn assert_quiet(ws: &mut Ws, wait: Duration) {
    if let Ok(Some(Ok(m))) = tokio::time::timeout(wait, ws.next()).await {
        match m {
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// A test channel that emits what it is told: `POST /emit/<channel>` with a
/// JSON list of messages (see the `emit` route in [`BUS_HTTP`]).
pub fn bus_spec(name: &str, extra: &str) -> String {
    format!(
        "channel: {name}\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: push\n  config: {{burst: 0, interval_ms: 5}}\n{extra}"
    )
}

/// Channel `slow` at /slow: test-faults polled every 20 ms, each poll one
/// `{"seq":n}` (schema `schemas/seq.json`, [`SEQ_SCHEMA`]); with
/// [`hold_a_poll`], a poll that waits inside the plugin.
pub const SLOW_POLL_SPEC: &str = "channel: slow\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\nendpoints:\n  - path: /slow\n";

/// Accepts any JSON object.
pub const ANY_SCHEMA: &str = r#"{"type": "object"}"#;

/// Start an example's own `examples/<name>/gateway.yaml`, unchanged except
/// for the documented overrides: plugins from [`target_dir`] and every
/// listener moved to 127.0.0.1:0 (`--listen NAME=127.0.0.1:0`).
/// `listeners` must name exactly the example's listeners.
pub async fn start_example(name: &str, listeners: &[&str]) -> Gateway {
    build_plugins();
    let path = repo_root().join("examples").join(name).join("gateway.yaml");
    let plugin_dirs = Some(vec![target_dir()]);
    let as_written = config::load(
        &path,
        &LoadOptions {
            plugin_dirs: plugin_dirs.clone(),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{} should load:\n{e}", path.display()));
    let mut names: Vec<&str> = as_written
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    names.sort();
    let mut want = listeners.to_vec();
    want.sort();
    assert_eq!(names, want, "the listeners of {}", path.display());
    let listen = listeners
        .iter()
        .map(|n| (n.to_string(), "127.0.0.1:0".to_string()))
        .collect();
    let cfg = config::load(
        &path,
        &LoadOptions {
            plugin_dirs,
            listen,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{} should load:\n{e}", path.display()));
    Gateway::start(cfg)
        .await
        .unwrap_or_else(|e| panic!("{} should start:\n{e}", path.display()))
}

/// A JSON Schema shipped with an example (`examples/<name>/<rel>`), format
/// checks on, as the gateway compiles channel schemas.
pub fn example_schema(name: &str, rel: &str) -> jsonschema::Validator {
    let path = repo_root().join("examples").join(name).join(rel);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{} does not compile: {e}", path.display()))
}

/// Fail unless `value` satisfies `schema`.
/// An object's keys, sorted.
pub fn sorted_keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort();
    k
}

/// An ISO 8601 UTC timestamp with milliseconds (`2024-01-15T10:30:00.000Z`),
/// as JavaScript's `toISOString` writes it.
pub fn is_iso_millis(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 24 && s.ends_with('Z') && s.as_bytes()[10] == b'T')
}

pub fn assert_schema(schema: &jsonschema::Validator, what: &str, value: &Value) {
    if let Err(e) = schema.validate(value) {
        panic!("{what} does not satisfy its schema: {e}\n{value}");
    }
}

/// The next text frame as JSON (skipping Ping/Pong), or the close code when
/// the server closes instead (`Err(None)`: closed without a Close frame).
pub async fn next_json_or_close(ws: &mut Ws) -> Result<Value, Option<u16>> {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("no message in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                return Ok(serde_json::from_str(&t).expect("server sent JSON"));
            }
            Some(Ok(Message::Close(f))) => return Err(f.map(|f| u16::from(f.code))),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("expected a text message, got {other:?}"),
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// A point PATIENCE from now, for loops that read until something shows up.
pub fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + PATIENCE
}

/// Fail once `deadline` has passed: a stream that keeps sending other
/// messages must not keep a reading loop going forever.
pub fn before(deadline: tokio::time::Instant, what: &str) {
    assert!(
        tokio::time::Instant::now() < deadline,
        "timed out waiting for {what}"
    );
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, made now:
/// (certificate PEM, PKCS#8 private key PEM).
pub fn self_signed_cert() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate a self-signed certificate");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// An HTTP/1.1 response read to its end, as (status, headers, body).
pub fn split_response(buf: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, head.to_string(), body.to_string())
}

/// A gateway with the status page: its `builtin: status` channel (the
/// shipped schema, a snapshot every `status_every`, `key` in its keys file)
/// at `/ws/status`, a channel whose test-faults plugin sends a
/// schema-invalid message every `invalid_every` polls (`/ws/faults`, one
/// connection at most) and one whose plugin fails every `error_every` polls
/// (`/ws/flaky`), both polled every `poll_every`.
pub fn status_page_deployment(
    key: &str,
    status_every: &str,
    poll_every: &str,
    invalid_every: u32,
    error_every: u32,
) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("admin:\n  status_page:\n    path: /status\n    endpoint: /ws/status\n");
    let schema =
        std::fs::read_to_string(repo_root().join("channel-specs/schemas/gateway-status.json"))
            .expect("read the shipped status schema");
    dep.write("specs/schemas/gateway-status.json", &schema);
    dep.write("specs/schemas/seq.json", SEQ_SCHEMA);
    dep.write("specs/status.keys", &format!("# test key\n{key}\n"));
    dep.write(
        "specs/status.yaml",
        &format!("channel: status\nschema: schemas/gateway-status.json\nsource:\n  builtin: status\n  interval: {status_every}\nlast_value: true\nendpoints:\n  - path: /ws/status\n    auth:\n      mode: api_key\n      query: api_key\n      keys_file: status.keys\n"),
    );
    dep.write(
        "specs/faults.yaml",
        &format!("channel: faults\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: {poll_every}\n  config: {{invalid_every: {invalid_every}}}\nendpoints:\n  - path: /ws/faults\n    limits: {{max_connections: 1}}\n"),
    );
    dep.write(
        "specs/flaky.yaml",
        &format!("channel: flaky\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: {poll_every}\n  config: {{error_every: {error_every}}}\nendpoints:\n  - path: /ws/flaky\n"),
    );
    dep
}

/// A command to `rt`'s plugin, answered as JSON (a refusal fails the test).
pub async fn plugin_command(rt: &gateway::channel::ChannelRuntime, request: Value) -> Value {
    let reply = rt
        .command(request.to_string().into_bytes(), PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("command {request}: {e:?}"));
    serde_json::from_slice(&reply).expect("the plugin answered JSON")
}

/// Hold `rt`'s test-faults polls (`hold`) and wait until one is held inside
/// the plugin; its `status` then (`seq`: the last message it emitted).
/// Pair with [`then_release`].
pub async fn hold_a_poll(rt: &gateway::channel::ChannelRuntime) -> Value {
    eventually("the channel's plugin", || async {
        rt.command(br#"{"op":"hold"}"#.to_vec(), PATIENCE)
            .await
            .ok()
    })
    .await;
    eventually("a held poll", || async {
        let v = plugin_command(rt, serde_json::json!({"op": "status"})).await;
        (v["in_poll"] == 1).then_some(v)
    })
    .await
}

/// Run `f`, then release `rt`'s held polls whatever happened: a test that
/// fails meanwhile fails at once, not after the plugin's own 60 s bound.
pub async fn then_release<T>(
    rt: &gateway::channel::ChannelRuntime,
    f: impl std::future::Future<Output = T>,
) -> T {
    use futures_util::FutureExt;
    let r = std::panic::AssertUnwindSafe(f).catch_unwind().await;
    plugin_command(rt, serde_json::json!({"op": "release"})).await;
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}
