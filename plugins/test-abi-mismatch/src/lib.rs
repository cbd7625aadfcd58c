//! `test-abi-mismatch`: a test-only plugin whose exported table carries
//! `abi_version = 2`, so a v1 host must refuse to load it (before reading
//! anything else from the table). Otherwise trivial: name
//! `test-abi-mismatch`, poll mode, emits `{"ok":true}`, no config keys.

#![forbid(unsafe_code)]

use plugin_api::{Emitter, Host, Plugin, PluginError};
use serde_json::{Value, json};

/// The (never loaded) plugin.
pub struct AbiMismatch;

impl Plugin for AbiMismatch {
    fn create(_config: Value, _host: Host) -> Result<Self, PluginError> {
        Ok(AbiMismatch)
    }

    fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        out.emit_json("", &json!({ "ok": true }))?;
        Ok(())
    }
}

plugin_api::__export_plugin_with_abi!(2, AbiMismatch, name = "test-abi-mismatch", modes = [poll]);

#[cfg(test)]
mod tests {
    use plugin_api::testing::Loaded;

    #[test]
    fn table_carries_abi_version_2() {
        let loaded = Loaded::of::<super::AbiMismatch>();
        assert_eq!(loaded.table().abi_version, 2);
        assert_ne!(plugin_api::abi::ABI_VERSION, 2);
        assert_eq!(loaded.name(), "test-abi-mismatch");
    }
}
