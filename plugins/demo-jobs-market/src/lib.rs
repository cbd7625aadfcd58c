//! `demo-jobs-market`: demo data for `examples/jobs-chain-market`, one
//! instance per channel, chosen by `kind`:
//!
//! - `kind: jobs` (keyed, poll): the status of one compute job per stream
//!   key. `open_key` gets the `job_id` path parameter; each poll emits
//!   `{job_id, state, assigned_miner_id, timestamp, progress}`. A job is
//!   QUEUED for `queued_for`, then RUNNING with `progress` rising from 0
//!   towards 1 over `run_for`, then reaches exactly one terminal state
//!   (COMPLETED at progress 1; FAILED, CANCELLED or EXPIRED part-way),
//!   after which its stream ends (the gateway closes with 1000). The outcome
//!   is a stable function of the job id (about 70 % COMPLETED), and a job
//!   keeps its clock when nobody watches it: subscribing to a finished job
//!   sends its terminal status and ends at once.
//! - `kind: chain` (push): blockchain events. Every `block_time` a block is
//!   mined: `transaction_pending` events arrive between blocks, then
//!   `new_block` with the block's transactions, then one
//!   `transaction_confirmed` per transaction; `sync_status` every 3rd block
//!   and `fork_detected` every `fork_every` blocks. Heights increase by one.
//! - `kind: market` (push): marketplace events, one every `every`, in a
//!   fixed rotation that shows every type within 8 events: `new_offer`,
//!   `offer_matched`, `offer_expired`, `offer_cancelled` (always of an open
//!   offer) and `price_update` (the mean, min and max price of the open
//!   offers of one GPU type).
//!
//! Config (unknown keys are an error): `kind` (required); jobs:
//! `queued_for` (default `1s`), `run_for` (default `5s`); chain:
//! `block_time` (default `1500ms`), `fork_every` (default 4),
//! `start_height` (default 1204800); market: `every` (default `500ms`).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use demo_common::{Rng, duration, fnv1a, iso_now, round};
use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    kind: String,
    queued_for: String,
    run_for: String,
    block_time: String,
    fork_every: u64,
    start_height: u64,
    every: String,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            kind: String::new(),
            queued_for: "1s".into(),
            run_for: "5s".into(),
            block_time: "1500ms".into(),
            fork_every: 4,
            start_height: 1_204_800,
            every: "500ms".into(),
        }
    }
}

/// What an instance produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Job status, keyed by job id.
    Jobs,
    /// Blockchain events.
    Chain,
    /// Marketplace events.
    Market,
}

/// The checked config.
#[derive(Debug, Clone)]
pub struct Config {
    kind: Kind,
    queued_for: Duration,
    run_for: Duration,
    block_time: Duration,
    fork_every: u64,
    start_height: u64,
    every: Duration,
}

impl Config {
    /// Parse and check a config.
    pub fn parse(v: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(v)?;
        let kind = match raw.kind.as_str() {
            "jobs" => Kind::Jobs,
            "chain" => Kind::Chain,
            "market" => Kind::Market,
            other => {
                return Err(PluginError::new(format!(
                    "demo-jobs-market: `kind` must be jobs, chain or market, got {other:?}"
                )));
            }
        };
        if raw.fork_every == 0 {
            return Err("demo-jobs-market: `fork_every` must be at least 1".into());
        }
        Ok(Config {
            kind,
            queued_for: duration("queued_for", &raw.queued_for)?,
            run_for: duration("run_for", &raw.run_for)?,
            block_time: duration("block_time", &raw.block_time)?,
            fork_every: raw.fork_every,
            start_height: raw.start_height,
            every: duration("every", &raw.every)?,
        })
    }
}

// ---------------------------------------------------------------- jobs

/// How a job ends, and at which fraction of its run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Runs to progress 1.
    Completed,
    /// Fails part-way.
    Failed(f64),
    /// Cancelled by its owner part-way.
    Cancelled(f64),
    /// Its deadline passes part-way.
    Expired(f64),
}

