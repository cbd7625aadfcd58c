//! The generic `extern "C"` shims behind every exported table, and the table
//! itself ([`plugin_table`]). Every shim runs the plugin inside `catch_unwind`:
//! a panic becomes `GW_PANIC` with the panic message written to the error sink.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::abi::{
    ABI_VERSION, GW_ERROR, GW_MODE_COMMAND, GW_MODE_KEYED, GW_MODE_POLL, GW_MODE_PUSH, GW_OK,
    GW_PANIC, GW_UNSUPPORTED, GwHostV1, GwPluginV1, GwSink, GwSlice,
};
use crate::error::PluginError;
use crate::host::{Emitter, Host, HostFns, Shared};
use crate::plugin::Exported;

/// The `GwPluginV1` table for `T` (what `gw_plugin_entry_v1` returns).
pub const fn plugin_table<T: Exported>() -> GwPluginV1 {
    GwPluginV1 {
        abi_version: T::ABI_VERSION,
        struct_size: size_of::<GwPluginV1>() as u32,
        name: GwSlice::from_slice(T::NAME.as_bytes()),
        version: GwSlice::from_slice(T::VERSION.as_bytes()),
        panic_unwind: T::PANIC_UNWIND as u32,
        modes: T::MODES,
        create: create::<T>,
        poll: poll::<T>,
        start: start::<T>,
        open_key: open_key::<T>,
        close_key: close_key::<T>,
        command: command::<T>,
        stop: stop::<T>,
        destroy: destroy::<T>,
    }
}

/// One instance behind the opaque `inst` pointer.
struct Instance<T> {
    plugin: Arc<T>,
    shared: Arc<Shared>,
    run_thread: Mutex<Option<JoinHandle<()>>>,
    stop_done: AtomicBool,
}

impl<T: Exported> Instance<T> {
    /// Stop once: set the flag, call the hook, join the run thread, revoke
    /// host access.
    fn stop_once(&self) {
        if self.stop_done.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.mark_stopped();
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.plugin.stop())) {
            let msg = format!("panic in stop: {}", panic_message(payload.as_ref()));
            Host::new(self.shared.clone()).error(&msg);
        }
        let handle = self
            .run_thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            // The run loop is wrapped in catch_unwind, so join cannot fail.
            let _ = handle.join();
        }
        self.shared.revoke();
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Borrow the bytes of a slice passed by the host.
///
/// # Safety
/// `s` must be valid for reads of `s.len` bytes for the returned lifetime (the
/// ABI guarantees this for the duration of the call it was passed to).
pub(crate) unsafe fn borrow<'a>(s: GwSlice) -> &'a [u8] {
    if s.ptr.is_null() || s.len == 0 {
        return &[];
    }
    // SAFETY: non-null, and the caller guarantees `len` readable bytes.
    unsafe { std::slice::from_raw_parts(s.ptr, s.len) }
}

fn write_sink(sink: GwSink, msg: &str) {
    (sink.write)(sink.ctx, GwSlice::from_slice(msg.as_bytes()));
}

/// The instance behind `inst`, or None for null.
///
/// # Safety
/// `inst` must be null or a pointer returned by `create::<T>` whose `destroy`
/// has not been called.
unsafe fn instance<'a, T>(inst: *mut c_void) -> Option<&'a Instance<T>> {
    // SAFETY: per the contract, a non-null `inst` points to a live `Instance<T>`.
    unsafe { inst.cast::<Instance<T>>().cast_const().as_ref() }
}

fn unsupported<T: Exported>(op: &str, err: GwSink) -> i32 {
    write_sink(err, &format!("plugin `{}` does not support {op}", T::NAME));
    GW_UNSUPPORTED
}

