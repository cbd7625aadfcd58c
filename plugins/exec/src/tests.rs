//! Unit tests with real commands (`sh`), through the trait and the ABI.

use std::path::Path;

use plugin_api::abi::{GW_ERROR, GW_LOG_WARN, GW_OK};
use plugin_api::testing::{Loaded, TestHost};
use serde_json::json;

use super::*;

const PATIENCE: Duration = Duration::from_secs(20);

fn exec(host: &TestHost, config: Value) -> Exec {
    Exec::new(Config::parse(config).unwrap(), host.host())
}

fn sh(script: &str) -> Value {
    json!(["sh", "-c", script])
}

fn warnings(host: &TestHost) -> Vec<String> {
    host.logs()
        .into_iter()
        .filter(|(l, _)| *l == GW_LOG_WARN)
        .map(|(_, m)| m)
        .collect()
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn config_defaults_and_errors() {
    let c = Config::parse(json!({"mode": "stream", "command": ["cat"]})).unwrap();
    assert_eq!(
        c,
        Config {
            mode: Mode::Stream,
            command: vec!["cat".into()],
            env: BTreeMap::new(),
            cwd: None,
            wrap_lines: false,
            timeout: Duration::from_secs(10),
        }
    );
    let c = Config::parse(
        json!({"mode": "interval", "command": ["date"], "timeout": "250ms",
        "env": {"A": "1"}, "cwd": "/"}),
    )
    .unwrap();
    assert_eq!(c.timeout, Duration::from_millis(250));
    assert_eq!(c.cwd, Some(PathBuf::from("/")));
    for (config, expect) in [
        (json!({"command": ["x"]}), "`mode` is required"),
        (
            json!({"mode": "daemon", "command": ["x"]}),
            "unknown variant `daemon`",
        ),
        (json!({"mode": "stream"}), "`command` is required"),
        (
            json!({"mode": "stream", "command": []}),
            "`command` is required",
        ),
        (
            json!({"mode": "stream", "command": [""]}),
            "`command[0]` (the program) is empty",
        ),
        (
            json!({"mode": "stream", "command": "ls -l"}),
            "invalid type",
        ),
        (
            json!({"mode": "stream", "command": ["x"], "env": {"A=B": "1"}}),
            "invalid variable name",
        ),
        (
            json!({"mode": "stream", "command": ["x"], "cwd": "/no/such/dir"}),
            "is not a directory",
        ),
        (
            json!({"mode": "stream", "command": ["x"], "timeout": "1s"}),
            "`timeout` applies to `mode: interval` only",
        ),
        (
            json!({"mode": "interval", "command": ["x"], "wrap_lines": true}),
            "`wrap_lines` applies to `mode: stream` only",
        ),
        (
            json!({"mode": "interval", "command": ["x"], "timeout": "0s"}),
            "must be more than 0",
        ),
        (
            json!({"mode": "interval", "command": ["x"], "timeout": "later"}),
            "is not a duration",
        ),
        (
            json!({"mode": "interval", "command": ["x"], "timeout": "500000000000y"}),
            "is more than a day",
        ),
        (
            json!({"mode": "interval", "command": ["x"], "shell": true}),
            "unknown field `shell`",
        ),
    ] {
        let e = Config::parse(config.clone()).unwrap_err();
        assert!(e.message().starts_with("exec: "), "{config}: {e}");
        assert!(e.message().contains(expect), "{config}: {e}");
    }
}

#[test]
fn interval_emits_the_whole_stdout_as_one_message() {
    let host = TestHost::new();
    let dir = std::env::temp_dir();
    let p = exec(
        &host,
        json!({"mode": "interval", "env": {"GREETING": "hi"}, "cwd": dir,
               "command": sh(r#"printf '{\n "greeting": "%s",\n "cwd": "%s"\n}\n' "$GREETING" "$(pwd)"; echo note >&2"#)}),
    );
    p.poll(None, &host.emitter()).unwrap();
    let got = host.json_messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["greeting"], "hi");
    assert_eq!(
        Path::new(got[0].1["cwd"].as_str().unwrap())
            .canonicalize()
            .unwrap(),
        dir.canonicalize().unwrap()
    );
    assert_eq!(warnings(&host), vec!["sh stderr: note".to_owned()]);
}

#[test]
fn interval_failures_are_logged_and_emit_nothing() {
    let host = TestHost::new();
    for (script, expect) in [
        ("echo '{\"a\":1}'; exit 3", "sh failed (exit status: 3)"),
        ("echo not json", "its output is not JSON: not json"),
    ] {
        exec(&host, json!({"mode": "interval", "command": sh(script)}))
            .poll(None, &host.emitter())
            .unwrap();
        let w = warnings(&host);
        assert!(w.last().unwrap().contains(expect), "{w:?}");
    }
    exec(
        &host,
        json!({"mode": "interval", "command": ["/no/such/program"]}),
    )
    .poll(None, &host.emitter())
    .unwrap();
    let w = warnings(&host);
    assert!(
        w.last()
            .unwrap()
            .contains("cannot start \"/no/such/program\""),
        "{w:?}"
    );
    assert_eq!(host.message_count(), 0);
}

#[test]
fn interval_timeout_kills_the_whole_process_group() {
    let host = TestHost::new();
    let pidfile = tempfile_path("exec-timeout");
    // The shell starts a background sleep (same group) and waits.
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let p = exec(
        &host,
        json!({"mode": "interval", "timeout": "300ms", "command": sh(&script)}),
    );
    let t0 = Instant::now();
    p.poll(None, &host.emitter()).unwrap();
    assert!(t0.elapsed() < PATIENCE, "{:?}", t0.elapsed());
    let w = warnings(&host);
    assert!(w.last().unwrap().contains("timed out after 300ms"), "{w:?}");
    let pid: u64 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The background sleep was killed too (it is reaped by init, not by us,
    // so wait for it to disappear).
    let deadline = Instant::now() + PATIENCE;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(pid), "the grandchild {pid} survived");
    let _ = std::fs::remove_file(pidfile);
}

fn tempfile_path(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("{name}-{}-{nanos}", std::process::id()))
}

#[test]
fn stream_emits_json_lines_wraps_or_drops_others_and_restarts() {
    for wrap in [false, true] {
        let host = TestHost::new();
        let p = exec(
            &host,
            json!({"mode": "stream", "wrap_lines": wrap,
                   "command": sh(r#"echo '{"i":1}'; echo; echo plain text; echo oops >&2; echo '[2]'"#)}),
        );
        let out = host.emitter();
        std::thread::scope(|s| {
            let run = s.spawn(|| p.run(out));
            let per_run = if wrap { 3 } else { 2 };
            // The command exits after its lines: it must be run again.
            assert!(host.wait_for_messages(2 * per_run, PATIENCE));
            host.stop();
            run.join().unwrap().unwrap();
        });
        let got: Vec<Value> = host.json_messages().into_iter().map(|(_, v)| v).collect();
        let first: Vec<Value> = if wrap {
            vec![json!({"i": 1}), json!({"line": "plain text"}), json!([2])]
        } else {
            vec![json!({"i": 1}), json!([2])]
        };
        assert_eq!(got[..first.len()], first[..]);
        assert_eq!(got[first.len()..2 * first.len()], first[..]);
        let w = warnings(&host);
        assert!(w.contains(&"sh stderr: oops".to_owned()), "{w:?}");
        assert!(
            w.iter()
                .any(|l| l.starts_with("sh exited (exit status: 0)")),
            "{w:?}"
        );
        assert!(w.iter().any(|l| l == "restarting sh in 100ms"), "{w:?}");
        assert_eq!(
            w.iter()
                .any(|l| l.contains("dropped a stdout line that is not JSON")),
            !wrap,
            "{w:?}"
        );
    }
}

#[test]
fn stream_restart_delay_doubles() {
    let host = TestHost::new();
    let p = exec(&host, json!({"mode": "stream", "command": ["true"]}));
    let out = host.emitter();
    std::thread::scope(|s| {
        let run = s.spawn(|| p.run(out));
        assert!(host.wait_until(PATIENCE, |r| {
            r.logs.iter().any(|(_, l)| l == "restarting true in 400ms")
        }));
        host.stop();
        run.join().unwrap().unwrap();
    });
    let restarts: Vec<String> = warnings(&host)
        .into_iter()
        .filter(|l| l.starts_with("restarting"))
        .collect();
    assert_eq!(
        restarts[..3],
        [
            "restarting true in 100ms",
            "restarting true in 200ms",
            "restarting true in 400ms"
        ]
    );
}

#[test]
fn stop_kills_and_reaps_the_stream_command() {
    let host = TestHost::new();
    let loaded = Loaded::of::<Exec>();
    assert_eq!(loaded.name(), "exec");
    let inst = loaded
        .create(
            &host,
            &json!({"mode": "stream", "command": sh(r#"echo "{\"pid\":$$}"; trap '' TERM; sleep 60 & echo "{\"pid\":$!}"; wait"#)})
                .to_string(),
        )
        .unwrap();
    assert_eq!(inst.start(), (GW_OK, String::new()));
    assert!(host.wait_for_messages(2, PATIENCE));
    let pids: Vec<u64> = host
        .json_messages()
        .iter()
        .map(|(_, v)| v["pid"].as_u64().unwrap())
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));
    let t0 = Instant::now();
    inst.stop();
    // The shell ignores SIGTERM: it takes the grace period, then SIGKILL.
    assert!(t0.elapsed() >= KILL_GRACE, "{:?}", t0.elapsed());
    assert!(t0.elapsed() < PATIENCE, "{:?}", t0.elapsed());
    // The shell was our child and is reaped; its sleep is reaped by init.
    assert!(!alive(pids[0]), "the command {} is still there", pids[0]);
    let deadline = Instant::now() + PATIENCE;
    while alive(pids[1]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(pids[1]), "the grandchild {} survived", pids[1]);
    assert!(host.exits().is_empty(), "a stop is not an exit");
}

#[test]
fn the_mode_must_match_the_call() {
    let host = TestHost::new();
    let loaded = Loaded::of::<Exec>();
    let inst = loaded
        .create(&host, r#"{"mode":"stream","command":["true"]}"#)
        .unwrap();
    let (status, msg) = inst.poll("");
    assert_eq!(status, GW_ERROR);
    assert!(msg.contains("set `source.mode: push`"), "{msg}");
    let inst = loaded
        .create(&host, r#"{"mode":"interval","command":["true"]}"#)
        .unwrap();
    assert_eq!(inst.start().0, GW_OK);
    let (status, msg) = host.wait_for_exit(PATIENCE).unwrap();
    assert_eq!(status, GW_ERROR);
    assert!(msg.contains("set `source.mode: poll`"), "{msg}");
}

#[test]
fn oversized_output_is_dropped_without_blocking_the_command() {
    // Stream: a 17 MB line is dropped, the next line still arrives.
    let host = TestHost::new();
    let p = exec(
        &host,
        json!({"mode": "stream", "command": sh(r#"head -c 17000000 /dev/zero | tr '\0' x; echo; echo '{"after":1}'; sleep 60"#)}),
    );
    let out = host.emitter();
    std::thread::scope(|s| {
        let run = s.spawn(|| p.run(out));
        assert!(host.wait_for_messages(1, PATIENCE));
        host.stop();
        run.join().unwrap().unwrap();
    });
    assert_eq!(host.json_messages()[0].1, json!({"after": 1}));
    let w = warnings(&host);
    assert!(
        w.iter()
            .any(|l| l.contains("dropped a stdout line of more than")),
        "{w:?}"
    );

    // Interval: output over the limit is an error, and the command is not
    // left blocked on a full pipe until the timeout.
    let host = TestHost::new();
    let p = exec(
        &host,
        json!({"mode": "interval", "timeout": "60s",
               "command": sh(r#"head -c 17000000 /dev/zero | tr '\0' ' '; echo '{}'"#)}),
    );
    let t0 = Instant::now();
    p.poll(None, &host.emitter()).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let w = warnings(&host);
    assert!(w.last().unwrap().contains("larger than"), "{w:?}");
    assert_eq!(host.message_count(), 0);
}

/// A stderr line longer than anything logged is skipped as it is read, not
/// kept: 20 MiB without a newline leave a line of `MAX_LOG_LINE` bytes.
#[test]
fn a_long_stderr_line_is_cut_while_reading() {
    let input = std::io::repeat(b'x').take(20 << 20).chain(&b"\nnext\n"[..]);
    let mut r = BufReader::new(input);
    let mut line = Vec::new();
    assert_eq!(next_log_line(&mut r, &mut line), Some(()));
    assert_eq!(line.len(), MAX_LOG_LINE);
    assert!(line.capacity() < 2 * MAX_LOG_LINE, "{}", line.capacity());
    assert_eq!(next_log_line(&mut r, &mut line), Some(()));
    assert_eq!(line, b"next\n");
    assert_eq!(next_log_line(&mut r, &mut line), None);
}

/// A line that is JSON but not UTF-8 inside a string is not passed on as
/// JSON (the gateway would refuse it): with `wrap_lines` it is wrapped.
#[test]
fn json_with_invalid_utf8_is_wrapped_not_emitted_as_is() {
    assert!(is_json(br#"{"a":"b"}"#));
    assert!(!is_json(b"{\"a\":\"\xff\"}"));
    let host = TestHost::new();
    let e = exec(
        &host,
        json!({"command": sh("true"), "mode": "stream", "wrap_lines": true}),
    );
    let out = host.emitter();
    e.line(&out, b"{\"a\":\"\xff\"}\n").unwrap();
    assert_eq!(
        host.json_messages()[0].1,
        json!({"line": "{\"a\":\"\u{fffd}\"}"})
    );
}
