//! The plugin loader and host side of ABI v1 (see `plugin_api::abi`).
//!
//! This is the only module of the gateway with `unsafe`: it loads libraries,
//! checks their version handshake, and calls through the C table. Every
//! library stays loaded for the life of the process. Every call into a plugin
//! blocks, so callers run them on blocking threads, never on async workers.

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;
use plugin_api::abi::{
    ABI_VERSION, ENTRY_SYMBOL_V1, GW_ERROR, GW_LOG_DEBUG, GW_LOG_ERROR, GW_LOG_INFO, GW_LOG_WARN,
    GW_MODE_COMMAND, GW_MODE_KEYED, GW_MODE_POLL, GW_MODE_PUSH, GW_OK, GW_PANIC, GW_REJECTED,
    GW_STOPPED, GW_UNSUPPORTED, GwEntryV1, GwHostV1, GwPluginV1, GwSink, GwSlice,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::SourceMode;
use crate::metrics::ChannelMetrics;

/// A loaded, version-checked plugin library.
pub struct LoadedPlugin {
    /// Name the plugin declares.
    pub name: String,
    /// Library file.
    pub path: PathBuf,
    /// Version the plugin declares.
    pub version: String,
    /// `GW_MODE_*` bits.
    pub modes: u32,
    /// False when built with `panic = "abort"`.
    pub panic_unwind: bool,
    table: &'static GwPluginV1,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("version", &self.version)
            .field("modes", &self.modes_text())
            .finish()
    }
}

impl LoadedPlugin {
    /// Whether the plugin implements a source mode.
    pub fn supports(&self, mode: SourceMode) -> bool {
        let bit = match mode {
            SourceMode::Poll => GW_MODE_POLL,
            SourceMode::Push => GW_MODE_PUSH,
        };
        self.modes & bit != 0
    }

    /// Whether the plugin implements keyed streams.
    pub fn keyed(&self) -> bool {
        self.modes & GW_MODE_KEYED != 0
    }

    /// Whether the plugin answers commands.
    pub fn commands(&self) -> bool {
        self.modes & GW_MODE_COMMAND != 0
    }

    /// Modes as words, e.g. `poll, command`.
    pub fn modes_text(&self) -> String {
        let names = [
            (GW_MODE_POLL, "poll"),
            (GW_MODE_PUSH, "push"),
            (GW_MODE_KEYED, "keyed"),
            (GW_MODE_COMMAND, "command"),
        ];
        let v: Vec<&str> = names
            .iter()
            .filter(|(b, _)| self.modes & b != 0)
            .map(|(_, n)| *n)
            .collect();
        if v.is_empty() {
            "nothing".into()
        } else {
            v.join(", ")
        }
    }
}

/// Every library loaded by this process, by canonical path. Libraries are
/// never unloaded: a reload finds them here.
pub struct PluginRegistry {
    loaded: Mutex<HashMap<PathBuf, Arc<LoadedPlugin>>>,
}

