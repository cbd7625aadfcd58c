//! Counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Hot paths hold an `Arc<ChannelMetrics>` and bump plain atomics; nothing
//! is looked up by name per message.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

use parking_lot::{Mutex, RwLock};

/// Per-channel figures.
#[derive(Debug, Default)]
pub struct ChannelMetrics {
    /// Plugin name.
    pub plugin: String,
    /// Messages the plugin emitted.
    pub received: AtomicU64,
    /// Messages that passed validation and were published.
    pub published: AtomicU64,
    /// Frames queued to subscribers (one per subscriber per message).
    pub deliveries: AtomicU64,
    /// Messages dropped because they were not JSON.
    pub invalid_json: AtomicU64,
    /// Messages dropped because they failed the channel's schema.
    pub schema_failures: AtomicU64,
    /// Messages refused at the plugin boundary (too large, key not UTF-8).
    pub rejected: AtomicU64,
    /// Frames dropped from full subscriber queues (`on_full: drop_oldest`).
    pub slow_drops: AtomicU64,
    /// Subscribers closed because their queue was full (`on_full: close`).
    pub slow_closes: AtomicU64,
    /// Plugin instance restarts after a failure.
    pub plugin_restarts: AtomicU64,
    /// Plugin failures (errors, panics, failed creates).
    pub plugin_failures: AtomicU64,
    /// Whether a plugin instance is running now.
    pub plugin_up: AtomicBool,
    /// Whether this instance holds the lease of the channel's source (nats
    /// broker only).
    pub lease_held: AtomicBool,
    /// Plugin failures since an instance last ran 30 s without failing.
    pub plugin_consecutive_failures: AtomicU64,
    /// When the plugin last failed, ms since the epoch (0: never).
    pub plugin_last_failure_ms: AtomicU64,
    /// Calls into the plugin that ran past `source.call_timeout`.
    pub plugin_call_timeouts: AtomicU64,
    /// Calls given up on (past `source.call_timeout`) still running inside
    /// the plugin, each holding a thread.
    pub plugin_calls_abandoned: AtomicU64,
    /// When the supervisor's current call into the plugin began, ms since
    /// the epoch (0: none runs).
    pub plugin_call_started_ms: AtomicU64,
    /// Woken when a call given up on returns.
    pub plugin_call_returned: tokio::sync::Notify,
    /// Current subscribers.
    pub subscribers: AtomicI64,
    /// Messages over the channel's `rate_limit`, dropped.
    pub rate_dropped: AtomicU64,
    /// Messages an old source handed over after a reload closed what they
    /// were for (the channel removed, or its keyed streams reopened on the
    /// new source), dropped.
    pub discarded: AtomicU64,
    /// Messages over the channel's `rate_limit`, replaced by a later one (conflated).
    pub rate_conflated: AtomicU64,
    /// The latest message that failed the channel's schema: where and why.
    pub last_validation_failure: Mutex<Option<ValidationFailure>>,
}

/// A message dropped because it failed its channel's schema.
#[derive(Clone, Debug)]
pub struct ValidationFailure {
    /// JSON pointer of the failing value (`/` for the root).
    pub instance_path: String,
    /// What is wrong (at most 256 bytes).
    pub error: String,
    /// When.
    pub at: std::time::SystemTime,
}

/// When a message entered the gateway: microseconds since the process's
/// first stamp, wrapping every 71 minutes (compare with `wrapping_sub`), and
/// never 0, which marks a frame that is not timed.
pub fn stamp() -> u32 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    (base.elapsed().as_micros() as u32).max(1)
}

/// Microseconds from stamp `then` to stamp `now`, across a wrap of the
/// counter.
fn since(now: u32, then: u32) -> u64 {
    u64::from(now.wrapping_sub(then))
}

