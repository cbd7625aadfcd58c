//! The general-purpose source plugins (`http-poll`, `exec`), the template and
//! a plugin written in C, each loaded from its real `.so` by the real gateway
//! and read over real WebSockets.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};

use common::*;
use gateway::config::{self, LoadOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Accepts every object.
const ANY_OBJECT: &str =
    r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}"#;

// ---------------------------------------------------------------------------
// Log capture: plugins log through the host into `tracing`; this binary's
// global subscriber keeps every line so tests can look for theirs (each test
// uses its own channel names).

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
    });
}

/// Log lines of `channel` containing `text`. Plugin logs carry
/// `channel="x"`, the gateway's own `channel=x`.
fn logged(channel: &str, text: &str) -> Vec<String> {
    let quoted = format!("channel=\"{channel}\"");
    let plain = format!("channel={channel} ");
    String::from_utf8_lossy(&LOGS.lock().unwrap())
        .lines()
        .filter(|l| (l.contains(&quoted) || l.contains(&plain)) && l.contains(text))
        .map(str::to_owned)
        .collect()
}

async fn eventually_logged(channel: &str, text: &str) -> String {
    eventually(
        &format!("a log line of {channel} with {text:?}"),
        || async { logged(channel, text).into_iter().next() },
    )
    .await
}

// ---------------------------------------------------------------------------
// A scriptable HTTP upstream on 127.0.0.1:0.

#[derive(Default)]
struct UpstreamState {
    status: u16,
    /// `{n}` is replaced by the request number (1, 2, ...).
    body: String,
    /// Request heads, in order.
    requests: Vec<String>,
}

#[derive(Clone)]
struct Upstream {
    url: String,
    state: Arc<Mutex<UpstreamState>>,
}

