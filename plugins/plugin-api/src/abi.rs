//! The plugin ABI, version 1: the only types that cross the library boundary.
//!
//! Rust has no stable ABI and every plugin carries its own std, allocator and
//! runtime, so only `#[repr(C)]` data, `extern "C"` function pointers and
//! borrowed `(ptr, len)` byte slices cross. Bytes are borrowed for the duration
//! of one call and copied by the receiver; nothing allocated on one side is
//! freed on the other. The same contract is written for C in `gw_plugin.h`.
//!
//! Loading sequence (host side):
//! 1. look up the C symbol [`ENTRY_SYMBOL_V1`] (`gw_plugin_entry_v1`) and call it;
//! 2. check `abi_version == ABI_VERSION` and `struct_size >= size_of::<GwPluginV1>()`
//!    before reading anything else from the table;
//! 3. `create` one instance per channel with the channel's plugin config (JSON);
//! 4. poll mode: call `poll` every update interval on a blocking thread;
//!    push mode: call `start` once, the plugin emits from its own threads;
//! 5. `stop` then `destroy` (also before a restart). Libraries are never unloaded.
//!
//! Threading: the host may call `poll`, `open_key`, `close_key` and `command`
//! on one instance from different threads at the same time; an instance must be
//! thread-safe. `create`/`start`/`stop`/`destroy` are never concurrent with
//! anything else on the same instance. After `stop` returns the plugin must not
//! call any host function with that instance's host table again.

use std::ffi::c_void;

/// Major ABI version. A plugin whose table carries another value is refused.
pub const ABI_VERSION: u32 = 1;

/// Name of the exported entry symbol (without the trailing NUL).
pub const ENTRY_SYMBOL_V1: &str = "gw_plugin_entry_v1";

/// Status: success.
pub const GW_OK: i32 = 0;
/// Status: the plugin returned an error; the message was written to the error sink.
pub const GW_ERROR: i32 = 1;
/// Status: the plugin panicked; the panic was caught at the boundary.
pub const GW_PANIC: i32 = 2;
/// Status: the plugin does not implement this call (e.g. `poll` on a push-only plugin).
pub const GW_UNSUPPORTED: i32 = 3;
/// Status (from host `emit`): the instance is being stopped; the plugin should return.
pub const GW_STOPPED: i32 = 4;
/// Status (from host `emit`): the message was refused (too large, or a key that is
/// not UTF-8; a body that is not JSON is taken, then dropped and counted).
pub const GW_REJECTED: i32 = 5;

/// Mode bit: the plugin implements `poll`.
pub const GW_MODE_POLL: u32 = 1;
/// Mode bit: the plugin implements `start` (push).
pub const GW_MODE_PUSH: u32 = 2;
/// Mode bit: the plugin implements keyed streams (`open_key`/`close_key`).
pub const GW_MODE_KEYED: u32 = 4;
/// Mode bit: the plugin implements `command`.
pub const GW_MODE_COMMAND: u32 = 8;

/// Log levels for [`GwHostV1::log`].
pub const GW_LOG_ERROR: u32 = 1;
/// Warning.
pub const GW_LOG_WARN: u32 = 2;
/// Info.
pub const GW_LOG_INFO: u32 = 3;
/// Debug.
pub const GW_LOG_DEBUG: u32 = 4;
/// Trace.
pub const GW_LOG_TRACE: u32 = 5;

/// A borrowed byte slice, valid only for the duration of the call it is passed to.
/// `ptr` may be null when `len` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GwSlice {
    /// First byte.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