/// A stable outcome for a job id.
pub fn outcome_of(job_id: &str) -> Outcome {
    let h = fnv1a(job_id);
    let at = 0.3 + (h >> 16) as f64 % 50.0 / 100.0; // 0.30 .. 0.79
    match h % 10 {
        0 => Outcome::Failed(at),
        1 => Outcome::Cancelled(at),
        2 => Outcome::Expired(at),
        _ => Outcome::Completed,
    }
}

/// The miner a job runs on.
pub fn miner_of(job_id: &str) -> String {
    format!("miner-{:04x}", fnv1a(&format!("miner:{job_id}")) % 0x10000)
}

/// A job's status `elapsed` after it was first seen: (state, progress, terminal).
pub fn status_at(
    outcome: Outcome,
    elapsed: Duration,
    queued_for: Duration,
    run_for: Duration,
) -> (&'static str, f64, bool) {
    if elapsed < queued_for {
        return ("QUEUED", 0.0, false);
    }
    let frac = (elapsed - queued_for).as_secs_f64() / run_for.as_secs_f64();
    let (stop, state) = match outcome {
        Outcome::Completed => (1.0, "COMPLETED"),
        Outcome::Failed(a) => (a, "FAILED"),
        Outcome::Cancelled(a) => (a, "CANCELLED"),
        Outcome::Expired(a) => (a, "EXPIRED"),
    };
    if frac >= stop {
        (state, round(stop, 3), true)
    } else {
        ("RUNNING", round(frac, 3), false)
    }
}

/// Jobs remembered (finished ones stay finished) before the oldest are forgotten.
const MAX_JOBS: usize = 10_000;

#[derive(Default)]
struct Jobs {
    /// Job id → when it was first seen.
    seen: HashMap<String, Instant>,
    /// Insertion order, to forget the oldest.
    order: VecDeque<String>,
    /// Stream key → job id.
    keys: HashMap<String, String>,
}

