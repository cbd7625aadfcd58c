//! `demo-relay`: a relay node for `examples/relay-sync`, one instance per
//! channel, chosen by `kind`:
//!
//! - `kind: sync` (push, command): every `sync_interval` the relay runs a
//!   sync round with its peers (`StateSync`, `HealthSync`, `MetricsSync` in
//!   turn) and emits `{sync_type, relay_id, payload, message_id}`. It keeps
//!   the counters, the peers, the sync status and a ring buffer of its own
//!   log lines, and answers the REST API through `command` (below). A
//!   forced sync (`{"op":"force"}`) runs at once, one message per type.
//! - `kind: notifications` (push): `{notification_type, data: {txid,
//!   block_height, amount, address}}` every `notify_every`.
//! - `kind: health` (push): the host's real CPU and memory usage, read from
//!   `/proc`, as `{status, cpu_usage, memory_usage}` every `health_every`
//!   (`status` is `degraded` when either is at 90 % or more).
//!
//! Block heights follow the clock (a block every 10 minutes, as on the
//! network the demo imitates), so the instances agree on the chain tip.
//!
//! Commands (`sync` instance): `{"op":"health"}`, `{"op":"metrics"}`,
//! `{"op":"config"}`, `{"op":"relays"}`, `{"op":"sync_status"}`,
//! `{"op":"force","sync_types":[...]}`, `{"op":"logs","level":"info","limit":"100"}`.
//! A bad request is refused with a message (the gateway answers 400).
//!
//! Config (unknown keys are an error): `kind` (required), `relay_id`
//! (default `relay-local-01`), `network` (default `mainnet`),
//! `sync_interval` (default `2s`), `notify_every` (default `1500ms`),
//! `health_every` (default `5s`), `peers` (default three demo peers, each
//! `{relay_id, address}`).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use demo_common::host::{CpuSampler, memory_used_percent};
use demo_common::{Rng, duration, round, unix_now};
use plugin_api::{EmitError, Emitter, Plugin, PluginError, parse_config};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Sync types, in the order scheduled rounds run them.
pub const SYNC_TYPES: [&str; 3] = ["StateSync", "HealthSync", "MetricsSync"];
/// Log levels, most severe first.
const LEVELS: [&str; 4] = ["error", "warn", "info", "debug"];
/// Log lines kept.
const LOG_LINES: usize = 1000;
/// Errors listed by `sync_status`.
const RECENT_ERRORS: usize = 10;

