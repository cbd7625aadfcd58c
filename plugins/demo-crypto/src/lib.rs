//! `demo-crypto`: simulated services for `examples/crypto-monitor`. Each
//! channel gets its own instance, configured with the service it plays;
//! every poll emits that service's update payload (the `data` of the
//! crypto-monitor `update` envelope, which the channel spec adds).
//!
//! | `service` | payload |
//! |---|---|
//! | `market_data` | `{prices, volumes, market_caps, price_changes, source, timestamp}`: prices random-walk |
//! | `explorers` | `{networks: {bitcoin, ethereum}, timestamp}`: chain heights that grow with time, well-formed block hashes |
//! | `news` | `{articles: [{title, source, url, published_at}], sources, categories, timestamp}` |
//! | `sentiment` | `{overall_sentiment, sentiment_score, social_volume, trending_topics, sentiment_by_source, timestamp}` |
//! | `whale_tracking` | `{large_transactions: [{hash, value, from, to, timestamp, asset}], whale_wallets, total_volume, alert_threshold, timestamp}` |
//! | `rpc_nodes` | `{nodes: [{name, network, url, status, latency_ms, block_height}], healthy_nodes, total_nodes, timestamp}` |
//! | `onchain` | `{network, active_addresses, transaction_count, gas_price_gwei: {slow, standard, fast}, avg_block_time, timestamp}` |
//! | `health_checker` | `{overall_health, healthy_count, unhealthy_count, total_providers, providers: {<name>: {status, response_time_ms, last_check}}, timestamp}` |
//! | `pool_manager` | `{pools: [{name, category, sources, active_source, healthy}], active_sources, inactive_sources, failover_count, timestamp}` |
//! | `scheduler` | `{running, total_jobs, active_jobs, jobs: [{id, next_run, status}], timestamp}` |
//! | `huggingface` | `{total_models, total_datasets, available_models, available_datasets, last_refresh, timestamp}` |
//! | `persistence` | `{storage_location, total_records, storage_size, last_save, active_writers, timestamp}` |
//!
//! Figures are demo data, kept consistent: counts add up, whale transfers
//! are all above the alert threshold and sum to `total_volume`, counters
//! only grow, hashes and addresses are well-formed hex.
//!
//! Config (a JSON object; unknown keys are an error):
//! - `service` (required): one of the names above;
//! - `seed` (integer, optional): fixes the random sequence (tests).

#![forbid(unsafe_code)]

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plugin_api::{EmitError, Emitter, Host, Plugin, PluginError, parse_config};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The services this plugin can play.
pub const SERVICES: &[&str] = &[
    "market_data",
    "explorers",
    "news",
    "sentiment",
    "whale_tracking",
    "rpc_nodes",
    "onchain",
    "health_checker",
    "pool_manager",
    "scheduler",
    "huggingface",
    "persistence",
];

/// `source.config` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    service: Option<String>,
    seed: Option<u64>,
}

/// The checked config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service this instance plays.
    pub service: String,
    /// Fixed random seed.
    pub seed: Option<u64>,
}