/// Map a caught plugin result to a status, writing the message to `err`.
fn finish<T: Exported>(
    op: &str,
    result: std::thread::Result<Result<(), PluginError>>,
    err: GwSink,
) -> i32 {
    match result {
        Ok(Ok(())) => GW_OK,
        Ok(Err(PluginError::Unsupported)) => unsupported::<T>(op, err),
        Ok(Err(PluginError::Failed(msg))) => {
            write_sink(err, &msg);
            GW_ERROR
        }
        Err(payload) => {
            write_sink(err, &panic_message(payload.as_ref()));
            GW_PANIC
        }
    }
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, PluginError> {
    std::str::from_utf8(bytes).map_err(|_| PluginError::new(format!("{what} is not valid UTF-8")))
}

/// Check the host table and copy its v1 functions.
///
/// # Safety
/// `host` must be null or point to a host table valid for reads of at least its
/// first two fields, and of the whole v1 table if `struct_size` says so.
unsafe fn read_host(host: *const GwHostV1) -> Result<HostFns, PluginError> {
    if host.is_null() {
        return Err(PluginError::new("create: host table is null"));
    }
    // SAFETY: every host table starts with `abi_version` and `struct_size`;
    // only these fields are read, not the whole (maybe shorter) struct.
    let abi_version = unsafe { (*host).abi_version };
    // SAFETY: as above.
    let struct_size = unsafe { (*host).struct_size };
    if abi_version != ABI_VERSION {
        return Err(PluginError::new(format!(
            "create: host ABI version {abi_version}, plugin expects {ABI_VERSION}"
        )));
    }
    let needed = size_of::<GwHostV1>();
    if (struct_size as usize) < needed {
        return Err(PluginError::new(format!(
            "create: host table is {struct_size} bytes, plugin needs at least {needed}"
        )));
    }
    // SAFETY: the host says the table holds at least the whole v1 struct.
    Ok(HostFns::from_table(unsafe { &*host }))
}

extern "C" fn create<T: Exported>(
    host: *const GwHostV1,
    config: GwSlice,
    err: GwSink,
) -> *mut c_void {
    let mut shared_slot = None;
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Instance<T>, PluginError> {
        // SAFETY: the ABI passes a host table valid until `destroy` returns.
        let fns = unsafe { read_host(host) }?;
        // SAFETY: `config` is borrowed for this call.
        let bytes = unsafe { borrow(config) };
        let config = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(bytes)
                .map_err(|e| PluginError::new(format!("invalid config JSON: {e}")))?
        };
        let shared = Shared::new(fns, None);
        shared_slot = Some(shared.clone());
        let plugin = T::create(config, Host::new(shared.clone()))?;
        Ok(Instance {
            plugin: Arc::new(plugin),
            shared,
            run_thread: Mutex::new(None),
            stop_done: AtomicBool::new(false),
        })
    }));
    let msg = match result {
        Ok(Ok(instance)) => return Box::into_raw(Box::new(instance)).cast(),
        Ok(Err(e)) => e.message().to_owned(),
        Err(payload) => panic_message(payload.as_ref()),
    };
    // Handles the plugin kept before failing must not reach the host any more.
    if let Some(shared) = shared_slot {
        shared.revoke();
    }
    write_sink(err, &msg);
    std::ptr::null_mut()
}

extern "C" fn poll<T: Exported>(inst: *mut c_void, key: GwSlice, err: GwSink) -> i32 {
    // SAFETY: the host passes an instance from `create` that is not destroyed.
    let Some(inst) = (unsafe { instance::<T>(inst) }) else {
        write_sink(err, "poll: null instance");
        return GW_ERROR;
    };
    if T::MODES & GW_MODE_POLL == 0 {
        return unsupported::<T>("poll", err);
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `key` is borrowed for this call.
        let key = utf8(unsafe { borrow(key) }, "key")?;
        let key = (!key.is_empty()).then_some(key);
        let out = Emitter::new(inst.shared.clone());
        inst.plugin.poll(key, &out)
    }));
    finish::<T>("poll", result, err)
}

extern "C" fn start<T: Exported>(inst: *mut c_void, err: GwSink) -> i32 {
    // SAFETY: the host passes an instance from `create` that is not destroyed.
    let Some(inst) = (unsafe { instance::<T>(inst) }) else {
        write_sink(err, "start: null instance");
        return GW_ERROR;
    };
    if T::MODES & GW_MODE_PUSH == 0 {
        return unsupported::<T>("push mode (start)", err);
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        if inst.shared.is_stopped() {
            return Err(PluginError::new("start: instance is stopped"));
        }
        let mut slot = inst
            .run_thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Err(PluginError::new("start: already started"));
        }
        let plugin = inst.plugin.clone();
        let shared = inst.shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("gw-{}", T::NAME))
            .spawn(move || run_thread::<T>(plugin, shared))
            .map_err(|e| PluginError::new(format!("start: cannot spawn thread: {e}")))?;
        *slot = Some(handle);
        Ok(())
    }));
    finish::<T>("push mode (start)", result, err)
}