fn file_name_for(name: &str) -> String {
    format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

impl PluginRegistry {
    /// The process-wide registry.
    pub fn global() -> &'static PluginRegistry {
        static R: OnceLock<PluginRegistry> = OnceLock::new();
        R.get_or_init(|| PluginRegistry {
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// Find plugin `name` in `dirs` (first match wins) and load it.
    pub fn find(&self, name: &str, dirs: &[PathBuf]) -> Result<Arc<LoadedPlugin>, String> {
        let file = file_name_for(name);
        for d in dirs {
            let p = d.join(&file);
            if p.is_file() {
                let plugin = self.load(&p)?;
                if plugin.name != name {
                    return Err(format!(
                        "{} declares plugin name {:?}, not {name:?}",
                        p.display(),
                        plugin.name
                    ));
                }
                return Ok(plugin);
            }
        }
        let mut available = Vec::new();
        for d in dirs {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    let f = e.file_name().to_string_lossy().into_owned();
                    if let Some(n) = f
                        .strip_prefix(std::env::consts::DLL_PREFIX)
                        .and_then(|f| f.strip_suffix(std::env::consts::DLL_SUFFIX))
                    {
                        let n = n.replace('_', "-");
                        if !available.contains(&n) {
                            available.push(n);
                        }
                    }
                }
            }
        }
        available.sort();
        let dirs_s: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let hint = if available.is_empty() {
            "none found there (build plugins with `cargo build --release`)".to_string()
        } else {
            format!("available: {}", available.join(", "))
        };
        Err(format!(
            "no plugin {name:?}: looked for {file} in {}; {hint}",
            dirs_s.join(", ")
        ))
    }

    /// Load a library and check its ABI handshake.
    pub fn load(&self, path: &Path) -> Result<Arc<LoadedPlugin>, String> {
        let canon = path
            .canonicalize()
            .map_err(|e| format!("cannot open plugin {}: {e}", path.display()))?;
        let mut loaded = self.loaded.lock();
        if let Some(p) = loaded.get(&canon) {
            return Ok(p.clone());
        }
        // SAFETY: loading runs the library's initialisers; we only load files
        // from the directories the operator configured (`plugins.dirs`).
        let lib = unsafe { libloading::Library::new(&canon) }
            .map_err(|e| format!("cannot load plugin {}: {e}", path.display()))?;
        // Never unloaded: code and statics of the plugin stay valid for the
        // life of the process, which is what makes the `'static` below sound.
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        // SAFETY: the symbol's type is fixed by ABI v1 (`GwEntryV1`); a library
        // exporting this name with another signature is not a v1 plugin.
        let entry: libloading::Symbol<'static, GwEntryV1> =
            unsafe { lib.get(ENTRY_SYMBOL_V1.as_bytes()) }.map_err(|_| {
                format!(
                    "{} is not a gateway plugin: it exports no `{ENTRY_SYMBOL_V1}` symbol (plugin ABI v{ABI_VERSION})",
                    path.display()
                )
            })?;
        // SAFETY: calling the entry has no preconditions; it returns a pointer
        // to the plugin's static table or null.
        let table_ptr = unsafe { entry() };
        if table_ptr.is_null() {
            return Err(format!("plugin {} returned no table", path.display()));
        }
        if !table_ptr.is_aligned() {
            return Err(format!(
                "plugin {} returned a table at a misaligned address: return a pointer to a `static const GwPluginV1`",
                path.display()
            ));
        }
        // SAFETY: the first two fields are the same in every ABI version, so
        // they may be read before the version is known.
        let (abi, size) = unsafe { ((*table_ptr).abi_version, (*table_ptr).struct_size) };
        if abi != ABI_VERSION {
            return Err(format!(
                "plugin {} speaks plugin ABI v{abi}; this gateway speaks v{ABI_VERSION}: rebuild the plugin against plugin-api for ABI v{ABI_VERSION}",
                path.display()
            ));
        }
        if (size as usize) < std::mem::size_of::<GwPluginV1>() {
            return Err(format!(
                "plugin {} has a {size}-byte v{ABI_VERSION} table, smaller than the {} bytes this gateway needs",
                path.display(),
                std::mem::size_of::<GwPluginV1>()
            ));
        }
        // The host calls the table's functions without a null check: a null
        // entry would crash the process at its first call.
        let missing: Vec<&str> = TABLE_FUNCTIONS
            .iter()
            .filter(|(_, offset)| {
                // SAFETY: the table is at least size_of::<GwPluginV1>() bytes
                // and aligned (both checked above), so each entry is; the entry
                // is read as a raw pointer, which may be null, not as a
                // function pointer, which may not.
                unsafe {
                    table_ptr
                        .cast::<u8>()
                        .add(*offset)
                        .cast::<*const c_void>()
                        .read()
                }
                .is_null()
            })
            .map(|(name, _)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "plugin {} leaves these entries of its table null: {}; fill every entry of GwPluginV1 (a call for a mode the plugin does not declare answers GW_UNSUPPORTED)",
                path.display(),
                missing.join(", ")
            ));
        }
        // SAFETY: version and size were checked, and no entry is null; the
        // table is static in a library that is never unloaded.
        let table: &'static GwPluginV1 = unsafe { &*table_ptr };
        // SAFETY: name/version are static strings of the plugin (ABI contract).
        let name = unsafe { slice(table.name) };
        // SAFETY: as above.
        let version = unsafe { slice(table.version) };
        let name = std::str::from_utf8(name)
            .map_err(|_| format!("plugin {} has a name that is not UTF-8", path.display()))?
            .to_string();
        let version = String::from_utf8_lossy(version).into_owned();
        let plugin = Arc::new(LoadedPlugin {
            name,
            path: canon.clone(),
            version,
            modes: table.modes,
            panic_unwind: table.panic_unwind != 0,
            table,
        });
        tracing::info!(plugin = %plugin.name, version = %plugin.version, path = %canon.display(), modes = %plugin.modes_text(), "plugin loaded");
        loaded.insert(canon, plugin.clone());
        Ok(plugin)
    }
}

