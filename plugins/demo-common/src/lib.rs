//! Helpers shared by the demo source plugins (`demo-jobs-market`,
//! `demo-ledger`, `demo-relay`): the clock in the formats the examples'
//! APIs use, duration parsing for plugin configs, a small seeded PRNG for
//! plausible demo values, hash-like identifiers, and real host figures read
//! from `/proc`.
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// ISO-8601 UTC with milliseconds, e.g. `2026-11-23T12:00:00.123Z`.
pub fn iso_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Whole seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parse a config duration such as `500ms` or `2s`; zero is refused.
pub fn duration(what: &str, s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("`{what}` must be more than 0")),
        Err(e) => Err(format!(
            "`{what}` {s:?} is not a duration like 500ms or 2s: {e}"
        )),
    }
}

/// FNV-1a: a stable hash of a string (job outcomes, miner ids).
pub fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A small xorshift64* generator: plausible demo values, not cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock and `salt`, so two instances differ.
    pub fn from_clock(salt: &str) -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng::seeded(nanos ^ fnv1a(salt))
    }

    /// A fixed seed (tests).
    pub fn seeded(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// `n` lowercase hex digits (`n` = 64 looks like a SHA-256 hash).
    pub fn hex(&mut self, n: usize) -> String {
        let mut s = String::with_capacity(n + 16);
        while s.len() < n {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(n);
        s
    }

    /// One item of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Round to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// Real host figures from `/proc` (Linux).
pub mod host {
    /// Percentage of the host's memory in use: `(MemTotal - MemAvailable) / MemTotal`,
    /// two decimals; None when /proc/meminfo cannot be read.
    pub fn memory_used_percent() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        let total = field("MemTotal")?;
        let available = field("MemAvailable")?;
        (total > 0.0).then(|| super::round((total - available) / total * 100.0, 2))
    }

    /// Seconds since the host booted (`/proc/uptime`).
    pub fn uptime_seconds() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/uptime").ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// The aggregate `cpu` line of `/proc/stat`: (busy, total) jiffies.
    fn cpu_times() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 4 {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest is in user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v[3] + v.get(4).copied().unwrap_or(0);
        Some((total - idle, total))
    }

    /// Host CPU usage, measured between readings of `/proc/stat` at least
    /// [`CpuSampler::MIN_SPAN`] apart (closer calls get the last figure, so
    /// two quick calls do not measure a couple of jiffies).
    #[derive(Debug, Default)]
    pub struct CpuSampler {
        last: Option<(u64, u64, std::time::Instant)>,
        value: Option<f64>,
    }

    impl CpuSampler {
        /// Shortest span measured once a figure exists.
        pub const MIN_SPAN: std::time::Duration = std::time::Duration::from_secs(1);

        /// A sampler that has read the counters once.
        pub fn new() -> CpuSampler {
            CpuSampler {
                last: cpu_times().map(|(b, t)| (b, t, std::time::Instant::now())),
                value: None,
            }
        }

        /// Percentage (0–100, two decimals) of CPU time busy over the last
        /// span; None if /proc/stat cannot be read or no time passed yet.
        pub fn sample(&mut self) -> Option<f64> {
            if let (Some(v), Some((_, _, at))) = (self.value, self.last)
                && at.elapsed() < Self::MIN_SPAN
            {
                return Some(v);
            }
            let now = cpu_times()?;
            let prev = self.last;
            let total = prev.map_or(0, |p| now.1.saturating_sub(p.1));
            if total == 0 {
                if prev.is_none() {
                    self.last = Some((now.0, now.1, std::time::Instant::now()));
                }
                return self.value;
            }
            let busy = prev.map_or(0, |p| now.0.saturating_sub(p.0)) as f64;
            self.last = Some((now.0, now.1, std::time::Instant::now()));
            let v = super::round((busy / total as f64 * 100.0).clamp(0.0, 100.0), 2);
            self.value = Some(v);
            Some(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_formats() {
        let s = iso_now();
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
        assert!(unix_now() > 1_700_000_000);
    }

    #[test]
    fn durations() {
        assert_eq!(duration("x", "250ms").unwrap(), Duration::from_millis(250));
        assert!(duration("x", "0s").unwrap_err().contains("more than 0"));
        assert!(
            duration("x", "soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn rng_values() {
        let mut r = Rng::seeded(7);
        let h = r.hex(64);
        assert_eq!(h.len(), 64);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
        for _ in 0..1000 {
            let x = r.range(3, 5);
            assert!((3..=5).contains(&x));
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn host_figures_are_real() {
        let m = host::memory_used_percent().expect("/proc/meminfo");
        assert!(m > 0.0 && m <= 100.0, "{m}");
        assert!(host::uptime_seconds().expect("/proc/uptime") > 0.0);
        let mut s = host::CpuSampler::new();
        std::thread::sleep(Duration::from_millis(50));
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        if let Some(c) = s.sample() {
            assert!((0.0..=100.0).contains(&c), "{c}");
        }
    }
}
