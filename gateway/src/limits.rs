//! Connection and request limits.
//!
//! Rates (new connections per IP, inbound messages per connection, HTTP
//! requests per IP, a channel's outbound messages) are governor rate
//! limiters. Concurrency caps (connections per IP, per principal, per
//! endpoint) are counters: a guard holds one slot and gives it back when the
//! connection ends. Keyed state is pruned, so memory does not grow with every
//! client ever seen: counters drop a key when its count reaches zero, and
//! keyed rate limiters forget keys whose quota is full again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use parking_lot::Mutex;

use crate::config::types::{OnInboundLimit, Rate};

/// A keyed (per client IP) rate limiter.
pub type IpLimiter = governor::DefaultKeyedRateLimiter<IpAddr>;

/// A new keyed limiter for `rate`.
pub fn ip_limiter(rate: Rate) -> Arc<IpLimiter> {
    Arc::new(governor::RateLimiter::keyed(rate.quota()))
}

/// Check `ip` against `lim`; Err carries how long to wait (Retry-After).
pub fn check_ip(lim: &IpLimiter, ip: IpAddr) -> Result<(), Duration> {
    lim.check_key(&ip)
        .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
}

/// Seconds for a Retry-After header: at least 1, rounded up.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

/// At most `max` holders per key.
#[derive(Debug)]
pub struct ConnCounter {
    /// The cap (a reload may change it; holders above a lowered cap keep
    /// their slots, new ones wait until the count is under it).
    max: AtomicUsize,
    /// What is counted, for messages (`client IP`, `principal`, `endpoint`).
    pub what: &'static str,
    counts: Mutex<HashMap<String, usize>>,
    /// The setting it counts for (`limits.max_connections`, ...).
    id: String,
    /// The other instances' counts, when the cluster counts together.
    remote: Arc<RemoteCounts>,
}

/// The other gateway instances' connection counts, per setting and key,
/// as their last heartbeats gave them (`broker.cluster_limits`).
#[derive(Debug, Default)]
pub struct RemoteCounts {
    counts: parking_lot::RwLock<HashMap<String, HashMap<String, usize>>>,
}

impl RemoteCounts {
    /// Replace every count.
    pub fn set(&self, counts: HashMap<String, HashMap<String, usize>>) {
        *self.counts.write() = counts;
    }

    /// Connections the other instances count for setting `id` and `key`.
    pub fn get(&self, id: &str, key: &str) -> usize {
        let c = self.counts.read();
        if c.is_empty() {
            return 0;
        }
        c.get(id).and_then(|k| k.get(key)).copied().unwrap_or(0)
    }
}

