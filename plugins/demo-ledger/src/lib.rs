//! `demo-ledger`: demo data for `examples/ledger-events`, a ledger node's
//! `valid_transactions` event stream.
//!
//! Every `block_time` a block is committed at the next height and each of
//! its transactions is emitted as `{transaction_id, asset_id, height}`, back
//! to back, so the transactions of one block arrive together. A block holds
//! 1 to `max_block_txs` transactions. A CREATE transaction creates an asset
//! (its `asset_id` is its own `transaction_id`); a TRANSFER moves an asset
//! created earlier (its `asset_id` is that CREATE's id). Ids are 64 hex
//! digits, like SHA3-256 hashes.
//!
//! Config (unknown keys are an error): `block_time` (default `1s`),
//! `max_block_txs` (default 4, at least 1), `start_height` (default 1).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::Duration;

use demo_common::{Rng, duration};
use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    block_time: String,
    max_block_txs: u64,
    start_height: u64,
}

impl Default for RawConfig {
    fn default() -> RawConfig {
        RawConfig {
            block_time: "1s".into(),
            max_block_txs: 4,
            start_height: 1,
        }
    }
}

/// One instance.
pub struct Ledger {
    block_time: Duration,
    max_block_txs: u64,
    start_height: u64,
}

/// Assets remembered as TRANSFER targets.
const KNOWN_ASSETS: usize = 256;

/// The transactions of one block: (transaction_id, asset_id).
pub fn block_txs(rng: &mut Rng, assets: &mut VecDeque<String>, max: u64) -> Vec<(String, String)> {
    (0..rng.range(1, max))
        .map(|_| {
            let tx = rng.hex(64);
            if assets.is_empty() || rng.chance(0.4) {
                assets.push_back(tx.clone());
                if assets.len() > KNOWN_ASSETS {
                    assets.pop_front();
                }
                (tx.clone(), tx)
            } else {
                let asset = rng.pick(assets.make_contiguous()).clone();
                (tx, asset)
            }
        })
        .collect()
}

impl Ledger {
    fn blocks(&self, out: &Emitter) -> Result<(), EmitError> {
        let mut rng = Rng::from_clock("ledger");
        let mut assets = VecDeque::new();
        for height in self.start_height.. {
            for (tx, asset) in block_txs(&mut rng, &mut assets, self.max_block_txs) {
                out.emit_json(
                    "",
                    &json!({"transaction_id": tx, "asset_id": asset, "height": height}),
                )?;
            }
            if out.wait_stopped(self.block_time) {
                break;
            }
        }
        Ok(())
    }
}

impl Plugin for Ledger {
    fn create(config: Value, _host: Host) -> Result<Self, PluginError> {
        let raw: RawConfig = parse_config(config)?;
        if raw.max_block_txs == 0 {
            return Err("demo-ledger: `max_block_txs` must be at least 1".into());
        }
        Ok(Ledger {
            block_time: duration("block_time", &raw.block_time)?,
            max_block_txs: raw.max_block_txs,
            start_height: raw.start_height,
        })
    }

    fn run(&self, out: Emitter) -> Result<(), PluginError> {
        match self.blocks(&out) {
            Ok(()) | Err(EmitError::Stopped) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

plugin_api::export_plugin!(Ledger, name = "demo-ledger", modes = [push]);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::abi::GW_OK;
    use plugin_api::testing::{Loaded, TestHost};

    #[test]
    fn transfers_move_assets_created_earlier() {
        let mut rng = Rng::seeded(3);
        let mut assets = VecDeque::new();
        let mut created = std::collections::HashSet::new();
        for _ in 0..200 {
            let txs = block_txs(&mut rng, &mut assets, 4);
            assert!((1..=4).contains(&txs.len()));
            for (tx, asset) in txs {
                if tx == asset {
                    created.insert(tx);
                } else {
                    assert!(created.contains(&asset), "a transfer of an unknown asset");
                }
            }
        }
    }

    #[test]
    fn heights_rise_block_by_block() {
        let host = TestHost::new();
        let inst = Loaded::of::<Ledger>()
            .create(&host, r#"{"block_time":"5ms","start_height":10}"#)
            .unwrap();
        assert_eq!(inst.start().0, GW_OK);
        assert!(host.wait_for_messages(20, Duration::from_secs(20)));
        inst.stop();
        let heights: Vec<u64> = host
            .json_messages()
            .iter()
            .map(|(_, m)| m["height"].as_u64().unwrap())
            .collect();
        assert_eq!(heights[0], 10);
        assert!(heights.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
        let err = Loaded::of::<Ledger>()
            .create(&host, r#"{"max_block_txs":0}"#)
            .unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
    }
}
