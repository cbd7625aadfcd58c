//! tracing setup: human text by default, JSON on request; `RUST_LOG` wins
//! over the configured level. A reload can change the level (not the format).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn from_env() -> Option<EnvFilter> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => Some(EnvFilter::new(v)),
        _ => None,
    }
}

/// Install the global subscriber (once; later calls do nothing).
pub fn init(level: &str, format: LogFormat) {
    let filter = from_env().unwrap_or_else(|| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => Registry::default().with(filter).with(fmt).try_init(),
        LogFormat::Json => Registry::default()
            .with(filter)
            .with(fmt.json().flatten_event(true))
            .try_init(),
    };
    if installed.is_ok() {
        let _ = LEVEL.set(handle);
    }
}

/// Use `level` from now on (a reloaded `log.level`); `RUST_LOG` still wins.
pub fn set_level(level: &str) {
    if from_env().is_some() {
        return;
    }
    if let Some(h) = LEVEL.get() {
        let _ = h.reload(EnvFilter::new(level));
    }
}