/// One slot of a [`ConnCounter`]; released on drop.
#[derive(Debug)]
pub struct CountGuard {
    counter: Arc<ConnCounter>,
    key: String,
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        let mut m = self.counter.counts.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl ConnCounter {
    /// A counter allowing `max` per key.
    pub fn new(max: usize, what: &'static str) -> Arc<ConnCounter> {
        Self::counting(max, what, String::new(), Arc::default())
    }

    fn counting(
        max: usize,
        what: &'static str,
        id: String,
        remote: Arc<RemoteCounts>,
    ) -> Arc<ConnCounter> {
        Arc::new(ConnCounter {
            max: AtomicUsize::new(max),
            what,
            counts: Mutex::new(HashMap::new()),
            id,
            remote,
        })
    }

    /// Take a slot for `key`, or None at the cap (counting the other
    /// instances' connections when the cluster counts together).
    pub fn try_acquire(self: &Arc<Self>, key: &str) -> Option<CountGuard> {
        let others = self.remote.get(&self.id, key);
        let mut m = self.counts.lock();
        let n = m.entry(key.to_string()).or_insert(0);
        if *n + others >= self.max() {
            if *n == 0 {
                m.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(CountGuard {
            counter: self.clone(),
            key: key.to_string(),
        })
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max.load(Relaxed)
    }

    /// Holders of `key` now.
    pub fn count(&self, key: &str) -> usize {
        self.counts.lock().get(key).copied().unwrap_or(0)
    }

    /// Keys currently counted (for tests and pruning checks).
    pub fn keys(&self) -> usize {
        self.counts.lock().len()
    }
}

/// The limits that apply to one endpoint's connections (the endpoint's own
/// settings over gateway.yaml's `limits`).
#[derive(Debug, Default)]
pub struct ConnLimits {
    /// Connections open at once on this endpoint.
    pub total: Option<Arc<ConnCounter>>,
    /// Per client IP (gateway-wide and/or this endpoint's).
    pub per_ip: Vec<Arc<ConnCounter>>,
    /// Per principal (gateway-wide and/or this endpoint's).
    pub per_principal: Vec<Arc<ConnCounter>>,
    /// New connections per client IP.
    pub new_per_ip: Vec<Arc<IpLimiter>>,
    /// Inbound messages per connection.
    pub inbound: Option<Rate>,
    /// What exceeding `inbound` does.
    pub on_inbound: OnInboundLimit,
    /// Largest inbound message.
    pub max_message_size: usize,
    /// Longest connection lifetime.
    pub max_duration: Option<Duration>,
    /// Longest silence.
    pub idle_timeout: Option<Duration>,
    /// Server Ping interval.
    pub ping_interval: Option<Duration>,
    /// Pong deadline after a Ping.
    pub pong_timeout: Duration,
    /// Shortest time between two writes of queued frames (`write_interval`).
    pub write_interval: Option<Duration>,
}

/// Why a connection was refused by a limit.
#[derive(Debug)]
pub struct Refused {
    /// Machine-readable code.
    pub error: &'static str,
    /// Message.
    pub message: String,
    /// Retry-After, if any.
    pub retry_after: Option<Duration>,
}

impl ConnLimits {
    /// Take the per-IP and endpoint slots for a new connection from `ip`.
    pub fn admit_ip(&self, ip: IpAddr) -> Result<Vec<CountGuard>, Refused> {
        for l in &self.new_per_ip {
            if let Err(wait) = check_ip(l, ip) {
                return Err(Refused {
                    error: "rate_limited",
                    message: format!(
                        "too many new connections from {ip}; retry in {} s",
                        retry_after_secs(wait)
                    ),
                    retry_after: Some(wait),
                });
            }
        }
        let mut guards = Vec::new();
        if let Some(t) = &self.total {
            match t.try_acquire("") {
                Some(g) => guards.push(g),
                None => {
                    return Err(Refused {
                        error: "too_many_connections",
                        message: format!(
                            "this endpoint is at its limit of {} connections",
                            t.max()
                        ),
                        retry_after: None,
                    });
                }
            }
        }
        let key = ip.to_string();
        for c in &self.per_ip {
            match c.try_acquire(&key) {
                Some(g) => guards.push(g),
                None => {
                    return Err(Refused {
                        error: "too_many_connections_per_ip",
                        message: format!("at most {} connections per client IP", c.max()),
                        retry_after: None,
                    });
                }
            }
        }
        Ok(guards)
    }

    /// Take the per-principal slots.
    pub fn admit_principal(&self, principal: &str) -> Result<Vec<CountGuard>, Refused> {
        let mut guards = Vec::new();
        for c in &self.per_principal {
            match c.try_acquire(principal) {
                Some(g) => guards.push(g),
                None => {
                    return Err(Refused {
                        error: "too_many_connections_per_principal",
                        message: format!("at most {} connections per user", c.max()),
                        retry_after: None,
                    });
                }
            }
        }
        Ok(guards)
    }
}

/// Counters and keyed rate limiters by the setting that made them, shared by
/// every configuration a gateway loads: a reloaded configuration counts the
/// connections its predecessor admitted (a changed cap applies to the same
/// count), and keeps the state of rate limiters whose rate did not change.
#[derive(Default)]
pub struct LimiterPool {
    counters: Mutex<HashMap<String, Arc<ConnCounter>>>,
    rates: Mutex<HashMap<String, (Rate, Arc<IpLimiter>)>>,
    /// The other instances' counts (empty unless `broker.cluster_limits`).
    pub remote: Arc<RemoteCounts>,
}

impl LimiterPool {
    /// The counter for setting `id` (e.g. `limits.max_connections_per_ip`),
    /// with its cap set to `max`.
    pub fn counter(&self, id: &str, max: usize, what: &'static str) -> Arc<ConnCounter> {
        let mut m = self.counters.lock();
        if let Some(c) = m.get(id)
            && c.what == what
        {
            c.max.store(max, Relaxed);
            return c.clone();
        }
        let c = ConnCounter::counting(max, what, id.to_string(), self.remote.clone());
        m.insert(id.to_string(), c.clone());
        c
    }

    /// This instance's counts per setting and key (for the other instances).
    pub fn local_counts(&self) -> HashMap<String, HashMap<String, usize>> {
        self.counters
            .lock()
            .iter()
            .filter_map(|(id, c)| {
                let counts = c.counts.lock().clone();
                (!counts.is_empty()).then(|| (id.clone(), counts))
            })
            .collect()
    }

    /// The per-IP rate limiter for setting `id` at `rate`.
    pub fn rate(&self, id: &str, rate: Rate) -> Arc<IpLimiter> {
        let mut m = self.rates.lock();
        match m.get(id) {
            Some((r, l)) if *r == rate => l.clone(),
            _ => {
                let l = ip_limiter(rate);
                m.insert(id.to_string(), (rate, l.clone()));
                l
            }
        }
    }
}

impl std::fmt::Debug for LimiterPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LimiterPool({} counters, {} rate limiters)",
            self.counters.lock().len(),
            self.rates.lock().len()
        )
    }
}

