//! The safe trait a plugin implements, and config parsing.

use serde::de::DeserializeOwned;

use crate::error::PluginError;
use crate::host::{Emitter, Host};

/// A gateway plugin. One value of the type is one instance (one channel).
///
/// Calls for the modes declared in [`export_plugin!`](crate::export_plugin)
/// reach these methods; the defaults answer `GW_UNSUPPORTED`. `poll`,
/// `open_key`, `close_key` and `command` may run concurrently on different
/// threads, hence `&self` and `Sync`. A panic in any method is caught and
/// reported to the host as `GW_PANIC` with the panic message.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Create an instance from the channel's plugin config (`null` when the
    /// host passed none). `host` may be kept for logging.
    fn create(config: serde_json::Value, host: Host) -> Result<Self, PluginError>;

    /// Poll mode: emit zero or more messages through `out` and return. `key`
    /// is `None` for the channel's own stream, else an open key (keyed mode).
    fn poll(&self, key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        let _ = (key, out);
        Err(PluginError::Unsupported)
    }

    /// Push mode: the run loop, called once on an SDK-owned thread named
    /// `gw-<plugin name>`. Must return soon after `out.is_stopped()` becomes
    /// true or an emit returns `Err(EmitError::Stopped)` (use
    /// [`Emitter::wait_stopped`] to sleep). If it returns by itself, the host is
    /// told (`Ok` → finished, `Err`/panic → failed, restarted with backoff).
    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        let _ = out;
        Err(PluginError::Unsupported)
    }

    /// Keyed mode: a subscriber wants stream `key`; `params` is a JSON object
    /// (e.g. path parameters).
    fn open_key(&self, key: &str, params: serde_json::Value) -> Result<(), PluginError> {
        let _ = (key, params);
        Err(PluginError::Unsupported)
    }

    /// Keyed mode: nobody wants `key` any more.
    fn close_key(&self, key: &str) {
        let _ = key;
    }

    /// Command mode: answer one JSON request.
    fn command(&self, request: serde_json::Value) -> Result<serde_json::Value, PluginError> {
        let _ = request;
        Err(PluginError::Unsupported)
    }

    /// Called when the host stops the instance, after the stopped flag is set
    /// and before the SDK joins the run thread: wake up anything `run` blocks on.
    fn stop(&self) {}
}

/// A [`Plugin`] with its export metadata. Implemented by
/// [`export_plugin!`](crate::export_plugin); do not implement it by hand.
pub trait Exported: Plugin {
    /// Plugin name, e.g. `system-metrics`.
    const NAME: &'static str;
    /// Plugin version (the plugin crate's `CARGO_PKG_VERSION`).
    const VERSION: &'static str;
    /// Bit set of `GW_MODE_*`.
    const MODES: u32;
    /// ABI version written to the table (always `ABI_VERSION` except in tests).
    const ABI_VERSION: u32;
    /// Whether the plugin was built with `panic = "unwind"`.
    const PANIC_UNWIND: bool;
}

/// Parse a plugin config into `C`: `null` gives `C::default()`, anything but a
/// JSON object is an error, and so is a field `C` refuses (use
/// `#[serde(deny_unknown_fields, default)]` on `C` to refuse unknown keys).
pub fn parse_config<C: DeserializeOwned + Default>(
    config: serde_json::Value,
) -> Result<C, PluginError> {
    match config {
        serde_json::Value::Null => Ok(C::default()),
        serde_json::Value::Object(_) => serde_json::from_value(config)
            .map_err(|e| PluginError::new(format!("invalid config: {e}"))),
        other => Err(PluginError::new(format!(
            "invalid config: expected a JSON object, got {other}"
        ))),
    }
}
