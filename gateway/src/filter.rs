//! Per-subscription filters: field matches, projection of a sub-object's
//! keys, and frequency (conflation: at most one message per period per key,
//! the latest wins).
//!
//! A channel declares which filters its subscribers may set (`filters:` in
//! its spec); a subscribe message sets them. Matching and conflation cost
//! nothing for subscribers without filters: they get the shared frame.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::OnFull;
use crate::config::types::FilterFile;
use crate::metrics::ChannelMetrics;
use crate::queue::{Pushed, SessionQueue};
use crate::template::{get_path, parse_path};

/// Conflation keys kept per subscription; beyond this, messages of new keys
/// pass unconflated rather than growing memory.
const MAX_CONFLATION_KEYS: usize = 10_000;

/// A filter a channel offers.
#[derive(Clone, Debug)]
pub enum FilterRule {
    /// Keep messages whose field equals the client's value (any of a list).
    Match(Vec<String>),
    /// Keep only the listed keys of the object at this path.
    Project(Vec<String>),
    /// At most one message per period per key (path of the key field).
    Frequency(Option<Vec<String>>),
}

impl FilterRule {
    /// Compile a channel spec's filter.
    pub fn compile(f: &FilterFile) -> Result<FilterRule, String> {
        let n = [f.match_field.is_some(), f.project.is_some(), f.frequency]
            .iter()
            .filter(|b| **b)
            .count();
        if n != 1 {
            return Err(
                "a filter is one of `match: FIELD`, `project: FIELD` or `frequency: true`".into(),
            );
        }
        if f.key.is_some() && !f.frequency {
            return Err("`key` applies to `frequency` filters only".into());
        }
        if let Some(m) = &f.match_field {
            return Ok(FilterRule::Match(parse_path(m)?));
        }
        if let Some(p) = &f.project {
            return Ok(FilterRule::Project(parse_path(p)?));
        }
        Ok(FilterRule::Frequency(
            f.key.as_deref().map(parse_path).transpose()?,
        ))
    }
}

/// One subscription's filters.
#[derive(Debug, Default)]
pub struct SubFilter {
    matches: Vec<(Vec<String>, Vec<Value>)>,
    project: Option<(Vec<String>, Vec<String>)>,
    conflate: Option<Conflate>,
    /// Cancelled when the subscription is gone: the timers of its held
    /// frames end then, not at their due time (with `frequency` only).
    gone: Option<CancellationToken>,
}

impl Drop for SubFilter {
    fn drop(&mut self) {
        if let Some(g) = &self.gone {
            g.cancel();
        }
    }
}

#[derive(Debug)]
struct Conflate {
    period: Duration,
    key: Option<Vec<String>>,
    state: Mutex<HashMap<String, Slot>>,
}

#[derive(Debug)]
struct Slot {
    last_sent: Instant,
    pending: Option<Bytes>,
    armed: bool,
}

/// What to do with one message for one subscriber.
pub enum Verdict {
    /// Not for this subscriber.
    Skip,
    /// Send the shared frame.
    Shared,
    /// Send this frame (projected).
    Own(Bytes),
    /// Held back by conflation; sent later if still the latest.
    Held,
}

/// The longest frequency period a client may ask for.
const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

fn parse_period(v: &Value) -> Result<Option<Duration>, String> {
    let p = parse_period_unchecked(v)?;
    match p {
        Some(d) if d > MAX_PERIOD => Err(format!("invalid frequency {v}: at most 24h")),
        other => Ok(other),
    }
}

