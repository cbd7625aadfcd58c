//! `demo-iot`: a simulated device fleet for `examples/iot-telemetry`. Each
//! channel gets its own instance, configured with the stream it produces.
//! Every poll emits complete messages in the shapes of the iot-telemetry API:
//!
//! - `stream: telemetry`: one `telemetry_update` per device per poll,
//!   `{type, channel, device_id, telemetry: {<metric>: {value, unit, timestamp}}}`
//!   with temperature, humidity, pressure and battery readings that
//!   random-walk within physical bounds (the battery drains slowly and is
//!   recharged when nearly empty);
//! - `stream: alerts`: one `alert` per poll,
//!   `{type, channel, alert_id, alert_type, device_id, severity, title, message, timestamp,
//!   metadata: {threshold_value, actual_value}}` where `actual_value` is past
//!   `threshold_value` in the alert's direction (above for `high_*`, below for
//!   `low_*`) and `severity` grows with the distance;
//! - `stream: devices`: one `device_status_update` per poll,
//!   `{type, channel, device_id, old_status, new_status, timestamp, reason, metadata: {last_seen}}`;
//!   `old_status` is always the status the device had after its previous
//!   change (every device starts `online`), and the transition and its
//!   reason are plausible (`offline → online` is `reconnected`, ...).
//!
//! Devices are numbered `1..=devices`, the same in every stream.
//!
//! Config (a JSON object; unknown keys are an error):
//! - `stream` (required): `telemetry`, `alerts` or `devices`;
//! - `devices` (integer 1..=1000, default 8): size of the fleet;
//! - `seed` (integer, optional): fixes the random sequence (tests).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Value, json};

/// What one instance produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// `telemetry_update` messages.
    Telemetry,
    /// `alert` messages.
    Alerts,
    /// `device_status_update` messages.
    Devices,
}

impl Stream {
    fn channel(self) -> &'static str {
        match self {
            Stream::Telemetry => "telemetry",
            Stream::Alerts => "alerts",
            Stream::Devices => "devices",
        }
    }
}

/// `source.config` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    stream: Option<Stream>,
    devices: u32,
    seed: Option<u64>,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            stream: None,
            devices: 8,
            seed: None,
        }
    }
}

/// The checked config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The stream this instance produces.
    pub stream: Stream,
    /// Fleet size.
    pub devices: u32,
    /// Fixed random seed.
    pub seed: Option<u64>,
}

impl Config {
    /// Parse and check.
    pub fn parse(v: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(v)?;
        let Some(stream) = raw.stream else {
            return Err("demo-iot: `stream` is required: telemetry, alerts or devices".into());
        };
        if !(1..=1000).contains(&raw.devices) {
            return Err(PluginError::new(format!(
                "demo-iot: `devices` must be 1..=1000, got {}",
                raw.devices
            )));
        }
        Ok(Config {
            stream,
            devices: raw.devices,
            seed: raw.seed,
        })
    }
}

/// A small deterministic generator (SplitMix64): demo data needs no crypto.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `seed`, or from the clock.
    pub fn new(seed: Option<u64>) -> Rng {
        Rng(seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        }))
    }
    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// Uniform index below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn iso(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// One sensor reading's walk: value, bounds, step, unit, decimals.
#[derive(Clone, Debug)]
struct Metric {
    value: f64,
    min: f64,
    max: f64,
    step: f64,
    unit: &'static str,
    places: i32,
}

/// A device's simulated state.
#[derive(Clone, Debug)]
struct Device {
    metrics: BTreeMap<&'static str, Metric>,
    status: &'static str,
    last_seen: SystemTime,
}

impl Device {
    fn new(rng: &mut Rng) -> Device {
        let mut metrics = BTreeMap::new();
        let mut m = |name, value, min, max, step, unit, places| {
            metrics.insert(
                name,
                Metric {
                    value,
                    min,
                    max,
                    step,
                    unit,
                    places,
                },
            );
        };
        m(
            "temperature",
            rng.range(18.0, 26.0),
            -20.0,
            60.0,
            0.4,
            "°C",
            2,
        );
        m("humidity", rng.range(35.0, 60.0), 0.0, 100.0, 1.0, "%", 1);
        m(
            "pressure",
            rng.range(1005.0, 1020.0),
            950.0,
            1050.0,
            0.6,
            "hPa",
            1,
        );
        m("battery", rng.range(60.0, 100.0), 0.0, 100.0, 0.0, "%", 1);
        Device {
            metrics,
            status: "online",
            last_seen: SystemTime::now(),
        }
    }
}

/// Status changes a device can make: (from, to, reason).
pub const TRANSITIONS: &[(&str, &str, &str)] = &[
    ("online", "offline", "heartbeat_timeout"),
    ("online", "maintenance", "scheduled_maintenance"),
    ("online", "error", "sensor_fault_detected"),
    ("offline", "online", "reconnected"),
    ("offline", "maintenance", "field_service_visit"),
    ("maintenance", "online", "maintenance_completed"),
    ("error", "online", "fault_cleared"),
    ("error", "maintenance", "repair_scheduled"),
    ("error", "offline", "device_unreachable"),
];