/// The function entries of `GwPluginV1`, by name and offset: none may be null.
const TABLE_FUNCTIONS: [(&str, usize); 8] = [
    ("create", std::mem::offset_of!(GwPluginV1, create)),
    ("poll", std::mem::offset_of!(GwPluginV1, poll)),
    ("start", std::mem::offset_of!(GwPluginV1, start)),
    ("open_key", std::mem::offset_of!(GwPluginV1, open_key)),
    ("close_key", std::mem::offset_of!(GwPluginV1, close_key)),
    ("command", std::mem::offset_of!(GwPluginV1, command)),
    ("stop", std::mem::offset_of!(GwPluginV1, stop)),
    ("destroy", std::mem::offset_of!(GwPluginV1, destroy)),
];

// The eight functions are the table's last eight fields, with nothing
// between them: a field added among or after them must be added to
// TABLE_FUNCTIONS too (and this check changed).
const _: () = assert!(
    std::mem::offset_of!(GwPluginV1, create) + 8 * std::mem::size_of::<usize>()
        == std::mem::size_of::<GwPluginV1>()
);

/// Borrow a `GwSlice` as a Rust slice.
///
/// # Safety
/// `s` must point to `s.len` readable bytes (or have `len == 0`) for the
/// lifetime `'a` chosen by the caller.
unsafe fn slice<'a>(s: GwSlice) -> &'a [u8] {
    if s.len == 0 || s.ptr.is_null() {
        &[]
    } else {
        // SAFETY: guaranteed by the caller (see above).
        unsafe { std::slice::from_raw_parts(s.ptr, s.len) }
    }
}

extern "C" fn sink_write(ctx: *mut c_void, bytes: GwSlice) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the `Vec<u8>` that `sink()` borrowed for the
        // duration of the call that received this sink.
        let v = unsafe { &mut *(ctx as *mut Vec<u8>) };
        // SAFETY: the plugin passes bytes valid for this call.
        v.extend_from_slice(unsafe { slice(bytes) });
    }));
}

fn sink(v: &mut Vec<u8>) -> GwSink {
    GwSink {
        ctx: v as *mut Vec<u8> as *mut c_void,
        write: sink_write,
    }
}

/// What a source sends to its channel's publisher.
#[derive(Debug)]
pub enum SourceEvent {
    /// A message on the channel (key None) or a keyed stream.
    Message {
        /// Stream key.
        key: Option<Arc<str>>,
        /// A complete WebSocket text frame: header, then the JSON exactly as
        /// the plugin emitted it (built in the one copy at the boundary).
        frame: Bytes,
        /// Where the JSON starts in `frame`.
        header: usize,
        /// When it entered the gateway ([`crate::metrics::stamp`]).
        emitted: u32,
    },
    /// A message already parsed and validated (the HTTP publish API).
    Ready {
        /// Stream key.
        key: Option<Arc<str>>,
        /// The message.
        msg: crate::broker::Message,
    },
    /// The plugin ended a keyed stream.
    End {
        /// Stream key.
        key: Arc<str>,
    },
}

/// A failed plugin call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginFailure {
    /// `GW_*` status code.
    pub code: i32,
    /// The plugin's message.
    pub message: String,
}

impl PluginFailure {
    fn new(code: i32, msg: Vec<u8>) -> PluginFailure {
        let mut message = String::from_utf8_lossy(&msg).into_owned();
        if message.is_empty() {
            message = match code {
                GW_PANIC => "panicked".into(),
                GW_UNSUPPORTED => "not supported by this plugin".into(),
                _ => format!("failed with status {code}"),
            };
        }
        PluginFailure { code, message }
    }

