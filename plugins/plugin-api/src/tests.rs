//! Drives generated tables in-process against the fake host of [`crate::testing`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::abi::*;
use crate::testing::{Loaded, TestHost};
use crate::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};

/// Emitters saved by `Demo::run`, to use them after stop.
static SAVED: Mutex<Vec<Emitter>> = Mutex::new(Vec::new());

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct DemoConfig {
    panic_in_poll: bool,
    fail_run: Option<String>,
    panic_run: bool,
    save_emitter: bool,
    fail_create: Option<String>,
}

struct Demo {
    config: DemoConfig,
    polls: AtomicU64,
    host: Host,
}

impl Plugin for Demo {
    fn create(config: Value, host: Host) -> Result<Self, PluginError> {
        let config: DemoConfig = parse_config(config)?;
        if let Some(msg) = &config.fail_create {
            return Err(msg.as_str().into());
        }
        host.info("demo created");
        Ok(Demo {
            config,
            polls: AtomicU64::new(0),
            host,
        })
    }

    fn poll(&self, key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        let n = self.polls.fetch_add(1, Ordering::Relaxed) + 1;
        if self.config.panic_in_poll {
            panic!("demo: planned panic at poll {n}");
        }
        out.emit_json(key.unwrap_or(""), &json!({ "n": n }))?;
        if let Some(key) = key {
            out.end_stream(key)?;
        }
        Ok(())
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        if let Some(msg) = &self.config.fail_run {
            return Err(msg.as_str().into());
        }
        if self.config.panic_run {
            panic!("demo: run panicked");
        }
        if self.config.save_emitter {
            SAVED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(out.clone());
        }
        let mut n = 0u64;
        loop {
            n += 1;
            match out.emit_json("", &json!({ "n": n })) {
                Ok(()) => {}
                Err(EmitError::Stopped) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            if out.wait_stopped(Duration::from_millis(2)) {
                return Ok(());
            }
        }
    }

    fn command(&self, request: Value) -> Result<Value, PluginError> {
        match request.get("op").and_then(Value::as_str) {
            Some("echo") => Ok(request),
            Some("polls") => Ok(json!({ "polls": self.polls.load(Ordering::Relaxed) })),
            _ => Err("demo: unknown op".into()),
        }
    }

    fn stop(&self) {
        self.host.debug("demo stopping");
    }
}

crate::export_plugin!(Demo, name = "demo", modes = [poll, push, command]);

/// A poll-only plugin, exported through `Loaded::of` (no entry symbol).
struct PollOnly;

impl Plugin for PollOnly {
    fn create(_config: Value, _host: Host) -> Result<Self, PluginError> {
        Ok(PollOnly)
    }
}

impl crate::Exported for PollOnly {
    const NAME: &'static str = "poll-only";
    const VERSION: &'static str = "9.9.9";
    const MODES: u32 = GW_MODE_POLL;
    const ABI_VERSION: u32 = ABI_VERSION;
    const PANIC_UNWIND: bool = true;
}

fn demo() -> Loaded {
    // SAFETY: the entry symbol returns a pointer to a static table.
    Loaded::from_table(unsafe { &*gw_plugin_entry_v1() })
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn table_metadata() {
    let t = demo().table();
    assert_eq!(t.abi_version, ABI_VERSION);
    assert_eq!(t.struct_size as usize, size_of::<GwPluginV1>());
    assert_eq!(demo().name(), "demo");
    assert_eq!(demo().version(), env!("CARGO_PKG_VERSION"));
    assert_eq!(t.panic_unwind, 1);
    assert_eq!(t.modes, GW_MODE_POLL | GW_MODE_PUSH | GW_MODE_COMMAND);
}

#[test]
fn create_with_bad_json_config_fails_with_message() {
    let host = TestHost::new();
    let err = demo().create(&host, "{not json").unwrap_err();
    assert!(err.contains("invalid config JSON"), "{err}");
    let err = demo().create(&host, r#"{"bogus":1}"#).unwrap_err();
    assert!(err.contains("unknown field `bogus`"), "{err}");
    let err = demo().create(&host, "[1]").unwrap_err();
    assert!(err.contains("expected a JSON object"), "{err}");
    let err = demo()
        .create(&host, r#"{"fail_create":"nope"}"#)
        .unwrap_err();
    assert_eq!(err, "nope");
    // Empty and null configs mean defaults.
    demo().create(&host, "").unwrap();
    demo().create(&host, "null").unwrap();
}

#[test]
fn create_checks_host_table() {
    let host = TestHost::new();
    let t = demo().table();
    let mut err = Vec::new();
    let bad = |abi_version: u32, struct_size: u32| GwHostV1 {
        abi_version,
        struct_size,
        ..*host_copy(host.table())
    };
    for (table, expect) in [
        (bad(2, size_of::<GwHostV1>() as u32), "host ABI version 2"),
        (bad(ABI_VERSION, 8), "host table is 8 bytes"),
    ] {
        err.clear();
        let sink = GwSink {
            ctx: (&raw mut err).cast(),
            write: push_bytes,
        };
        let inst = (t.create)(&table, GwSlice::EMPTY, sink);
        assert!(inst.is_null());
        let msg = String::from_utf8_lossy(&err);
        assert!(msg.contains(expect), "{msg}");
    }
    let inst = (t.create)(std::ptr::null(), GwSlice::EMPTY, unused_sink());
    assert!(inst.is_null());
}

fn host_copy(t: &GwHostV1) -> Box<GwHostV1> {
    Box::new(GwHostV1 {
        abi_version: t.abi_version,
        struct_size: t.struct_size,
        ctx: t.ctx,
        emit: t.emit,
        end_stream: t.end_stream,
        log: t.log,
        exited: t.exited,
    })
}

extern "C" fn push_bytes(ctx: *mut std::ffi::c_void, bytes: GwSlice) {
    // SAFETY: `bytes` is borrowed for the call.
    let bytes = unsafe { crate::export::borrow(bytes) };
    // SAFETY: `ctx` is the Vec lent for the call.
    unsafe { (*ctx.cast::<Vec<u8>>()).extend_from_slice(bytes) };
}

extern "C" fn ignore_bytes(_ctx: *mut std::ffi::c_void, _bytes: GwSlice) {}

fn unused_sink() -> GwSink {
    GwSink {
        ctx: std::ptr::null_mut(),
        write: ignore_bytes,
    }
}

#[test]
fn poll_emits_and_logs() {
    let host = TestHost::new();
    let inst = demo().create(&host, "{}").unwrap();
    assert_eq!(inst.poll(""), (GW_OK, String::new()));
    assert_eq!(inst.poll("k1"), (GW_OK, String::new()));
    assert_eq!(
        host.messages(),
        vec![
            (String::new(), r#"{"n":1}"#.to_owned()),
            ("k1".to_owned(), r#"{"n":2}"#.to_owned())
        ]
    );
    assert_eq!(host.ended(), vec!["k1".to_owned()]);
    assert_eq!(host.logs(), vec![(GW_LOG_INFO, "demo created".to_owned())]);
}

#[test]
fn emit_maps_host_statuses() {
    let host = TestHost::new();
    let inst = demo().create(&host, "{}").unwrap();
    host.set_emit_status(GW_REJECTED);
    let (status, msg) = inst.poll("");
    assert_eq!(status, GW_ERROR);
    assert!(msg.contains("rejected"), "{msg}");
    host.set_emit_status(GW_STOPPED);
    let (status, msg) = inst.poll("");
    assert_eq!(status, GW_ERROR);
    assert!(msg.contains("stopped"), "{msg}");
    // Stopped is sticky: the host is not called again.
    host.set_emit_status(GW_OK);
    assert_eq!(inst.poll("").0, GW_ERROR);
    assert_eq!(host.message_count(), 0);
}

#[test]
fn panicking_poll_returns_gw_panic_with_message() {
    let host = TestHost::new();
    let inst = demo().create(&host, r#"{"panic_in_poll":true}"#).unwrap();
    assert_eq!(
        inst.poll(""),
        (GW_PANIC, "demo: planned panic at poll 1".to_owned())
    );
    // The instance survives a caught panic.
    assert_eq!(
        inst.poll(""),
        (GW_PANIC, "demo: planned panic at poll 2".to_owned())
    );
}

#[test]
fn unsupported_modes() {
    let host = TestHost::new();
    let inst = demo().create(&host, "{}").unwrap();
    let (status, msg) = inst.open_key("k", "{}");
    assert_eq!(status, GW_UNSUPPORTED);
    assert!(msg.contains("does not support"), "{msg}");
    assert_eq!(inst.close_key("k"), GW_UNSUPPORTED);

    let poll_only = Loaded::of::<PollOnly>();
    assert_eq!(poll_only.name(), "poll-only");
    assert_eq!(poll_only.version(), "9.9.9");
    let inst = poll_only.create(&host, "").unwrap();
    // Declared but not implemented: the trait default answers.
    assert_eq!(inst.poll("").0, GW_UNSUPPORTED);
    assert_eq!(inst.start().0, GW_UNSUPPORTED);
    assert_eq!(inst.command("{}").0, GW_UNSUPPORTED);
}

#[test]
fn command_round_trip() {
    let host = TestHost::new();
    let inst = demo().create(&host, "{}").unwrap();
    let (status, reply) = inst.command(r#"{"op":"echo","x":[1,2]}"#);
    assert_eq!(status, GW_OK);
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply, json!({"op":"echo","x":[1,2]}));
    assert_eq!(
        inst.command(r#"{"op":"nope"}"#),
        (GW_ERROR, "demo: unknown op".to_owned())
    );
    let (status, msg) = inst.command("{oops");
    assert_eq!(status, GW_ERROR);
    assert!(msg.contains("invalid request JSON"), "{msg}");
}

#[test]
fn push_run_and_stop_revokes_cloned_emitters() {
    let host = TestHost::new();
    let inst = demo().create(&host, r#"{"save_emitter":true}"#).unwrap();
    assert_eq!(inst.start(), (GW_OK, String::new()));
    let (status, msg) = inst.start();
    assert_eq!(status, GW_ERROR);
    assert!(msg.contains("already started"), "{msg}");
    assert!(host.wait_for_messages(3, WAIT));
    let t0 = Instant::now();
    inst.stop();
    assert!(t0.elapsed() < Duration::from_secs(1));
    // The run thread was joined: nothing more arrives.
    let count = host.message_count();
    let saved = SAVED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop()
        .expect("run saved its emitter");
    assert!(saved.is_stopped());
    assert_eq!(saved.emit("", b"{}"), Err(EmitError::Stopped));
    assert_eq!(saved.end_stream("k"), Err(EmitError::Stopped));
    saved.host().error("after stop");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(host.message_count(), count);
    assert!(!host.logs().iter().any(|(_, m)| m == "after stop"));
    assert!(host.logs().iter().any(|(_, m)| m == "demo stopping"));
    // A stopped instance reports no exit (the host asked for the stop).
    assert!(host.exits().is_empty());
    // Messages are numbered without gaps.
    for (i, (_, v)) in host.json_messages().iter().enumerate() {
        assert_eq!(v["n"], json!(i + 1));
    }
    drop(inst);
}

#[test]
fn exited_reports_failed_run() {
    let host = TestHost::new();
    let inst = demo().create(&host, r#"{"fail_run":"boom"}"#).unwrap();
    assert_eq!(inst.start().0, GW_OK);
    assert_eq!(
        host.wait_for_exit(WAIT),
        Some((GW_ERROR, "boom".to_owned()))
    );
    inst.stop();

    let host = TestHost::new();
    let inst = demo().create(&host, r#"{"panic_run":true}"#).unwrap();
    assert_eq!(inst.start().0, GW_OK);
    assert_eq!(
        host.wait_for_exit(WAIT),
        Some((GW_PANIC, "demo: run panicked".to_owned()))
    );
    drop(inst);
}

#[test]
fn exited_ok_when_run_finishes_after_host_refuses() {
    // GW_STOPPED from the host makes run return; no exit is reported.
    let host = TestHost::new();
    host.set_emit_status(GW_STOPPED);
    let inst = demo().create(&host, "{}").unwrap();
    assert_eq!(inst.start().0, GW_OK);
    std::thread::sleep(Duration::from_millis(50));
    assert!(host.exits().is_empty());
    drop(inst);
}

#[test]
fn destroy_without_stop_joins_run_thread() {
    let host = TestHost::new();
    let inst = demo().create(&host, "{}").unwrap();
    assert_eq!(inst.start().0, GW_OK);
    assert!(host.wait_for_messages(1, WAIT));
    drop(inst);
    let count = host.message_count();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(host.message_count(), count);
}

#[test]
fn concurrent_polls_and_commands() {
    let host = TestHost::new();
    let inst = demo().create(&host, "{}").unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..100 {
                    assert_eq!(inst.poll("").0, GW_OK);
                    assert_eq!(inst.command(r#"{"op":"polls"}"#).0, GW_OK);
                }
            });
        }
    });
    assert_eq!(host.message_count(), 400);
}

#[test]
fn emitter_wait_stopped_wakes_on_stop() {
    let host = TestHost::new();
    let out = host.emitter();
    assert!(!out.wait_stopped(Duration::from_millis(1)));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            host.stop();
        });
        assert!(out.wait_stopped(Duration::from_secs(10)));
    });
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(out.emit("", b"{}"), Err(EmitError::Stopped));
}

/// The C header matches abi.rs: compile a probe with the system C compiler
/// (skipped when there is none) and compare sizes, offsets and constants.
#[test]
fn c_header_matches_rust_layout() {
    use std::mem::offset_of;
    let dir = std::env::temp_dir().join(format!("gw_plugin_h_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let probe = dir.join("probe.c");
    let exe = dir.join("probe");
    std::fs::write(
        &probe,
        r#"#include <stdio.h>
#include "gw_plugin.h"
#define P(x) printf("%lu\n", (unsigned long)(x));
int main(void) {
  P(sizeof(GwSlice)) P(offsetof(GwSlice, len))
  P(sizeof(GwSink)) P(offsetof(GwSink, write))
  P(sizeof(GwHostV1)) P(offsetof(GwHostV1, struct_size)) P(offsetof(GwHostV1, ctx))
  P(offsetof(GwHostV1, emit)) P(offsetof(GwHostV1, end_stream)) P(offsetof(GwHostV1, log))
  P(offsetof(GwHostV1, exited))
  P(sizeof(GwPluginV1)) P(offsetof(GwPluginV1, struct_size)) P(offsetof(GwPluginV1, name))
  P(offsetof(GwPluginV1, version)) P(offsetof(GwPluginV1, panic_unwind))
  P(offsetof(GwPluginV1, modes)) P(offsetof(GwPluginV1, create)) P(offsetof(GwPluginV1, poll))
  P(offsetof(GwPluginV1, start)) P(offsetof(GwPluginV1, open_key))
  P(offsetof(GwPluginV1, close_key)) P(offsetof(GwPluginV1, command))
  P(offsetof(GwPluginV1, stop)) P(offsetof(GwPluginV1, destroy))
  P(GW_ABI_VERSION) P(GW_OK) P(GW_ERROR) P(GW_PANIC) P(GW_UNSUPPORTED) P(GW_STOPPED)
  P(GW_REJECTED) P(GW_MODE_POLL) P(GW_MODE_PUSH) P(GW_MODE_KEYED) P(GW_MODE_COMMAND)
  P(GW_LOG_ERROR) P(GW_LOG_WARN) P(GW_LOG_INFO) P(GW_LOG_DEBUG) P(GW_LOG_TRACE)
  printf("%s\n", GW_ENTRY_SYMBOL_V1);
  return 0;
}
"#,
    )
    .unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let compiled = std::process::Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(&exe)
        .arg(&probe)
        .output();
    let compiled = match compiled {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping: no C compiler ({e})");
            return;
        }
    };
    assert!(
        compiled.status.success(),
        "{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let out = std::process::Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let got: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let want: Vec<String> = [
        size_of::<GwSlice>(),
        offset_of!(GwSlice, len),
        size_of::<GwSink>(),
        offset_of!(GwSink, write),
        size_of::<GwHostV1>(),
        offset_of!(GwHostV1, struct_size),
        offset_of!(GwHostV1, ctx),
        offset_of!(GwHostV1, emit),
        offset_of!(GwHostV1, end_stream),
        offset_of!(GwHostV1, log),
        offset_of!(GwHostV1, exited),
        size_of::<GwPluginV1>(),
        offset_of!(GwPluginV1, struct_size),
        offset_of!(GwPluginV1, name),
        offset_of!(GwPluginV1, version),
        offset_of!(GwPluginV1, panic_unwind),
        offset_of!(GwPluginV1, modes),
        offset_of!(GwPluginV1, create),
        offset_of!(GwPluginV1, poll),
        offset_of!(GwPluginV1, start),
        offset_of!(GwPluginV1, open_key),
        offset_of!(GwPluginV1, close_key),
        offset_of!(GwPluginV1, command),
        offset_of!(GwPluginV1, stop),
        offset_of!(GwPluginV1, destroy),
    ]
    .iter()
    .map(|n| n.to_string())
    .chain(
        [
            ABI_VERSION as i64,
            GW_OK.into(),
            GW_ERROR.into(),
            GW_PANIC.into(),
            GW_UNSUPPORTED.into(),
            GW_STOPPED.into(),
            GW_REJECTED.into(),
            GW_MODE_POLL.into(),
            GW_MODE_PUSH.into(),
            GW_MODE_KEYED.into(),
            GW_MODE_COMMAND.into(),
            GW_LOG_ERROR.into(),
            GW_LOG_WARN.into(),
            GW_LOG_INFO.into(),
            GW_LOG_DEBUG.into(),
            GW_LOG_TRACE.into(),
        ]
        .iter()
        .map(|n| n.to_string()),
    )
    .chain([ENTRY_SYMBOL_V1.to_owned()])
    .collect();
    assert_eq!(got, want);
}

#[test]
fn parse_config_rules() {
    #[derive(serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct C {
        a: u32,
    }
    assert_eq!(parse_config::<C>(Value::Null).unwrap(), C { a: 0 });
    assert_eq!(parse_config::<C>(json!({"a": 3})).unwrap(), C { a: 3 });
    let e = parse_config::<C>(json!({"b": 3})).unwrap_err();
    assert!(e.message().contains("unknown field `b`"), "{e}");
    let e = parse_config::<C>(json!("x")).unwrap_err();
    assert!(e.message().contains("expected a JSON object"), "{e}");
    assert_eq!(
        PluginError::from(EmitError::Stopped).message(),
        "emit failed: instance stopped"
    );
}
