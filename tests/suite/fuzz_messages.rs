//! Property test: whatever a client sends in well-formed WebSocket frames,
//! the connection stays open. Arbitrary JSON values, arbitrary text and
//! bytes, and near-valid control messages (random actions, channel values of
//! random types, random filters) go over ONE connection to a real gateway's
//! subscribe endpoint (and one to its stream endpoint); after each, a ping
//! action must still be answered by its pong, with at most one reply (an
//! error or a confirmation) before it. Nothing here is documented to close:
//! invalid UTF-8 cannot be sent in a text frame by tungstenite, and sizes
//! stay under `limits.max_message_size`.
//!
//! Bounded and reproducible: a fixed seed, 300 cases, no persistence files.

use std::cell::RefCell;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Map, Number, Value, json};
use tokio_tungstenite::tungstenite::Message;

const FILTER_NAMES: [&str; 4] = ["device_id", "severity", "metrics", "frequency"];

/// Frequencies (seconds) from this number on are left out. Infinity: none
/// is (huge ones once panicked in the session; see
/// `bad_input::frequency_overflow_as_a_number_is_an_invalid_filter_not_a_panic`).
const MAX_FREQUENCY_NUMBER: f64 = f64::INFINITY;

fn deployment() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(
        r#"
limits:
  max_message_size: 64KiB
protocols:
  iot:
    filters_at: [top_level, filters]
endpoints:
  - path: /ws
    protocol: iot
    channels: all
"#,
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write(
        "specs/telemetry.yaml",
        &bus_spec(
            "telemetry",
            "filters:\n  device_id: {match: device_id}\n  severity: {match: severity}\n  metrics: {project: telemetry}\n  frequency: {frequency: true, key: device_id}\nendpoints:\n  - path: /stream\n",
        ),
    )
    .write(
        "specs/other.yaml",
        &bus_spec("other", ""),
    );
    dep
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        (-1000i64..1000).prop_map(Value::from),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "type", "channel", "filters", "data", "timestamp", "device_id", "severity",
            "metrics", "frequency", "token",
        ])
        .prop_map(str::to_string),
        1 => "\\PC{0,12}",
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        "\\PC{0,24}".prop_map(Value::String),
        prop::sample::select(vec![
            "subscribe",
            "unsubscribe",
            "ping",
            "status",
            "telemetry",
            "1s",
            "real-time"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value a client might put in a filter: plausible or anything.
fn filter_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => (0.0..100.0f64).prop_map(|f| json!(f)),
        1 => (0.0..f64::MAX).prop_map(|f| json!(f)),
        1 => prop::sample::select(vec![1e9, 1e15, 1e19, 1.8446744073709552e19, 1e300, f64::MAX, 5e-324])
            .prop_map(|f| json!(f)),
        1 => (-5i64..5).prop_map(Value::from),
        2 => prop::sample::select(vec![
            "1s", "30s", "1m", "real-time", "live", "0", "", "often", "-1s", "1ms", "2h 5m",
            "99999999999999999999s", "500000000000y", "1ns", "cpu", "high",
        ])
        .prop_map(|s| Value::String(s.into())),
        1 => prop::collection::vec(
            prop_oneof![(-3i64..3).prop_map(Value::from), "[a-z]{0,4}".prop_map(Value::String)],
            0..4
        )
        .prop_map(Value::Array),
        1 => json_value(),
    ]
}

/// Whether `v` holds a `frequency` number past [`MAX_FREQUENCY_NUMBER`]
/// anywhere (the known bug; such inputs are left out until it is fixed).
fn known_bug(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, x)| {
            (k == "frequency" && x.as_f64().is_some_and(|f| f >= MAX_FREQUENCY_NUMBER))
                || known_bug(x)
        }),
        Value::Array(a) => a.iter().any(known_bug),
        _ => false,
    }
}

/// A near-valid control message.
fn control() -> impl Strategy<Value = Value> {
    let action = prop_oneof![
        6 => Just(Value::String("subscribe".into())),
        3 => prop::sample::select(vec!["unsubscribe", "ping", "status"])
            .prop_map(|s| Value::String(s.into())),
        1 => "\\PC{0,10}".prop_map(Value::String),
        1 => json_value(),
    ];
    let channel = prop_oneof![
        6 => Just(Value::String("telemetry".into())),
        2 => prop::sample::select(vec!["other", "nope", ""]).prop_map(|s| Value::String(s.into())),
        1 => json_value(),
    ];
    let top = prop::collection::btree_map(
        prop::sample::select(FILTER_NAMES.to_vec()),
        filter_value(),
        0..4,
    );
    let nested = prop_oneof![
        2 => prop::collection::btree_map(
            prop_oneof![4 => prop::sample::select(FILTER_NAMES.to_vec()).prop_map(str::to_string), 1 => "[a-z]{1,6}"],
            filter_value(),
            0..4
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => json_value(),
    ];
    (
        action,
        proptest::option::weighted(0.9, channel),
        top,
        proptest::option::of(nested),
        proptest::option::of(json_value()),
    )
        .prop_map(|(action, channel, top, nested, data)| {
            let mut m = Map::new();
            m.insert("type".into(), action);
            if let Some(c) = channel {
                m.insert("channel".into(), c);
            }
            for (k, v) in top {
                m.insert(k.into(), v);
            }
            if let Some(f) = nested {
                m.insert("filters".into(), f);
            }
            if let Some(d) = data {
                m.insert("data".into(), d);
            }
            Value::Object(m)
        })
}

#[derive(Clone, Debug)]
enum Input {
    /// Any JSON value, as text.
    Json(Value),
    /// A near-valid control message, as text.
    Control(Value),
    /// Any text.
    Text(String),
    /// Arbitrary bytes as text (lossily made UTF-8).
    LossyText(Vec<u8>),
    /// Arbitrary bytes as a binary frame.
    Binary(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        3 => json_value().prop_map(Input::Json),
        4 => control().prop_map(Input::Control),
        1 => "\\PC{0,64}".prop_map(Input::Text),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Input::LossyText),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Input::Binary),
    ]
    .prop_filter("the known frequency bug", |i| match i {
        Input::Json(v) | Input::Control(v) => !known_bug(v),
        _ => true,
    })
}

