//! `system-metrics`: real figures of the host the gateway runs on (poll + command).
//!
//! Every poll reads the system afresh and emits one message on the channel's
//! own stream:
//!
//! ```json
//! {
//!   "timestamp": "2025-01-01T12:00:00.123Z",
//!   "hostname": "web-1",
//!   "uptime_secs": 86400,
//!   "cpu": { "usage_percent": 12.5, "cores": 8, "per_core": [10.0, 15.0, ...] },
//!   "memory": { "total_bytes": 1, "used_bytes": 1, "available_bytes": 1, "usage_percent": 42.0 },
//!   "swap": { "total_bytes": 0, "used_bytes": 0, "free_bytes": 0, "usage_percent": 0.0 },
//!   "load_average": { "one": 0.5, "five": 0.4, "fifteen": 0.3 },
//!   "disks": [ { "mount_point": "/", "file_system": "ext4", "total_bytes": 1,
//!                "available_bytes": 1, "used_bytes": 0, "usage_percent": 0.0 } ]
//! }
//! ```
//!
//! `timestamp` is ISO-8601 UTC with milliseconds; percentages are 0–100 with two
//! decimals; CPU usage is measured since the previous poll (the first poll
//! waits once for the minimum sampling interval, about 200 ms, so it is real).
//! Disks skip pseudo and in-memory file systems and list each device once.
//! The JSON Schema is `channel-specs/schemas/system-metrics.json`.
//!
//! Config (a JSON object; every key optional, unknown keys are an error):
//! - `per_core` (bool, default `true`): include `cpu.per_core`;
//! - `disks` (bool, default `true`): include `disks`.
//!
//! Command: `{"op":"snapshot"}` answers the same message as a poll.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use plugin_api::{Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Value, json};
use sysinfo::{DiskRefreshKind, Disks, MINIMUM_CPU_UPDATE_INTERVAL, System};

/// The plugin config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Include `cpu.per_core`.
    pub per_core: bool,
    /// Include `disks`.
    pub disks: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            per_core: true,
            disks: true,
        }
    }
}

/// File system types that are not storage worth reporting.
const PSEUDO_FS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "fuse.lxcfs",
    "fuse.portal",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

struct Sampler {
    system: System,
    /// When CPU usage was last refreshed.
    last_cpu_refresh: Instant,
}

/// One instance: the sampler state kept between polls.
pub struct SystemMetrics {
    config: Config,
    sampler: Mutex<Sampler>,
}

fn percent(part: f64, total: f64) -> f64 {
    if total <= 0.0 {
        return 0.0;
    }
    round2((part / total * 100.0).clamp(0.0, 100.0))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn cpu_percent(x: f32) -> f64 {
    round2(f64::from(x).clamp(0.0, 100.0))
}

impl SystemMetrics {
    /// Read every figure now and build the message.
    pub fn snapshot(&self) -> Value {
        let mut sampler = self.sampler.lock().unwrap_or_else(PoisonError::into_inner);
        let since = sampler.last_cpu_refresh.elapsed();
        if since < MINIMUM_CPU_UPDATE_INTERVAL {
            std::thread::sleep(MINIMUM_CPU_UPDATE_INTERVAL - since);
        }
        sampler.system.refresh_cpu_usage();
        sampler.last_cpu_refresh = Instant::now();
        let system = &mut sampler.system;
        system.refresh_memory();
        let timestamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();

        let cpus = system.cpus();
        let mut cpu = json!({
            "usage_percent": cpu_percent(system.global_cpu_usage()),
            "cores": cpus.len(),
        });
        if self.config.per_core {
            let per_core: Vec<f64> = cpus.iter().map(|c| cpu_percent(c.usage())).collect();
            cpu["per_core"] = json!(per_core);
        }

        let total = system.total_memory();
        let available = system.available_memory().min(total);
        let used = total - available;
        let memory = json!({
            "total_bytes": total,
            "used_bytes": used,
            "available_bytes": available,
            "usage_percent": percent(used as f64, total as f64),
        });

        let swap_total = system.total_swap();
        let swap_free = system.free_swap().min(swap_total);
        let swap_used = swap_total - swap_free;
        let swap = json!({
            "total_bytes": swap_total,
            "used_bytes": swap_used,
            "free_bytes": swap_free,
            "usage_percent": percent(swap_used as f64, swap_total as f64),
        });
        drop(sampler);

        let load = System::load_average().unwrap_or(sysinfo::LoadAvg {
            one: 0.0,
            five: 0.0,
            fifteen: 0.0,
        });
        let mut message = json!({
            "timestamp": timestamp,
            "hostname": System::host_name().unwrap_or_else(|_| "unknown".to_owned()),
            "uptime_secs": System::uptime().unwrap_or(0),
            "cpu": cpu,
            "memory": memory,
            "swap": swap,
            "load_average": {
                "one": round2(load.one.max(0.0)),
                "five": round2(load.five.max(0.0)),
                "fifteen": round2(load.fifteen.max(0.0)),
            },
        });
        if self.config.disks {
            message["disks"] = Value::Array(disks());
        }
        message
    }
}

/// Real storage mounts, one per device (the shortest mount point wins).
fn disks() -> Vec<Value> {
    let Ok(list) =
        Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage())
    else {
        return Vec::new();
    };
    let mut by_device: HashMap<String, &sysinfo::Disk> = HashMap::new();
    for disk in &list {
        let fs = disk.file_system().to_string_lossy();
        if disk.total_space() == 0 || PSEUDO_FS.contains(&fs.as_ref()) {
            continue;
        }
        let device = format!("{}|{fs}", disk.name().to_string_lossy());
        let keep = by_device.get(&device).is_none_or(|kept| {
            disk.mount_point().as_os_str().len() < kept.mount_point().as_os_str().len()
        });
        if keep {
            by_device.insert(device, disk);
        }
    }
    let mut kept: Vec<&sysinfo::Disk> = by_device.into_values().collect();
    kept.sort_by(|a, b| a.mount_point().cmp(b.mount_point()));
    kept.into_iter()
        .map(|disk| {
            let total = disk.total_space();
            let available = disk.available_space().min(total);
            let used = total - available;
            json!({
                "mount_point": disk.mount_point().to_string_lossy(),
                "file_system": disk.file_system().to_string_lossy(),
                "total_bytes": total,
                "available_bytes": available,
                "used_bytes": used,
                "usage_percent": percent(used as f64, total as f64),
            })
        })
        .collect()
}