/// A peer relay as configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    relay_id: String,
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    kind: String,
    relay_id: String,
    network: String,
    sync_interval: String,
    notify_every: String,
    health_every: String,
    peers: Vec<PeerConfig>,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        let peer = |id: &str, addr: &str| PeerConfig {
            relay_id: id.into(),
            address: addr.into(),
        };
        RawConfig {
            kind: String::new(),
            relay_id: "relay-local-01".into(),
            network: "mainnet".into(),
            sync_interval: "2s".into(),
            notify_every: "1500ms".into(),
            health_every: "5s".into(),
            peers: vec![
                peer("relay-eu-west-1", "10.0.1.11:8090"),
                peer("relay-us-east-1", "10.0.2.12:8090"),
                peer("relay-ap-south-1", "10.0.3.13:8090"),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sync,
    Notifications,
    Health,
}

/// The chain tip at Unix time `t`: a block every 600 s.
pub fn chain_height(t: u64) -> u64 {
    877_000 + t.saturating_sub(1_735_689_600) / 600
}

struct Peer {
    relay_id: String,
    address: String,
    version: String,
    /// Uptime the peer reported when first seen, and when that was.
    uptime_base: u64,
    since: Instant,
    health: &'static str,
    last_seen: Option<u64>,
}

#[derive(Default)]
struct Counters {
    sync_requests: u64,
    sync_responses: u64,
    cache_hits: u64,
    cache_misses: u64,
    latency_sum_ms: f64,
    error_count: u64,
    total_requests: u64,
}

struct State {
    rng: Rng,
    counters: Counters,
    peers: Vec<Peer>,
    logs: VecDeque<(u64, &'static str, String)>,
    errors: VecDeque<Value>,
    forced: VecDeque<Vec<String>>,
    last_sync: Option<u64>,
    next_sync: u64,
    syncing: bool,
    seq: u64,
    cpu: CpuSampler,
    cpu_usage: f64,
}

impl State {
    fn log(&mut self, level: &'static str, message: String) {
        self.logs.push_back((unix_now(), level, message));
        if self.logs.len() > LOG_LINES {
            self.logs.pop_front();
        }
    }

    fn sample_cpu(&mut self) -> f64 {
        if let Some(c) = self.cpu.sample() {
            self.cpu_usage = c;
        }
        self.cpu_usage
    }
}

/// One instance.
pub struct Relay {
    kind: Kind,
    relay_id: String,
    network: String,
    sync_interval: Duration,
    notify_every: Duration,
    health_every: Duration,
    peers: Vec<PeerConfig>,
    state: Mutex<State>,
}

fn health_of(cpu: f64, mem: f64) -> &'static str {
    if cpu >= 90.0 || mem >= 90.0 {
        "degraded"
    } else {
        "healthy"
    }
}

fn stopped_is_ok(r: Result<(), EmitError>) -> Result<(), PluginError> {
    match r {
        Ok(()) | Err(EmitError::Stopped) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Relay {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One sync of `sync_type` with every peer; the message to emit.
    fn sync_once(&self, sync_type: &str, forced: bool) -> Value {
        let mut guard = self.state();
        let st = &mut *guard;
        st.syncing = true;
        let now = unix_now();
        let mut answered = 0;
        for i in 0..st.peers.len() {
            st.counters.sync_requests += 1;
            let roll = st.rng.unit();
            let latency = 8.0 + st.rng.unit() * 70.0;
            let hit = st.rng.chance(0.7);
            let peer = &mut st.peers[i];
            if roll < 0.05 {
                peer.health = if peer.health == "healthy" {
                    "degraded"
                } else {
                    "unreachable"
                };
                let id = peer.relay_id.clone();
                st.counters.error_count += 1;
                st.errors.push_back(json!({
                    "timestamp": now, "relay_id": id, "sync_type": sync_type,
                    "message": "no response within 500ms",
                }));
                if st.errors.len() > RECENT_ERRORS {
                    st.errors.pop_front();
                }
                st.log(
                    "warn",
                    format!("{sync_type}: no response from {id} within 500ms"),
                );
            } else {
                peer.health = "healthy";
                peer.last_seen = Some(now);
                let id = peer.relay_id.clone();
                answered += 1;
                st.counters.sync_responses += 1;
                st.counters.latency_sum_ms += latency;
                if hit {
                    st.counters.cache_hits += 1;
                } else {
                    st.counters.cache_misses += 1;
                }
                st.log(
                    "debug",
                    format!(
                        "{sync_type}: {id} answered in {latency:.1}ms (cache {})",
                        if hit { "hit" } else { "miss" }
                    ),
                );
            }
        }
        let total = st.peers.len();
        st.log(
            "info",
            format!(
                "{}{sync_type} round: {answered}/{total} relays answered",
                if forced { "forced " } else { "" }
            ),
        );
        st.last_sync = Some(now);
        st.syncing = false;
        st.seq += 1;
        let message_id = format!("{}-{:08}-{}", self.relay_id, st.seq, st.rng.hex(8));
        let payload = match sync_type {
            "StateSync" => {
                let height = chain_height(now);
                json!({
                    "block_height": height,
                    "best_block_hash": format!("00000000000000000002{}", st.rng.hex(44)),
                    "mempool_size": st.rng.range(2_000, 40_000),
                    "peers_in_sync": answered,
                    "known_relays": total,
                })
            }
            "HealthSync" => {
                let cpu = st.sample_cpu();
                let mem = memory_used_percent().unwrap_or(0.0);
                json!({
                    "status": health_of(cpu, mem),
                    "cpu_usage": cpu,
                    "memory_usage": mem,
                    "relays_healthy": st.peers.iter().filter(|p| p.health == "healthy").count(),
                    "relays_total": total,
                })
            }
            _ => self.sync_metrics(st),
        };
        json!({
            "sync_type": sync_type,
            "relay_id": self.relay_id,
            "payload": payload,
            "message_id": message_id,
        })
    }

    fn sync_metrics(&self, st: &State) -> Value {
        let c = &st.counters;
        let avg = if c.sync_responses == 0 {
            0.0
        } else {
            round(c.latency_sum_ms / c.sync_responses as f64, 2)
        };
        json!({
            "known_relays": st.peers.len(),
            "mesh_connections": st.peers.iter().filter(|p| p.health != "unreachable").count(),
            "sync_requests": c.sync_requests,
            "sync_responses": c.sync_responses,
            "cache_hits": c.cache_hits,
            "cache_misses": c.cache_misses,
            "avg_latency": avg,
            "error_count": c.error_count,
        })
    }

    fn run_sync(&self, out: &Emitter) -> Result<(), EmitError> {
        {
            let mut st = self.state();
            st.next_sync = unix_now();
            let (n, id) = (self.peers.len(), self.relay_id.clone());
            st.log("info", format!("relay {id} started with {n} peer(s)"));
        }
        let mut next = Instant::now();
        let mut turn = 0usize;
        loop {
            let forced = self.state().forced.pop_front();
            if let Some(types) = forced {
                for t in types {
                    let msg = self.sync_once(&t, true);
                    out.emit_json("", &msg)?;
                }
                continue;
            }
            if Instant::now() >= next {
                let t = SYNC_TYPES[turn % SYNC_TYPES.len()];
                turn += 1;
                let msg = self.sync_once(t, false);
                out.emit_json("", &msg)?;
                next += self.sync_interval;
                if next < Instant::now() {
                    next = Instant::now() + self.sync_interval;
                }
                self.state().next_sync = unix_now() + self.sync_interval.as_secs().max(1);
            }
            if out.wait_stopped(Duration::from_millis(50)) {
                return Err(EmitError::Stopped);
            }
        }
    }

    fn run_notifications(&self, out: &Emitter) -> Result<(), EmitError> {
        const BECH32: &[u8] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
        let mut rng = Rng::from_clock("notifications");
        let mut pending: VecDeque<(String, f64, String)> = VecDeque::new();
        for i in 0u64.. {
            let height = chain_height(unix_now());
            let (kind, txid, amount, address) = match (i % 4, pending.pop_front()) {
                (2, Some((tx, amount, address))) => ("transaction_confirmed", tx, amount, address),
                (3, _) => {
                    let tx = rng.hex(64);
                    let addr = format!(
                        "bc1q{}",
                        (0..38)
                            .map(|_| *rng.pick(BECH32) as char)
                            .collect::<String>()
                    );
                    (
                        "large_transaction",
                        tx,
                        round(50.0 + rng.unit() * 950.0, 8),
                        addr,
                    )
                }
                (_, back) => {
                    if let Some(b) = back {
                        pending.push_front(b);
                    }
                    let tx = rng.hex(64);
                    let addr = format!(
                        "bc1q{}",
                        (0..38)
                            .map(|_| *rng.pick(BECH32) as char)
                            .collect::<String>()
                    );
                    let amount = round(rng.unit() * 2.5 + 0.0001, 8);
                    pending.push_back((tx.clone(), amount, addr.clone()));
                    if pending.len() > 100 {
                        pending.pop_front();
                    }
                    ("new_transaction", tx, amount, addr)
                }
            };
            out.emit_json(
                "",
                &json!({
                    "notification_type": kind,
                    "data": {"txid": txid, "block_height": height, "amount": amount, "address": address},
                }),
            )?;
            if out.wait_stopped(self.notify_every) {
                return Err(EmitError::Stopped);
            }
        }
        Ok(())
    }

    fn run_health(&self, out: &Emitter) -> Result<(), EmitError> {
        // A first CPU figure needs two readings of /proc/stat.
        if out.wait_stopped(Duration::from_millis(250)) {
            return Err(EmitError::Stopped);
        }
        loop {
            let cpu = self.state().sample_cpu();
            let mem = memory_used_percent().unwrap_or(0.0);
            out.emit_json(
                "",
                &json!({"status": health_of(cpu, mem), "cpu_usage": cpu, "memory_usage": mem}),
            )?;
            if out.wait_stopped(self.health_every) {
                return Err(EmitError::Stopped);
            }
        }
    }

    fn answer(&self, request: &Value) -> Result<Value, PluginError> {
        let op = request.get("op").and_then(Value::as_str).unwrap_or("");
        let mut guard = self.state();
        let st = &mut *guard;
        st.counters.total_requests += 1;
        Ok(match op {
            "health" => {
                let cpu = st.sample_cpu();
                let mem = memory_used_percent().unwrap_or(0.0);
                json!({"status": health_of(cpu, mem), "cpu_usage": cpu, "memory_usage": mem})
            }
            "metrics" => {
                let cpu = st.sample_cpu();
                json!({
                    "sync_metrics": self.sync_metrics(st),
                    "cpu_usage": cpu,
                    "memory_usage": memory_used_percent().unwrap_or(0.0),
                    "total_requests": st.counters.total_requests,
                })
            }
            "config" => json!({
                "relay_id": self.relay_id,
                "network": self.network,
                "version": env!("CARGO_PKG_VERSION"),
                "sync_interval_seconds": self.sync_interval.as_secs_f64(),
                "sync_types": SYNC_TYPES,
                "peers": self.peers,
                "log_buffer_lines": LOG_LINES,
            }),
            "relays" => json!({
                "relays": st.peers.iter().map(|p| json!({
                    "relay_id": p.relay_id,
                    "address": p.address,
                    "version": p.version,
                    "uptime": p.uptime_base + p.since.elapsed().as_secs(),
                    "health": p.health,
                    "last_seen": p.last_seen,
                })).collect::<Vec<_>>(),
            }),
            "sync_status" => json!({
                "status": if st.syncing { "syncing" } else { "idle" },
                "last_sync": st.last_sync,
                "next_sync": st.next_sync,
                "sync_types": SYNC_TYPES,
                "errors": st.errors,
            }),
            "force" => {
                let types: Vec<String> = match request.get("sync_types") {
                    Some(Value::Array(a)) if !a.is_empty() => a
                        .iter()
                        .map(|t| match t.as_str() {
                            Some(s) if SYNC_TYPES.contains(&s) => Ok(s.to_owned()),
                            _ => Err(PluginError::new(format!(
                                "unknown sync type {t}; sync types: {}",
                                SYNC_TYPES.join(", ")
                            ))),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => {
                        return Err(PluginError::new(format!(
                            "`sync_types` must be a non-empty list of {}",
                            SYNC_TYPES.join(", ")
                        )));
                    }
                };
                if self.kind != Kind::Sync {
                    return Err("forced syncs go to the sync channel".into());
                }
                st.log(
                    "info",
                    format!("forced sync requested: {}", types.join(", ")),
                );
                st.forced.push_back(types.clone());
                json!({"sync_types": types})
            }
            "logs" => {
                let level = match request.get("level") {
                    None | Some(Value::Null) => "info",
                    Some(Value::String(l)) if LEVELS.contains(&l.as_str()) => l.as_str(),
                    Some(l) => {
                        return Err(PluginError::new(format!(
                            "unknown level {l}; levels: {}",
                            LEVELS.join(", ")
                        )));
                    }
                };
                let limit = match request.get("limit") {
                    None | Some(Value::Null) => 100,
                    Some(Value::String(s)) => s
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=LOG_LINES).contains(n))
                        .ok_or_else(|| {
                            PluginError::new(format!(
                                "`limit` must be an integer from 1 to {LOG_LINES}, got {s:?}"
                            ))
                        })?,
                    Some(Value::Number(n)) => n
                        .as_u64()
                        .map_or(100, |n| n.clamp(1, LOG_LINES as u64) as usize),
                    Some(other) => {
                        return Err(PluginError::new(format!(
                            "`limit` must be an integer, got {other}"
                        )));
                    }
                };
                let rank = |l: &str| LEVELS.iter().position(|x| *x == l).unwrap_or(0);
                let max = rank(level);
                let lines: Vec<Value> = st
                    .logs
                    .iter()
                    .filter(|(_, l, _)| rank(l) <= max)
                    .rev()
                    .take(limit)
                    .map(|(t, l, m)| json!({"timestamp": t, "level": l, "message": m}))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                json!({"logs": lines})
            }
            other => {
                return Err(PluginError::new(format!(
                    "unknown op {other:?}; ops: health, metrics, config, relays, sync_status, force, logs"
                )));
            }
        })
    }
}

impl Plugin for Relay {
    fn create(config: Value, _host: plugin_api::Host) -> Result<Self, PluginError> {
        let raw: RawConfig = parse_config(config)?;
        let kind = match raw.kind.as_str() {
            "sync" => Kind::Sync,
            "notifications" => Kind::Notifications,
            "health" => Kind::Health,
            other => {
                return Err(PluginError::new(format!(
                    "demo-relay: `kind` must be sync, notifications or health, got {other:?}"
                )));
            }
        };
        let mut rng = Rng::from_clock(&raw.relay_id);
        let peers = raw
            .peers
            .iter()
            .map(|p| Peer {
                relay_id: p.relay_id.clone(),
                address: p.address.clone(),
                version: format!("{}.{}.{}", 1, rng.range(3, 4), rng.range(0, 9)),
                uptime_base: rng.range(3_600, 30 * 86_400),
                since: Instant::now(),
                health: "healthy",
                last_seen: None,
            })
            .collect();
        Ok(Relay {
            kind,
            sync_interval: duration("sync_interval", &raw.sync_interval)?,
            notify_every: duration("notify_every", &raw.notify_every)?,
            health_every: duration("health_every", &raw.health_every)?,
            relay_id: raw.relay_id,
            network: raw.network,
            peers: raw.peers,
            state: Mutex::new(State {
                rng,
                counters: Counters::default(),
                peers,
                logs: VecDeque::new(),
                errors: VecDeque::new(),
                forced: VecDeque::new(),
                last_sync: None,
                next_sync: unix_now(),
                syncing: false,
                seq: 0,
                cpu: CpuSampler::new(),
                cpu_usage: 0.0,
            }),
        })
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        stopped_is_ok(match self.kind {
            Kind::Sync => self.run_sync(&out),
            Kind::Notifications => self.run_notifications(&out),
            Kind::Health => self.run_health(&out),
        })
    }

    fn command(&self, request: Value) -> Result<Value, PluginError> {
        self.answer(&request)
    }
}

plugin_api::export_plugin!(Relay, name = "demo-relay", modes = [push, command]);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::abi::GW_OK;
    use plugin_api::testing::{Loaded, TestHost};

    fn sync_instance() -> Relay {
        let host = TestHost::new();
        Relay::create(json!({"kind": "sync"}), host.host()).unwrap()
    }

    #[test]
    fn commands_answer_the_rest_api() {
        let r = sync_instance();
        let m = r.sync_once("StateSync", false);
        assert_eq!(m["sync_type"], "StateSync");
        assert_eq!(m["relay_id"], "relay-local-01");
        assert!(m["payload"]["block_height"].as_u64().unwrap() > 877_000);
        let metrics = r.answer(&json!({"op": "metrics"})).unwrap();
        assert_eq!(metrics["sync_metrics"]["sync_requests"], 3);
        assert_eq!(metrics["sync_metrics"]["known_relays"], 3);
        let relays = r.answer(&json!({"op": "relays"})).unwrap();
        assert_eq!(relays["relays"].as_array().unwrap().len(), 3);
        let logs = r
            .answer(&json!({"op": "logs", "level": "info", "limit": "100"}))
            .unwrap();
        let lines = logs["logs"].as_array().unwrap();
        assert!(lines.iter().all(|l| l["level"] != "debug"));
        assert!(
            lines.last().unwrap()["message"]
                .as_str()
                .unwrap()
                .contains("StateSync round")
        );
        let debug = r
            .answer(&json!({"op": "logs", "level": "debug", "limit": "2"}))
            .unwrap();
        assert_eq!(debug["logs"].as_array().unwrap().len(), 2);
        for bad in [
            json!({"op": "logs", "level": "loud"}),
            json!({"op": "logs", "limit": "many"}),
            json!({"op": "force"}),
            json!({"op": "force", "sync_types": []}),
            json!({"op": "force", "sync_types": ["Nope"]}),
            json!({"op": "what"}),
        ] {
            assert!(r.answer(&bad).is_err(), "{bad}");
        }
        let f = r
            .answer(&json!({"op": "force", "sync_types": ["HealthSync"]}))
            .unwrap();
        assert_eq!(f, json!({"sync_types": ["HealthSync"]}));
        assert_eq!(r.state().forced.len(), 1);
        assert_eq!(
            r.answer(&json!({"op": "metrics"})).unwrap()["total_requests"],
            12
        );
    }

    #[test]
    fn every_kind_emits() {
        for (cfg, field) in [
            (r#"{"kind":"sync","sync_interval":"10ms"}"#, "sync_type"),
            (
                r#"{"kind":"notifications","notify_every":"5ms"}"#,
                "notification_type",
            ),
            (r#"{"kind":"health","health_every":"5ms"}"#, "cpu_usage"),
        ] {
            let host = TestHost::new();
            let inst = Loaded::of::<Relay>().create(&host, cfg).unwrap();
            assert_eq!(inst.start().0, GW_OK);
            assert!(host.wait_for_messages(4, Duration::from_secs(20)), "{cfg}");
            inst.stop();
            for (_, m) in host.json_messages() {
                assert!(m.get(field).is_some(), "{cfg}: {m}");
            }
        }
        let host = TestHost::new();
        let err = Loaded::of::<Relay>()
            .create(&host, r#"{"kind":"x"}"#)
            .unwrap_err();
        assert!(err.contains("`kind` must be"), "{err}");
    }
}
