//! In-process test support for plugins (no `unsafe` needed in plugin tests).
//!
//! - [`TestHost`]: a fake host table whose `extern "C"` functions record emits,
//!   ended streams, log lines and exits. [`TestHost::emitter`] / [`TestHost::host`]
//!   give handles for calling a plugin's trait methods directly.
//! - [`Loaded`] / [`TestInstance`]: drive a plugin's exported [`GwPluginV1`]
//!   table through the real ABI shims, as the gateway does.

use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::abi::{ABI_VERSION, GW_OK, GwHostV1, GwPluginV1, GwSink, GwSlice};
use crate::export::borrow;
use crate::host::{Emitter, Host, HostFns, Shared};
use crate::plugin::Exported;

/// What a [`TestHost`] has seen.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Emitted messages: `(key, json bytes)`.
    pub messages: Vec<(String, Vec<u8>)>,
    /// Keys passed to `end_stream`.
    pub ended: Vec<String>,
    /// Log lines: `(GW_LOG_* level, text)`.
    pub logs: Vec<(u32, String)>,
    /// `exited` calls: `(status, message)`.
    pub exits: Vec<(i32, String)>,
}

struct TestState {
    table: GwHostV1,
    recorded: Mutex<Recorded>,
    changed: Condvar,
    emit_status: AtomicI32,
}

impl TestState {
    fn record(&self, f: impl FnOnce(&mut Recorded)) {
        f(&mut self.recorded.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }
}

/// The `TestState` behind a host `ctx`.
///
/// # Safety
/// `ctx` must be the `ctx` of a `TestState`'s table, and that state alive.
unsafe fn state<'a>(ctx: *mut c_void) -> &'a TestState {
    // SAFETY: per the contract, `ctx` points to a live `TestState`.
    unsafe { &*ctx.cast::<TestState>().cast_const() }
}

fn lossy(s: GwSlice) -> String {
    // SAFETY: the SDK passes slices borrowed for the duration of the call.
    String::from_utf8_lossy(unsafe { borrow(s) }).into_owned()
}

extern "C" fn test_emit(ctx: *mut c_void, key: GwSlice, json: GwSlice) -> i32 {
    // SAFETY: the table's ctx is its TestState, kept alive by every user of it.
    let st = unsafe { state(ctx) };
    let status = st.emit_status.load(Ordering::Acquire);
    if status == GW_OK {
        // SAFETY: borrowed for the duration of this call.
        let bytes = unsafe { borrow(json) }.to_vec();
        let key = lossy(key);
        st.record(|r| r.messages.push((key, bytes)));
    }
    status
}

extern "C" fn test_end_stream(ctx: *mut c_void, key: GwSlice) -> i32 {
    // SAFETY: as in `test_emit`.
    let st = unsafe { state(ctx) };
    let status = st.emit_status.load(Ordering::Acquire);
    if status == GW_OK {
        let key = lossy(key);
        st.record(|r| r.ended.push(key));
    }
    status
}

extern "C" fn test_log(ctx: *mut c_void, level: u32, msg: GwSlice) {
    // SAFETY: as in `test_emit`.
    let st = unsafe { state(ctx) };
    let msg = lossy(msg);
    st.record(|r| r.logs.push((level, msg)));
}

extern "C" fn test_exited(ctx: *mut c_void, status: i32, msg: GwSlice) {
    // SAFETY: as in `test_emit`.
    let st = unsafe { state(ctx) };
    let msg = lossy(msg);
    st.record(|r| r.exits.push((status, msg)));
}

/// A fake host recording everything a plugin sends. Clones share the record.
#[derive(Clone)]
pub struct TestHost {
    state: Arc<TestState>,
    /// Handles given out by `host()`/`emitter()`.
    shared: Arc<Shared>,
}

impl Default for TestHost {
    fn default() -> TestHost {
        TestHost::new()
    }
}

impl TestHost {
    /// A host whose `emit` answers `GW_OK` and records.
    pub fn new() -> TestHost {
        let state = Arc::new_cyclic(|weak: &std::sync::Weak<TestState>| TestState {
            table: GwHostV1 {
                abi_version: ABI_VERSION,
                struct_size: size_of::<GwHostV1>() as u32,
                ctx: weak.as_ptr().cast_mut().cast(),
                emit: test_emit,
                end_stream: test_end_stream,
                log: test_log,
                exited: test_exited,
            },
            recorded: Mutex::new(Recorded::default()),
            changed: Condvar::new(),
            emit_status: AtomicI32::new(GW_OK),
        });
        let shared = Shared::new(HostFns::from_table(&state.table), Some(state.clone()));
        TestHost { state, shared }
    }