    /// Whether the plugin panicked.
    pub fn panicked(&self) -> bool {
        self.code == GW_PANIC
    }
}

impl std::fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code == GW_PANIC {
            write!(f, "panic: {}", self.message)
        } else {
            f.write_str(&self.message)
        }
    }
}

/// Host state behind one instance's `GwHostV1::ctx`.
struct HostCtx {
    channel: Arc<str>,
    plugin: Arc<str>,
    tx: mpsc::Sender<SourceEvent>,
    stop: CancellationToken,
    stopped: AtomicBool,
    exited: Mutex<Option<oneshot::Sender<PluginFailure>>>,
    max_message: usize,
    metrics: Arc<ChannelMetrics>,
    rt: tokio::runtime::Handle,
}

impl HostCtx {
    fn send(&self, ev: SourceEvent) -> i32 {
        if self.stopped.load(Relaxed) {
            return GW_STOPPED;
        }
        match self.tx.try_send(ev) {
            Ok(()) => GW_OK,
            Err(mpsc::error::TrySendError::Closed(_)) => GW_STOPPED,
            Err(mpsc::error::TrySendError::Full(ev)) => {
                // Backpressure: wait for room, but wake up if the instance is
                // stopped meanwhile. Plugin threads are never async workers.
                let tx = self.tx.clone();
                let stop = self.stop.clone();
                self.rt.block_on(async move {
                    tokio::select! {
                        r = tx.send(ev) => if r.is_ok() { GW_OK } else { GW_STOPPED },
                        _ = stop.cancelled() => GW_STOPPED,
                    }
                })
            }
        }
    }
}

fn key_of(k: &[u8]) -> Result<Option<Arc<str>>, ()> {
    if k.is_empty() {
        return Ok(None);
    }
    std::str::from_utf8(k)
        .map(|s| Some(Arc::from(s)))
        .map_err(|_| ())
}

extern "C" fn host_emit(ctx: *mut c_void, key: GwSlice, json: GwSlice) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the `HostCtx` given at create; it outlives the
        // instance's `destroy` (ABI contract: no host calls after `stop`).
        let h = unsafe { &*(ctx as *const HostCtx) };
        // A message answered "stopped" stays the plugin's (a durable source
        // does not acknowledge it), so it is not counted at all: `received`
        // counts what the gateway took, published or dropped.
        if h.stopped.load(Relaxed) {
            return GW_STOPPED;
        }
        // Too large, or a key that is not UTF-8: refused at the boundary.
        // The length is checked before a slice is made of it (one longer
        // than `isize::MAX` may not even be formed).
        // SAFETY: the plugin passes a key slice valid for this call.
        let key = match (json.len <= h.max_message).then(|| key_of(unsafe { slice(key) })) {
            Some(Ok(key)) => key,
            _ => {
                h.metrics.received.fetch_add(1, Relaxed);
                h.metrics.rejected.fetch_add(1, Relaxed);
                return GW_REJECTED;
            }
        };
        // SAFETY: the plugin passes a body slice valid for this call, and
        // its length was checked above.
        let json = unsafe { slice(json) };
        let emitted = crate::metrics::stamp();
        let (frame, header) = crate::ws::text_frame(json);
        let r = h.send(SourceEvent::Message {
            key,
            frame,
            header,
            emitted,
        });
        if r == GW_OK {
            h.metrics.received.fetch_add(1, Relaxed);
        }
        r
    }))
    .unwrap_or(GW_ERROR)
}

extern "C" fn host_end_stream(ctx: *mut c_void, key: GwSlice) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see `host_emit`.
        let h = unsafe { &*(ctx as *const HostCtx) };
        // SAFETY: the plugin passes a slice valid for this call.
        match key_of(unsafe { slice(key) }) {
            Ok(Some(key)) => h.send(SourceEvent::End { key }),
            _ => GW_REJECTED,
        }
    }))
    .unwrap_or(GW_ERROR)
}

