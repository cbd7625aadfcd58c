//! Process-level helpers: own CPU time, wall clock in ns, the open-file limit.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the UNIX epoch (the clock the servers stamp `ts` with).
#[inline]
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// User + system CPU seconds this process has used so far (all threads),
/// from `/proc/self/stat`. `None` off Linux or if unreadable.
pub fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat_cpu(&stat)
}

/// utime + stime (fields 14 and 15) in seconds. Linux reports them in
/// USER_HZ ticks, which is 100 on every architecture the kernel exposes to
/// user space via /proc.
pub fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut it = after.split_ascii_whitespace();
    // Field 3 is the first token after ')': utime is field 14, stime 15.
    let utime: u64 = it.nth(11)?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft
/// limit (or the error, which callers report and otherwise ignore).
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let s = "1234 (my (weird) prog) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu(s), Some(3.25));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn own_cpu_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(cpu_secs().is_some());
        }
        assert!(now_ns() > 1_600_000_000_000_000_000);
    }
}
