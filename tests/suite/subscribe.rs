//! The subscribe protocol with real clients: configurable field names and
//! replies, envelopes, groups, aliases, filters, frequency, last value and
//! plugin commands answering client actions.

use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

/// A crypto-monitor-like deployment: `action`/`service`, every message in a
/// `{service, type, data, timestamp}` envelope.
fn crypto_like() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(
        r#"
protocols:
  svc:
    action_field: action
    channel_field: service
    actions:
      subscribe: subscribe
      unsubscribe: unsubscribe
      get_status: status
      ping: ping
      echo: {command: {channel: prices, request: {op: echo, asked: "{{request.data}}"}}}
      broken: {command: {channel: prices, request: {op: fail}}}
    replies:
      connected: {service: system, type: connection_established, data: {client_id: "{{client.id}}"}, timestamp: "{{now}}"}
      subscribed: {service: "{{channel}}", type: subscription_confirmed, data: {service: "{{channel}}"}, timestamp: "{{now}}"}
      unsubscribed: {service: "{{channel}}", type: unsubscription_confirmed, data: {service: "{{channel}}"}, timestamp: "{{now}}"}
      pong: {service: system, type: pong, data: "{{request.data}}", timestamp: "{{now}}"}
      status: {service: system, type: status, data: {client_id: "{{client.id}}", connected_at: "{{client.connected_at}}", last_activity: "{{client.last_activity}}", subscriptions: "{{client.subscriptions}}", total_clients: "{{gateway.connections}}"}, timestamp: "{{now}}"}
      error: {service: system, type: error, data: {code: "{{error.code}}", message: "{{error.message}}", available_services: "{{channels}}"}, timestamp: "{{now}}"}
      command: {service: system, type: result, data: "{{result}}", timestamp: "{{now}}"}
endpoints:
  - path: /ws
    protocol: svc
    channels: all
  - path: /ws/master
    protocol: svc
    channels: all
    on_connect:
      - {service: system, type: welcome, data: {groups: "{{groups}}"}, timestamp: "{{now}}"}
  - path: /ws/data
    protocol: svc
    channels: {group: data}
  - path: /ws/all
    protocol: svc
    channels: all
    subscribe: all
  - path: /ws/prices
    aliases: [/ws/p]
    protocol: svc
    channels: all
    subscribe: prices
http:
  - path: /emit/prices
    method: POST
    command: {channel: prices, request: {op: emit, messages: "{{request.body}}"}}
  - path: /emit/news
    method: POST
    command: {channel: news, request: {op: emit, messages: "{{request.body}}"}}
"#,
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write(
        "specs/schemas/update.json",
        r#"{"type":"object","required":["service","type","data","timestamp"],
            "properties":{"type":{"const":"update"},"timestamp":{"type":"string","format":"date-time"}}}"#,
    )
    .write(
        "specs/prices.yaml",
        &bus_spec(
            "prices",
            "schema: schemas/update.json\ngroups: [data]\nenvelope: {service: \"{{channel}}\", type: update, data: \"{{data}}\", timestamp: \"{{now}}\"}\n",
        )
        .replace("schema: schemas/any.json\n", ""),
    )
    .write(
        "specs/news.yaml",
        &bus_spec(
            "news",
            "schema: schemas/update.json\ngroups: [media]\nenvelope: {service: \"{{channel}}\", type: update, data: \"{{data}}\", timestamp: \"{{now}}\"}\n",
        )
        .replace("schema: schemas/any.json\n", ""),
    );
    dep
}

async fn emit(addr: std::net::SocketAddr, channel: &str, messages: Value) {
    let (status, _, body) = http_body(
        addr,
        "POST",
        &format!("/emit/{channel}"),
        &[("Content-Type", "application/json")],
        &messages.to_string(),
    )
    .await;
    assert_eq!(status, 200, "emit: {body}");
}

