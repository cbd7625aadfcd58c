//! Reloading the configuration while serving (SIGHUP, or a change of the
//! configuration files).
//!
//! A reload loads and validates everything again, exactly as at start. On any
//! error the running configuration stays and the errors are logged. Otherwise
//! the new configuration is swapped in at once:
//! - a channel whose spec, schema and plugin are unchanged keeps running, and
//!   its subscribers notice nothing;
//! - a changed channel's source is restarted with the new settings; its
//!   subscribers stay subscribed (keyed channels: their streams are closed
//!   with 1001, to be reopened by the clients against the new source);
//! - a removed channel's subscribers are closed with 1001 `channel removed`;
//! - endpoints and HTTP routes answer new requests from the new
//!   configuration; open connections keep the endpoint settings they were
//!   accepted with. Connection counters carry over, so limits hold across
//!   the swap.
//!
//! Listeners and the admin listener are fixed for the life of the process: a
//! reload that changes them is refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channel::{self, ChannelRuntime};
use crate::config::{self, Config, ConfigError, ConfigErrors};
use crate::state::{GatewayState, Live, epoch_ms};
use crate::ws::close;

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Channels started.
    pub added: Vec<String>,
    /// Channels restarted with new settings.
    pub changed: Vec<String>,
    /// Channels stopped.
    pub removed: Vec<String>,
    /// Channels left running as they were.
    pub unchanged: usize,
    /// Subscriptions closed (removed channels, changed keyed channels).
    pub closed: usize,
    /// The configuration's generation now (1 at start).
    pub generation: u64,
    /// Settings that changed but only take effect at restart, and the new
    /// configuration's warnings.
    pub warnings: Vec<String>,
}