impl Jobs {
    fn remember(&mut self, job_id: &str) {
        if self.seen.contains_key(job_id) {
            return;
        }
        self.seen.insert(job_id.to_owned(), Instant::now());
        self.order.push_back(job_id.to_owned());
        while self.order.len() > MAX_JOBS {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

// ---------------------------------------------------------------- plugin

/// One instance.
pub struct JobsMarket {
    config: Config,
    host: Host,
    jobs: Mutex<Jobs>,
}

impl JobsMarket {
    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The job status message for `job_id` now, and whether it is terminal.
    fn job_status(&self, job_id: &str) -> (Value, bool) {
        let first_seen = {
            let mut jobs = self.jobs();
            jobs.remember(job_id);
            jobs.seen[job_id]
        };
        let (state, progress, terminal) = status_at(
            outcome_of(job_id),
            first_seen.elapsed(),
            self.config.queued_for,
            self.config.run_for,
        );
        let miner = if state == "QUEUED" {
            Value::Null
        } else {
            Value::String(miner_of(job_id))
        };
        (
            json!({
                "job_id": job_id,
                "state": state,
                "assigned_miner_id": miner,
                "timestamp": iso_now(),
                "progress": progress,
            }),
            terminal,
        )
    }

    fn run_chain(&self, out: &Emitter) -> Result<(), EmitError> {
        let c = &self.config;
        let mut rng = Rng::from_clock("chain");
        let mut height = c.start_height;
        let mut tip = rng.hex(64);
        let mut mempool: Vec<String> = Vec::new();
        let peers = rng.range(8, 16);
        for n in 0u64.. {
            // Between blocks: transactions enter the mempool.
            for _ in 0..3 {
                if out.wait_stopped(c.block_time / 4) {
                    return Err(EmitError::Stopped);
                }
                for _ in 0..rng.range(1, 2) {
                    let tx = rng.hex(64);
                    out.emit_json(
                        "",
                        &json!({
                            "type": "transaction_pending",
                            "tx_hash": tx,
                            "fee": round(rng.unit() * 0.002 + 0.0001, 6),
                            "timestamp": iso_now(),
                        }),
                    )?;
                    mempool.push(tx);
                }
            }
            if out.wait_stopped(c.block_time / 4) {
                return Err(EmitError::Stopped);
            }
            // A block: it confirms what the mempool holds.
            height += 1;
            let parent = std::mem::replace(&mut tip, rng.hex(64));
            let txs: Vec<String> = std::mem::take(&mut mempool);
            let now = iso_now();
            out.emit_json(
                "",
                &json!({
                    "type": "new_block",
                    "block": {
                        "height": height,
                        "hash": tip,
                        "parent_hash": parent,
                        "timestamp": now,
                        "transactions": txs,
                    },
                    "timestamp": now,
                }),
            )?;
            for tx in &txs {
                out.emit_json(
                    "",
                    &json!({
                        "type": "transaction_confirmed",
                        "tx_hash": tx,
                        "block_height": height,
                        "block_hash": tip,
                        "confirmations": 1,
                        "timestamp": now,
                    }),
                )?;
            }
            if n % 3 == 0 {
                out.emit_json(
                    "",
                    &json!({
                        "type": "sync_status",
                        "syncing": false,
                        "current_height": height,
                        "highest_height": height,
                        "peers": peers,
                        "timestamp": iso_now(),
                    }),
                )?;
            }
            if n % c.fork_every == c.fork_every - 1 {
                // A competing block at the same height lost the race.
                out.emit_json(
                    "",
                    &json!({
                        "type": "fork_detected",
                        "height": height,
                        "local_hash": tip,
                        "competing_hash": rng.hex(64),
                        "depth": 1,
                        "resolution": "kept_local",
                        "timestamp": iso_now(),
                    }),
                )?;
            }
        }
        Ok(())
    }

    fn run_market(&self, out: &Emitter) -> Result<(), EmitError> {
        const GPUS: [(&str, u64, f64); 6] = [
            ("H100", 80, 2.49),
            ("A100", 80, 1.79),
            ("A100", 40, 1.29),
            ("L40S", 48, 1.09),
            ("RTX 4090", 24, 0.69),
            ("A10", 24, 0.49),
        ];
        const ROTATION: [&str; 8] = [
            "new_offer",
            "new_offer",
            "price_update",
            "offer_matched",
            "new_offer",
            "offer_cancelled",
            "new_offer",
            "offer_expired",
        ];
        let mut rng = Rng::from_clock("market");
        // Open offers by id: (gpu_type, gpu_memory, price).
        let mut open: BTreeMap<String, (&str, u64, f64)> = BTreeMap::new();
        let mut next_id = 1u64;
        for i in 0usize.. {
            let mut kind = ROTATION[i % ROTATION.len()];
            if kind != "new_offer" && kind != "price_update" && open.is_empty() {
                kind = "new_offer";
            }
            let msg = match kind {
                "new_offer" => {
                    let &(gpu, mem, base) = rng.pick(&GPUS);
                    let price = round(base * (0.85 + rng.unit() * 0.3), 2);
                    let id = format!("offer-{next_id:06}");
                    next_id += 1;
                    open.insert(id.clone(), (gpu, mem, price));
                    // Keep the book small: the oldest offer expires quietly.
                    if open.len() > 50 {
                        open.pop_first();
                    }
                    json!({
                        "type": "new_offer",
                        "offer": {
                            "id": id,
                            "gpu_type": gpu,
                            "gpu_memory": mem,
                            "price_per_hour": price,
                            "currency": "USD",
                            "provider_id": format!("provider-{:03}", rng.range(1, 120)),
                        },
                        "timestamp": iso_now(),
                    })
                }
                "price_update" => {
                    let gpu = match open.values().next() {
                        Some(&(g, _, _)) => g,
                        None => rng.pick(&GPUS).0,
                    };
                    let prices: Vec<f64> =
                        open.values().filter(|o| o.0 == gpu).map(|o| o.2).collect();
                    let (avg, min, max) = if prices.is_empty() {
                        let base = GPUS.iter().find(|g| g.0 == gpu).map_or(1.0, |g| g.2);
                        (base, base, base)
                    } else {
                        let sum: f64 = prices.iter().sum();
                        (
                            sum / prices.len() as f64,
                            prices.iter().copied().fold(f64::INFINITY, f64::min),
                            prices.iter().copied().fold(0.0, f64::max),
                        )
                    };
                    json!({
                        "type": "price_update",
                        "gpu_type": gpu,
                        "average_price_per_hour": round(avg, 2),
                        "min_price_per_hour": round(min, 2),
                        "max_price_per_hour": round(max, 2),
                        "open_offers": prices.len(),
                        "currency": "USD",
                        "timestamp": iso_now(),
                    })
                }
                closing => {
                    let nth = rng.below(open.len() as u64) as usize;
                    let id = open.keys().nth(nth).cloned().unwrap_or_default();
                    let (gpu, _, price) = open.remove(&id).unwrap_or(("", 0, 0.0));
                    match closing {
                        "offer_matched" => json!({
                            "type": "offer_matched",
                            "offer_id": id,
                            "job_id": format!("job-{}", rng.hex(8)),
                            "gpu_type": gpu,
                            "price_per_hour": price,
                            "currency": "USD",
                            "timestamp": iso_now(),
                        }),
                        "offer_cancelled" => json!({
                            "type": "offer_cancelled",
                            "offer_id": id,
                            "reason": "withdrawn_by_provider",
                            "timestamp": iso_now(),
                        }),
                        _ => json!({
                            "type": "offer_expired",
                            "offer_id": id,
                            "timestamp": iso_now(),
                        }),
                    }
                }
            };
            out.emit_json("", &msg)?;
            if out.wait_stopped(self.config.every) {
                return Err(EmitError::Stopped);
            }
        }
        Ok(())
    }
}

fn stopped_is_ok(r: Result<(), EmitError>) -> Result<(), PluginError> {
    match r {
        Ok(()) | Err(EmitError::Stopped) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Plugin for JobsMarket {
    fn create(config: Value, host: Host) -> Result<Self, PluginError> {
        let config = Config::parse(config)?;
        Ok(JobsMarket {
            config,
            host,
            jobs: Mutex::new(Jobs::default()),
        })
    }

    fn open_key(&self, key: &str, params: Value) -> Result<(), PluginError> {
        let job_id = match params.get("job_id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => {
                self.host.warn(&format!(
                    "demo-jobs-market: params {params} have no job_id; using the key"
                ));
                key.to_owned()
            }
        };
        let mut jobs = self.jobs();
        jobs.remember(&job_id);
        jobs.keys.insert(key.to_owned(), job_id);
        Ok(())
    }

    fn close_key(&self, key: &str) {
        self.jobs().keys.remove(key);
    }

    fn poll(&self, key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        if self.config.kind != Kind::Jobs {
            return Err("demo-jobs-market: only kind `jobs` runs in poll mode".into());
        }
        let Some(key) = key else { return Ok(()) };
        let Some(job_id) = self.jobs().keys.get(key).cloned() else {
            return Ok(());
        };
        let (msg, terminal) = self.job_status(&job_id);
        stopped_is_ok(out.emit_json(key, &msg).and_then(|()| {
            if terminal {
                self.jobs().keys.remove(key);
                out.end_stream(key)
            } else {
                Ok(())
            }
        }))
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        match self.config.kind {
            Kind::Chain => stopped_is_ok(self.run_chain(&out)),
            Kind::Market => stopped_is_ok(self.run_market(&out)),
            Kind::Jobs => Err("demo-jobs-market: kind `jobs` runs in poll mode".into()),
        }
    }
}

plugin_api::export_plugin!(
    JobsMarket,
    name = "demo-jobs-market",
    modes = [poll, push, keyed]
);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::abi::GW_OK;
    use plugin_api::testing::{Loaded, TestHost};

    const TERMINAL: [&str; 4] = ["COMPLETED", "FAILED", "CANCELLED", "EXPIRED"];

    #[test]
    fn a_job_runs_then_ends_once() {
        let q = Duration::from_secs(1);
        let r = Duration::from_secs(5);
        for id in ["1", "42", "job-7", "abc", "x", "y", "z", "q", "w", "e", "r"] {
            let o = outcome_of(id);
            let mut last = 0.0;
            let mut end: Option<&str> = None;
            for t in 0..80 {
                let (state, p, terminal) = status_at(o, Duration::from_millis(t * 100), q, r);
                assert!(p >= last && (0.0..=1.0).contains(&p), "{id}: {p}");
                last = p;
                if let Some(e) = end {
                    assert_eq!((state, terminal), (e, true), "{id}: one terminal state");
                } else if t < 10 {
                    assert_eq!(state, "QUEUED");
                } else if terminal {
                    assert!(TERMINAL.contains(&state));
                    assert_eq!(state == "COMPLETED", p == 1.0, "{id}");
                    end = Some(state);
                } else {
                    assert_eq!(state, "RUNNING");
                }
            }
            assert!(end.is_some(), "{id} ends within 8 s");
        }
    }

    #[test]
    fn every_outcome_occurs() {
        let names: std::collections::HashSet<_> = (0..200)
            .map(|i| std::mem::discriminant(&outcome_of(&i.to_string())))
            .collect();
        assert_eq!(names.len(), 4);
    }

    #[test]
    fn keyed_poll_ends_the_stream_after_the_terminal_state() {
        let host = TestHost::new();
        let inst = Loaded::of::<JobsMarket>()
            .create(
                &host,
                r#"{"kind":"jobs","queued_for":"10ms","run_for":"50ms"}"#,
            )
            .unwrap();
        assert_eq!(inst.open_key("j1", r#"{"job_id":"j1"}"#).0, GW_OK);
        let deadline = Instant::now() + Duration::from_secs(20);
        while host.ended().is_empty() {
            assert!(Instant::now() < deadline);
            assert_eq!(inst.poll("j1").0, GW_OK);
            std::thread::sleep(Duration::from_millis(5));
        }
        let msgs = host.json_messages();
        let last = &msgs.last().unwrap().1;
        assert!(
            TERMINAL.contains(&last["state"].as_str().unwrap()),
            "{last}"
        );
        assert_eq!(msgs[0].1["state"], "QUEUED");
        assert!(msgs[0].1["assigned_miner_id"].is_null());
        assert_eq!(host.ended(), ["j1"]);
        // Reopening a finished job: its terminal status, then the end.
        assert_eq!(inst.open_key("j1", r#"{"job_id":"j1"}"#).0, GW_OK);
        assert_eq!(inst.poll("j1").0, GW_OK);
        assert_eq!(
            host.json_messages().last().unwrap().1["state"],
            last["state"]
        );
        assert_eq!(host.ended(), ["j1", "j1"]);
    }

    #[test]
    fn chain_and_market_emit_every_type() {
        for (cfg, types) in [
            (
                r#"{"kind":"chain","block_time":"20ms","fork_every":2}"#,
                &[
                    "new_block",
                    "transaction_confirmed",
                    "transaction_pending",
                    "fork_detected",
                    "sync_status",
                ][..],
            ),
            (
                r#"{"kind":"market","every":"1ms"}"#,
                &[
                    "new_offer",
                    "offer_matched",
                    "offer_expired",
                    "offer_cancelled",
                    "price_update",
                ][..],
            ),
        ] {
            let host = TestHost::new();
            let inst = Loaded::of::<JobsMarket>().create(&host, cfg).unwrap();
            assert_eq!(inst.start().0, GW_OK);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let seen: std::collections::BTreeSet<String> = host
                    .json_messages()
                    .into_iter()
                    .map(|(_, m)| m["type"].as_str().unwrap().to_owned())
                    .collect();
                if types.iter().all(|t| seen.contains(*t)) {
                    break;
                }
                assert!(Instant::now() < deadline, "{cfg}: {seen:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            inst.stop();
        }
    }

    #[test]
    fn config_errors() {
        for (c, e) in [
            (json!({}), "`kind` must be"),
            (json!({"kind": "jobs", "run_for": "0s"}), "more than 0"),
            (json!({"kind": "chain", "fork_every": 0}), "at least 1"),
            (json!({"kind": "chain", "blocktime": "1s"}), "unknown field"),
        ] {
            let err = Config::parse(c).expect_err("refused");
            assert!(err.message().contains(e), "{err}");
        }
    }
}