/// Body of the SDK-owned run thread.
fn run_thread<T: Exported>(plugin: Arc<T>, shared: Arc<Shared>) {
    let out = Emitter::new(shared.clone());
    let result = catch_unwind(AssertUnwindSafe(|| plugin.run(out)));
    drop(plugin);
    let (status, msg) = match result {
        Ok(Ok(())) => (GW_OK, String::new()),
        Ok(Err(PluginError::Unsupported)) => (
            GW_ERROR,
            format!("plugin `{}` does not implement run", T::NAME),
        ),
        Ok(Err(PluginError::Failed(msg))) => (GW_ERROR, msg),
        Err(payload) => (GW_PANIC, panic_message(payload.as_ref())),
    };
    shared.report_exit(status, &msg);
}

extern "C" fn open_key<T: Exported>(
    inst: *mut c_void,
    key: GwSlice,
    params: GwSlice,
    err: GwSink,
) -> i32 {
    // SAFETY: the host passes an instance from `create` that is not destroyed.
    let Some(inst) = (unsafe { instance::<T>(inst) }) else {
        write_sink(err, "open_key: null instance");
        return GW_ERROR;
    };
    if T::MODES & GW_MODE_KEYED == 0 {
        return unsupported::<T>("keyed streams (open_key)", err);
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `key` is borrowed for this call.
        let key = utf8(unsafe { borrow(key) }, "key")?;
        // SAFETY: `params` is borrowed for this call.
        let params = unsafe { borrow(params) };
        let params = if params.is_empty() {
            serde_json::Value::Object(serde_json::Map::new())
        } else {
            serde_json::from_slice(params)
                .map_err(|e| PluginError::new(format!("open_key: invalid params JSON: {e}")))?
        };
        inst.plugin.open_key(key, params)
    }));
    finish::<T>("keyed streams (open_key)", result, err)
}

extern "C" fn close_key<T: Exported>(inst: *mut c_void, key: GwSlice) -> i32 {
    // SAFETY: the host passes an instance from `create` that is not destroyed.
    let Some(inst) = (unsafe { instance::<T>(inst) }) else {
        return GW_ERROR;
    };
    if T::MODES & GW_MODE_KEYED == 0 {
        return GW_UNSUPPORTED;
    }
    // SAFETY: `key` is borrowed for this call.
    let Ok(key) = std::str::from_utf8(unsafe { borrow(key) }) else {
        return GW_ERROR;
    };
    match catch_unwind(AssertUnwindSafe(|| inst.plugin.close_key(key))) {
        Ok(()) => GW_OK,
        Err(payload) => {
            // No error sink in this call: log the panic instead.
            let msg = format!("panic in close_key: {}", panic_message(payload.as_ref()));
            Host::new(inst.shared.clone()).error(&msg);
            GW_PANIC
        }
    }
}

extern "C" fn command<T: Exported>(inst: *mut c_void, request: GwSlice, reply: GwSink) -> i32 {
    // SAFETY: the host passes an instance from `create` that is not destroyed.
    let Some(inst) = (unsafe { instance::<T>(inst) }) else {
        write_sink(reply, "command: null instance");
        return GW_ERROR;
    };
    if T::MODES & GW_MODE_COMMAND == 0 {
        return unsupported::<T>("commands", reply);
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `request` is borrowed for this call.
        let request = serde_json::from_slice(unsafe { borrow(request) })
            .map_err(|e| PluginError::new(format!("command: invalid request JSON: {e}")))?;
        let answer = inst.plugin.command(request)?;
        let bytes = serde_json::to_vec(&answer)?;
        (reply.write)(reply.ctx, GwSlice::from_slice(&bytes));
        Ok(())
    }));
    finish::<T>("commands", result, reply)
}

extern "C" fn stop<T: Exported>(inst: *mut c_void) {
    // SAFETY: the host passes an instance from `create` that is not destroyed.
    if let Some(inst) = unsafe { instance::<T>(inst) } {
        // `stop_once` catches the hook's panic; this is belt and braces.
        let _ = catch_unwind(AssertUnwindSafe(|| inst.stop_once()));
    }
}

extern "C" fn destroy<T: Exported>(inst: *mut c_void) {
    if inst.is_null() {
        return;
    }
    stop::<T>(inst);
    // SAFETY: `inst` came from `Box::into_raw` in `create::<T>` and the ABI
    // promises no call on it follows `destroy`.
    let boxed = unsafe { Box::from_raw(inst.cast::<Instance<T>>()) };
    // Dropping runs the plugin's `Drop`, which may panic.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
}