impl Config {
    /// Parse and check.
    pub fn parse(v: Value) -> Result<Config, PluginError> {
        let raw: RawConfig = parse_config(v)?;
        let Some(service) = raw.service else {
            return Err(PluginError::new(format!(
                "demo-crypto: `service` is required: one of {}",
                SERVICES.join(", ")
            )));
        };
        if !SERVICES.contains(&service.as_str()) {
            return Err(PluginError::new(format!(
                "demo-crypto: unknown service {service:?}; services: {}",
                SERVICES.join(", ")
            )));
        }
        Ok(Config {
            service,
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
    /// `n` random bytes as lower-case hex.
    pub fn hex(&mut self, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes * 2);
        while s.len() < bytes * 2 {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(bytes * 2);
        s
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn iso(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// (symbol, starting price in USD, circulating supply).
const COINS: &[(&str, f64, f64)] = &[
    ("BTC", 67_250.0, 19_700_000.0),
    ("ETH", 3_480.0, 120_100_000.0),
    ("BNB", 585.0, 147_600_000.0),
    ("SOL", 148.0, 462_000_000.0),
    ("XRP", 0.52, 55_800_000_000.0),
    ("ADA", 0.45, 35_500_000_000.0),
];

const PROVIDERS: &[&str] = &[
    "coingecko",
    "coinmarketcap",
    "binance",
    "kraken",
    "etherscan",
    "blockchair",
    "cryptopanic",
    "alternative_me",
];

struct State {
    rng: Rng,
    started: SystemTime,
    polls: u64,
    /// market_data: current and 24-hour-ago prices, 24-hour volumes.
    prices: Vec<f64>,
    opens: Vec<f64>,
    volumes: Vec<f64>,
    /// Counters that only grow.
    failovers: u64,
    records: u64,
    storage_bytes: u64,
    sentiment: f64,
    provider_up: Vec<bool>,
}

/// One instance.
pub struct DemoCrypto {
    service: String,
    state: Mutex<State>,
}

impl DemoCrypto {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The payload of one poll.
    pub fn next_payload(&self) -> Value {
        let mut st = self.state();
        st.polls += 1;
        let now = SystemTime::now();
        let mut v = match self.service.as_str() {
            "market_data" => market_data(&mut st),
            "explorers" => explorers(&mut st, now),
            "news" => news(&mut st, now),
            "sentiment" => sentiment(&mut st),
            "whale_tracking" => whales(&mut st, now),
            "rpc_nodes" => rpc_nodes(&mut st, now),
            "onchain" => onchain(&mut st),
            "health_checker" => health(&mut st, now),
            "pool_manager" => pools(&mut st),
            "scheduler" => scheduler(&mut st, now),
            "huggingface" => huggingface(&mut st, now),
            _ => persistence(&mut st, now),
        };
        v["timestamp"] = json!(iso(now));
        v
    }
}

fn by_coin(values: impl Iterator<Item = f64>) -> Value {
    Value::Object(
        COINS
            .iter()
            .zip(values)
            .map(|((sym, _, _), v)| ((*sym).to_owned(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

fn price_places(p: f64) -> i32 {
    if p < 10.0 { 4 } else { 2 }
}

fn market_data(st: &mut State) -> Value {
    for i in 0..COINS.len() {
        // A random walk: ±0.3 % a step.
        let step = st.rng.range(-0.003, 0.003);
        st.prices[i] *= 1.0 + step;
        st.volumes[i] *= 1.0 + st.rng.range(-0.01, 0.01);
    }
    let prices: Vec<f64> = st
        .prices
        .iter()
        .map(|p| round(*p, price_places(*p)))
        .collect();
    json!({
        "prices": by_coin(prices.iter().copied()),
        "volumes": by_coin(st.volumes.iter().map(|v| v.round())),
        "market_caps": by_coin(prices.iter().zip(COINS).map(|(p, c)| (p * c.2).round())),
        "price_changes": by_coin(st.prices.iter().zip(&st.opens).map(|(p, o)| round((p / o - 1.0) * 100.0, 2))),
        "source": "demo",
    })
}

fn explorers(st: &mut State, now: SystemTime) -> Value {
    let t = unix(now);
    // Heights that grow with wall time: one block per 600 s / 12 s.
    let btc_height = 840_000 + (t.saturating_sub(1_713_500_000)) / 600;
    let eth_height = 19_700_000 + (t.saturating_sub(1_713_500_000)) / 12;
    json!({
        "networks": {
            "bitcoin": {
                "latest_block": btc_height,
                // Proof of work: a hash with leading zero bytes.
                "block_hash": format!("00000000000000000{}", &st.rng.hex(32)[17..]),
                "mempool_transactions": 3_000 + st.rng.below(40_000),
                "avg_fee_sat_vb": round(st.rng.range(4.0, 60.0), 1),
                "status": "synced",
            },
            "ethereum": {
                "latest_block": eth_height,
                "block_hash": format!("0x{}", st.rng.hex(32)),
                "pending_transactions": 50_000 + st.rng.below(150_000),
                "gas_price_gwei": round(st.rng.range(6.0, 45.0), 2),
                "status": "synced",
            },
        },
    })
}

const HEADLINES: &[(&str, &str)] = &[
    (
        "Bitcoin ETF inflows reach {n} million dollars in a week",
        "etf",
    ),
    (
        "Ethereum developers schedule the next network upgrade",
        "technology",
    ),
    (
        "Stablecoin supply grows {n} percent this quarter",
        "stablecoins",
    ),
    (
        "Regulators publish draft rules for crypto custody",
        "regulation",
    ),
    (
        "DeFi lending volumes rise {n} percent as yields recover",
        "defi",
    ),
    (
        "Layer-2 networks process a record {n} million transactions",
        "technology",
    ),
    (
        "Miners' revenue climbs after the difficulty adjustment",
        "mining",
    ),
    (
        "Exchange reserves of bitcoin fall to a {n}-month low",
        "markets",
    ),
];

const SOURCES: &[&str] = &[
    "CoinDesk",
    "Cointelegraph",
    "The Block",
    "Decrypt",
    "CryptoSlate",
];

fn slug(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

fn news(st: &mut State, now: SystemTime) -> Value {
    let n = 3 + st.rng.below(3);
    let mut articles = Vec::new();
    let mut categories: Vec<&str> = Vec::new();
    for i in 0..n {
        let (h, cat) = HEADLINES[st.rng.below(HEADLINES.len())];
        let title = h.replace("{n}", &(2 + st.rng.below(40)).to_string());
        let source = SOURCES[st.rng.below(SOURCES.len())];
        let minutes = (i as u64) * 7 + st.rng.below(7) as u64;
        articles.push(json!({
            "title": title,
            "source": source,
            "url": format!("https://news.example.com/{}/{}", slug(source), slug(&title)),
            "published_at": iso(now - Duration::from_secs(60 * minutes)),
        }));
        if !categories.contains(&cat) {
            categories.push(cat);
        }
    }
    json!({"articles": articles, "sources": SOURCES, "categories": categories})
}

fn sentiment(st: &mut State) -> Value {
    st.sentiment = (st.sentiment + st.rng.range(-0.08, 0.08)).clamp(-1.0, 1.0);
    let score = round(st.sentiment, 3);
    let overall = match score {
        s if s > 0.2 => "bullish",
        s if s < -0.2 => "bearish",
        _ => "neutral",
    };
    let mut by_source = Map::new();
    for src in ["twitter", "reddit", "news", "telegram"] {
        by_source.insert(
            src.into(),
            json!(round(
                (score + st.rng.range(-0.15, 0.15)).clamp(-1.0, 1.0),
                3
            )),
        );
    }
    let topics = [
        "#bitcoin",
        "#ethereum",
        "#solana",
        "ETF",
        "halving",
        "staking",
        "airdrop",
    ];
    let start = st.rng.below(topics.len());
    let trending: Vec<&str> = (0..4).map(|i| topics[(start + i) % topics.len()]).collect();
    json!({
        "overall_sentiment": overall,
        "sentiment_score": score,
        "social_volume": 40_000 + st.rng.below(60_000),
        "trending_topics": trending,
        "sentiment_by_source": by_source,
    })
}

fn address(rng: &mut Rng) -> String {
    format!("0x{}", rng.hex(20))
}

fn whales(st: &mut State, now: SystemTime) -> Value {
    let threshold = 1_000_000.0;
    let n = 1 + st.rng.below(4);
    let mut total = 0.0;
    let txs: Vec<Value> = (0..n)
        .map(|i| {
            let value = round(threshold * st.rng.range(1.05, 25.0), 2);
            let asset = ["ETH", "USDT", "USDC", "WBTC"][st.rng.below(4)];
            total += value;
            json!({
                "hash": format!("0x{}", st.rng.hex(32)),
                "value": value,
                "from": address(&mut st.rng),
                "to": address(&mut st.rng),
                "timestamp": iso(now - Duration::from_secs(20 * i as u64)),
                "asset": asset,
            })
        })
        .collect();
    json!({
        "large_transactions": txs,
        "whale_wallets": 1_200 + st.rng.below(50),
        "total_volume": round(total, 2),
        "alert_threshold": threshold,
    })
}

fn rpc_nodes(st: &mut State, now: SystemTime) -> Value {
    let t = unix(now);
    let eth_height = 19_700_000 + (t.saturating_sub(1_713_500_000)) / 12;
    let nodes = [
        ("infura-mainnet", "ethereum", "https://mainnet.infura.io/v3"),
        (
            "alchemy-mainnet",
            "ethereum",
            "https://eth-mainnet.g.alchemy.com/v2",
        ),
        ("ankr-eth", "ethereum", "https://rpc.ankr.com/eth"),
        ("cloudflare-eth", "ethereum", "https://cloudflare-eth.com"),
        ("bsc-dataseed", "bsc", "https://bsc-dataseed.binance.org"),
    ];
    let mut healthy = 0;
    let list: Vec<Value> = nodes
        .iter()
        .map(|(name, network, url)| {
            let up = !st.rng.chance(0.1);
            healthy += usize::from(up);
            let height = if *network == "ethereum" {
                eth_height - st.rng.below(2) as u64
            } else {
                38_000_000 + t.saturating_sub(1_713_500_000) / 3
            };
            json!({
                "name": name,
                "network": network,
                "url": url,
                "status": if up { "healthy" } else { "unreachable" },
                "latency_ms": if up { json!(20 + st.rng.below(300)) } else { Value::Null },
                "block_height": if up { json!(height) } else { Value::Null },
            })
        })
        .collect();
    json!({"nodes": list, "healthy_nodes": healthy, "total_nodes": nodes.len()})
}

fn onchain(st: &mut State) -> Value {
    let standard = round(st.rng.range(8.0, 40.0), 2);
    json!({
        "network": "ethereum",
        "active_addresses": 380_000 + st.rng.below(150_000),
        "transaction_count": 1_050_000 + st.rng.below(300_000),
        "gas_price_gwei": {
            "slow": round(standard * 0.8, 2),
            "standard": standard,
            "fast": round(standard * 1.3, 2),
        },
        "avg_block_time": round(st.rng.range(11.9, 12.3), 2),
    })
}

fn health(st: &mut State, now: SystemTime) -> Value {
    let mut providers = Map::new();
    let mut healthy = 0;
    for (i, name) in PROVIDERS.iter().enumerate() {
        // A provider goes down now and then and recovers soon after.
        let up = &mut st.provider_up[i];
        *up = if *up {
            !st.rng.chance(0.08)
        } else {
            st.rng.chance(0.6)
        };
        let up = *up;
        healthy += usize::from(up);
        let last_check = now - Duration::from_millis(st.rng.below(5_000) as u64);
        providers.insert(
            (*name).into(),
            json!({
                "status": if up { "healthy" } else { "unhealthy" },
                "response_time_ms": if up { 40 + st.rng.below(400) } else { 5_000 },
                "last_check": iso(last_check),
            }),
        );
    }
    let total = PROVIDERS.len();
    let overall = if healthy == total {
        "healthy"
    } else if healthy * 2 >= total {
        "degraded"
    } else {
        "unhealthy"
    };
    json!({
        "overall_health": overall,
        "healthy_count": healthy,
        "unhealthy_count": total - healthy,
        "total_providers": total,
        "providers": providers,
    })
}

fn pools(st: &mut State) -> Value {
    let pools = [
        (
            "market_prices",
            "market_data",
            &["coingecko", "coinmarketcap", "binance"][..],
        ),
        (
            "exchange_tickers",
            "market_data",
            &["binance", "kraken"][..],
        ),
        (
            "block_explorers",
            "explorers",
            &["etherscan", "blockchair"][..],
        ),
        ("news_feeds", "news", &["cryptopanic", "rss"][..]),
        ("sentiment_index", "sentiment", &["alternative_me"][..]),
    ];
    if st.rng.chance(0.2) {
        st.failovers += 1;
    }
    let mut active = 0;
    let mut inactive = 0;
    let list: Vec<Value> = pools
        .iter()
        .map(|(name, cat, sources)| {
            let up: Vec<bool> = sources.iter().map(|_| !st.rng.chance(0.1)).collect();
            active += up.iter().filter(|u| **u).count();
            inactive += up.iter().filter(|u| !**u).count();
            let current = sources.iter().zip(&up).find(|(_, u)| **u).map(|(s, _)| *s);
            json!({
                "name": name,
                "category": cat,
                "sources": sources,
                "active_source": current,
                "healthy": current.is_some(),
            })
        })
        .collect();
    json!({
        "pools": list,
        "active_sources": active,
        "inactive_sources": inactive,
        "failover_count": st.failovers,
    })
}

fn scheduler(st: &mut State, now: SystemTime) -> Value {
    // The collection jobs and their intervals (the services' own).
    let jobs = [
        ("market_data", 5),
        ("explorers", 10),
        ("news", 60),
        ("sentiment", 30),
        ("whale_tracking", 15),
        ("rpc_nodes", 20),
        ("onchain", 30),
        ("health_checker", 30),
        ("pool_manager", 20),
        ("huggingface", 60),
        ("persistence", 30),
    ];
    let since = now.duration_since(st.started).unwrap_or_default().as_secs();
    let mut active = 0;
    let list: Vec<Value> = jobs
        .iter()
        .map(|(id, every)| {
            let due_in = every - since % every;
            let running = st.rng.chance(0.15);
            active += usize::from(running);
            json!({
                "id": id,
                "next_run": iso(now + Duration::from_secs(due_in)),
                "status": if running { "running" } else { "scheduled" },
            })
        })
        .collect();
    json!({"running": true, "total_jobs": jobs.len(), "active_jobs": active, "jobs": list})
}

fn huggingface(st: &mut State, now: SystemTime) -> Value {
    let models = [
        "ProsusAI/finbert",
        "ElKulako/cryptobert",
        "cardiffnlp/twitter-roberta-base-sentiment-latest",
        "mrm8488/distilroberta-finetuned-financial-news-sentiment-analysis",
    ];
    let datasets = [
        "demo/crypto-news-headlines",
        "demo/btc-ohlcv-1h",
        "demo/crypto-social-sentiment",
    ];
    let _ = st.rng.next_u64();
    json!({
        "total_models": models.len(),
        "total_datasets": datasets.len(),
        "available_models": models,
        "available_datasets": datasets,
        "last_refresh": iso(now - Duration::from_secs(st.rng.below(60) as u64)),
    })
}

fn persistence(st: &mut State, now: SystemTime) -> Value {
    let added = 200 + st.rng.below(800) as u64;
    st.records += added;
    st.storage_bytes += added * (180 + st.rng.below(40) as u64);
    json!({
        "storage_location": "data/exports",
        "total_records": st.records,
        "storage_size": st.storage_bytes,
        "last_save": iso(now),
        "active_writers": 1 + st.rng.below(3),
    })
}

impl Plugin for DemoCrypto {
    fn create(config: Value, host: Host) -> Result<Self, PluginError> {
        let config = Config::parse(config)?;
        let mut rng = Rng::new(config.seed);
        let opens: Vec<f64> = COINS
            .iter()
            .map(|(_, p, _)| p * rng.range(0.96, 1.04))
            .collect();
        let prices: Vec<f64> = COINS.iter().map(|(_, p, _)| *p).collect();
        let volumes: Vec<f64> = COINS
            .iter()
            .map(|(_, p, s)| p * s * rng.range(0.01, 0.05))
            .collect();
        host.debug(&format!("demo-crypto: playing {}", config.service));
        Ok(DemoCrypto {
            service: config.service,
            state: Mutex::new(State {
                rng,
                started: SystemTime::now(),
                polls: 0,
                prices,
                opens,
                volumes,
                failovers: 0,
                records: 1_250_000,
                storage_bytes: 240_000_000,
                sentiment: 0.15,
                provider_up: vec![true; PROVIDERS.len()],
            }),
        })
    }

    fn poll(&self, _key: Option<&str>, out: &Emitter) -> Result<(), PluginError> {
        match out.emit_json("", &self.next_payload()) {
            Ok(()) | Err(EmitError::Stopped) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

plugin_api::export_plugin!(DemoCrypto, name = "demo-crypto", modes = [poll]);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testing::TestHost;

    fn make(service: &str) -> DemoCrypto {
        let host = TestHost::new();
        DemoCrypto::create(json!({"service": service, "seed": 3}), host.host()).unwrap()
    }

    fn is_hex(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
    }

    #[test]
    fn config_is_checked() {
        let host = TestHost::new();
        for (c, needle) in [
            (json!({}), "`service` is required"),
            (json!({"service": "weather"}), "unknown service"),
            (json!({"service": "news", "sed": 1}), "unknown field"),
        ] {
            let e = DemoCrypto::create(c, host.host()).err().unwrap();
            assert!(e.message().contains(needle), "{e}");
        }
    }

    #[test]
    fn every_service_has_a_timestamped_payload() {
        for s in SERVICES {
            let v = make(s).next_payload();
            assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{s}: {v}");
        }
    }

    #[test]
    fn prices_random_walk() {
        let p = make("market_data");
        let a = p.next_payload();
        let b = p.next_payload();
        let (x, y) = (
            a["prices"]["BTC"].as_f64().unwrap(),
            b["prices"]["BTC"].as_f64().unwrap(),
        );
        assert_ne!(x, y);
        assert!((y / x - 1.0).abs() <= 0.0031, "{x} → {y}");
        assert_eq!(a["source"], "demo");
        for k in ["volumes", "market_caps", "price_changes"] {
            assert_eq!(a[k].as_object().unwrap().len(), COINS.len());
        }
    }

    #[test]
    fn whales_are_above_the_threshold_and_well_formed() {
        let p = make("whale_tracking");
        for _ in 0..100 {
            let v = p.next_payload();
            let th = v["alert_threshold"].as_f64().unwrap();
            let mut sum = 0.0;
            for t in v["large_transactions"].as_array().unwrap() {
                let value = t["value"].as_f64().unwrap();
                assert!(value > th);
                sum += value;
                assert!(is_hex(&t["hash"].as_str().unwrap()[2..], 64));
                assert!(is_hex(&t["from"].as_str().unwrap()[2..], 40));
                assert!(is_hex(&t["to"].as_str().unwrap()[2..], 40));
            }
            assert!((sum - v["total_volume"].as_f64().unwrap()).abs() < 0.01);
        }
    }

    #[test]
    fn counts_add_up() {
        let h = make("health_checker");
        let p = make("pool_manager");
        let mut last_failovers = 0;
        for _ in 0..100 {
            let v = h.next_payload();
            let providers = v["providers"].as_object().unwrap();
            let up = providers
                .values()
                .filter(|p| p["status"] == "healthy")
                .count();
            assert_eq!(v["healthy_count"], up);
            assert_eq!(v["unhealthy_count"], providers.len() - up);
            assert_eq!(v["total_providers"], providers.len());
            let v = p.next_payload();
            let f = v["failover_count"].as_u64().unwrap();
            assert!(f >= last_failovers);
            last_failovers = f;
        }
        let e = make("explorers").next_payload();
        let h = e["networks"]["bitcoin"]["block_hash"].as_str().unwrap();
        assert!(is_hex(h, 64) && h.starts_with("00000000"));
        assert!(is_hex(
            &e["networks"]["ethereum"]["block_hash"].as_str().unwrap()[2..],
            64
        ));
    }
}
