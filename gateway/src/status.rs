//! The gateway's view of itself: the snapshot the builtin `status` source
//! publishes, and the HTML status page that shows it.
//!
//! The snapshot goes through its channel's publisher like any plugin
//! message (schema-checked, rate-limited, fanned out), so the page's data
//! comes over an ordinary, authenticated channel endpoint. The page itself
//! is one embedded HTML file with inline script and style, served with a
//! Content-Security-Policy that allows those two (by hash) and a WebSocket
//! back to the same host, nothing else.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, LazyLock};
use std::time::{Instant, SystemTime};

use base64::Engine;
use serde_json::{Value, json};

use crate::config::StatusPageCfg;
use crate::metrics::{BucketQuantile, DELAY_BOUNDS_US, DelayCounts, bucket_quantile};
use crate::state::{GatewayState, iso};

/// Published counts seen at the previous snapshot, for message rates, and
/// the delivery-delay histogram then, for the delay since.
#[derive(Default)]
pub struct Rates {
    seen: HashMap<Arc<str>, (u64, Instant)>,
    delay: Option<(DelayCounts, Instant)>,
}

impl Rates {
    /// Messages per second published since the last call for `channel`
    /// (0 the first time, and after a reload reset the count).
    fn rate(&mut self, channel: &Arc<str>, published: u64, now: Instant) -> f64 {
        let prev = self.seen.insert(channel.clone(), (published, now));
        match prev {
            Some((n, t)) if published >= n => {
                let secs = now.saturating_duration_since(t).as_secs_f64();
                if secs > 0.0 {
                    ((published - n) as f64 / secs * 100.0).round() / 100.0
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }

    /// The socket writes timed since the last call (since start the first
    /// time) and how long their oldest frames had waited.
    fn delay(&mut self, st: &GatewayState, now: Instant) -> Value {
        let (counts, _) = st.metrics.delivery_delay.snapshot();
        let (before, window_secs) = match self.delay.replace((counts, now)) {
            Some((c, t)) => (c, now.saturating_duration_since(t).as_secs_f64()),
            None => (
                DelayCounts::default(),
                SystemTime::now()
                    .duration_since(st.started)
                    .map_or(0.0, |d| d.as_secs_f64()),
            ),
        };
        let window: DelayCounts = std::array::from_fn(|i| counts[i].saturating_sub(before[i]));
        let writes: u64 = window.iter().sum();
        let le_ms = |q| match bucket_quantile(&window, q) {
            BucketQuantile::AtMost(us) => json!(us as f64 / 1000.0),
            BucketQuantile::Empty | BucketQuantile::AboveLast => Value::Null,
        };
        json!({
            "window_seconds": (window_secs * 1000.0).round() / 1000.0,
            "writes": writes,
            "p50_le_ms": le_ms(0.5),
            "p99_le_ms": le_ms(0.99),
            "writes_over_10s": window[DELAY_BOUNDS_US.len()],
        })
    }
}

/// The gateway's state now, as the `status` source publishes it
/// (`channel-specs/schemas/gateway-status.json` describes it).
pub fn snapshot(st: &GatewayState, rates: &mut Rates) -> Value {
    let live = st.live();
    let cfg = &live.config;
    let m = &st.metrics;
    let now = Instant::now();
    let listeners: Vec<Value> = cfg
        .listeners
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "address": st.addrs.get(&l.name).unwrap_or(&l.bind).to_string(),
                "tls": l.tls.is_some(),
                "admin": cfg.admin_listener.as_deref() == Some(l.name.as_str()),
            })
        })
        .collect();
    let endpoints: Vec<Value> = cfg
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "path": e.path.as_str(),
                "aliases": e.paths.iter().skip(1).map(|p| p.as_str()).collect::<Vec<_>>(),
                "listener": e.listener,
                "auth": e.auth.mode(),
                "protocol": e.protocol.as_ref().map_or("stream", |p| p.name.as_str()),
                "channels": e.channels.iter().map(|c| &*c.name).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut channels = Vec::new();
    for c in &cfg.channels {
        let Some(rt) = live.channels.get(&c.name) else {
            continue;
        };
        let cm = &rt.metrics;
        let h = rt.health();
        let published = cm.published.load(Relaxed);
        let last_failure = cm.last_validation_failure.lock().clone();
        channels.push(json!({
            "name": &*c.name,
            "source": c.source.name(),
            "mode": c.source.mode.to_string(),
            "subscribers": cm.subscribers.load(Relaxed).max(0),
            "received": cm.received.load(Relaxed),
            "published": published,
            "rate": rates.rate(&c.name, published, now),
            "validation_failures": cm.schema_failures.load(Relaxed),
            "invalid_json": cm.invalid_json.load(Relaxed),
            "rejected": cm.rejected.load(Relaxed),
            "last_validation_failure": last_failure.map(|f| json!({
                "instance_path": f.instance_path,
                "error": f.error,
                "at": iso(f.at),
            })),
            "plugin": {
                "state": h.state.as_str(),
                "restarts": cm.plugin_restarts.load(Relaxed),
                "failures": cm.plugin_failures.load(Relaxed),
                "consecutive_failures": h.consecutive_failures,
                "last_error": h.last_error,
                "last_failure": h.last_failure.map(iso),
            },
            "slow_consumer_drops": cm.slow_drops.load(Relaxed),
            "slow_consumer_closes": cm.slow_closes.load(Relaxed),
            "rate_limit_dropped": cm.rate_dropped.load(Relaxed),
            "rate_limit_conflated": cm.rate_conflated.load(Relaxed),
        }));
    }
    // Forget channels a reload removed.
    rates
        .seen
        .retain(|name, _| live.channels.contains_key(name));
    let refused = [
        ("limit", m.refused_limit.load(Relaxed)),
        ("rate", m.refused_rate.load(Relaxed)),
        ("per_ip", m.refused_per_ip.load(Relaxed)),
        ("per_principal", m.refused_per_principal.load(Relaxed)),
    ];
    let closed = [
        ("idle_timeout", m.closed_idle.load(Relaxed)),
        ("max_connection_duration", m.closed_lifetime.load(Relaxed)),
        ("ping_timeout", m.closed_ping_timeout.load(Relaxed)),
        ("inbound_messages", m.closed_inbound_rate.load(Relaxed)),
        ("auth_timeout", m.auth_timeouts.load(Relaxed)),
        ("token_expired", m.closed_token_expired.load(Relaxed)),
        ("message_too_big", m.closed_too_big.load(Relaxed)),
    ];
    let inbound_dropped = m.inbound_rate_errors.load(Relaxed);
    let http_refused = m.http_rate_limited.load(Relaxed);
    let total =
        refused.iter().chain(&closed).map(|(_, n)| n).sum::<u64>() + inbound_dropped + http_refused;
    let uptime = SystemTime::now()
        .duration_since(st.started)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "at": iso(SystemTime::now()),
        "gateway": {
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": iso(st.started),
            "uptime_seconds": uptime,
            "generation": live.generation,
            "connections": m.connections.load(Relaxed).max(0),
            "connections_total": m.connections_total.load(Relaxed),
            "refused": {
                "auth": m.refused_auth.load(Relaxed),
                "origin": m.refused_origin.load(Relaxed),
                "bad_request": m.refused_bad_request.load(Relaxed),
            },
            "reloads": {
                "ok": m.reloads.load(Relaxed),
                "error": m.reload_failures.load(Relaxed),
            },
            "cluster": st.cluster.as_ref().map(|c| c.summary(st)),
            "delivery_delay": rates.delay(st, now),
        },
        "listeners": listeners,
        "endpoints": endpoints,
        "channels": channels,
        "limits_hit": {
            "total": total,
            "connections_refused": counts(&refused),
            "connections_closed": counts(&closed),
            "inbound_messages_dropped": inbound_dropped,
            "http_requests_refused": http_refused,
        },
    })
}