fn parse_period_unchecked(v: &Value) -> Result<Option<Duration>, String> {
    match v {
        Value::String(s) => {
            let t = s.trim().to_ascii_lowercase();
            if matches!(t.as_str(), "real-time" | "realtime" | "live" | "0" | "") {
                return Ok(None);
            }
            humantime::parse_duration(&t)
                .map(|d| (!d.is_zero()).then_some(d))
                .map_err(|_| format!("invalid frequency {s:?}: use `real-time` or a period such as `5s`, `30s`, `1m`"))
        }
        Value::Number(n) => match n.as_f64() {
            // Checked here: from_secs_f64 panics on huge values.
            Some(x) if x >= 0.0 && x <= MAX_PERIOD.as_secs_f64() => {
                Ok((x > 0.0).then(|| Duration::from_secs_f64(x)))
            }
            Some(x) if x > MAX_PERIOD.as_secs_f64() => {
                Err(format!("invalid frequency {n}: at most 24h"))
            }
            _ => Err(format!("invalid frequency {n}: use seconds ≥ 0")),
        },
        other => Err(format!(
            "invalid frequency {other}: use `real-time` or a period such as `30s`"
        )),
    }
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

impl SubFilter {
    /// Build from the filters a client asked for. `given` lists (name,
    /// value) pairs; names the channel does not offer are the caller's
    /// concern.
    pub fn build(
        rules: &[(String, FilterRule)],
        given: &[(&str, &Value)],
    ) -> Result<Option<SubFilter>, String> {
        let mut f = SubFilter::default();
        let mut any = false;
        for (name, value) in given {
            let Some((_, rule)) = rules.iter().find(|(n, _)| n == name) else {
                continue;
            };
            match rule {
                FilterRule::Match(path) => {
                    let accepted = match value {
                        Value::Array(a) => a.clone(),
                        Value::Null => continue,
                        Value::Object(_) => {
                            return Err(format!(
                                "filter {name:?} takes a value or a list of values, not an object"
                            ));
                        }
                        v => vec![(*v).clone()],
                    };
                    f.matches.push((path.clone(), accepted));
                    any = true;
                }
                FilterRule::Project(path) => {
                    let keys = match value {
                        Value::Array(a) => a
                            .iter()
                            .map(|k| k.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>(),
                        Value::String(s) => Some(vec![s.clone()]),
                        Value::Null => continue,
                        _ => None,
                    }
                    .ok_or_else(|| format!("filter {name:?} takes a list of names"))?;
                    f.project = Some((path.clone(), keys));
                    any = true;
                }
                FilterRule::Frequency(key) => {
                    if let Some(period) =
                        parse_period(value).map_err(|e| format!("filter {name:?}: {e}"))?
                    {
                        f.gone = Some(CancellationToken::new());
                        f.conflate = Some(Conflate {
                            period,
                            key: key.clone(),
                            state: Mutex::new(HashMap::new()),
                        });
                        any = true;
                    }
                }
            }
        }
        Ok(any.then_some(f))
    }

    fn matches(&self, v: &Value) -> bool {
        self.matches
            .iter()
            .all(|(path, accepted)| match get_path(v, path) {
                None => false,
                Some(Value::Array(items)) => items
                    .iter()
                    .any(|i| accepted.iter().any(|a| values_equal(a, i))),
                Some(x) => accepted.iter().any(|a| values_equal(a, x)),
            })
    }

    /// Decide for one message. `value` is the parsed message; `frame` its
    /// shared frame. Deferred frames are pushed to `queue` by a timer, and
    /// counted in `metrics` as the broker counts what it pushes.
    pub fn decide(
        self: &Arc<Self>,
        value: &Value,
        frame: &Bytes,
        queue: &Arc<SessionQueue>,
        on_full: OnFull,
        cancelled: &Arc<AtomicBool>,
        metrics: &Arc<ChannelMetrics>,
    ) -> Verdict {
        if !self.matches(value) {
            return Verdict::Skip;
        }
        let own = self.project.as_ref().map(|(path, keys)| {
            let mut v = value.clone();
            if let Some(Value::Object(m)) = get_mut_path(&mut v, path) {
                m.retain(|k, _| keys.iter().any(|x| x == k));
            }
            let body = serde_json::to_vec(&v).unwrap_or_default();
            crate::ws::frame(crate::ws::OP_TEXT, &body)
        });
        let Some(c) = &self.conflate else {
            return match own {
                Some(b) => Verdict::Own(b),
                None => Verdict::Shared,
            };
        };
        let key = match &c.key {
            None => String::new(),
            Some(p) => match get_path(value, p) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            },
        };
        let now = Instant::now();
        let mut st = c.state.lock();
        if !st.contains_key(&key) && st.len() >= MAX_CONFLATION_KEYS {
            return match own {
                Some(b) => Verdict::Own(b),
                None => Verdict::Shared,
            };
        }
        let slot = st.entry(key.clone()).or_insert(Slot {
            last_sent: now.checked_sub(c.period).unwrap_or(now),
            pending: None,
            armed: false,
        });
        if now.duration_since(slot.last_sent) >= c.period && !slot.armed {
            slot.last_sent = now;
            return match own {
                Some(b) => Verdict::Own(b),
                None => Verdict::Shared,
            };
        }
        // Too soon: keep the latest and send it when the period is over.
        slot.pending = Some(own.unwrap_or_else(|| frame.clone()));
        if !slot.armed {
            slot.armed = true;
            let due = slot
                .last_sent
                .checked_add(c.period)
                .unwrap_or_else(|| now + MAX_PERIOD);
            // The timer holds the subscription weakly: one that ends frees
            // its held frames (up to MAX_CONFLATION_KEYS of them) at once,
            // and its timers end with it.
            let me = Arc::downgrade(self);
            let q = Arc::downgrade(queue);
            let cancelled = cancelled.clone();
            let metrics = metrics.clone();
            let gone = self.gone.clone().unwrap_or_default();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = gone.cancelled() => return,
                }
                let Some(me) = me.upgrade() else { return };
                let frame = {
                    let mut st = me.conflate.as_ref().map(|c| c.state.lock());
                    st.as_mut().and_then(|st| {
                        st.get_mut(&key).and_then(|s| {
                            s.armed = false;
                            s.last_sent = Instant::now();
                            s.pending.take()
                        })
                    })
                };
                drop(me);
                if let Some(f) = frame
                    && !cancelled.load(Relaxed)
                    && let Some(q) = q.upgrade()
                {
                    match q.push(f, on_full) {
                        Pushed::Queued => {
                            metrics.deliveries.fetch_add(1, Relaxed);
                        }
                        Pushed::DroppedOldest => {
                            metrics.deliveries.fetch_add(1, Relaxed);
                            metrics.slow_drops.fetch_add(1, Relaxed);
                        }
                        Pushed::Closed => {
                            metrics.slow_closes.fetch_add(1, Relaxed);
                        }
                        Pushed::Ignored => {}
                    }
                }
            });
        }
        Verdict::Held
    }
}