/// Alert kinds: (alert_type, metric, threshold, above (true) or below, title).
pub const ALERT_KINDS: &[(&str, &str, f64, bool, &str)] = &[
    (
        "high_temperature",
        "temperature",
        35.0,
        true,
        "High temperature",
    ),
    (
        "low_temperature",
        "temperature",
        0.0,
        false,
        "Low temperature",
    ),
    ("high_humidity", "humidity", 85.0, true, "High humidity"),
    ("low_pressure", "pressure", 980.0, false, "Low pressure"),
    ("low_battery", "battery", 20.0, false, "Low battery"),
];

struct State {
    rng: Rng,
    devices: Vec<Device>,
    alerts: u64,
}

/// One instance.
pub struct DemoIot {
    config: Config,
    state: Mutex<State>,
}

impl DemoIot {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The messages of one poll.
    pub fn next_messages(&self) -> Vec<Value> {
        let mut st = self.state();
        let now = SystemTime::now();
        match self.config.stream {
            Stream::Telemetry => telemetry(&mut st, now),
            Stream::Alerts => vec![alert(&mut st, now)],
            Stream::Devices => vec![status_change(&mut st, now)],
        }
    }
}

fn telemetry(st: &mut State, now: SystemTime) -> Vec<Value> {
    let ts = iso(now);
    let State { rng, devices, .. } = st;
    devices
        .iter_mut()
        .enumerate()
        .map(|(i, d)| {
            d.last_seen = now;
            let mut readings = serde_json::Map::new();
            for (name, m) in d.metrics.iter_mut() {
                if *name == "battery" {
                    // Drains slowly; a nearly empty battery gets recharged.
                    m.value -= rng.range(0.0, 0.3);
                    if m.value < 5.0 {
                        m.value = 100.0;
                    }
                } else {
                    m.value += rng.range(-m.step, m.step);
                }
                m.value = m.value.clamp(m.min, m.max);
                readings.insert(
                    (*name).to_owned(),
                    json!({"value": round(m.value, m.places), "unit": m.unit, "timestamp": ts}),
                );
            }
            json!({
                "type": "telemetry_update",
                "channel": "telemetry",
                "device_id": i + 1,
                "telemetry": readings,
            })
        })
        .collect()
}

fn severity(excess_ratio: f64) -> &'static str {
    match excess_ratio {
        r if r < 0.05 => "low",
        r if r < 0.15 => "medium",
        r if r < 0.30 => "high",
        _ => "critical",
    }
}

/// A version-4 UUID from the generator.
fn uuid(rng: &mut Rng) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        8 + (b >> 62),
        (b >> 48) & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

fn alert(st: &mut State, now: SystemTime) -> Value {
    st.alerts += 1;
    let rng = &mut st.rng;
    let device_id = rng.below(st.devices.len()) + 1;
    let (alert_type, metric, threshold, above, title) = ALERT_KINDS[rng.below(ALERT_KINDS.len())];
    let m = &st.devices[device_id - 1].metrics[metric];
    // How far past the threshold: 1 % to 40 % of the metric's span.
    let span = m.max - m.min;
    let excess = span * rng.range(0.01, 0.4) * 0.5;
    let actual = if above {
        (threshold + excess).min(m.max)
    } else {
        (threshold - excess).max(m.min)
    };
    let actual = round(actual, m.places);
    let threshold_r = round(threshold, m.places);
    // Rounding can never land on the threshold: excess ≥ 0.5 % of the span.
    let sev = severity((actual - threshold).abs() / (span * 0.5));
    let unit = m.unit;
    let message = format!(
        "Device {device_id} {metric} {actual} {unit} is {} the threshold of {threshold_r} {unit}",
        if above { "above" } else { "below" }
    );
    json!({
        "type": "alert",
        "channel": "alerts",
        "alert_id": uuid(rng),
        "alert_type": alert_type,
        "device_id": device_id,
        "severity": sev,
        "title": format!("{title} on device {device_id}"),
        "message": message,
        "timestamp": iso(now),
        "metadata": {"threshold_value": threshold_r, "actual_value": actual},
    })
}

