//! Safe handles to the host table: [`Host`] (logging) and [`Emitter`] (messages).
//!
//! Both hold an `Arc` of [`Shared`], which keeps a copy of the host's function
//! pointers and `ctx` behind a `RwLock<Option<_>>`. Every call into the host
//! holds the read lock; the SDK's stop sets the stopped flag and then takes the
//! write lock to clear the table, so once stop has returned no plugin thread,
//! even one holding a cloned handle, can reach the host again.

use std::any::Any;
use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::abi::{
    GW_LOG_DEBUG, GW_LOG_ERROR, GW_LOG_INFO, GW_LOG_TRACE, GW_LOG_WARN, GW_OK, GW_REJECTED,
    GW_STOPPED, GwHostV1, GwSlice,
};
use crate::error::EmitError;

/// A copy of the v1 host functions and their `ctx`.
#[derive(Clone, Copy)]
pub(crate) struct HostFns {
    ctx: *mut c_void,
    emit: extern "C" fn(ctx: *mut c_void, key: GwSlice, json: GwSlice) -> i32,
    end_stream: extern "C" fn(ctx: *mut c_void, key: GwSlice) -> i32,
    log: extern "C" fn(ctx: *mut c_void, level: u32, msg: GwSlice),
    exited: extern "C" fn(ctx: *mut c_void, status: i32, msg: GwSlice),
}

// SAFETY: the ABI requires every host function to be callable from any thread
// with a thread-safe `ctx` (see `abi` module docs), and `Shared` stops all use
// of these pointers before the host may invalidate them (stop/destroy).
unsafe impl Send for HostFns {}
// SAFETY: see the `Send` impl above.
unsafe impl Sync for HostFns {}

impl HostFns {
    pub(crate) fn from_table(table: &GwHostV1) -> HostFns {
        HostFns {
            ctx: table.ctx,
            emit: table.emit,
            end_stream: table.end_stream,
            log: table.log,
            exited: table.exited,
        }
    }
}

/// State shared by an instance and all its `Host`/`Emitter` handles.
pub(crate) struct Shared {
    stopped: AtomicBool,
    fns: RwLock<Option<HostFns>>,
    wake: Mutex<()>,
    wake_cv: Condvar,
    /// Keeps a test host alive as long as handles exist (see `testing`).
    _keepalive: Option<Arc<dyn Any + Send + Sync>>,
}

impl Shared {
    pub(crate) fn new(fns: HostFns, keepalive: Option<Arc<dyn Any + Send + Sync>>) -> Arc<Shared> {
        Arc::new(Shared {
            stopped: AtomicBool::new(false),
            fns: RwLock::new(Some(fns)),
            wake: Mutex::new(()),
            wake_cv: Condvar::new(),
            _keepalive: keepalive,
        })
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Set the (sticky) stopped flag and wake every `wait_stopped`.
    pub(crate) fn mark_stopped(&self) {
        let _guard = self.wake.lock().unwrap_or_else(PoisonError::into_inner);
        self.stopped.store(true, Ordering::Release);
        self.wake_cv.notify_all();
    }

    /// Mark stopped, then wait for every call in progress into the host to
    /// return and forbid any further one.
    pub(crate) fn revoke(&self) {
        self.mark_stopped();
        *self.fns.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Run `f` with the host functions unless access was revoked.
    fn with_fns<R>(&self, f: impl FnOnce(&HostFns) -> R) -> Option<R> {
        let guard = self.fns.read().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().map(f)
    }

    /// Push mode: report that the run loop ended by itself. Skipped once the
    /// instance is stopping (the host asked for it, so nothing to report).
    pub(crate) fn report_exit(&self, status: i32, msg: &str) {
        self.with_fns(|fns| {
            if !self.is_stopped() {
                (fns.exited)(fns.ctx, status, GwSlice::from_slice(msg.as_bytes()));
            }
        });
    }

    fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = self.wake.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.is_stopped() {
                return true;
            }
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return false;
            }
            guard = self
                .wake_cv
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn status_to_result(status: i32) -> Result<(), EmitError> {
    match status {
        GW_OK => Ok(()),
        GW_STOPPED => Err(EmitError::Stopped),
        GW_REJECTED => Err(EmitError::Rejected),
        other => Err(EmitError::Status(other)),
    }
}

/// Log levels of [`Host::log`] (the `GW_LOG_*` constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// `GW_LOG_ERROR`
    Error,
    /// `GW_LOG_WARN`
    Warn,
    /// `GW_LOG_INFO`
    Info,
    /// `GW_LOG_DEBUG`
    Debug,
    /// `GW_LOG_TRACE`
    Trace,
}

impl LogLevel {
    /// The `GW_LOG_*` value.
    pub fn to_abi(self) -> u32 {
        match self {
            LogLevel::Error => GW_LOG_ERROR,
            LogLevel::Warn => GW_LOG_WARN,
            LogLevel::Info => GW_LOG_INFO,
            LogLevel::Debug => GW_LOG_DEBUG,
            LogLevel::Trace => GW_LOG_TRACE,
        }
    }
}

/// The host as seen by one plugin instance: logging. Cheap to clone; every
/// call does nothing once the instance has been stopped.
#[derive(Clone)]
pub struct Host {
    pub(crate) shared: Arc<Shared>,
}

impl Host {
    pub(crate) fn new(shared: Arc<Shared>) -> Host {
        Host { shared }
    }