/// Upper bounds of [`DelayHistogram`]'s buckets, in microseconds (the
/// last bucket, `+Inf`, takes the rest).
pub const DELAY_BOUNDS_US: [u64; 21] = [
    250, 500, 1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 50_000, 75_000,
    100_000, 150_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Observations per bucket of a [`DelayHistogram`] (not cumulative; the
/// last is `+Inf`).
pub type DelayCounts = [u64; DELAY_BOUNDS_US.len() + 1];

/// Where a quantile of a [`DelayHistogram`] lies, to the resolution of its
/// buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketQuantile {
    /// Nothing was observed.
    Empty,
    /// At most this many microseconds: the upper bound of its bucket.
    AtMost(u64),
    /// Above the last bound of [`DELAY_BOUNDS_US`] (the `+Inf` bucket).
    AboveLast,
}

/// Quantile `q` (0 < q ≤ 1) of per-bucket `counts`, as
/// [`DelayHistogram::snapshot`] gives them (or the difference of two): the
/// bucket that holds the observation of rank ⌈q·n⌉.
pub fn bucket_quantile(counts: &DelayCounts, q: f64) -> BucketQuantile {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return BucketQuantile::Empty;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut cumulative = 0;
    for (i, c) in counts.iter().enumerate() {
        cumulative += c;
        if cumulative >= rank {
            return match DELAY_BOUNDS_US.get(i) {
                Some(&b) => BucketQuantile::AtMost(b),
                None => break,
            };
        }
    }
    BucketQuantile::AboveLast
}

/// A histogram of delays, fed from every worker thread: each thread counts
/// into a shard of its own (cache-line aligned; threads beyond the eighth
/// share), so sessions on different threads do not contend; `/metrics`
/// adds the shards up.
#[derive(Debug, Default)]
pub struct DelayHistogram {
    shards: [DelayShard; DELAY_SHARDS],
}

const DELAY_SHARDS: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct DelayShard {
    counts: [AtomicU64; DELAY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl DelayHistogram {
    /// Count the time since `stamp` (a [`stamp`] value).
    pub fn observe_since(&self, stamp: u32) {
        self.observe_us(since(crate::metrics::stamp(), stamp));
    }

    /// Count a delay of `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        thread_local! {
            static SHARD: usize = {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Relaxed) as usize % DELAY_SHARDS
            };
        }
        let shard = &self.shards[SHARD.with(|s| *s)];
        let bucket = DELAY_BOUNDS_US.partition_point(|&b| b < us);
        shard.counts[bucket].fetch_add(1, Relaxed);
        shard.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations so far, per bucket (not cumulative), and their sum in µs.
    pub fn snapshot(&self) -> (DelayCounts, u64) {
        let mut counts = DelayCounts::default();
        let mut sum = 0;
        for s in &self.shards {
            for (c, a) in counts.iter_mut().zip(&s.counts) {
                *c += a.load(Relaxed);
            }
            sum += s.sum_us.load(Relaxed);
        }
        (counts, sum)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let (counts, sum) = self.snapshot();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            match DELAY_BOUNDS_US.get(i) {
                Some(b) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"{}\"}} {cumulative}",
                        *b as f64 / 1e6
                    );
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Process-wide figures.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicI64,
    /// WebSocket connections accepted since start.
    pub connections_total: AtomicU64,
    /// Upgrades refused by auth.
    pub refused_auth: AtomicU64,
    /// Upgrades refused by the connection limit.
    pub refused_limit: AtomicU64,
    /// Requests that were not valid WebSocket upgrades.
    pub refused_bad_request: AtomicU64,
    /// Connections closed because an inbound message was too large.
    pub closed_too_big: AtomicU64,
    /// Control replies dropped because they failed the protocol's schema.
    pub reply_schema_failures: AtomicU64,
    /// Upgrades refused because the Origin is not allowed.
    pub refused_origin: AtomicU64,
    /// Upgrades refused by `new_connections_per_ip`.
    pub refused_rate: AtomicU64,
    /// Upgrades refused by `max_connections_per_ip`.
    pub refused_per_ip: AtomicU64,
    /// Connections refused by `max_connections_per_principal`.
    pub refused_per_principal: AtomicU64,
    /// HTTP route requests refused by `http_requests_per_ip`.
    pub http_rate_limited: AtomicU64,
    /// HTTP route and publish API requests refused by their auth.
    pub http_refused_auth: AtomicU64,
    /// Connections closed after `idle_timeout`.
    pub closed_idle: AtomicU64,
    /// Configuration reloads applied.
    pub reloads: AtomicU64,
    /// Configuration reloads refused (the running configuration was kept).
    pub reload_failures: AtomicU64,
    /// When the configuration was last (re)loaded, seconds since the epoch.
    pub config_loaded_at: AtomicU64,
    /// Subscribers closed because a reload removed (or reconfigured) their channel.
    pub closed_by_reload: AtomicU64,
    /// Connections closed at `max_connection_duration`.
    pub closed_lifetime: AtomicU64,
    /// Connections closed because no Pong came back in time.
    pub closed_ping_timeout: AtomicU64,
    /// Connections closed for sending faster than `inbound_messages`.
    pub closed_inbound_rate: AtomicU64,
    /// Client messages dropped (with an error reply) for exceeding `inbound_messages`.
    pub inbound_rate_errors: AtomicU64,
    /// Connections closed because in-band authentication did not come in time.
    pub auth_timeouts: AtomicU64,
    /// Connections closed when their token expired (`close_at_exp`).
    pub closed_token_expired: AtomicU64,
    /// TLS handshakes that failed or timed out on TLS listeners.
    pub tls_handshake_failures: AtomicU64,
    /// Connections to `proxy_protocol` listeners closed for want of a valid
    /// PROXY protocol header (or from an address not in `trusted_proxies`).
    pub proxy_protocol_refused: AtomicU64,
    /// How long the oldest frame of each socket write waited in the gateway.
    pub delivery_delay: DelayHistogram,
    channels: RwLock<BTreeMap<Arc<str>, Arc<ChannelMetrics>>>,
}

impl Metrics {
    /// The metrics of one channel (created on first use).
    pub fn channel(&self, name: &Arc<str>, plugin: &str) -> Arc<ChannelMetrics> {
        if let Some(m) = self.channels.read().get(name) {
            return m.clone();
        }
        self.channels
            .write()
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(ChannelMetrics {
                    plugin: plugin.to_string(),
                    ..Default::default()
                })
            })
            .clone()
    }

    /// Stop listing a channel (a reload removed it).
    pub fn forget_channel(&self, name: &str) {
        self.channels.write().remove(name);
    }

    /// Render everything in the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let g = series;
        self.delivery_delay.render(
            &mut out,
            "gateway_delivery_delay_seconds",
            "Time from a message entering the gateway to the socket write that sends it to a subscriber, for the oldest frame of each write.",
        );
        g(
            &mut out,
            "gateway_connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections.load(Relaxed),
        );
        g(
            &mut out,
            "gateway_connections_total",
            "counter",
            "WebSocket connections accepted since start.",
            self.connections_total.load(Relaxed) as i64,
        );
        let _ = writeln!(
            out,
            "# HELP gateway_connections_refused_total WebSocket upgrades refused, by reason.\n# TYPE gateway_connections_refused_total counter"
        );
        for (reason, v) in [
            ("auth", &self.refused_auth),
            ("limit", &self.refused_limit),
            ("bad_request", &self.refused_bad_request),
            ("origin", &self.refused_origin),
            ("rate", &self.refused_rate),
            ("per_ip", &self.refused_per_ip),
            ("per_principal", &self.refused_per_principal),
        ] {
            let _ = writeln!(
                out,
                "gateway_connections_refused_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        g(
            &mut out,
            "gateway_closed_message_too_big_total",
            "counter",
            "Connections closed (1009) for an oversized inbound message.",
            self.closed_too_big.load(Relaxed) as i64,
        );
        let _ = writeln!(
            out,
            "# HELP gateway_config_reloads_total Configuration reloads, by result (error: refused, the running configuration was kept).\n# TYPE gateway_config_reloads_total counter\ngateway_config_reloads_total{{result=\"ok\"}} {}\ngateway_config_reloads_total{{result=\"error\"}} {}",
            self.reloads.load(Relaxed),
            self.reload_failures.load(Relaxed)
        );
        g(
            &mut out,
            "gateway_config_loaded_timestamp_seconds",
            "gauge",
            "When the running configuration was loaded (start or last successful reload).",
            self.config_loaded_at.load(Relaxed) as i64,
        );
        g(
            &mut out,
            "gateway_closed_by_reload_total",
            "counter",
            "Subscriptions closed (1001) because a reload removed their channel or changed a keyed one.",
            self.closed_by_reload.load(Relaxed) as i64,
        );
        let _ = writeln!(
            out,
            "# HELP gateway_connections_closed_by_limit_total Connections the gateway closed because of a limit, by limit.\n# TYPE gateway_connections_closed_by_limit_total counter"
        );
        for (reason, v) in [
            ("idle_timeout", &self.closed_idle),
            ("max_connection_duration", &self.closed_lifetime),
            ("ping_timeout", &self.closed_ping_timeout),
            ("inbound_messages", &self.closed_inbound_rate),
            ("auth_timeout", &self.auth_timeouts),
            ("token_expired", &self.closed_token_expired),
        ] {
            let _ = writeln!(
                out,
                "gateway_connections_closed_by_limit_total{{limit=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        g(
            &mut out,
            "gateway_inbound_rate_errors_total",
            "counter",
            "Client messages dropped with a `rate_limited` error reply (on_inbound_limit: error).",
            self.inbound_rate_errors.load(Relaxed) as i64,
        );
        g(
            &mut out,
            "gateway_http_rate_limited_total",
            "counter",
            "HTTP route requests refused with 429 by requests_per_ip.",
            self.http_rate_limited.load(Relaxed) as i64,
        );
        g(
            &mut out,
            "gateway_http_auth_refused_total",
            "counter",
            "HTTP route and publish API requests refused by their auth (401, 403).",
            self.http_refused_auth.load(Relaxed) as i64,
        );
        g(
            &mut out,
            "gateway_auth_timeouts_total",
            "counter",
            "Connections closed (1008) because in-band authentication did not come in time.",
            self.auth_timeouts.load(Relaxed) as i64,
        );
        g(
            &mut out,
            "gateway_tls_handshake_failures_total",
            "counter",
            "Connections to TLS listeners dropped because the TLS handshake failed or timed out.",
            self.tls_handshake_failures.load(Relaxed) as i64,
        );
        g(
            &mut out,
            "gateway_proxy_protocol_refused_total",
            "counter",
            "Connections to proxy_protocol listeners closed: no valid PROXY protocol header within 10 s, or not from a trusted proxy.",
            self.proxy_protocol_refused.load(Relaxed) as i64,
        );
        g(
            &mut out,
            "gateway_reply_schema_failures_total",
            "counter",
            "Control replies dropped because they failed their protocol's schema.",
            self.reply_schema_failures.load(Relaxed) as i64,
        );

        let chans = self.channels.read();
        type Get = fn(&ChannelMetrics) -> i64;
        let series: [(&str, &str, &str, Get); 20] = [
            (
                "gateway_rate_limit_dropped_total",
                "counter",
                "Messages dropped by the channel's rate_limit (on_exceed: drop).",
                |m| m.rate_dropped.load(Relaxed) as i64,
            ),
            (
                "gateway_messages_discarded_total",
                "counter",
                "Messages an old source handed over after a reload had closed what they were for (channel removed, keyed streams reopened on the new source).",
                |m| m.discarded.load(Relaxed) as i64,
            ),
            (
                "gateway_rate_limit_conflated_total",
                "counter",
                "Messages replaced by a later one under the channel's rate_limit (on_exceed: conflate).",
                |m| m.rate_conflated.load(Relaxed) as i64,
            ),
            (
                "gateway_messages_received_total",
                "counter",
                "Messages emitted by the channel's plugin.",
                |m| m.received.load(Relaxed) as i64,
            ),
            (
                "gateway_messages_published_total",
                "counter",
                "Messages validated and published to subscribers.",
                |m| m.published.load(Relaxed) as i64,
            ),
            (
                "gateway_deliveries_total",
                "counter",
                "Frames queued to subscribers (one per subscriber per message).",
                |m| m.deliveries.load(Relaxed) as i64,
            ),
            (
                "gateway_invalid_json_total",
                "counter",
                "Plugin messages dropped because they were not JSON.",
                |m| m.invalid_json.load(Relaxed) as i64,
            ),
            (
                "gateway_validation_failures_total",
                "counter",
                "Plugin messages dropped because they failed the channel's JSON Schema.",
                |m| m.schema_failures.load(Relaxed) as i64,
            ),
            (
                "gateway_messages_rejected_total",
                "counter",
                "Plugin messages refused at the ABI boundary (too large, bad key).",
                |m| m.rejected.load(Relaxed) as i64,
            ),
            (
                "gateway_slow_consumer_drops_total",
                "counter",
                "Frames dropped from full subscriber queues (on_full: drop_oldest).",
                |m| m.slow_drops.load(Relaxed) as i64,
            ),
            (
                "gateway_slow_consumer_closes_total",
                "counter",
                "Subscribers closed with 1008 because their queue was full (on_full: close).",
                |m| m.slow_closes.load(Relaxed) as i64,
            ),
            (
                "gateway_plugin_failures_total",
                "counter",
                "Plugin errors, panics and failed starts.",
                |m| m.plugin_failures.load(Relaxed) as i64,
            ),
            (
                "gateway_plugin_restarts_total",
                "counter",
                "Plugin instances restarted after a failure.",
                |m| m.plugin_restarts.load(Relaxed) as i64,
            ),
            (
                "gateway_plugin_up",
                "gauge",
                "1 while the channel's plugin instance runs.",
                |m| m.plugin_up.load(Relaxed) as i64,
            ),
            (
                "gateway_plugin_consecutive_failures",
                "gauge",
                "Plugin failures in a row (since an instance last ran 30 s without failing).",
                |m| m.plugin_consecutive_failures.load(Relaxed) as i64,
            ),
            (
                "gateway_plugin_last_failure_timestamp_seconds",
                "gauge",
                "When the channel's plugin last failed, seconds since the UNIX epoch (0: never).",
                |m| (m.plugin_last_failure_ms.load(Relaxed) / 1000) as i64,
            ),
            (
                "gateway_plugin_call_timeouts_total",
                "counter",
                "Calls into the plugin that ran past source.call_timeout (the instance was given up and restarted).",
                |m| m.plugin_call_timeouts.load(Relaxed) as i64,
            ),
            (
                "gateway_plugin_calls_abandoned",
                "gauge",
                "Calls given up on after source.call_timeout that still run inside the plugin.",
                |m| m.plugin_calls_abandoned.load(Relaxed) as i64,
            ),
            (
                "gateway_plugin_call_running_seconds",
                "gauge",
                "How long the supervisor's current call into the plugin (create, start, poll, open_key, close_key) has run; 0 when none runs.",
                |m| match m.plugin_call_started_ms.load(Relaxed) {
                    0 => 0,
                    t => {
                        (crate::state::epoch_ms(std::time::SystemTime::now()).saturating_sub(t)
                            / 1000) as i64
                    }
                },
            ),
            (
                "gateway_subscribers",
                "gauge",
                "Current subscribers of the channel.",
                |m| m.subscribers.load(Relaxed),
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (ch, m) in chans.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{channel=\"{}\",plugin=\"{}\"}} {}",
                    escape(ch),
                    escape(&m.plugin),
                    get(m)
                );
            }
        }
        out
    }
}

/// One unlabelled series: its HELP and TYPE lines and its value.
pub fn series(out: &mut String, name: &str, kind: &str, help: &str, v: i64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

/// A label value escaped for the text format.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_rendered_as_a_cumulative_histogram_in_seconds() {
        let h = DelayHistogram::default();
        for us in [100, 250, 251, 20_000_000] {
            h.observe_us(us);
        }
        let mut out = String::new();
        h.render(&mut out, "d", "Delays.");
        for line in [
            "# TYPE d histogram",
            "d_bucket{le=\"0.00025\"} 2",
            "d_bucket{le=\"0.0005\"} 3",
            "d_bucket{le=\"0.015\"} 3",
            "d_bucket{le=\"10\"} 3",
            "d_bucket{le=\"+Inf\"} 4",
            "d_sum 20.000601",
            "d_count 4",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in\n{out}");
        }
        assert_eq!(
            out.lines().filter(|l| l.starts_with("d_bucket")).count(),
            DELAY_BOUNDS_US.len() + 1
        );
    }

    #[test]
    fn observations_from_other_threads_are_all_counted() {
        let h = Arc::new(DelayHistogram::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| h.observe_us(3_000)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let (counts, sum) = h.snapshot();
        assert_eq!(
            counts[DELAY_BOUNDS_US.partition_point(|&b| b < 3_000)],
            4000
        );
        assert_eq!(counts.iter().sum::<u64>(), 4000);
        assert_eq!(sum, 12_000_000);
    }

    #[test]
    fn quantiles_come_from_the_bucket_of_their_rank() {
        let h = DelayHistogram::default();
        let q = |h: &DelayHistogram, q| bucket_quantile(&h.snapshot().0, q);
        assert_eq!(q(&h, 0.5), BucketQuantile::Empty);
        // 98 fast writes, one in (2, 3] ms, one in (15, 20] ms.
        (0..98).for_each(|_| h.observe_us(100));
        h.observe_us(2_500);
        h.observe_us(16_000);
        assert_eq!(q(&h, 0.5), BucketQuantile::AtMost(250));
        // Rank 98 of 100 is the last fast one, rank 99 the 2.5 ms one.
        assert_eq!(q(&h, 0.98), BucketQuantile::AtMost(250));
        assert_eq!(q(&h, 0.99), BucketQuantile::AtMost(3_000));
        assert_eq!(q(&h, 1.0), BucketQuantile::AtMost(20_000));
        // A bound itself belongs to its bucket (le).
        let b = DelayHistogram::default();
        b.observe_us(500);
        assert_eq!(q(&b, 0.99), BucketQuantile::AtMost(500));
        // Above the last bound.
        b.observe_us(11_000_000);
        assert_eq!(q(&b, 1.0), BucketQuantile::AboveLast);
        assert_eq!(q(&b, 0.5), BucketQuantile::AtMost(500));
        // The difference of two snapshots: only what came between.
        let before = h.snapshot().0;
        h.observe_us(40_000);
        let after = h.snapshot().0;
        let delta: DelayCounts = std::array::from_fn(|i| after[i] - before[i]);
        assert_eq!(bucket_quantile(&delta, 0.5), BucketQuantile::AtMost(50_000));
    }

    #[test]
    fn a_delay_is_measured_across_a_wrap_of_the_stamp_counter() {
        assert_eq!(since(5, u32::MAX - 4), 10);
        assert_eq!(since(1_000, 400), 600);
        let a = stamp();
        assert_ne!(a, 0, "0 marks an untimed frame");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(since(stamp(), a) >= 2_000);
    }
}
