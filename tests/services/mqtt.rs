//! `mqtt-source` against real Mosquitto: wildcard filters, topic injection,
//! wrapping non-JSON payloads, keyed routing by topic segment, a persistent
//! session (QoS 1) delivering what was published while the gateway was down
//! and nothing twice after a stop mid-stream, and a broker restart under a
//! running gateway.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::support::*;

/// A test-side MQTT client whose event loop runs on a task.
struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn new(addr: &str) -> Publisher {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let opts = MqttOptions::new(unique("pub"), host, port.parse().expect("port"));
        let (client, mut events) = AsyncClient::new(opts, 1000);
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            task,
        }
    }

    async fn send(&self, topic: &str, payload: &str, qos: QoS) {
        self.client
            .publish(topic, qos, false, payload.as_bytes().to_vec())
            .await
            .unwrap_or_else(|e| panic!("MQTT publish to {topic}: {e}"));
    }

    /// Publish warm-up messages to `topic` until one reaches `ws` (the
    /// plugin is subscribed).
    async fn warm_up(&self, ws: &mut Ws, topic: &str, qos: QoS) {
        warm_up(ws, |n| async move {
            self.send(topic, &json!({ "warmup": n }).to_string(), qos)
                .await
        })
        .await;
    }

    /// Wait until the broker acknowledged `n` QoS 1 messages in all.
    async fn wait_acked(&self, n: usize) {
        eventually("the broker's PUBACKs", || async {
            (self.acked.load(Ordering::SeqCst) >= n).then_some(())
        })
        .await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn deployment(name: &str, config: &serde_json::Value, path: &str) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/object.json", OBJECT_SCHEMA)
        .write(
            &format!("specs/{name}.yaml"),
            &spec(name, "mqtt-source", config, path),
        );
    dep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_wildcard_filters_inject_the_topic_and_wrap_non_json() {
    require("Mosquitto (MQTT)", MQTT).await;
    let u = unique("gwt");
    let config = json!({
        "url": format!("mqtt://{MQTT}"),
        "topics": [format!("{u}/sensors/+/temp"), format!("{u}/alerts/#")],
        "topic_field": "topic",
        "non_json": "wrap",
    });
    let dep = deployment("m", &config, "/m");
    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/m").await;
    let publisher = Publisher::new(MQTT);
    let warm = format!("{u}/sensors/warm/temp");
    publisher.warm_up(&mut ws, &warm, QoS::AtMostOnce).await;

    let t1 = format!("{u}/sensors/r1/temp");
    publisher.send(&t1, r#"{"c":21.5}"#, QoS::AtMostOnce).await;
    assert_eq!(next_data(&mut ws).await, json!({"c": 21.5, "topic": t1}));
    // `+` matches one level only: not delivered.
    publisher
        .send(
            &format!("{u}/sensors/r1/x/temp"),
            r#"{"c":1}"#,
            QoS::AtMostOnce,
        )
        .await;
    // `#` matches any depth; a non-JSON payload is wrapped.
    let t2 = format!("{u}/alerts/fire/floor2");
    publisher.send(&t2, "smoke detected", QoS::AtMostOnce).await;
    assert_eq!(
        next_data(&mut ws).await,
        json!({"topic": t2, "payload": "smoke detected"})
    );
    shutdown_promptly(gw, [ws]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_keyed_channel_routes_by_topic_segment() {
    require("Mosquitto (MQTT)", MQTT).await;
    let u = unique("gwt");
    let config = json!({
        "url": format!("mqtt://{MQTT}"),
        "topics": [format!("{u}/rooms/+/events")],
        "key": {"segment": 3},
    });
    let dep = deployment("rooms", &config, "/rooms/{room}");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut a = connect(addr, "/rooms/a").await;
    let mut b = connect(addr, "/rooms/b").await;
    let publisher = Publisher::new(MQTT);
    for (ws, room) in [(&mut a, "a"), (&mut b, "b")] {
        let topic = format!("{u}/rooms/{room}/events");
        warm_up(ws, |n| {
            let (p, t) = (&publisher, &topic);
            async move {
                p.send(t, &json!({ "warmup": n }).to_string(), QoS::AtMostOnce)
                    .await
            }
        })
        .await;
    }
    // QoS 1 keeps the order across topics of one publisher.
    for (room, n) in [("b", 1), ("a", 1), ("c", 1), ("b", 2)] {
        publisher
            .send(
                &format!("{u}/rooms/{room}/events"),
                &json!({"room": room, "n": n}).to_string(),
                QoS::AtLeastOnce,
            )
            .await;
    }
    assert_eq!(next_data(&mut a).await, json!({"room": "a", "n": 1}));
    assert_eq!(next_data(&mut b).await, json!({"room": "b", "n": 1}));
    assert_eq!(next_data(&mut b).await, json!({"room": "b", "n": 2}));
    shutdown_promptly(gw, [a, b]).await;
}

/// A gateway whose channel `name` (at `/name`) follows topic `<unique>/name`
/// with a persistent session (QoS 1, a fixed client id) through an open
/// gate, a client on it and a publisher, warmed up.
struct Persistent {
    topic: String,
    gate: Gate,
    dep: Deployment,
    gw: gateway::Gateway,
    ws: Ws,
    publisher: Publisher,
}

impl Persistent {
    async fn start(name: &str) -> Persistent {
        let topic = format!("{}/{name}", unique("gwt"));
        let gate = Gate::new(MQTT).await;
        gate.open();
        let config = json!({
            "url": format!("mqtt://{}", gate.addr),
            "topics": [topic],
            "qos": 1,
            "client_id": unique("gw"),
            "clean_session": false,
            "reconnect": {"initial_ms": 20, "max_ms": 200},
        });
        let dep = deployment(name, &config, &format!("/{name}"));
        let gw = dep.start().await;
        let mut ws = connect(gw.addr("main").unwrap(), &format!("/{name}")).await;
        let publisher = Publisher::new(MQTT);
        publisher.warm_up(&mut ws, &topic, QoS::AtLeastOnce).await;
        Persistent {
            topic,
            gate,
            dep,
            gw,
            ws,
            publisher,
        }
    }
}

/// `clean_session: false` with a fixed client id and QoS 1: the broker keeps
/// the subscription and queues messages while the gateway is down; the next
/// gateway gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_persistent_session_delivers_what_was_published_while_the_gateway_was_down() {
    require("Mosquitto (MQTT)", MQTT).await;
    let Persistent {
        topic,
        gate,
        dep,
        gw,
        mut ws,
        publisher,
    } = Persistent::start("orders").await;
    publisher.send(&topic, r#"{"n":1}"#, QoS::AtLeastOnce).await;
    assert_eq!(next_data(&mut ws).await, json!({"n": 1}));
    shutdown_promptly(gw, [ws]).await;
    // Let the plugin's last bytes (its PUBACKs) through before cutting.
    gate.wait_idle().await;
    gate.close();

    let before = publisher.acked.load(Ordering::SeqCst);
    publisher.send(&topic, r#"{"n":2}"#, QoS::AtLeastOnce).await;
    publisher.send(&topic, r#"{"n":3}"#, QoS::AtLeastOnce).await;
    publisher.wait_acked(before + 2).await;

    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/orders").await;
    wait_subscribed(gw.addr("main").unwrap(), "orders", "mqtt-source", 1).await;
    gate.open();
    assert_eq!(next_data(&mut ws).await, json!({"n": 2}));
    assert_eq!(next_data(&mut ws).await, json!({"n": 3}));
    shutdown_promptly(gw, [ws]).await;
}

/// A gateway stopped while QoS 1 messages stream in acknowledges, before it
/// leaves, every message it handed on, and its client gets them: the next
/// gateway on the same persistent session gets the rest, none of what the
/// first one's client received, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_a_gateway_stopped_mid_stream_acknowledges_what_it_delivered() {
    require("Mosquitto (MQTT)", MQTT).await;
    capture_logs();
    let Persistent {
        topic,
        gate,
        dep,
        gw,
        mut ws,
        publisher,
    } = Persistent::start("stream").await;
    let acked_before = publisher.acked.load(Ordering::SeqCst);

    // A stream paced to still be flowing when the gateway stops (at 2 a
    // millisecond at most, 400 ms after message 200), and short enough that
    // what is left fits the broker's queue for an offline session (1000).
    const TOTAL: u64 = 1000;
    let stream = {
        let (client, topic) = (publisher.client.clone(), topic.clone());
        tokio::spawn(async move {
            for n in 0..TOTAL {
                let body = json!({ "n": n }).to_string();
                client
                    .publish(&topic, QoS::AtLeastOnce, false, body.into_bytes())
                    .await
                    .expect("publish");
                if n % 2 == 1 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let number = |v: &serde_json::Value| v.get("n").and_then(|n| n.as_u64());
    let mut first = Vec::new();
    while first.last().is_none_or(|&n| n < 200) {
        if let Some(n) = number(&next_data(&mut ws).await) {
            first.push(n);
        }
    }
    // Stop mid-stream while the client goes on reading to its Close, so it
    // holds everything the gateway wrote to it.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(PATIENCE, ws.next()).await {
            if let Message::Text(t) = msg {
                let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
                got.extend(number(&v));
            }
        }
        got
    });
    assert!(gw.shutdown().await, "gateway shutdown hit its deadline");
    first.extend(reader.await.expect("reader"));
    // The acks and the DISCONNECT went out, not waited out.
    assert!(
        !logged(&[
            "mqtt-source: pending acknowledgements not sent to",
            &gate.addr.to_string()
        ]),
        "the stop waited out its bound"
    );
    gate.wait_idle().await;
    gate.close();
    stream.await.expect("the stream's publisher");
    publisher.wait_acked(acked_before + TOTAL as usize).await;
    let last_first = *first.last().expect("the first gateway delivered");
    assert!(
        last_first < TOTAL - 1,
        "the stream ended before the gateway stopped (last {last_first}); nothing was tested"
    );

    let gw = dep.start().await;
    let mut ws = connect(gw.addr("main").unwrap(), "/stream").await;
    wait_subscribed(gw.addr("main").unwrap(), "stream", "mqtt-source", 1).await;
    gate.open();
    let mut second = Vec::new();
    while second.last() != Some(&(TOTAL - 1)) {
        if let Some(n) = number(&next_data(&mut ws).await) {
            second.push(n);
        }
    }
    let again: Vec<u64> = second
        .iter()
        .copied()
        .filter(|n| first.contains(n))
        .collect();
    eprintln!(
        "mqtt mid-stream stop: first gateway's client got {} (last {last_first}), the second's {} from {}",
        first.len(),
        second.len(),
        second[0]
    );
    assert!(
        again.is_empty(),
        "the second gateway delivered again what the first one's client had: {again:?}"
    );
    let mut once = second.clone();
    once.sort_unstable();
    once.dedup();
    assert_eq!(
        once.len(),
        second.len(),
        "the second gateway repeated a message"
    );
    // Nothing lost either: the first gateway stopped its source before it
    // closed its client, so what it took in (and acknowledged) reached the
    // client; the rest came to the second.
    assert_eq!(
        first.len() + second.len(),
        TOTAL as usize,
        "lost between the gateways: first up to {last_first}, second from {}",
        second[0]
    );
    shutdown_promptly(gw, [ws]).await;
}

/// The broker goes away under a running gateway and comes back: the plugin
/// reconnects and subscribes again by itself. QoS 0 messages published before
/// it is back are lost (this broker keeps no sessions across its restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_broker_restart_messages_flow_again_without_restarting_the_gateway() {
    capture_logs();
    let mut server = PrivateServer::mosquitto().await;
    let baddr = server.addr.to_string();
    let u = unique("gwt");
    let topic = format!("{u}/live");
    let config = json!({
        "url": format!("mqtt://{baddr}"),
        "topics": [topic],
        "reconnect": {"initial_ms": 50, "max_ms": 500},
    });
    let dep = deployment("live", &config, "/live");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/live").await;
    let publisher = Publisher::new(&baddr);
    publisher.warm_up(&mut ws, &topic, QoS::AtMostOnce).await;
    publisher.send(&topic, r#"{"n":1}"#, QoS::AtMostOnce).await;
    assert_eq!(next_data(&mut ws).await, json!({"n": 1}));
    drop(publisher);

    server.stop().await;
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.start().await;
    let up = Instant::now();
    // A fresh publisher: warm-ups sent before the plugin has subscribed again
    // are lost; the first one that arrives shows it is back.
    let publisher = Publisher::new(&baddr);
    publisher.warm_up(&mut ws, &topic, QoS::AtMostOnce).await;
    eprintln!(
        "mqtt restart: outage {:?}; messages flowed again {:?} after the broker was back",
        up - down,
        up.elapsed()
    );
    publisher.send(&topic, r#"{"n":2}"#, QoS::AtMostOnce).await;
    assert_eq!(next_data(&mut ws).await, json!({"n": 2}));
    // The loss and the recovery went to the gateway's log through the host.
    let lost = wait_for_log(&["WARN", "mqtt-source: connection to", &baddr, "lost"]).await;
    assert!(lost.contains("channel=\"live\""), "{lost}");
    wait_for_log(&["INFO", "mqtt-source: reconnected to", &baddr]).await;
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_restarts_total{channel=\"live\",plugin=\"mqtt-source\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0,
        "the plugin reconnected by itself, without an instance restart"
    );
    shutdown_promptly(gw, [ws]).await;
}