fn status_change(st: &mut State, now: SystemTime) -> Value {
    let rng = &mut st.rng;
    let i = rng.below(st.devices.len());
    let dev = &mut st.devices[i];
    let options: Vec<&(&str, &str, &str)> = TRANSITIONS
        .iter()
        .filter(|(from, _, _)| *from == dev.status)
        .collect();
    let (from, to, reason) = *options[rng.below(options.len())];
    dev.last_seen = if to == "offline" {
        // The last heartbeat was a while ago: that is why it went offline.
        now - Duration::from_millis(30_000 + rng.below(30_000) as u64)
    } else {
        now
    };
    dev.status = to;
    json!({
        "type": "device_status_update",
        "channel": "devices",
        "device_id": i + 1,
        "old_status": from,
        "new_status": to,
        "timestamp": iso(now),
        "reason": reason,
        "metadata": {"last_seen": iso(dev.last_seen)},
    })
}

impl Plugin for DemoIot {
    fn create(config: Value, host: Host) -> Result<Self, PluginError> {
        let config = Config::parse(config)?;
        let mut rng = Rng::new(config.seed);
        let devices = (0..config.devices).map(|_| Device::new(&mut rng)).collect();
        host.debug(&format!(
            "demo-iot: {} stream for {} devices",
            config.stream.channel(),
            config.devices
        ));
        Ok(DemoIot {
            config,
            state: Mutex::new(State {
                rng,
                devices,
                alerts: 0,
            }),
        })
    }

    fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        for m in self.next_messages() {
            match out.emit_json("", &m) {
                Ok(()) => {}
                Err(EmitError::Stopped) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

plugin_api::export_plugin!(DemoIot, name = "demo-iot", modes = [poll]);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testing::TestHost;

    fn make(stream: &str) -> (TestHost, DemoIot) {
        let host = TestHost::new();
        let p = DemoIot::create(json!({"stream": stream, "seed": 7}), host.host()).unwrap();
        (host, p)
    }

    #[test]
    fn config_is_checked() {
        let host = TestHost::new();
        for (c, needle) in [
            (json!({}), "`stream` is required"),
            (json!({"stream": "weather"}), "unknown variant"),
            (json!({"stream": "alerts", "devices": 0}), "1..=1000"),
            (json!({"stream": "alerts", "devics": 3}), "unknown field"),
        ] {
            let e = DemoIot::create(c, host.host()).err().unwrap();
            assert!(e.message().contains(needle), "{e}");
        }
    }

    #[test]
    fn telemetry_covers_every_device_with_bounded_readings() {
        let (_h, p) = make("telemetry");
        for _ in 0..200 {
            let msgs = p.next_messages();
            assert_eq!(msgs.len(), 8);
            for (i, m) in msgs.iter().enumerate() {
                assert_eq!(m["type"], "telemetry_update");
                assert_eq!(m["device_id"], i + 1);
                let t = m["telemetry"].as_object().unwrap();
                assert_eq!(t.len(), 4);
                let h = t["humidity"]["value"].as_f64().unwrap();
                assert!((0.0..=100.0).contains(&h));
                let b = t["battery"]["value"].as_f64().unwrap();
                assert!((0.0..=100.0).contains(&b));
                assert_eq!(t["pressure"]["unit"], "hPa");
            }
        }
    }

    #[test]
    fn alerts_cross_their_thresholds() {
        let (_h, p) = make("alerts");
        let mut ids = std::collections::HashSet::new();
        for _ in 0..500 {
            let a = p.next_messages().remove(0);
            let kind = ALERT_KINDS.iter().find(|k| k.0 == a["alert_type"]).unwrap();
            let th = a["metadata"]["threshold_value"].as_f64().unwrap();
            let act = a["metadata"]["actual_value"].as_f64().unwrap();
            assert_eq!(th, kind.2);
            if kind.3 {
                assert!(act > th, "{a}");
            } else {
                assert!(act < th, "{a}");
            }
            assert!(
                ["low", "medium", "high", "critical"].contains(&a["severity"].as_str().unwrap())
            );
            let id = a["alert_id"].as_str().unwrap().to_owned();
            assert_eq!(id.len(), 36);
            assert!(ids.insert(id));
            let d = a["device_id"].as_u64().unwrap();
            assert!((1..=8).contains(&d));
        }
    }

    #[test]
    fn status_changes_chain_per_device() {
        let (_h, p) = make("devices");
        let mut last: BTreeMap<u64, String> = BTreeMap::new();
        for _ in 0..500 {
            let m = p.next_messages().remove(0);
            let d = m["device_id"].as_u64().unwrap();
            let old = m["old_status"].as_str().unwrap();
            let new = m["new_status"].as_str().unwrap();
            assert_ne!(old, new);
            assert_eq!(old, last.get(&d).map(String::as_str).unwrap_or("online"));
            assert!(TRANSITIONS.iter().any(|t| t.0 == old && t.1 == new));
            last.insert(d, new.to_owned());
        }
    }

    #[test]
    fn uuids_are_well_formed() {
        let mut rng = Rng::new(Some(1));
        for _ in 0..100 {
            let u = uuid(&mut rng);
            let parts: Vec<&str> = u.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(parts[2].starts_with('4'));
            assert!("89ab".contains(&parts[3][..1]));
        }
    }
}