extern "C" fn host_log(ctx: *mut c_void, level: u32, msg: GwSlice) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see `host_emit`.
        let h = unsafe { &*(ctx as *const HostCtx) };
        // SAFETY: the plugin passes a slice valid for this call.
        let msg = String::from_utf8_lossy(unsafe { slice(msg) });
        let (p, c) = (&*h.plugin, &*h.channel);
        match level {
            GW_LOG_ERROR => tracing::error!(plugin = p, channel = c, "{msg}"),
            GW_LOG_WARN => tracing::warn!(plugin = p, channel = c, "{msg}"),
            GW_LOG_INFO => tracing::info!(plugin = p, channel = c, "{msg}"),
            GW_LOG_DEBUG => tracing::debug!(plugin = p, channel = c, "{msg}"),
            _ => tracing::trace!(plugin = p, channel = c, "{msg}"),
        }
    }));
}

extern "C" fn host_exited(ctx: *mut c_void, status: i32, msg: GwSlice) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see `host_emit`.
        let h = unsafe { &*(ctx as *const HostCtx) };
        // SAFETY: the plugin passes a slice valid for this call.
        let msg = unsafe { slice(msg) }.to_vec();
        if let Some(tx) = h.exited.lock().take() {
            let _ = tx.send(PluginFailure::new(status, msg));
        }
    }));
}

/// Settings for a new instance.
pub struct InstanceParams {
    /// Channel name (for logs).
    pub channel: Arc<str>,
    /// Plugin config JSON.
    pub config: Vec<u8>,
    /// Where emitted messages go.
    pub tx: mpsc::Sender<SourceEvent>,
    /// Largest message accepted from the plugin.
    pub max_message: usize,
    /// Channel metrics.
    pub metrics: Arc<ChannelMetrics>,
    /// Runtime used to wait for queue room on plugin threads.
    pub rt: tokio::runtime::Handle,
}

/// One running plugin instance. Every method blocks: call them from
/// blocking threads.
pub struct Instance {
    plugin: Arc<LoadedPlugin>,
    ptr: *mut c_void,
    host: Box<GwHostV1>,
    ctx: Arc<HostCtx>,
    destroyed: bool,
}

// SAFETY: ABI v1 requires instances to be thread-safe (the host may call
// poll/open_key/close_key/command from several threads); the host state is
// `Sync` (atomics, channels, mutexes).
unsafe impl Send for Instance {}
// SAFETY: see above.
unsafe impl Sync for Instance {}

impl Instance {
    /// Create an instance; on a push plugin `exited` reports when its run loop ends.
    pub fn create(
        plugin: Arc<LoadedPlugin>,
        p: InstanceParams,
    ) -> Result<(Instance, oneshot::Receiver<PluginFailure>), PluginFailure> {
        let (etx, erx) = oneshot::channel();
        let ctx = Arc::new(HostCtx {
            channel: p.channel,
            plugin: plugin.name.as_str().into(),
            tx: p.tx,
            stop: CancellationToken::new(),
            stopped: AtomicBool::new(false),
            exited: Mutex::new(Some(etx)),
            max_message: p.max_message,
            metrics: p.metrics,
            rt: p.rt,
        });
        let host = Box::new(GwHostV1 {
            abi_version: ABI_VERSION,
            struct_size: std::mem::size_of::<GwHostV1>() as u32,
            ctx: Arc::as_ptr(&ctx) as *mut c_void,
            emit: host_emit,
            end_stream: host_end_stream,
            log: host_log,
            exited: host_exited,
        });
        let mut err = Vec::new();
        let ptr = (plugin.table.create)(&*host, GwSlice::from_slice(&p.config), sink(&mut err));
        if ptr.is_null() {
            return Err(PluginFailure::new(GW_ERROR, err));
        }
        Ok((
            Instance {
                plugin,
                ptr,
                host,
                ctx,
                destroyed: false,
            },
            erx,
        ))
    }

    fn status(code: i32, err: Vec<u8>) -> Result<(), PluginFailure> {
        if code == GW_OK {
            Ok(())
        } else {
            Err(PluginFailure::new(code, err))
        }
    }

    /// Poll once (key None for unkeyed channels).
    pub fn poll(&self, key: Option<&str>) -> Result<(), PluginFailure> {
        let mut err = Vec::new();
        let k = key.unwrap_or("").as_bytes();
        let code = (self.plugin.table.poll)(self.ptr, GwSlice::from_slice(k), sink(&mut err));
        Self::status(code, err)
    }