    /// The raw host table (valid while this `TestHost` or a clone lives).
    pub fn table(&self) -> &GwHostV1 {
        &self.state.table
    }

    /// A `Host` handle backed by this fake host.
    pub fn host(&self) -> Host {
        Host::new(self.shared.clone())
    }

    /// An `Emitter` backed by this fake host (for calling `poll`/`run` directly).
    pub fn emitter(&self) -> Emitter {
        Emitter::new(self.shared.clone())
    }

    /// Stop the handles from `host()`/`emitter()` as the SDK's stop does:
    /// set the stopped flag, wake `wait_stopped`, then revoke host access.
    pub fn stop(&self) {
        self.shared.revoke();
    }

    /// The status `emit`/`end_stream` answer from now on (e.g. `GW_STOPPED`,
    /// `GW_REJECTED`); only `GW_OK` records.
    pub fn set_emit_status(&self, status: i32) {
        self.state.emit_status.store(status, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.state
            .recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of everything recorded.
    pub fn recorded(&self) -> Recorded {
        self.lock().clone()
    }

    /// Emitted messages `(key, json text)`.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.lock()
            .messages
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// Emitted messages parsed as JSON (panics on invalid JSON).
    pub fn json_messages(&self) -> Vec<(String, serde_json::Value)> {
        self.lock()
            .messages
            .iter()
            .map(|(k, v)| {
                let value = serde_json::from_slice(v).expect("plugin emitted invalid JSON");
                (k.clone(), value)
            })
            .collect()
    }

    /// Number of emitted messages.
    pub fn message_count(&self) -> usize {
        self.lock().messages.len()
    }

    /// Remove and return the emitted messages.
    pub fn take_messages(&self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut self.lock().messages)
    }

    /// Keys passed to `end_stream`.
    pub fn ended(&self) -> Vec<String> {
        self.lock().ended.clone()
    }

    /// Log lines.
    pub fn logs(&self) -> Vec<(u32, String)> {
        self.lock().logs.clone()
    }

    /// `exited` calls.
    pub fn exits(&self) -> Vec<(i32, String)> {
        self.lock().exits.clone()
    }

    /// Wait until `cond` holds for the record (true) or `timeout` passes (false).
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Recorded) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock();
        loop {
            if cond(&guard) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .state
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Wait until at least `n` messages were emitted.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |r| r.messages.len() >= n)
    }

    /// Wait for the first `exited` call.
    pub fn wait_for_exit(&self, timeout: Duration) -> Option<(i32, String)> {
        let mut exit = None;
        self.wait_until(timeout, |r| {
            exit = r.exits.first().cloned();
            exit.is_some()
        });
        exit
    }
}

impl std::fmt::Debug for TestHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHost").finish_non_exhaustive()
    }
}

extern "C" fn vec_sink_write(ctx: *mut c_void, bytes: GwSlice) {
    // SAFETY: `ctx` is the `Vec<u8>` lent by `with_sink` for this call.
    let buf = unsafe { &mut *ctx.cast::<Vec<u8>>() };
    // SAFETY: borrowed for the duration of this call.
    buf.extend_from_slice(unsafe { borrow(bytes) });
}