impl Plugin for SystemMetrics {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        let config: Config = parse_config(config)?;
        let mut system =
            System::new().map_err(|e| format!("system-metrics: cannot read the system: {e}"))?;
        system.refresh_cpu_usage();
        Ok(SystemMetrics {
            config,
            sampler: Mutex::new(Sampler {
                system,
                last_cpu_refresh: Instant::now(),
            }),
        })
    }

    fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        out.emit_json("", &self.snapshot())?;
        Ok(())
    }

    fn command(&self, request: Value) -> Result<Value, PluginError> {
        match request.get("op").and_then(Value::as_str) {
            Some("snapshot") => Ok(self.snapshot()),
            _ => Err(PluginError::new(format!(
                "system-metrics: unknown command {request}; expected {{\"op\":\"snapshot\"}}"
            ))),
        }
    }
}

plugin_api::export_plugin!(
    SystemMetrics,
    name = "system-metrics",
    modes = [poll, command]
);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::abi::{GW_ERROR, GW_OK};
    use plugin_api::testing::{Loaded, TestHost};

    fn schema() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../channel-specs/schemas/system-metrics.json"
        )))
        .unwrap()
    }

    fn validate(message: &Value) {
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema())
            .unwrap();
        let errors: Vec<String> = validator
            .iter_errors(message)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{errors:?}\n{message:#}");
    }

    #[test]
    fn poll_emits_valid_plausible_message() {
        let host = TestHost::new();
        let plugin = SystemMetrics::create(Value::Null, host.host()).unwrap();
        plugin.poll(None, &host.emitter()).unwrap();
        let messages = host.json_messages();
        assert_eq!(messages.len(), 1);
        let (key, m) = &messages[0];
        assert_eq!(key, "");
        validate(m);
        assert!(m["memory"]["total_bytes"].as_u64().unwrap() > 0);
        let cpu = m["cpu"]["usage_percent"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");
        let cores = m["cpu"]["cores"].as_u64().unwrap();
        assert!(cores >= 1);
        assert_eq!(m["cpu"]["per_core"].as_array().unwrap().len() as u64, cores);
        assert!(m["uptime_secs"].as_u64().unwrap() > 0);
        assert!(!m["hostname"].as_str().unwrap().is_empty());
        assert!(m["timestamp"].as_str().unwrap().ends_with('Z'));
        for disk in m["disks"].as_array().unwrap() {
            assert!(disk["total_bytes"].as_u64().unwrap() > 0);
        }
        // A second poll right away is still valid.
        plugin.poll(None, &host.emitter()).unwrap();
        validate(&host.json_messages()[1].1);
    }

    #[test]
    fn options_drop_parts() {
        let host = TestHost::new();
        let config = json!({"per_core": false, "disks": false});
        let plugin = SystemMetrics::create(config, host.host()).unwrap();
        let m = plugin.snapshot();
        validate(&m);
        assert!(m.get("disks").is_none());
        assert!(m["cpu"].get("per_core").is_none());
    }

    #[test]
    fn config_errors_are_clear() {
        let host = TestHost::new();
        let err = SystemMetrics::create(json!({"disk": true}), host.host())
            .err()
            .unwrap();
        assert!(err.message().contains("unknown field `disk`"), "{err}");
        let err = SystemMetrics::create(json!({"disks": "yes"}), host.host())
            .err()
            .unwrap();
        assert!(err.message().contains("invalid type"), "{err}");
        let err = SystemMetrics::create(json!(3), host.host()).err().unwrap();
        assert!(err.message().contains("expected a JSON object"), "{err}");
    }

    #[test]
    fn through_the_abi() {
        let host = TestHost::new();
        let loaded = Loaded::of::<SystemMetrics>();
        assert_eq!(loaded.name(), "system-metrics");
        let inst = loaded.create(&host, r#"{"disks":false}"#).unwrap();
        assert_eq!(inst.poll(""), (GW_OK, String::new()));
        validate(&host.json_messages()[0].1);
        let (status, reply) = inst.command(r#"{"op":"snapshot"}"#);
        assert_eq!(status, GW_OK);
        validate(&serde_json::from_str(&reply).unwrap());
        let (status, msg) = inst.command(r#"{"op":"reboot"}"#);
        assert_eq!(status, GW_ERROR);
        assert!(msg.contains("unknown command"), "{msg}");
        assert!(loaded.create(&host, r#"{"bogus":1}"#).is_err());
    }
}