/// Every keyed limiter, for pruning.
#[derive(Default)]
pub struct Prunable {
    /// The limiters.
    pub limiters: Vec<Arc<IpLimiter>>,
}

impl Prunable {
    /// Forget keys whose quota is full again.
    pub fn prune(&self) {
        for l in &self.limiters {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

impl std::fmt::Debug for Prunable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prunable({} limiters)", self.limiters.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_cap_per_key_and_forget_keys_at_zero() {
        let c = ConnCounter::new(2, "client IP");
        let a = c.try_acquire("1.1.1.1").unwrap();
        let b = c.try_acquire("1.1.1.1").unwrap();
        assert!(c.try_acquire("1.1.1.1").is_none());
        let other = c.try_acquire("2.2.2.2").unwrap();
        drop(a);
        let a2 = c.try_acquire("1.1.1.1").unwrap();
        drop((a2, b, other));
        assert_eq!(c.keys(), 0);
    }

    #[test]
    fn rates_parse_and_refuse_with_a_wait() {
        assert_eq!(
            Rate::parse("10/1m"),
            Some(Rate {
                count: 10,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(Rate::parse("100/s").map(|r| r.count), Some(100));
        assert_eq!(Rate::parse("0/s"), None);
        assert_eq!(Rate::parse("ten/s"), None);
        // Beyond what the limiter can count (it panicked at 1/600y).
        assert_eq!(Rate::parse("1/600y"), None);
        assert_eq!(Rate::parse("1/101y"), None);
        let longest = Rate::parse("1/100y").unwrap();
        let _ = longest.quota();
        let _ = ip_limiter(longest);
        let l = ip_limiter(Rate::parse("2/1m").unwrap());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(check_ip(&l, ip).is_ok());
        assert!(check_ip(&l, ip).is_ok());
        let wait = check_ip(&l, ip).unwrap_err();
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(check_ip(&l, "10.0.0.2".parse().unwrap()).is_ok());
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
