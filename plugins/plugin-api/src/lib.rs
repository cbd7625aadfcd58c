//! Plugin ABI v1 and the safe SDK that gateway plugins are written with.
//!
//! Module map:
//! - [`abi`]: the fixed C ABI (the only types that cross the library boundary;
//!   `include/gw_plugin.h` is the same contract for C);
//! - [`Plugin`], [`PluginError`], [`parse_config`]: the safe trait a plugin implements;
//! - [`Host`], [`Emitter`], [`EmitError`], [`LogLevel`]: what a plugin calls back into;
//! - [`export_plugin!`], [`Exported`], [`plugin_table`]: turn a `Plugin` type into
//!   the exported `gw_plugin_entry_v1` table (the generic `extern "C"` shims live
//!   in a private module; every one catches panics);
//! - [`testing`]: an in-process fake host and a safe driver for a plugin's table,
//!   for plugin unit tests.
//!
//! A plugin is a normal crate with `crate-type = ["cdylib", "rlib"]`:
//!
//! ```
//! use plugin_api::{Emitter, Host, Plugin, PluginError};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn create(_config: serde_json::Value, _host: Host) -> Result<Self, PluginError> {
//!         Ok(Hello)
//!     }
//!     fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
//!         out.emit("", br#"{"hello":"world"}"#)?;
//!         Ok(())
//!     }
//! }
//!
//! plugin_api::export_plugin!(Hello, name = "hello", modes = [poll]);
//! ```
//!
//! All `unsafe` code of the plugin system lives in this crate; plugins need none.

#![warn(
    missing_docs,
    clippy::undocumented_unsafe_blocks,
    clippy::multiple_unsafe_ops_per_block
)]

pub mod abi;
mod error;
mod export;
mod host;
mod plugin;
pub mod testing;

pub use error::{EmitError, PluginError};
pub use export::plugin_table;
pub use host::{Emitter, Host, LogLevel};
pub use plugin::{Exported, Plugin, parse_config};

/// Export a [`Plugin`] type as a loadable plugin: generates the C entry symbol
/// `gw_plugin_entry_v1` returning a static [`abi::GwPluginV1`] table.
///
/// ```ignore
/// plugin_api::export_plugin!(MyPlugin, name = "my-plugin", modes = [poll, push, keyed, command]);
/// ```
///
/// `modes` lists the capabilities the plugin implements (any of `poll`, `push`,
/// `keyed`, `command`); calls for undeclared modes answer `GW_UNSUPPORTED`
/// without reaching the plugin. The version is the plugin crate's
/// `CARGO_PKG_VERSION`. Use it once per crate, at module level.
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty, name = $name:literal, modes = [$($mode:ident),* $(,)?] $(,)?) => {
        $crate::__export_plugin_with_abi!(
            $crate::abi::ABI_VERSION, $ty, name = $name, modes = [$($mode),*]
        );
    };
}

/// Like [`export_plugin!`] but with an explicit `abi_version` in the table.
/// Only for tests of the host's ABI check (`test-abi-mismatch`).
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin_with_abi {
    ($abi:expr, $ty:ty, name = $name:literal, modes = [$($mode:ident),* $(,)?] $(,)?) => {
        impl $crate::Exported for $ty {
            const NAME: &'static str = $name;
            const VERSION: &'static str = ::core::env!("CARGO_PKG_VERSION");
            const MODES: u32 = 0 $(| $crate::__plugin_mode!($mode))*;
            const ABI_VERSION: u32 = $abi;
            const PANIC_UNWIND: bool = ::core::cfg!(panic = "unwind");
        }

        /// The plugin's entry symbol (plugin ABI v1).
        #[unsafe(no_mangle)]
        pub extern "C" fn gw_plugin_entry_v1() -> *const $crate::abi::GwPluginV1 {
            static TABLE: $crate::abi::GwPluginV1 = $crate::plugin_table::<$ty>();
            &TABLE
        }
    };
}

/// Maps a mode name of [`export_plugin!`] to its `GW_MODE_*` bit.
#[doc(hidden)]
#[macro_export]
macro_rules! __plugin_mode {
    (poll) => {
        $crate::abi::GW_MODE_POLL
    };
    (push) => {
        $crate::abi::GW_MODE_PUSH
    };
    (keyed) => {
        $crate::abi::GW_MODE_KEYED
    };
    (command) => {
        $crate::abi::GW_MODE_COMMAND
    };
    ($other:ident) => {
        ::core::compile_error!(::core::concat!(
            "unknown plugin mode `",
            ::core::stringify!($other),
            "`: expected poll, push, keyed or command"
        ))
    };
}

#[cfg(test)]
mod tests;
