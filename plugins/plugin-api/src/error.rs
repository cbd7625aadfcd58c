//! Error types of the SDK.

use std::fmt;

/// Why a plugin call failed. Crosses the boundary as `GW_ERROR` (with the
/// message written to the error sink) or `GW_UNSUPPORTED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// The plugin does not implement this call (`GW_UNSUPPORTED`).
    Unsupported,
    /// The call failed; the message goes to the host (`GW_ERROR`).
    Failed(String),
}

impl PluginError {
    /// A failure with `message`.
    pub fn new(message: impl Into<String>) -> PluginError {
        PluginError::Failed(message.into())
    }

    /// The message (for `Unsupported`: "unsupported").
    pub fn message(&self) -> &str {
        match self {
            PluginError::Unsupported => "unsupported",
            PluginError::Failed(message) => message,
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for PluginError {}

impl From<String> for PluginError {
    fn from(message: String) -> PluginError {
        PluginError::Failed(message)
    }
}

impl From<&str> for PluginError {
    fn from(message: &str) -> PluginError {
        PluginError::Failed(message.to_owned())
    }
}

impl From<serde_json::Error> for PluginError {
    fn from(error: serde_json::Error) -> PluginError {
        PluginError::Failed(error.to_string())
    }
}

impl From<EmitError> for PluginError {
    fn from(error: EmitError) -> PluginError {
        PluginError::Failed(format!("emit failed: {error}"))
    }
}

/// Why [`Emitter::emit`](crate::Emitter::emit) (or `end_stream`) did not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitError {
    /// The instance is being stopped (by the host, `GW_STOPPED`, or by the
    /// SDK's `stop`): stop emitting and return. Sticky: every later call
    /// returns it too, without reaching the host.
    Stopped,
    /// The host refused this message (`GW_REJECTED`: not UTF-8 JSON, too large, ...).
    Rejected,
    /// The host answered another status code.
    Status(i32),
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmitError::Stopped => f.write_str("instance stopped"),
            EmitError::Rejected => f.write_str("message rejected by the host"),
            EmitError::Status(code) => write!(f, "host returned status {code}"),
        }
    }
}

impl std::error::Error for EmitError {}