/// Serializes reloads and applies them.
pub struct Reloader {
    state: Arc<GatewayState>,
    tracker: TaskTracker,
    lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader for a running gateway.
    pub fn new(state: Arc<GatewayState>, tracker: TaskTracker) -> Reloader {
        Reloader {
            state,
            tracker,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Load the configuration files again and serve them, or keep the
    /// running configuration and return every error.
    pub async fn reload(&self) -> Result<ReloadReport, ConfigErrors> {
        let _one_at_a_time = self.lock.lock().await;
        let old = self.state.live();
        let file = old.config.file.clone();
        let opts = old.config.options.clone();
        let f2 = file.clone();
        let loaded = match tokio::task::spawn_blocking(move || config::load(&f2, &opts)).await {
            Ok(r) => r,
            Err(e) => Err(ConfigErrors(vec![whole_file(
                &file,
                ".",
                format!("loading the configuration failed: {e}"),
            )])),
        };
        let new = match loaded {
            Ok(c) => c,
            Err(e) => return Err(self.refused(e)),
        };
        let errors = restart_only(&old.config, &new);
        if !errors.is_empty() {
            return Err(self.refused(ConfigErrors(errors)));
        }
        Ok(self.apply(&old, new))
    }

    fn refused(&self, e: ConfigErrors) -> ConfigErrors {
        self.state.metrics.reload_failures.fetch_add(1, Relaxed);
        tracing::error!(
            errors = e.0.len(),
            "configuration reload refused; still serving the running configuration:\n{e}"
        );
        e
    }

    fn apply(&self, old: &Live, new: Config) -> ReloadReport {
        let st = &self.state;
        let mut report = ReloadReport::default();
        let mut channels: HashMap<Arc<str>, Arc<ChannelRuntime>> = HashMap::new();
        let mut replaced = Vec::new();
        for ch in &new.channels {
            let prev = old.channels.get(&ch.name);
            if let Some(rt) = prev
                && rt.cfg.fingerprint == ch.fingerprint
            {
                channels.insert(ch.name.clone(), rt.clone());
                report.unchanged += 1;
                continue;
            }
            if let Some(rt) = prev {
                // Stop the old source first: one source per channel. A keyed
                // channel's streams are closed below (their clients reopen
                // them on the new source): what the old source still hands
                // over would reach those new streams, so it goes nowhere.
                if rt.cfg.keyed {
                    rt.remove();
                } else {
                    rt.stop();
                }
                replaced.push(rt.clone());
                report.changed.push(ch.name.to_string());
            } else {
                report.added.push(ch.name.to_string());
            }
            let rt = channel::start(
                ch.clone(),
                &new.limits,
                &st.metrics,
                st.broker.clone(),
                &self.tracker,
                st.shutdown.clone(),
                Arc::downgrade(st),
                st.cluster.as_ref(),
                // What a keyed channel's old source still hands over goes
                // nowhere (see above): nothing to wait for.
                prev.filter(|p| !p.cfg.keyed).map(|p| p.published_all()),
            );
            // A restarted channel was ready before; readiness is about the
            // first start.
            if let Some(p) = prev {
                rt.succeed(p);
            }
            channels.insert(ch.name.clone(), rt);
        }
        let removed: Vec<Arc<ChannelRuntime>> = old
            .channels
            .iter()
            .filter(|(name, _)| !channels.contains_key(*name))
            .map(|(_, rt)| rt.clone())
            .collect();
        if old.config.log_level != new.log_level {
            crate::logging::set_level(&new.log_level);
        }
        if old.config.log_format != new.log_format {
            report.warnings.push(format!(
                "log.format changed to {:?}: it takes effect at restart",
                new.log_format
            ));
        }
        report.warnings.extend(new.warnings.iter().cloned());
        report.generation = old.generation + 1;
        st.replace(Live::new(Arc::new(new), channels, report.generation));

        // After the swap: nobody new can subscribe to what goes now.
        for rt in &removed {
            rt.remove();
            report.removed.push(rt.cfg.name.to_string());
            report.closed +=
                st.broker
                    .close_channel(&rt.cfg.name, close::GOING_AWAY, "channel removed");
            st.metrics.forget_channel(&rt.cfg.name);
        }
        for rt in replaced.iter().filter(|rt| rt.cfg.keyed) {
            report.closed +=
                st.broker
                    .close_channel(&rt.cfg.name, close::GOING_AWAY, "channel reconfigured");
        }
        report.removed.sort();
        let m = &st.metrics;
        m.reloads.fetch_add(1, Relaxed);
        m.closed_by_reload.fetch_add(report.closed as u64, Relaxed);
        m.config_loaded_at
            .store(epoch_ms(SystemTime::now()) / 1000, Relaxed);
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(
            generation = report.generation,
            added = ?report.added,
            changed = ?report.changed,
            removed = ?report.removed,
            unchanged = report.unchanged,
            subscriptions_closed = report.closed,
            "configuration reloaded"
        );
        report
    }

    /// Reload whenever a watched file changes (`reload.watch`), until
    /// `stop`. A change is applied once the files have stayed the same for
    /// one interval, so a file caught half-written is not loaded.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut files = self.state.config().watched.clone();
        let mut seen = stamp(&files);
        let mut pending: Option<Vec<Stamp>> = None;
        loop {
            let every = self.state.config().watch.unwrap_or(Duration::from_secs(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if self.state.config().watch.is_none() {
                continue;
            }
            let now = stamp(&files);
            if now == seen {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&now) {
                // Changed since the last look: wait until it holds still.
                pending = Some(now);
                continue;
            }
            pending = None;
            tracing::info!("configuration files changed; reloading");
            let _ = self.reload().await;
            // Watch what the configuration served now is made of.
            files = self.state.config().watched.clone();
            seen = stamp(&files);
        }
    }
}

/// A file's modification time and size (None: missing).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(files: &[PathBuf]) -> Vec<Stamp> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// An error about `field` with no line to point at.
fn whole_file(file: &std::path::Path, field: &str, message: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: 0,
        col: 0,
        field: field.into(),
        message,
    }
}

/// Settings a running gateway cannot change.
fn restart_only(old: &Config, new: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => errors.push(l.origin.error(format!(
                "listener {:?} is new: listeners are bound at start; restart the gateway to add it",
                l.name
            ))),
            Some(o) if o.bind != l.bind => errors.push(l.origin.error(format!(
                "listener {:?} moved from {} to {}: listeners are bound at start; restart the gateway to move it",
                l.name, o.bind, l.bind
            ))),
            Some(_) => {}
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == o.name) {
            errors.push(whole_file(
                &new.file,
                &format!("listeners.{}", o.name),
                format!(
                    "listener {:?} was removed: listeners are bound at start; restart the gateway to remove it",
                    o.name
                ),
            ));
        }
    }
    if old.broker != new.broker {
        errors.push(whole_file(
            &new.file,
            "broker",
            "the broker settings changed: the broker is chosen at start; restart the gateway to change it".into(),
        ));
    }
    if old.admin_listener != new.admin_listener {
        errors.push(whole_file(
            &new.file,
            "admin",
            format!(
                "the admin routes moved from {:?} to {:?}: restart the gateway to move them",
                old.admin_listener, new.admin_listener
            ),
        ));
    }
    errors
}