fn get_mut_path<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = v;
    for s in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(s)?,
            Value::Array(a) => a.get_mut(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Vec<(String, FilterRule)> {
        vec![
            (
                "device_id".into(),
                FilterRule::Match(vec!["device_id".into()]),
            ),
            (
                "severity".into(),
                FilterRule::Match(vec!["severity".into()]),
            ),
            (
                "metrics".into(),
                FilterRule::Project(vec!["telemetry".into()]),
            ),
            (
                "frequency".into(),
                FilterRule::Frequency(Some(vec!["device_id".into()])),
            ),
        ]
    }

    #[test]
    fn match_equality_any_of_and_numbers() {
        let v = json!(5);
        let f = SubFilter::build(&rules(), &[("device_id", &v)])
            .unwrap()
            .unwrap();
        assert!(f.matches(&json!({"device_id": 5})));
        assert!(f.matches(&json!({"device_id": 5.0})));
        assert!(!f.matches(&json!({"device_id": 6})));
        assert!(!f.matches(&json!({"other": 5})));
        let l = json!(["high", "critical"]);
        let f = SubFilter::build(&rules(), &[("severity", &l)])
            .unwrap()
            .unwrap();
        assert!(f.matches(&json!({"severity": "critical"})));
        assert!(!f.matches(&json!({"severity": "low"})));
    }

    #[test]
    fn no_filters_means_none_and_bad_values_are_errors() {
        assert!(SubFilter::build(&rules(), &[]).unwrap().is_none());
        let rt = json!("real-time");
        assert!(
            SubFilter::build(&rules(), &[("frequency", &rt)])
                .unwrap()
                .is_none()
        );
        let bad = json!("often");
        assert!(
            SubFilter::build(&rules(), &[("frequency", &bad)])
                .unwrap_err()
                .contains("invalid frequency")
        );
        let obj = json!({"a": 1});
        assert!(SubFilter::build(&rules(), &[("device_id", &obj)]).is_err());
    }

    #[tokio::test]
    async fn projection_keeps_only_the_asked_keys() {
        let keys = json!(["cpu"]);
        let f = Arc::new(
            SubFilter::build(&rules(), &[("metrics", &keys)])
                .unwrap()
                .unwrap(),
        );
        let q = Arc::new(SessionQueue::new(4));
        let c = Arc::new(AtomicBool::new(false));
        let cm = Arc::default();
        let v = json!({"device_id": 1, "telemetry": {"cpu": 1, "temp": 2}});
        match f.decide(&v, &Bytes::new(), &q, OnFull::DropOldest, &c, &cm) {
            Verdict::Own(b) => {
                let (_, body) = b.split_at(2);
                let got: Value = serde_json::from_slice(body).unwrap();
                assert_eq!(got, json!({"device_id": 1, "telemetry": {"cpu": 1}}));
            }
            _ => panic!("expected a projected frame"),
        }
    }

    /// A subscription with `frequency: period`: its filter, queue (16),
    /// cancelled flag and channel metrics.
    #[allow(clippy::type_complexity)]
    fn with_frequency(
        period: &str,
    ) -> (
        Arc<SubFilter>,
        Arc<SessionQueue>,
        Arc<AtomicBool>,
        Arc<ChannelMetrics>,
    ) {
        let p = json!(period);
        let f = SubFilter::build(&rules(), &[("frequency", &p)])
            .unwrap()
            .unwrap();
        (
            Arc::new(f),
            Arc::new(SessionQueue::new(16)),
            Arc::new(AtomicBool::new(false)),
            Arc::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn frequency_conflates_per_key_latest_wins() {
        let (f, q, c, cm) = with_frequency("10s");
        let m = |d: i64, n: i64| json!({"device_id": d, "n": n});
        let fr = |v: &Value| crate::ws::frame(crate::ws::OP_TEXT, v.to_string().as_bytes());
        assert!(matches!(
            f.decide(&m(1, 1), &fr(&m(1, 1)), &q, OnFull::DropOldest, &c, &cm),
            Verdict::Shared
        ));
        assert!(matches!(
            f.decide(&m(2, 1), &fr(&m(2, 1)), &q, OnFull::DropOldest, &c, &cm),
            Verdict::Shared
        ));
        assert!(matches!(
            f.decide(&m(1, 2), &fr(&m(1, 2)), &q, OnFull::DropOldest, &c, &cm),
            Verdict::Held
        ));
        assert!(matches!(
            f.decide(&m(1, 3), &fr(&m(1, 3)), &q, OnFull::DropOldest, &c, &cm),
            Verdict::Held
        ));
        tokio::time::sleep(Duration::from_secs(11)).await;
        let mut out = Vec::new();
        q.take(&mut out, 10);
        assert_eq!(out.len(), 1, "one held message per key, the latest");
        match &out[0] {
            crate::queue::Outbound::Frame(b) => {
                let got: Value = serde_json::from_slice(&b[2..]).unwrap();
                assert_eq!(got, m(1, 3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cm.deliveries.load(Relaxed), 1, "the held frame is counted");
    }

    /// A subscription that ends with frames held for later lets them go at
    /// once: its timers do not keep them, or its session's queue, alive.
    #[tokio::test(start_paused = true)]
    async fn held_frames_go_with_their_subscription() {
        let (f, q, c, cm) = with_frequency("24h");
        let m = |d: i64| json!({"device_id": d, "pad": "x".repeat(1000)});
        let fr = |v: &Value| crate::ws::frame(crate::ws::OP_TEXT, v.to_string().as_bytes());
        for d in 0..50 {
            f.decide(&m(d), &fr(&m(d)), &q, OnFull::DropOldest, &c, &cm);
            assert!(matches!(
                f.decide(&m(d), &fr(&m(d)), &q, OnFull::DropOldest, &c, &cm),
                Verdict::Held
            ));
        }
        let weak = Arc::downgrade(&f);
        drop(f);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(weak.upgrade().is_none(), "a timer keeps the filter");
        assert_eq!(Arc::strong_count(&q), 1, "a timer keeps the queue");
    }
}
