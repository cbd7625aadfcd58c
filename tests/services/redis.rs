//! `redis-source` against real Redis: pub/sub channels and patterns, keyed
//! routing, streams resuming from a checkpoint across gateway restarts, and a
//! Redis restart under a running gateway.

use std::time::{Duration, Instant};

use redis::Commands;
use serde_json::json;

use crate::common::*;
use crate::support::*;

fn client(addr: &str) -> redis::Connection {
    redis::Client::open(format!("redis://{addr}"))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("Redis at {addr}: {e}"))
}

fn publish(con: &mut redis::Connection, channel: &str, payload: &str) -> i64 {
    con.publish(channel, payload)
        .unwrap_or_else(|e| panic!("PUBLISH {channel}: {e}"))
}

fn deployment(specs: &[(&str, String)]) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/object.json", OBJECT_SCHEMA);
    for (name, text) in specs {
        dep.write(&format!("specs/{name}.yaml"), text);
    }
    dep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_channels_and_patterns_reach_clients_and_non_json_is_dropped() {
    require("Redis", REDIS).await;
    let u = unique("gwt");
    let chan = format!("{u}:orders");
    let pattern = format!("{u}:sensor:*");
    let config = json!({
        "url": format!("redis://{REDIS}"),
        "channels": [chan],
        "patterns": [pattern],
        "channel_field": "channel",
    });
    let dep = deployment(&[("r", spec("r", "redis-source", &config, "/r"))]);
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/r").await;
    let mut con = client(REDIS);
    warm_up(&mut ws, |n| {
        publish(&mut con, &chan, &json!({ "warmup": n }).to_string());
        async {}
    })
    .await;

    assert_eq!(publish(&mut con, &chan, "not json"), 1);
    publish(&mut con, &chan, r#"{"n":1}"#);
    assert_eq!(next_data(&mut ws).await, json!({"n": 1, "channel": chan}));
    let sensor = format!("{u}:sensor:t1");
    publish(&mut con, &sensor, r#"{"n":2}"#);
    assert_eq!(next_data(&mut ws).await, json!({"n": 2, "channel": sensor}));
    // Not matched by the pattern: nothing arrives.
    publish(&mut con, &format!("{u}:other"), r#"{"n":3}"#);
    publish(&mut con, &chan, r#"{"n":4}"#);
    assert_eq!(next_data(&mut ws).await["n"], 4);
    // The plugin dropped the non-JSON payload itself: the gateway never saw it.
    let invalid = metric(
        addr,
        "gateway_invalid_json_total{channel=\"r\",plugin=\"redis-source\"}",
    )
    .await
    .unwrap_or(0.0);
    assert_eq!(invalid, 0.0);
    shutdown_promptly(gw, [ws]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keyed_channel_routes_each_message_to_the_key_in_its_channel_name() {
    require("Redis", REDIS).await;
    let u = unique("gwt");
    let config = json!({
        "url": format!("redis://{REDIS}"),
        "patterns": [format!("{u}:*:events")],
        "key": {"segment": 2},
    });
    let dep = deployment(&[(
        "rooms",
        spec("rooms", "redis-source", &config, "/rooms/{room}"),
    )]);
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut a = connect(addr, "/rooms/a").await;
    let mut b = connect(addr, "/rooms/b").await;
    let mut con = client(REDIS);
    for (ws, room) in [(&mut a, "a"), (&mut b, "b")] {
        let chan = format!("{u}:{room}:events");
        warm_up(ws, |n| {
            publish(&mut con, &chan, &json!({ "warmup": n }).to_string());
            async {}
        })
        .await;
    }
    // b's message goes first: if it were misrouted, `a` would read it first.
    publish(&mut con, &format!("{u}:b:events"), r#"{"room":"b","n":1}"#);
    publish(&mut con, &format!("{u}:a:events"), r#"{"room":"a","n":1}"#);
    publish(&mut con, &format!("{u}:c:events"), r#"{"room":"c","n":1}"#);
    publish(&mut con, &format!("{u}:b:events"), r#"{"room":"b","n":2}"#);
    assert_eq!(next_data(&mut a).await, json!({"room": "a", "n": 1}));
    assert_eq!(next_data(&mut b).await, json!({"room": "b", "n": 1}));
    assert_eq!(next_data(&mut b).await, json!({"room": "b", "n": 2}));
    shutdown_promptly(gw, [a, b]).await;
}

fn xadd(con: &mut redis::Connection, stream: &str, n: u64) -> String {
    con.xadd(stream, "*", &[("json", json!({ "n": n }).to_string())])
        .unwrap_or_else(|e| panic!("XADD {stream}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_resumes_after_the_stored_id_across_gateway_restarts() {
    require("Redis", REDIS).await;
    let u = unique("gwt");
    let stream = format!("{u}:stream");
    let checkpoint = format!("{u}:offsets");
    let mut con = client(REDIS);
    let ids: Vec<String> = (1..=4).map(|n| xadd(&mut con, &stream, n)).collect();
    // A previous run got as far as entry 2.
    let _: () = con.hset(&checkpoint, &stream, &ids[1]).unwrap();

    let gate = Gate::new(REDIS).await;
    let config = json!({
        "url": format!("redis://{}", gate.addr),
        "streams": {"keys": [stream], "checkpoint": checkpoint, "field": "json", "id_field": "id"},
        "reconnect": {"initial_ms": 20, "max_ms": 200},
    });
    let dep = deployment(&[("s", spec("s", "redis-source", &config, "/s"))]);
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/s").await;
    wait_subscribed(gw.addr("main").unwrap(), "s", "redis-source", 1).await;
    gate.open();
    assert_eq!(next_json(&mut ws).await, json!({"n": 3, "id": ids[2]}));
    assert_eq!(next_json(&mut ws).await, json!({"n": 4, "id": ids[3]}));
    let id5 = xadd(&mut con, &stream, 5);
    assert_eq!(next_json(&mut ws).await, json!({"n": 5, "id": id5}));
    // The checkpoint is written right after each delivery.
    eventually("the checkpoint at the last delivered id", || {
        let stored: Option<String> = con.hget(&checkpoint, &stream).unwrap();
        std::future::ready((stored.as_deref() == Some(id5.as_str())).then_some(()))
    })
    .await;
    shutdown_promptly(gw, [ws]).await;
    gate.close();

    // Entries added while no gateway runs are delivered by the next one.
    let id6 = xadd(&mut con, &stream, 6);
    let id7 = xadd(&mut con, &stream, 7);
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/s").await;
    wait_subscribed(gw.addr("main").unwrap(), "s", "redis-source", 1).await;
    gate.open();
    assert_eq!(next_json(&mut ws).await, json!({"n": 6, "id": id6}));
    assert_eq!(next_json(&mut ws).await, json!({"n": 7, "id": id7}));
    shutdown_promptly(gw, [ws]).await;
    let _: () = con.del(&[&stream, &checkpoint]).unwrap();
}

/// `start: $` with a checkpoint: where `$` was is stored at once, so an
/// instance stopped before the first new entry does not skip, next time,
/// what was added in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_started_at_new_entries_keeps_its_place_before_the_first_one() {
    require("Redis", REDIS).await;
    let u = unique("gwt");
    let stream = format!("{u}:stream");
    let checkpoint = format!("{u}:offsets");
    let mut con = client(REDIS);
    let old = xadd(&mut con, &stream, 1);

    let gate = Gate::new(REDIS).await;
    gate.open();
    let config = json!({
        "url": format!("redis://{}", gate.addr),
        "streams": {"keys": [stream], "checkpoint": checkpoint, "field": "json"},
        "reconnect": {"initial_ms": 20, "max_ms": 200},
    });
    let dep = deployment(&[("s", spec("s", "redis-source", &config, "/s"))]);
    let gw = dep.start().await;
    eventually("the checkpoint at the stream's last entry", || {
        let stored: Option<String> = con.hget(&checkpoint, &stream).unwrap();
        std::future::ready((stored.as_deref() == Some(old.as_str())).then_some(()))
    })
    .await;
    shutdown_promptly(gw, []).await;
    gate.wait_idle().await;
    gate.close();

    // Added while no gateway runs, before any entry was delivered.
    xadd(&mut con, &stream, 2);
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/s").await;
    wait_subscribed(gw.addr("main").unwrap(), "s", "redis-source", 1).await;
    gate.open();
    assert_eq!(next_json(&mut ws).await, json!({"n": 2}));
    shutdown_promptly(gw, [ws]).await;
    let _: () = con.del(&[&stream, &checkpoint]).unwrap();
}

/// A read that fails every time (here the key is not a stream) is retried
/// with a growing delay, not at the first delay over and over: the
/// connection counts as made only once a read worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_read_errors_are_retried_with_a_growing_delay() {
    require("Redis", REDIS).await;
    capture_logs();
    let key = format!("{}:not-a-stream", unique("gwt"));
    let mut con = client(REDIS);
    let _: () = con.set(&key, "x").unwrap();
    let config = json!({
        "url": format!("redis://{REDIS}"),
        "streams": {"keys": [key], "start": "0"},
        "reconnect": {"initial_ms": 20, "max_ms": 5000},
    });
    let dep = deployment(&[("s", spec("s", "redis-source", &config, "/s"))]);
    let gw = dep.start().await;
    let line = wait_for_log(&["WRONGTYPE", "retry 4 in"]).await;
    assert!(line.contains("redis-source: cannot connect to"), "{line}");
    shutdown_promptly(gw, []).await;
    let _: () = con.del(&key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_without_field_sends_all_fields_and_starts_at_new_entries() {
    require("Redis", REDIS).await;
    let u = unique("gwt");
    let stream = format!("{u}:stream");
    let mut con = client(REDIS);
    let _: String = con.xadd(&stream, "*", &[("old", "1")]).unwrap();
    let config = json!({
        "url": format!("redis://{REDIS}"),
        "streams": {"keys": [stream]},
        "channel_field": "stream",
    });
    let dep = deployment(&[("s", spec("s", "redis-source", &config, "/s"))]);
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/s").await;
    // `start: $` skips the old entry; keep adding until the plugin reads.
    warm_up(&mut ws, |n| {
        let _: String = con
            .xadd(&stream, "*", &[("warmup", n.to_string())])
            .unwrap();
        async {}
    })
    .await;
    let _: String = con.xadd(&stream, "*", &[("a", "x"), ("b", "2")]).unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        json!({"a": "x", "b": "2", "stream": stream})
    );
    shutdown_promptly(gw, [ws]).await;
    let _: () = con.del(&stream).unwrap();
}

/// Redis goes away under a running gateway and comes back: the plugin
/// reconnects and subscribes again by itself. Pub/sub keeps nothing for an
/// absent subscriber, so what is published before the plugin is back is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_pubsub_flows_again_without_restarting_the_gateway() {
    capture_logs();
    let mut server = PrivateServer::redis().await;
    let raddr = server.addr.to_string();
    let u = unique("gwt");
    let chan = format!("{u}:live");
    let config = json!({
        "url": format!("redis://{raddr}"),
        "channels": [chan],
        "reconnect": {"initial_ms": 50, "max_ms": 500},
    });
    let dep = deployment(&[("live", spec("live", "redis-source", &config, "/live"))]);
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/live").await;
    let mut con = client(&raddr);
    warm_up(&mut ws, |n| {
        publish(&mut con, &chan, &json!({ "warmup": n }).to_string());
        async {}
    })
    .await;
    publish(&mut con, &chan, r#"{"n":1}"#);
    assert_eq!(next_data(&mut ws).await, json!({"n": 1}));

    server.stop().await;
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.start().await;
    let up = Instant::now();
    let mut con = client(&raddr);
    // PUBLISH answers the number of subscribers: 0 until the plugin is back.
    let mut lost = 0;
    loop {
        if publish(&mut con, &chan, r#"{"lost":true}"#) > 0 {
            break;
        }
        lost += 1;
        assert!(up.elapsed() < PATIENCE, "the plugin never subscribed again");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "redis restart: outage {:?}, plugin subscribed again {:?} after Redis was back; {lost} messages published meanwhile were lost",
        up - down,
        up.elapsed()
    );
    // The loss and the recovery went to the gateway's log through the host.
    let lost = wait_for_log(&["WARN", "redis-source: connection to", &raddr, "lost"]).await;
    assert!(lost.contains("channel=\"live\""), "{lost}");
    let back = wait_for_log(&["INFO", "redis-source: reconnected to", &raddr]).await;
    eprintln!("redis restart logs:\n  {lost}\n  {back}");
    publish(&mut con, &chan, r#"{"n":2}"#);
    // The gateway was not restarted: same client, same connection.
    let mut got = next_data(&mut ws).await;
    if got.get("lost").is_some() {
        got = next_data(&mut ws).await;
    }
    assert_eq!(got, json!({"n": 2}));
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_restarts_total{channel=\"live\",plugin=\"redis-source\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0,
        "the plugin reconnected by itself, without an instance restart"
    );
    shutdown_promptly(gw, [ws]).await;
}

/// The path to Redis goes silent (nothing forwarded, nothing closed) under a
/// pub/sub subscription: after `health_check_secs` without a message the
/// plugin sends PING, gets no answer within 5 s, reconnects once the path is
/// back and subscribes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_a_silent_connection_is_noticed_and_replaced() {
    require("Redis", REDIS).await;
    capture_logs();
    let gate = Gate::new(REDIS).await;
    gate.open();
    let chan = format!("{}:silent", unique("gwt"));
    let config = json!({
        "url": format!("redis://{}", gate.addr),
        "channels": [chan],
        "health_check_secs": 1,
        "reconnect": {"initial_ms": 50, "max_ms": 500},
    });
    let dep = deployment(&[("p", spec("p", "redis-source", &config, "/p"))]);
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/p").await;
    let mut con = client(REDIS);
    warm_up(&mut ws, |n| {
        publish(&mut con, &chan, &json!({ "warmup": n }).to_string());
        async {}
    })
    .await;

    gate.freeze();
    let frozen = Instant::now();
    let at = gate.addr.to_string();
    let lost = wait_for_log(&["WARN", "redis-source: connection to", &at, "lost"]).await;
    assert!(lost.contains("health check (PING) failed"), "{lost}");
    eprintln!("redis silent: noticed after {:?}", frozen.elapsed());
    gate.open();
    wait_for_log(&["INFO", "redis-source: reconnected to", &at]).await;
    warm_up(&mut ws, |n| {
        publish(&mut con, &chan, &json!({ "warmup": n }).to_string());
        async {}
    })
    .await;
    publish(&mut con, &chan, r#"{"n":1}"#);
    assert_eq!(next_data(&mut ws).await, json!({"n": 1}));
    shutdown_promptly(gw, [ws]).await;
}

/// An entry whose field name is not UTF-8 does not stick the stream: it is
/// read like any other (here it lacks the configured field, so it is skipped
/// and logged) and the next entry is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_an_entry_with_a_non_utf8_field_name_does_not_stop_the_stream() {
    require("Redis", REDIS).await;
    capture_logs();
    let stream = format!("{}:odd", unique("gwt"));
    let mut con = client(REDIS);
    let odd: String = con
        .xadd(&stream, "*", &[(b"\xff\xfe".as_slice(), b"x".as_slice())])
        .unwrap();
    let id2 = xadd(&mut con, &stream, 2);
    let config = json!({
        "url": format!("redis://{REDIS}"),
        "streams": {"keys": [stream], "start": "0", "field": "json", "id_field": "id"},
    });
    let dep = deployment(&[("s", spec("s", "redis-source", &config, "/s"))]);
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/s").await;
    // The handshake completes a little before the subscription is made: an
    // entry added in between would go to nobody.
    wait_subscribed(gw.addr("main").unwrap(), "s", "redis-source", 1).await;
    // Added after the client is on: the first two may have gone to nobody.
    let id3 = xadd(&mut con, &stream, 3);
    let mut got = next_json(&mut ws).await;
    if got["n"] == 2 {
        assert_eq!(got, json!({"n": 2, "id": id2}));
        got = next_json(&mut ws).await;
    }
    assert_eq!(got, json!({"n": 3, "id": id3}));
    wait_for_log(&["redis-source: stream", &format!("entry {odd}"), "skipped"]).await;
    shutdown_promptly(gw, [ws]).await;
    let _: () = con.del(&stream).unwrap();
}