/// Call `f` with a sink collecting into a string.
fn with_sink<R>(f: impl FnOnce(GwSink) -> R) -> (R, String) {
    let mut buf: Vec<u8> = Vec::new();
    let sink = GwSink {
        ctx: (&raw mut buf).cast(),
        write: vec_sink_write,
    };
    let r = f(sink);
    (r, String::from_utf8_lossy(&buf).into_owned())
}

/// A plugin table to drive in-process.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    table: &'static GwPluginV1,
}

impl Loaded {
    /// The table `export_plugin!` generates for `T` (built anew and leaked:
    /// for tests only).
    pub fn of<T: Exported>() -> Loaded {
        Loaded {
            table: Box::leak(Box::new(crate::plugin_table::<T>())),
        }
    }

    /// Drive an existing static table.
    pub fn from_table(table: &'static GwPluginV1) -> Loaded {
        Loaded { table }
    }

    /// The raw table.
    pub fn table(&self) -> &'static GwPluginV1 {
        self.table
    }

    /// The table's name.
    pub fn name(&self) -> String {
        lossy(self.table.name)
    }

    /// The table's version.
    pub fn version(&self) -> String {
        lossy(self.table.version)
    }

    /// Create an instance with `config` (JSON text; `""` passes an empty slice).
    /// `Err` carries the message the plugin wrote to the error sink.
    pub fn create(&self, host: &TestHost, config: &str) -> Result<TestInstance, String> {
        let (inst, msg) = with_sink(|err| {
            (self.table.create)(host.table(), GwSlice::from_slice(config.as_bytes()), err)
        });
        if inst.is_null() {
            Err(msg)
        } else {
            Ok(TestInstance {
                table: self.table,
                inst,
                _host: host.clone(),
            })
        }
    }
}

/// One created instance; destroyed on drop. Each call returns the status and
/// what the plugin wrote to the error/reply sink.
pub struct TestInstance {
    table: &'static GwPluginV1,
    inst: *mut c_void,
    /// The host table must outlive the instance.
    _host: TestHost,
}

// SAFETY: SDK instances are thread-safe (the ABI lets the host call an
// instance from several threads) and `_host` is Send + Sync.
unsafe impl Send for TestInstance {}
// SAFETY: as above.
unsafe impl Sync for TestInstance {}

impl TestInstance {
    /// `poll` with `key` (`""` for the channel's own stream).
    pub fn poll(&self, key: &str) -> (i32, String) {
        with_sink(|err| (self.table.poll)(self.inst, GwSlice::from_slice(key.as_bytes()), err))
    }

    /// `start` (push mode).
    pub fn start(&self) -> (i32, String) {
        with_sink(|err| (self.table.start)(self.inst, err))
    }

    /// `open_key` with `params` as JSON text.
    pub fn open_key(&self, key: &str, params: &str) -> (i32, String) {
        with_sink(|err| {
            (self.table.open_key)(
                self.inst,
                GwSlice::from_slice(key.as_bytes()),
                GwSlice::from_slice(params.as_bytes()),
                err,
            )
        })
    }

    /// `close_key`.
    pub fn close_key(&self, key: &str) -> i32 {
        (self.table.close_key)(self.inst, GwSlice::from_slice(key.as_bytes()))
    }

    /// `command` with `request` as JSON text; the string is the reply (or error).
    pub fn command(&self, request: &str) -> (i32, String) {
        with_sink(|reply| {
            (self.table.command)(self.inst, GwSlice::from_slice(request.as_bytes()), reply)
        })
    }

    /// `stop` (idempotent in the SDK).
    pub fn stop(&self) {
        (self.table.stop)(self.inst);
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        (self.table.destroy)(self.inst);
    }
}

impl std::fmt::Debug for TestInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestInstance")
            .field("plugin", &lossy(self.table.name))
            .finish_non_exhaustive()
    }
}