impl Upstream {
    async fn start(status: u16, body: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(UpstreamState {
            status,
            body: body.to_owned(),
            requests: Vec::new(),
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let (status, body) = {
                        let mut s = st.lock().unwrap();
                        s.requests.push(String::from_utf8_lossy(&head).into_owned());
                        let n = s.requests.len();
                        (s.status, s.body.replace("{n}", &n.to_string()))
                    };
                    let response = format!(
                        "HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Upstream { url, state }
    }

    fn answer(&self, status: u16, body: &str) {
        let mut s = self.state.lock().unwrap();
        s.status = status;
        s.body = body.to_owned();
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Wait until `more` requests arrived after the `seen`-th.
    async fn wait_requests(&self, seen: usize, more: usize) -> usize {
        eventually(&format!("{more} more upstream requests"), || async {
            let n = self.requests().len();
            (n >= seen + more).then_some(n)
        })
        .await
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn spec(channel: &str, source: &str) -> String {
    format!(
        "channel: {channel}\nschema: schemas/any.json\nsource:\n{source}\nendpoints:\n  - path: /{channel}\n"
    )
}

async fn failures(addr: std::net::SocketAddr, channel: &str, plugin: &str) -> f64 {
    metric(
        addr,
        &format!("gateway_plugin_failures_total{{channel=\"{channel}\",plugin=\"{plugin}\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// http-poll

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_poll_extracts_renames_skips_unchanged_and_sends_env_headers() {
    capture_logs();
    let up = Upstream::start(
        200,
        r#"{"data":{"price":1,"sym":"X","noise":{n}},"other":true}"#,
    )
    .await;
    let path = std::env::var("PATH").expect("PATH is set");
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_OBJECT)
        .write(
            "specs/quotes.yaml",
            &spec(
                "quotes",
                &format!(
                    "  plugin: http-poll\n  mode: poll\n  interval: 10ms\n  config:\n    url: {}/v1/quote?sym=X\n    headers: {{X-Static: fixed}}\n    headers_env: {{X-From-Env: PATH}}\n    extract: /data\n    fields: {{value: /price, symbol: /sym}}\nlast_value: true\n",
                    up.url
                ),
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // Polling starts with the gateway; `last_value` hands the first change
    // to a client that subscribes after it.
    let mut ws = connect(addr, "/quotes").await;
    assert_eq!(next_json(&mut ws).await, json!({"value": 1, "symbol": "X"}));
    // Many more polls see only `noise` change: nothing is emitted for them,
    // so the next message the client gets is the next real change.
    let seen = up.requests().len();
    up.wait_requests(seen, 10).await;
    up.answer(200, r#"{"data":{"price":2,"sym":"X","noise":{n}}}"#);
    assert_eq!(next_json(&mut ws).await, json!({"value": 2, "symbol": "X"}));

    let requests = up.requests();
    let first = &requests[0];
    assert!(
        first.starts_with("GET /v1/quote?sym=X HTTP/1.1\r\n"),
        "{first}"
    );
    assert_eq!(header(first, "x-static"), Some("fixed"));
    assert_eq!(header(first, "x-from-env"), Some(path.trim()));
    assert_eq!(failures(addr, "quotes", "http-poll").await, 0.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_poll_logs_upstream_errors_backs_off_and_recovers_without_a_restart() {
    capture_logs();
    let up = Upstream::start(200, r#"{"v":1}"#).await;
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_OBJECT)
        .write(
            "specs/flaky.yaml",
            &spec(
                "flaky",
                &format!(
                    "  plugin: http-poll\n  mode: poll\n  interval: 5ms\n  config:\n    url: {}/\n    max_skip: 4\nlast_value: true\n",
                    up.url
                ),
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // The source polls from start-up and sends an unchanged body only once:
    // `last_value` hands {"v":1} to a client that subscribes after it.
    let mut ws = connect(addr, "/flaky").await;
    assert_eq!(next_json(&mut ws).await, json!({"v": 1}));

    // A failing upstream: errors, then a body that is not JSON.
    up.answer(503, "try later");
    let line = eventually_logged("flaky", "HTTP 503 Service Unavailable").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("try later"), "{line}");
    // Then a body that is not JSON (its log line falls in the rate limit's
    // 10 s window; the unit tests check its text).
    up.answer(200, "<html>not json</html>");
    // Backoff: after 3+ failures in a row, each request is followed by at
    // least 4 skipped polls (max_skip 4) of 5 ms. Without backoff, 6 requests
    // take 25 ms; with it, at least 15 + 4 × 25 ms.
    let start = up.requests().len();
    let t0 = tokio::time::Instant::now();
    up.wait_requests(start, 6).await;
    let took = t0.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(100),
        "6 requests in {took:?}: polls were not skipped"
    );
    assert_eq!(
        logged("flaky", "HTTP 503").len(),
        1,
        "rate-limited to one line"
    );

    up.answer(200, r#"{"v":2}"#);
    // The client gets the recovered value next: nothing was emitted meanwhile.
    assert_eq!(next_json(&mut ws).await, json!({"v": 2}));
    eventually_logged("flaky", "recovered after").await;
    // Upstream errors never failed the instance.
    assert_eq!(failures(addr, "flaky", "http-poll").await, 0.0);
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_restarts_total{channel=\"flaky\",plugin=\"http-poll\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// exec

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_emits_lines_logs_stderr_and_kills_the_command_at_shutdown() {
    capture_logs();
    let dep = Deployment::new();
    // The shell starts a background sleep, then repeats: its own and the
    // sleep's pid, three JSON lines, a plain line and a stderr line.
    let script = r#"sleep 600 & s=$!; while true; do echo "{\"shell\":$$,\"sleep\":$s}"; for i in 1 2 3; do echo "{\"i\":$i}"; done; echo plain words; echo "disk almost full" >&2; sleep 0.2; done"#;
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_OBJECT)
        .write(
            "specs/lines.yaml",
            &spec(
                "lines",
                &format!(
                    "  plugin: exec\n  mode: push\n  config:\n    mode: stream\n    wrap_lines: true\n    command: [sh, -c, {}]\n",
                    serde_json::to_string(script).unwrap()
                ),
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/lines").await;
    let pids = loop {
        let m = next_json(&mut ws).await;
        if m.get("shell").is_some() {
            break m;
        }
    };
    for expect in [
        json!({"i": 1}),
        json!({"i": 2}),
        json!({"i": 3}),
        json!({"line": "plain words"}),
    ] {
        assert_eq!(next_json(&mut ws).await, expect);
    }
    let line = eventually_logged("lines", "sh stderr: disk almost full").await;
    assert!(line.contains("WARN"), "{line}");
    // The same command all along: one process per channel, not restarted.
    assert_eq!(next_json(&mut ws).await, pids);

    let shell = pids["shell"].as_u64().unwrap();
    let sleep = pids["sleep"].as_u64().unwrap();
    assert!(alive(shell) && alive(sleep));
    assert!(gw.shutdown().await);
    // The shell is this process's child: gone means killed and reaped (a
    // zombie keeps /proc/<pid>). Its background sleep went with its group.
    eventually("the command to be gone", || async {
        (!alive(shell)).then_some(())
    })
    .await;
    eventually("its background sleep to be gone", || async {
        (!alive(sleep)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_restarts_the_command_when_it_exits() {
    capture_logs();
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_OBJECT)
        .write(
            "specs/oneshot.yaml",
            &spec(
                "oneshot",
                "  plugin: exec\n  mode: push\n  config:\n    mode: stream\n    command: [sh, -c, 'echo \"{\\\"pid\\\":$$}\"']\n",
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/oneshot").await;
    // Each run prints its pid and exits; a restarted run has another pid.
    let first = next_json(&mut ws).await["pid"].as_u64().unwrap();
    let second = next_json(&mut ws).await["pid"].as_u64().unwrap();
    let third = next_json(&mut ws).await["pid"].as_u64().unwrap();
    assert!(
        first != second && second != third,
        "{first} {second} {third}"
    );
    eventually_logged("oneshot", "restarting sh in").await;
    eventually_logged("oneshot", "sh exited (exit status: 0)").await;
    // A command that exits is not a plugin failure.
    assert_eq!(failures(addr, "oneshot", "exec").await, 0.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_interval_runs_the_command_each_poll() {
    capture_logs();
    let dep = Deployment::new();
    let counter = dep.path("count");
    let script = format!(
        "n=$(( $(cat {0} 2>/dev/null || echo 0) + 1 )); echo $n > {0}; printf '{{\"run\": %s, \"from\": \"%s\"}}' $n \"$WHO\"",
        counter.display()
    );
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_OBJECT)
        .write(
            "specs/runs.yaml",
            &spec(
                "runs",
                &format!(
                    "  plugin: exec\n  mode: poll\n  interval: 20ms\n  config:\n    mode: interval\n    timeout: 5s\n    env: {{WHO: gateway}}\n    command: [sh, -c, {}]\n",
                    serde_json::to_string(&script).unwrap()
                ),
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/runs").await;
    let a = next_json(&mut ws).await;
    let b = next_json(&mut ws).await;
    assert_eq!(a["from"], "gateway");
    assert_eq!(b["run"].as_u64().unwrap(), a["run"].as_u64().unwrap() + 1);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// The template and a C plugin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_plugin_runs_in_both_modes() {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_OBJECT)
        .write(
            "specs/tpoll.yaml",
            &spec(
                "tpoll",
                "  plugin: template\n  mode: poll\n  interval: 10ms\n  config: {greeting: polled}\n",
            ),
        )
        .write(
            "specs/tpush.yaml",
            &spec(
                "tpush",
                "  plugin: template\n  mode: push\n  config: {greeting: pushed, every: 10ms}\n",
            ),
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    for (path, greeting) in [("/tpoll", "polled"), ("/tpush", "pushed")] {
        let mut ws = connect(addr, path).await;
        let a = next_json(&mut ws).await;
        let b = next_json(&mut ws).await;
        assert_eq!(a["greeting"], greeting);
        assert_eq!(
            b["count"].as_u64().unwrap(),
            a["count"].as_u64().unwrap() + 1
        );
    }
    gw.shutdown().await;
}

/// A C plugin that leaves entries of its table null (here `start` and
/// `command`, easy to leave out of a designated initializer for a poll-only
/// plugin) is refused at load, naming them. Before, it loaded, and the
/// first call of a null entry (a client's command, say) crashed the process.
#[test]
fn a_c_plugin_with_null_table_entries_is_refused_naming_them() {
    let dep = Deployment::new();
    let root = repo_root();
    let source = std::fs::read_to_string(root.join("plugins/c-example/counter.c")).unwrap();
    let partial = source
        .replace("    .start = counter_start,\n", "")
        .replace("    .command = counter_command,\n", "");
    assert_eq!(partial.len() + 60, source.len(), "both lines left out");
    let c_file = dep.path("partial.c");
    std::fs::write(&c_file, partial).unwrap();
    let lib = dep.path("libc_partial.so");
    let status = std::process::Command::new("cc")
        .args(["-std=c11", "-Wall", "-shared", "-fPIC", "-I"])
        .arg(root.join("plugins/plugin-api/include"))
        .arg("-o")
        .arg(&lib)
        .arg(&c_file)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling partial.c failed");
    let err = gateway::plugin::PluginRegistry::global()
        .load(&lib)
        .expect_err("a table with null entries must be refused");
    assert_eq!(
        err,
        format!(
            "plugin {} leaves these entries of its table null: start, command; fill every entry of GwPluginV1 (a call for a mode the plugin does not declare answers GW_UNSUPPORTED)",
            lib.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_written_in_c_is_loaded_and_delivers() {
    capture_logs();
    let dep = Deployment::new();
    let out_dir = dep.path("cplugins");
    std::fs::create_dir_all(&out_dir).unwrap();
    let root = repo_root();
    let status = std::process::Command::new("cc")
        .args([
            "-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I",
        ])
        .arg(root.join("plugins/plugin-api/include"))
        .arg("-o")
        .arg(out_dir.join("libc_counter.so"))
        .arg(root.join("plugins/c-example/counter.c"))
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling counter.c failed");
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\nplugins:\n  dirs: [{}, {}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display(),
            out_dir.display()
        ),
    )
    .write("specs/schemas/any.json", ANY_OBJECT)
    .write(
        "specs/counted.yaml",
        &spec("counted", "  plugin: c-counter\n  mode: poll\n  interval: 10ms\n"),
    )
    .write(
        "specs/refused.yaml",
        &spec(
            "refused",
            "  plugin: c-counter\n  mode: poll\n  interval: 1s\n  config: {start: 5}\n",
        ),
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/counted").await;
    let a = next_json(&mut ws).await;
    let n = a["n"].as_u64().expect("an integer n");
    assert_eq!(a, json!({"n": n, "source": "c"}));
    assert_eq!(next_json(&mut ws).await, json!({"n": n + 1, "source": "c"}));
    // A config the C plugin refuses: create fails with its message, and the
    // gateway counts the failure and retries.
    eventually("the refused channel to fail", || async {
        (failures(addr, "refused", "c-counter").await >= 1.0).then_some(())
    })
    .await;
    eventually_logged("refused", "c-counter: takes no config").await;
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// The shipped examples

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_source_examples_load_and_the_exec_ones_deliver() {
    let plugins = build_plugins();
    let file = repo_root().join("examples/sources/gateway.yaml");
    let opts = LoadOptions {
        plugin_dirs: Some(vec![plugins]),
        listen: BTreeMap::from([("main".to_owned(), "127.0.0.1:0".to_owned())]),
        ..Default::default()
    };
    let cfg = config::load(&file, &opts).unwrap_or_else(|e| panic!("{e}"));
    let mut channels: Vec<(String, String)> = cfg
        .channels
        .iter()
        .map(|c| (c.name.to_string(), c.source.name().to_string()))
        .collect();
    channels.sort();
    assert_eq!(
        channels,
        [
            ("loadavg".to_owned(), "exec".to_owned()),
            ("status".to_owned(), "http-poll".to_owned()),
            ("uptime".to_owned(), "exec".to_owned()),
        ]
    );
    let gw = gateway::Gateway::start(cfg).await.unwrap();
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws/loadavg").await;
    let m: Value = next_json(&mut ws).await;
    assert!(m["load1"].is_number(), "{m}");
    let mut ws = connect(addr, "/ws/uptime").await;
    let m: Value = next_json(&mut ws).await;
    assert!(m["uptime_secs"].is_number(), "{m}");
    gw.shutdown().await;
}