    /// Log one line; the host adds the plugin's name. Does nothing after stop.
    pub fn log(&self, level: LogLevel, msg: &str) {
        self.shared.with_fns(|fns| {
            (fns.log)(fns.ctx, level.to_abi(), GwSlice::from_slice(msg.as_bytes()));
        });
    }

    /// Log at error level.
    pub fn error(&self, msg: &str) {
        self.log(LogLevel::Error, msg);
    }

    /// Log at warning level.
    pub fn warn(&self, msg: &str) {
        self.log(LogLevel::Warn, msg);
    }

    /// Log at info level.
    pub fn info(&self, msg: &str) {
        self.log(LogLevel::Info, msg);
    }

    /// Log at debug level.
    pub fn debug(&self, msg: &str) {
        self.log(LogLevel::Debug, msg);
    }

    /// Log at trace level.
    pub fn trace(&self, msg: &str) {
        self.log(LogLevel::Trace, msg);
    }

    /// True once the instance is stopping (the SDK's stop began, or the host
    /// answered `GW_STOPPED` to an emit).
    pub fn is_stopped(&self) -> bool {
        self.shared.is_stopped()
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}

/// Sends messages to the host for one instance. Cheap to clone, may be moved to
/// other threads; after the instance is stopped every call returns
/// [`EmitError::Stopped`] without reaching the host.
#[derive(Clone)]
pub struct Emitter {
    host: Host,
}

impl Emitter {
    pub(crate) fn new(shared: Arc<Shared>) -> Emitter {
        Emitter {
            host: Host::new(shared),
        }
    }

    /// Emit one message (UTF-8 JSON bytes, copied by the host) on stream `key`;
    /// `""` is the channel's own stream. Blocks while the channel's queue is
    /// full. `Err(Stopped)`: return from `run`/`poll` soon.
    pub fn emit(&self, key: &str, json: &[u8]) -> Result<(), EmitError> {
        let shared = &self.host.shared;
        if shared.is_stopped() {
            return Err(EmitError::Stopped);
        }
        let status = shared
            .with_fns(|fns| {
                (fns.emit)(
                    fns.ctx,
                    GwSlice::from_slice(key.as_bytes()),
                    GwSlice::from_slice(json),
                )
            })
            .unwrap_or(GW_STOPPED);
        if status == GW_STOPPED {
            shared.mark_stopped();
        }
        status_to_result(status)
    }

    /// Serialize `value` and [`emit`](Emitter::emit) it.
    pub fn emit_json(&self, key: &str, value: &serde_json::Value) -> Result<(), EmitError> {
        // Serializing a `Value` into a Vec cannot fail.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.emit(key, &bytes)
    }

    /// End the keyed stream `key`: its subscribers get what was emitted before
    /// and are then closed normally.
    pub fn end_stream(&self, key: &str) -> Result<(), EmitError> {
        let shared = &self.host.shared;
        if shared.is_stopped() {
            return Err(EmitError::Stopped);
        }
        let status = shared
            .with_fns(|fns| (fns.end_stream)(fns.ctx, GwSlice::from_slice(key.as_bytes())))
            .unwrap_or(GW_STOPPED);
        if status == GW_STOPPED {
            shared.mark_stopped();
        }
        status_to_result(status)
    }

    /// True once the instance is stopping: `run` should return.
    pub fn is_stopped(&self) -> bool {
        self.host.is_stopped()
    }

    /// Sleep up to `timeout`, waking at once when the instance is stopped.
    /// Returns true if the instance is stopped (a pacing loop then returns).
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        self.host.shared.wait_stopped(timeout)
    }

    /// The host handle (logging).
    pub fn host(&self) -> &Host {
        &self.host
    }
}

impl fmt::Debug for Emitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emitter")
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}