    /// Start a push plugin.
    pub fn start(&self) -> Result<(), PluginFailure> {
        let mut err = Vec::new();
        let code = (self.plugin.table.start)(self.ptr, sink(&mut err));
        Self::status(code, err)
    }

    /// Open a keyed stream.
    pub fn open_key(&self, key: &str, params_json: &[u8]) -> Result<(), PluginFailure> {
        let mut err = Vec::new();
        let code = (self.plugin.table.open_key)(
            self.ptr,
            GwSlice::from_slice(key.as_bytes()),
            GwSlice::from_slice(params_json),
            sink(&mut err),
        );
        Self::status(code, err)
    }

    /// Close a keyed stream.
    pub fn close_key(&self, key: &str) -> Result<(), PluginFailure> {
        let code = (self.plugin.table.close_key)(self.ptr, GwSlice::from_slice(key.as_bytes()));
        Self::status(code, Vec::new())
    }

    /// Send a command; returns the plugin's JSON reply.
    pub fn command(&self, request: &[u8]) -> Result<Vec<u8>, PluginFailure> {
        let mut out = Vec::new();
        let code =
            (self.plugin.table.command)(self.ptr, GwSlice::from_slice(request), sink(&mut out));
        if code == GW_OK {
            Ok(out)
        } else {
            Err(PluginFailure::new(code, out))
        }
    }

    /// Refuse everything the plugin hands over from now on (`GW_STOPPED`),
    /// and wake an emit waiting for room, without calling the plugin: its
    /// source is over even while a command still running inside it holds
    /// the instance (the last holder stops and frees it).
    pub fn revoke(&self) {
        self.ctx.stopped.store(true, Relaxed);
        self.ctx.stop.cancel();
    }

    /// Stop and free the instance. After this no plugin thread calls the host
    /// for it, so the host state can go.
    pub fn shutdown(mut self) {
        self.destroy_now();
    }

    fn destroy_now(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        self.revoke();
        (self.plugin.table.stop)(self.ptr);
        (self.plugin.table.destroy)(self.ptr);
        let _ = &self.host;
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.destroy_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(
        capacity: usize,
    ) -> (
        Arc<HostCtx>,
        mpsc::Receiver<SourceEvent>,
        tokio::runtime::Runtime,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(capacity);
        let ctx = Arc::new(HostCtx {
            channel: "c".into(),
            plugin: "p".into(),
            tx,
            stop: CancellationToken::new(),
            stopped: AtomicBool::new(false),
            exited: Mutex::new(None),
            max_message: 16,
            metrics: Arc::default(),
            rt: rt.handle().clone(),
        });
        (ctx, rx, rt)
    }

    fn emit(ctx: &Arc<HostCtx>, json: &[u8]) -> i32 {
        host_emit(
            Arc::as_ptr(ctx) as *mut c_void,
            GwSlice::EMPTY,
            GwSlice::from_slice(json),
        )
    }

    /// `received` counts what the gateway took: a message answered
    /// "stopped" is neither published nor dropped, so it is not counted
    /// either; one refused at the boundary is counted with `rejected`.
    #[test]
    fn an_emit_answered_stopped_is_not_counted_as_received() {
        let (h, mut rx, _rt) = ctx(1);
        assert_eq!(emit(&h, b"{}"), GW_OK);
        assert_eq!(emit(&h, &[b' '; 17]), GW_REJECTED);
        assert_eq!(h.metrics.received.load(Relaxed), 2);
        assert_eq!(h.metrics.rejected.load(Relaxed), 1);

        // The channel is full: the emit waits, and the stop answers it.
        let stopper = {
            let h = h.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                h.stopped.store(true, Relaxed);
                h.stop.cancel();
            })
        };
        assert_eq!(emit(&h, b"{}"), GW_STOPPED);
        stopper.join().unwrap();
        assert_eq!(emit(&h, b"{}"), GW_STOPPED, "after the stop");
        assert_eq!(h.metrics.received.load(Relaxed), 2);

        // A closed channel answers "stopped" too.
        let (h, rx2, _rt) = ctx(1);
        drop(rx2);
        assert_eq!(emit(&h, b"{}"), GW_STOPPED);
        assert_eq!(h.metrics.received.load(Relaxed), 0);
        assert!(rx.try_recv().is_ok(), "the first message was taken");
    }
}