struct Clients {
    ws: Option<Ws>,
    stream: Option<Ws>,
    n: u64,
}

/// Send `input` on both connections, then check each is open: the
/// subscribe endpoint answers a ping action with its pong after at most one
/// reply; the stream endpoint answers a Ping frame.
async fn check(addr: std::net::SocketAddr, c: &mut Clients, input: &Input) -> Result<(), String> {
    // A case that broke a connection is reported by that case; the next one
    // (e.g. while shrinking) starts on a fresh connection.
    let ws = match &mut c.ws {
        Some(ws) => ws,
        None => c.ws.insert(connect(addr, "/ws").await),
    };
    let stream = match &mut c.stream {
        Some(s) => s,
        None => c.stream.insert(connect(addr, "/stream").await),
    };
    let msg = match input {
        Input::Json(v) | Input::Control(v) => Message::Text(v.to_string().into()),
        Input::Text(t) => Message::Text(t.clone().into()),
        Input::LossyText(b) => Message::Text(String::from_utf8_lossy(b).into_owned().into()),
        Input::Binary(b) => Message::Binary(b.clone().into()),
    };
    c.n += 1;
    let nonce = format!("check-{}", c.n);
    let result = async {
        ws.send(msg.clone())
            .await
            .map_err(|e| format!("send: {e}"))?;
        stream.send(msg).await.map_err(|e| format!("send: {e}"))?;
        ws.send(Message::Text(
            json!({"type": "ping", "data": nonce}).to_string().into(),
        ))
        .await
        .map_err(|e| format!("send ping: {e}"))?;
        stream
            .send(Message::Ping(nonce.clone().into_bytes().into()))
            .await
            .map_err(|e| format!("send Ping: {e}"))?;
        let mut before = Vec::new();
        loop {
            let m = tokio::time::timeout(PATIENCE, ws.next())
                .await
                .map_err(|_| "no answer in time (a hang)".to_string())?;
            match m {
                Some(Ok(Message::Text(t))) => {
                    let v: Value =
                        serde_json::from_str(&t).map_err(|e| format!("not JSON: {e}"))?;
                    if v == json!({"type": "pong", "data": nonce}) {
                        break;
                    }
                    before.push(v);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return Err(format!("/ws connection ended: {other:?}")),
            }
        }
        if before.len() > 1 {
            return Err(format!("more than one reply: {before:?}"));
        }
        if let Some(r) = before.first() {
            let t = r["type"].as_str().unwrap_or_default();
            let ok = matches!(
                t,
                "error" | "subscribed" | "unsubscribed" | "pong" | "status"
            );
            if !ok {
                return Err(format!("unexpected reply {r}"));
            }
            if t == "error" && !r["error"].is_string() {
                return Err(format!("error reply without a code: {r}"));
            }
            if matches!(input, Input::Binary(_)) {
                return Err(format!("a binary frame got a reply: {r}"));
            }
        }
        loop {
            let m = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .map_err(|_| "no Pong in time (a hang)".to_string())?;
            match m {
                Some(Ok(Message::Pong(p))) if p.as_ref() == nonce.as_bytes() => break,
                Some(Ok(Message::Pong(_) | Message::Ping(_))) => {}
                Some(Ok(Message::Text(t))) => {
                    return Err(format!("the stream endpoint answered text: {t}"));
                }
                other => return Err(format!("/stream connection ended: {other:?}")),
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        c.ws = None;
        c.stream = None;
    }
    result
}

#[test]
fn any_well_formed_message_leaves_the_connection_open() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dep = deployment();
    let gw = rt.block_on(dep.start());
    let addr = gw.addr("main").unwrap();
    let clients = RefCell::new(Clients {
        ws: None,
        stream: None,
        n: 0,
    });
    let config = Config {
        cases: 300,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]));
    let result = runner.run(&input(), |inp| {
        let mut c = clients.borrow_mut();
        rt.block_on(check(addr, &mut c, &inp))
            .map_err(|e| TestCaseError::fail(format!("{e}\ninput: {inp:?}")))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Everything the cases opened is gone once the clients close.
    let mut c = clients.into_inner();
    rt.block_on(async {
        for ws in [c.ws.take(), c.stream.take()].into_iter().flatten() {
            let mut ws = ws;
            ws.close(None).await.unwrap();
            close_code(&mut ws).await;
        }
        metric_becomes(addr, "gateway_connections", 0.0).await;
        gw.shutdown().await;
    });
}