impl GwSlice {
    /// The empty slice.
    pub const EMPTY: GwSlice = GwSlice {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// Borrow a Rust slice for one call.
    pub const fn from_slice(s: &[u8]) -> GwSlice {
        GwSlice {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }
}

/// A byte sink owned by the caller: the callee calls `write` (zero or more
/// times; the receiver appends) and the receiver copies the bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GwSink {
    /// Opaque receiver state.
    pub ctx: *mut c_void,
    /// Append `bytes` to the receiver.
    pub write: extern "C" fn(ctx: *mut c_void, bytes: GwSlice),
}

/// Functions the host gives an instance at `create`. The table and its `ctx`
/// stay valid until the instance's `destroy` returns.
#[repr(C)]
#[derive(Debug)]
pub struct GwHostV1 {
    /// Always [`ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<GwHostV1>()` as the host knows it; fields may be added at the end.
    pub struct_size: u32,
    /// Opaque host state for this instance; pass it back to every function below.
    pub ctx: *mut c_void,
    /// Emit one message (UTF-8 JSON) on stream `key` (empty: the channel's own
    /// stream). Blocks while the channel's queue is full (backpressure).
    /// Returns `GW_OK`, `GW_STOPPED` (stop emitting and return) or `GW_REJECTED`.
    pub emit: extern "C" fn(ctx: *mut c_void, key: GwSlice, json: GwSlice) -> i32,
    /// End the keyed stream `key` (terminal state): its subscribers receive what
    /// was emitted before and are then closed normally.
    pub end_stream: extern "C" fn(ctx: *mut c_void, key: GwSlice) -> i32,
    /// Log one UTF-8 line at `level` (`GW_LOG_*`); the host adds the plugin's name.
    pub log: extern "C" fn(ctx: *mut c_void, level: u32, msg: GwSlice),
    /// Push mode: the plugin's run loop ended by itself. `status` is `GW_OK`
    /// (finished), `GW_ERROR` or `GW_PANIC` (failed; `msg` says why). The host
    /// restarts failed instances with backoff.
    pub exited: extern "C" fn(ctx: *mut c_void, status: i32, msg: GwSlice),
}

/// The table a plugin's entry symbol returns. It must live as long as the
/// library (a `static`).
#[repr(C)]
#[derive(Debug)]
pub struct GwPluginV1 {
    /// Must equal the host's [`ABI_VERSION`]; checked before anything else.
    pub abi_version: u32,
    /// `size_of::<GwPluginV1>()` as the plugin knows it; must be at least the host's.
    pub struct_size: u32,
    /// Plugin name (static UTF-8), e.g. `system-metrics`.
    pub name: GwSlice,
    /// Plugin version (static UTF-8), e.g. `0.1.0`.
    pub version: GwSlice,
    /// 1 if the plugin was built with `panic = "unwind"` (panics are contained),
    /// 0 if built with `panic = "abort"` (a panic ends the whole process).
    pub panic_unwind: u32,
    /// Bit set of `GW_MODE_*`.
    pub modes: u32,
    /// Create an instance from the channel's plugin config (UTF-8 JSON). Returns
    /// null on failure, after writing the reason to `err`.
    pub create: extern "C" fn(host: *const GwHostV1, config: GwSlice, err: GwSink) -> *mut c_void,
    /// Poll once: emit zero or more messages through `host.emit` before returning.
    /// `key` is empty for unkeyed channels, else the stream key of an open key.
    pub poll: extern "C" fn(inst: *mut c_void, key: GwSlice, err: GwSink) -> i32,
    /// Push mode: start the plugin's own thread(s) and return at once.
    pub start: extern "C" fn(inst: *mut c_void, err: GwSink) -> i32,
    /// Keyed streams: a subscriber wants stream `key`; `params` is a JSON object
    /// (e.g. path parameters `{"job_id":"42"}`).
    pub open_key:
        extern "C" fn(inst: *mut c_void, key: GwSlice, params: GwSlice, err: GwSink) -> i32,
    /// Keyed streams: nobody wants `key` any more.
    pub close_key: extern "C" fn(inst: *mut c_void, key: GwSlice) -> i32,
    /// Command: JSON request in; on `GW_OK` the JSON reply was written to `reply`,
    /// on `GW_ERROR` an error message was.
    pub command: extern "C" fn(inst: *mut c_void, request: GwSlice, reply: GwSink) -> i32,
    /// Stop: ask the plugin's threads to finish and wait for them. After this
    /// returns the plugin calls no host function for this instance.
    pub stop: extern "C" fn(inst: *mut c_void),
    /// Free the instance. No call on `inst` follows.
    pub destroy: extern "C" fn(inst: *mut c_void),
}

/// Signature of the entry symbol.
pub type GwEntryV1 = unsafe extern "C" fn() -> *const GwPluginV1;

// SAFETY: a `GwPluginV1` is an immutable static table: its slices point to
// static strings and its functions are plain code pointers, so sharing it
// between threads cannot race.
unsafe impl Sync for GwPluginV1 {}
// SAFETY: as above; the table never changes after the entry symbol returns it.
unsafe impl Send for GwPluginV1 {}
// SAFETY: the host promises (module docs) that every function in the table may
// be called from any thread and that `ctx` is thread-safe host state.
unsafe impl Sync for GwHostV1 {}
// SAFETY: see the `Sync` impl above.
unsafe impl Send for GwHostV1 {}