fn counts(named: &[(&str, u64)]) -> Value {
    Value::Object(
        named
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

/// The page, as shipped: inline script and style, no external resource.
const PAGE: &str = include_str!("status_page.html");

/// `'sha256-…'` of the text between `open` and `</…>` in the page: what the
/// CSP allows.
fn inline_hash(open: &str, close: &str) -> String {
    let start = PAGE.find(open).map_or(0, |i| i + open.len());
    let end = PAGE[start..].find(close).map_or(PAGE.len(), |i| start + i);
    let digest = ring::digest::digest(&ring::digest::SHA256, &PAGE.as_bytes()[start..end]);
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

static SCRIPT_HASH: LazyLock<String> = LazyLock::new(|| inline_hash("<script>", "</script>"));
static STYLE_HASH: LazyLock<String> = LazyLock::new(|| inline_hash("<style>", "</style>"));

/// `s` escaped for an HTML attribute value.
fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The Content-Security-Policy of the page: its own inline script and
/// style, and WebSockets to the host it was loaded from.
pub fn content_security_policy(host: Option<&str>) -> String {
    // 'self' covers ws:// and wss:// to the same host in CSP 3; the host is
    // named too for browsers that only match http(s). A Host header with
    // anything but host-name characters is not echoed.
    let ws = host
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .map(|h| format!(" ws://{h} wss://{h}"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'{ws}; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        *SCRIPT_HASH, *STYLE_HASH
    )
}

/// The status page, for the request's `Host`.
pub fn page(cfg: &StatusPageCfg, host: Option<&str>) -> warp::reply::Response {
    let body = PAGE
        .replace("{{endpoint}}", &attr(&cfg.endpoint))
        .replace("{{key_param}}", &attr(&cfg.key_query));
    let mut r = warp::reply::Response::new(body.into());
    let h = r.headers_mut();
    let mut set = |name: http::HeaderName, value: &str| {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set(http::header::CONTENT_TYPE, "text/html; charset=utf-8");
    set(
        http::header::CONTENT_SECURITY_POLICY,
        &content_security_policy(host),
    );
    set(http::header::CACHE_CONTROL, "no-store");
    set(http::header::REFERRER_POLICY, "no-referrer");
    set(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(http::header::X_FRAME_OPTIONS, "DENY");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_exactly_the_inline_script_and_style() {
        let csp = content_security_policy(Some("127.0.0.1:8080"));
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(csp.contains("connect-src 'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080;"));
        assert!(SCRIPT_HASH.len() > 20 && STYLE_HASH.len() > 20);
        assert_ne!(*SCRIPT_HASH, *STYLE_HASH);
        // One script and one style element, so the hashes cover all of them.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        // Placeholders stay out of the hashed parts.
        let script = &PAGE[PAGE.find("<script>").unwrap()..PAGE.find("</script>").unwrap()];
        assert!(!script.contains("{{"), "the script must not be templated");
    }

    #[test]
    fn a_strange_host_is_not_echoed() {
        let csp = content_security_policy(Some("evil.example; script-src *"));
        assert!(!csp.contains("evil"), "{csp}");
        assert!(csp.contains("connect-src 'self';"), "{csp}");
    }

    #[test]
    fn rates_are_messages_per_second_between_snapshots() {
        let mut r = Rates::default();
        let name: Arc<str> = "a".into();
        let t0 = Instant::now();
        assert_eq!(r.rate(&name, 10, t0), 0.0);
        let t1 = t0 + std::time::Duration::from_secs(2);
        assert_eq!(r.rate(&name, 30, t1), 10.0);
        // A reset count (a reload) is not a negative rate.
        assert_eq!(
            r.rate(&name, 5, t1 + std::time::Duration::from_secs(1)),
            0.0
        );
    }
}