/// Emit until the client sees a message of `channel` (the plugin may still be
/// starting when the first emit arrives).
async fn emit_until_seen(
    addr: std::net::SocketAddr,
    ws: &mut Ws,
    channel: &str,
    data: Value,
) -> Value {
    eventually("the plugin to run", || async {
        let (status, _, _) = http_body(
            addr,
            "POST",
            &format!("/emit/{channel}"),
            &[],
            &json!([data]).to_string(),
        )
        .await;
        (status == 200).then_some(())
    })
    .await;
    next_json(ws).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_field_names_replies_and_envelopes() {
    let dep = crypto_like();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws").await;

    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "connection_established");
    assert_eq!(hello["service"], "system");
    let client_id = hello["data"]["client_id"].as_str().unwrap().to_string();
    assert_eq!(client_id.len(), 16);
    assert!(hello["timestamp"].as_str().unwrap().ends_with('Z'));

    send_json(
        &mut ws,
        &json!({"action": "subscribe", "service": "prices"}),
    )
    .await;
    let ok = next_json(&mut ws).await;
    assert_eq!(ok["type"], "subscription_confirmed");
    assert_eq!(ok["service"], "prices");

    let update = emit_until_seen(addr, &mut ws, "prices", json!({"btc": 1})).await;
    assert_eq!(update["service"], "prices");
    assert_eq!(update["type"], "update");
    assert_eq!(update["data"], json!({"btc": 1}));

    // Unknown service: an error listing what is available; the connection stays.
    send_json(
        &mut ws,
        &json!({"action": "subscribe", "service": "weather"}),
    )
    .await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["data"]["code"], "unknown_channel");
    assert_eq!(err["data"]["available_services"], json!(["news", "prices"]));

    send_json(
        &mut ws,
        &json!({"action": "ping", "data": {"n": 7, "s": "x"}}),
    )
    .await;
    let pong = next_json(&mut ws).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["data"], json!({"n": 7, "s": "x"}));

    send_json(&mut ws, &json!({"action": "get_status"})).await;
    let st = next_json(&mut ws).await;
    assert_eq!(st["type"], "status");
    assert_eq!(st["data"]["client_id"], client_id.as_str());
    assert_eq!(st["data"]["subscriptions"], json!(["prices"]));
    assert_eq!(st["data"]["total_clients"], 1);
    assert!(st["data"]["connected_at"].as_str().unwrap().ends_with('Z'));

    // Malformed messages get an error reply, never a close.
    for (bad, code) in [
        ("{not json", "invalid_json"),
        ("[1,2]", "bad_request"),
        (r#"{"service":"prices"}"#, "bad_request"),
        (r#"{"action":"dance"}"#, "unknown_action"),
        (r#"{"action":"subscribe"}"#, "bad_request"),
        (r#"{"action":"subscribe","service":7}"#, "bad_request"),
        (
            r#"{"action":"unsubscribe","service":"news"}"#,
            "not_subscribed",
        ),
    ] {
        send_text(&mut ws, bad).await;
        let e = next_json(&mut ws).await;
        assert_eq!(e["type"], "error", "{bad}");
        assert_eq!(e["data"]["code"], code, "{bad}: {e}");
    }

    send_json(
        &mut ws,
        &json!({"action": "unsubscribe", "service": "prices"}),
    )
    .await;
    let un = next_json(&mut ws).await;
    assert_eq!(un["type"], "unsubscription_confirmed");
    emit(addr, "prices", json!([{"btc": 2}])).await;
    // The ping answered after the emit proves nothing of prices came first.
    send_json(&mut ws, &json!({"action": "ping", "data": 1})).await;
    let after = next_json(&mut ws).await;
    assert_eq!(
        after["type"], "pong",
        "no update after unsubscribing: {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_groups_auto_subscription_and_aliases() {
    let dep = crypto_like();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();

    let mut master = connect(addr, "/ws/master").await;
    let welcome = next_json(&mut master).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(
        welcome["data"]["groups"],
        json!({"data": ["prices"], "media": ["news"]})
    );

    // A group endpoint refuses channels outside its group.
    let mut data = connect(addr, "/ws/data").await;
    assert_eq!(next_json(&mut data).await["type"], "connection_established");
    send_json(
        &mut data,
        &json!({"action": "subscribe", "service": "news"}),
    )
    .await;
    let e = next_json(&mut data).await;
    assert_eq!(e["data"]["code"], "unknown_channel");
    assert_eq!(e["data"]["available_services"], json!(["prices"]));

    // Auto-subscribed endpoints, and an alias of one.
    let mut all = connect(addr, "/ws/all").await;
    let mut alias = connect(addr, "/ws/p").await;
    assert_eq!(next_json(&mut all).await["type"], "connection_established");
    assert_eq!(
        next_json(&mut alias).await["type"],
        "connection_established"
    );
    let first = emit_until_seen(addr, &mut all, "news", json!({"headline": "a"})).await;
    assert_eq!(first["service"], "news");
    emit(addr, "prices", json!([{"eth": 3}])).await;
    assert_eq!(next_json(&mut all).await["service"], "prices");
    let p = next_json(&mut alias).await;
    assert_eq!(
        (p["service"].as_str(), &p["data"]),
        (Some("prices"), &json!({"eth": 3}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_actions_are_answered_by_plugin_commands() {
    let dep = crypto_like();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws").await;
    next_json(&mut ws).await;
    // Until the plugin runs, the answer is a `plugin_unavailable` error.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let answer = loop {
        send_json(&mut ws, &json!({"action": "echo", "data": {"q": 42}})).await;
        let r = next_json(&mut ws).await;
        if r["type"] == "result" {
            break r;
        }
        assert_eq!(r["data"]["code"], "plugin_unavailable", "{r}");
        assert!(tokio::time::Instant::now() < deadline, "no answer in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(answer["data"], json!({"op": "echo", "asked": {"q": 42}}));
    send_json(&mut ws, &json!({"action": "broken"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["data"]["code"], "command_failed");
    assert_eq!(e["data"]["message"], "test-faults: planned command failure");
}

/// An iot-telemetry-like deployment: `type`/`channel`, filters at the top
/// level or under `filters`.
fn iot_like(extra_channel: &str) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(
        r#"
protocols:
  iot:
    filters_at: [top_level, filters]
endpoints:
  - path: /ws
    protocol: iot
    channels: all
http:
  - path: /emit/telemetry
    method: POST
    command: {channel: telemetry, request: {op: emit, messages: "{{request.body}}"}}
"#,
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write(
        "specs/telemetry.yaml",
        &bus_spec(
            "telemetry",
            &format!(
                "filters:\n  device_id: {{match: device_id}}\n  severity: {{match: severity}}\n  metrics: {{project: telemetry}}\n  frequency: {{frequency: true, key: device_id}}\n{extra_channel}"
            ),
        ),
    );
    dep
}

/// A connection holds at most `MAX_SUBSCRIPTIONS` subscriptions: with a
/// `subscription_key`, each value is one, and every publish visits each.
/// One more is refused with `too_many_subscriptions`; replacing one is not
/// one more, and ending one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_a_bounded_number_of_subscriptions() {
    use gateway::control::MAX_SUBSCRIPTIONS;
    let dep = Deployment::new();
    dep.gateway_yaml(
        "protocols:\n  iot:\n    subscription_key: device_id\nendpoints:\n  - path: /ws\n    protocol: iot\n    channels: all\n",
    )
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write(
        "specs/telemetry.yaml",
        &bus_spec("telemetry", "filters:\n  device_id: {match: device_id}\n"),
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws").await;
    let sub = |d: usize| json!({"type": "subscribe", "channel": "telemetry", "device_id": d});
    for d in 0..MAX_SUBSCRIPTIONS {
        send_json(&mut ws, &sub(d)).await;
    }
    for _ in 0..MAX_SUBSCRIPTIONS {
        assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    }
    send_json(&mut ws, &sub(MAX_SUBSCRIPTIONS)).await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"], "too_many_subscriptions", "{e}");
    let subscribers = "gateway_subscribers{channel=\"telemetry\",plugin=\"test-faults\"}";
    assert_eq!(
        metric(addr, subscribers).await,
        Some(MAX_SUBSCRIPTIONS as f64)
    );
    subscribe(&mut ws, sub(0)).await;
    send_json(
        &mut ws,
        &json!({"type": "unsubscribe", "channel": "telemetry", "device_id": 1}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "unsubscribed");
    subscribe(&mut ws, sub(MAX_SUBSCRIPTIONS)).await;
    assert_eq!(
        metric(addr, subscribers).await,
        Some(MAX_SUBSCRIPTIONS as f64)
    );
    gw.shutdown().await;
}

async fn subscribe(ws: &mut Ws, msg: Value) {
    send_json(ws, &msg).await;
    let r = next_json(ws).await;
    assert_eq!(r["type"], "subscribed", "{msg} → {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_match_fields_any_of_lists_and_project_keys() {
    let dep = iot_like("");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut one = connect(addr, "/ws").await;
    let mut many = connect(addr, "/ws").await;
    let mut proj = connect(addr, "/ws").await;
    let mut all = connect(addr, "/ws").await;
    subscribe(
        &mut one,
        json!({"type": "subscribe", "channel": "telemetry", "device_id": 2}),
    )
    .await;
    subscribe(&mut many, json!({"type": "subscribe", "channel": "telemetry", "filters": {"severity": ["high", "critical"]}})).await;
    subscribe(&mut proj, json!({"type": "subscribe", "channel": "telemetry", "device_id": 1, "filters": {"metrics": ["cpu"]}})).await;
    subscribe(
        &mut all,
        json!({"type": "subscribe", "channel": "telemetry"}),
    )
    .await;

    let msgs = json!([
        {"device_id": 1, "severity": "low", "telemetry": {"cpu": 1, "temp": 20}},
        {"device_id": 2, "severity": "high", "telemetry": {"cpu": 2, "temp": 21}},
        {"device_id": 3, "severity": "critical", "telemetry": {"cpu": 3, "temp": 22}},
        {"device_id": 2, "severity": "low", "telemetry": {"cpu": 4, "temp": 23}}
    ]);
    let first = emit_until_seen(addr, &mut all, "telemetry", msgs[0].clone()).await;
    assert_eq!(first, msgs[0]);
    emit(addr, "telemetry", json!(msgs.as_array().unwrap()[1..])).await;
    for m in &msgs.as_array().unwrap()[1..] {
        assert_eq!(&next_json(&mut all).await, m);
    }
    assert_eq!(next_json(&mut one).await, msgs[1]);
    assert_eq!(next_json(&mut one).await, msgs[3]);
    assert_eq!(next_json(&mut many).await, msgs[1]);
    assert_eq!(next_json(&mut many).await, msgs[2]);
    assert_eq!(
        next_json(&mut proj).await,
        json!({"device_id": 1, "severity": "low", "telemetry": {"cpu": 1}})
    );
    // Nothing more for the filtered ones: a ping's pong comes next.
    for ws in [&mut one, &mut many, &mut proj] {
        send_json(ws, &json!({"type": "ping", "timestamp": 5})).await;
        let p = next_json(ws).await;
        assert_eq!(p, json!({"type": "pong", "timestamp": 5}));
    }

    // Bad filters are refused with an error reply.
    for (bad, needle) in [
        (
            json!({"type": "subscribe", "channel": "telemetry", "filters": {"colour": "red"}}),
            "has no filter \"colour\"",
        ),
        (
            json!({"type": "subscribe", "channel": "telemetry", "filters": {"frequency": "often"}}),
            "invalid frequency",
        ),
        (
            json!({"type": "subscribe", "channel": "telemetry", "filters": 5}),
            "must be an object",
        ),
    ] {
        send_json(&mut all, &bad).await;
        let e = next_json(&mut all).await;
        assert_eq!(e["error"], "invalid_filter", "{e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_sends_at_most_one_per_period_per_key_latest_wins() {
    let dep = iot_like("");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut slow = connect(addr, "/ws").await;
    let mut all = connect(addr, "/ws").await;
    subscribe(
        &mut slow,
        json!({"type": "subscribe", "channel": "telemetry", "frequency": "3s"}),
    )
    .await;
    subscribe(
        &mut all,
        json!({"type": "subscribe", "channel": "telemetry"}),
    )
    .await;
    let m = |d: i64, n: i64| json!({"device_id": d, "n": n});
    let first = emit_until_seen(addr, &mut all, "telemetry", m(1, 1)).await;
    assert_eq!(first, m(1, 1));
    assert_eq!(next_json(&mut slow).await, m(1, 1));
    emit(addr, "telemetry", json!([m(1, 2), m(1, 3), m(2, 1)])).await;
    for n in [m(1, 2), m(1, 3), m(2, 1)] {
        assert_eq!(next_json(&mut all).await, n);
    }
    // Device 2 is due at once; device 1's latest (n=3, not n=2) comes when
    // its period is over.
    assert_eq!(next_json(&mut slow).await, m(2, 1));
    assert_eq!(next_json(&mut slow).await, m(1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_value_reaches_a_new_subscriber_at_once() {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/seq.json", SEQ_SCHEMA)
        // Polled once at start, then not for an hour: only the retained
        // message can reach a later subscriber within the test's patience.
        .write(
            "specs/slow.yaml",
            "channel: slow\nschema: schemas/seq.json\nlast_value: true\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 1h\nendpoints:\n  - path: /slow\n",
        )
        .write(
            "specs/plain.yaml",
            "channel: plain\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 1h\nendpoints:\n  - path: /plain\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    eventually("the first poll", || async {
        metric(
            addr,
            "gateway_messages_published_total{channel=\"slow\",plugin=\"test-faults\"}",
        )
        .await
        .filter(|n| *n >= 1.0)
    })
    .await;
    eventually("the first poll", || async {
        metric(
            addr,
            "gateway_messages_published_total{channel=\"plain\",plugin=\"test-faults\"}",
        )
        .await
        .filter(|n| *n >= 1.0)
    })
    .await;
    let mut a = connect(addr, "/slow").await;
    let mut b = connect(addr, "/slow").await;
    assert_eq!(next_json(&mut a).await, json!({"seq": 1}));
    assert_eq!(next_json(&mut b).await, json!({"seq": 1}));
    let mut plain = connect(addr, "/plain").await;
    assert_quiet(&mut plain, Duration::from_millis(300)).await;
}
