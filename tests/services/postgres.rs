//! `postgres-source` against real PostgreSQL: NOTIFY payloads reach clients,
//! non-JSON is dropped, keyed routing by a payload field, and a connection cut
//! (through a gate) under a running gateway.

use std::time::Instant;

use serde_json::json;

use crate::common::*;
use crate::support::*;

/// A test-side connection sending NOTIFY. The sync client lives on its own
/// thread (it must not be used, or dropped, inside the async runtime).
struct Notifier(std::sync::mpsc::Sender<(String, String, tokio::sync::oneshot::Sender<()>)>);

impl Notifier {
    async fn new() -> Notifier {
        let (tx, rx) =
            std::sync::mpsc::channel::<(String, String, tokio::sync::oneshot::Sender<()>)>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(
                "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5",
                postgres::NoTls,
            )
            .unwrap_or_else(|e| panic!("PostgreSQL at {POSTGRES} (user postgres, db test): {e}"));
            let _ = ready_tx.send(());
            for (channel, payload, done) in rx {
                client
                    .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                    .unwrap_or_else(|e| panic!("NOTIFY {channel}: {e}"));
                let _ = done.send(());
            }
        });
        ready_rx
            .await
            .expect("the NOTIFY connection failed (see the panic above)");
        Notifier(tx)
    }

    async fn notify(&self, channel: &str, payload: &str) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.0
            .send((channel.to_owned(), payload.to_owned(), done))
            .expect("NOTIFY thread gone");
        wait.await.expect("NOTIFY failed (see the panic above)");
    }
}

/// A gateway whose channel `name` (at `/name`) LISTENs on `<unique>_name`
/// through an open gate, with `extra` config keys; a client on it and a
/// NOTIFY connection, warmed up.
struct Gated {
    gate: Gate,
    chan: String,
    gw: gateway::Gateway,
    addr: std::net::SocketAddr,
    ws: Ws,
    pg: Notifier,
}

impl Gated {
    async fn start(name: &str, extra: serde_json::Value) -> Gated {
        let gate = Gate::new(POSTGRES).await;
        gate.open();
        let chan = format!("{}_{name}", unique("gwt"));
        let mut config = json!({
            "connection": format!("host=127.0.0.1 port={} user=postgres dbname=test", gate.addr.port()),
            "channels": [chan],
            "reconnect": {"initial_ms": 50, "max_ms": 500},
        });
        for (k, v) in extra.as_object().expect("an object") {
            config[k] = v.clone();
        }
        let dep = deployment(name, &config, &format!("/{name}"));
        let gw = dep.start().await;
        let addr = gw.addr("main").unwrap();
        let mut ws = connect(addr, &format!("/{name}")).await;
        let pg = Notifier::new().await;
        warm_up(&mut ws, |n| {
            let (pg, c) = (&pg, &chan);
            async move { pg.notify(c, &json!({ "warmup": n }).to_string()).await }
        })
        .await;
        Gated {
            gate,
            chan,
            gw,
            addr,
            ws,
            pg,
        }
    }
}

fn deployment(name: &str, config: &serde_json::Value, path: &str) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/object.json", OBJECT_SCHEMA)
        .write(
            &format!("specs/{name}.yaml"),
            &spec(name, "postgres-source", config, path),
        );
    dep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_payloads_reach_clients_and_non_json_is_dropped() {
    require("PostgreSQL", POSTGRES).await;
    let u = unique("gwt");
    let (orders, refunds) = (format!("{u}_orders"), format!("{u}_Refunds"));
    let config = json!({
        "connection": "host=127.0.0.1 port=5432 user=postgres dbname=test",
        "channels": [orders, refunds],
        "channel_field": "channel",
    });
    let dep = deployment("pg", &config, "/pg");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/pg").await;
    let pg = Notifier::new().await;
    warm_up(&mut ws, |n| {
        let (pg, c) = (&pg, &orders);
        async move { pg.notify(c, &json!({ "warmup": n }).to_string()).await }
    })
    .await;
    pg.notify(&orders, "not json").await;
    pg.notify(&orders, r#"{"id":1}"#).await;
    assert_eq!(
        next_data(&mut ws).await,
        json!({"id": 1, "channel": orders})
    );
    // A mixed-case channel name works (the plugin quotes it).
    pg.notify(&refunds, r#"{"id":2}"#).await;
    assert_eq!(
        next_data(&mut ws).await,
        json!({"id": 2, "channel": refunds})
    );
    let invalid = metric(
        addr,
        "gateway_invalid_json_total{channel=\"pg\",plugin=\"postgres-source\"}",
    )
    .await
    .unwrap_or(0.0);
    assert_eq!(
        invalid, 0.0,
        "the plugin dropped the non-JSON payload itself"
    );
    shutdown_promptly(gw, [ws]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keyed_channel_routes_by_a_payload_field() {
    require("PostgreSQL", POSTGRES).await;
    let u = unique("gwt");
    let chan = format!("{u}_jobs");
    let config = json!({
        "connection": "host=127.0.0.1 user=postgres dbname=test",
        "channels": [chan],
        "key": {"field": "job"},
    });
    let dep = deployment("jobs", &config, "/jobs/{job}");
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut j1 = connect(addr, "/jobs/1").await;
    let mut j2 = connect(addr, "/jobs/2").await;
    let pg = Notifier::new().await;
    for (ws, job) in [(&mut j1, 1), (&mut j2, 2)] {
        warm_up(ws, |n| {
            let (pg, c) = (&pg, &chan);
            async move {
                pg.notify(c, &json!({ "warmup": n, "job": job }).to_string())
                    .await
            }
        })
        .await;
    }
    pg.notify(&chan, r#"{"job":2,"state":"queued"}"#).await;
    pg.notify(&chan, r#"{"job":1,"state":"running"}"#).await;
    pg.notify(&chan, r#"{"state":"no job field"}"#).await;
    pg.notify(&chan, r#"{"job":2,"state":"done"}"#).await;
    assert_eq!(
        next_data(&mut j1).await,
        json!({"job": 1, "state": "running"})
    );
    assert_eq!(
        next_data(&mut j2).await,
        json!({"job": 2, "state": "queued"})
    );
    assert_eq!(next_data(&mut j2).await, json!({"job": 2, "state": "done"}));
    shutdown_promptly(gw, [j1, j2]).await;
}

/// The connection to PostgreSQL is cut under a running gateway (a gate in
/// between closes it; the shared server keeps running): the plugin notices,
/// reconnects with backoff once the path is back, LISTENs again, and
/// notifications flow without restarting the gateway or the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_cut_listening_resumes_without_restarting_the_gateway() {
    require("PostgreSQL", POSTGRES).await;
    capture_logs();
    let Gated {
        gate,
        chan,
        gw,
        addr,
        mut ws,
        pg,
    } = Gated::start("live", json!({})).await;
    pg.notify(&chan, r#"{"n":1}"#).await;
    assert_eq!(next_data(&mut ws).await, json!({"n": 1}));

    gate.close();
    let port = format!(":{} ", gate.addr.port());
    // Once the plugin has seen the cut, a NOTIFY has no listener left to
    // reach: PostgreSQL queues nothing for it.
    wait_for_log(&["WARN", "postgres-source: connection to", &port, "lost"]).await;
    pg.notify(&chan, r#"{"lost":true}"#).await;
    gate.open();
    let up = Instant::now();
    warm_up(&mut ws, |n| {
        let (pg, c) = (&pg, &chan);
        async move { pg.notify(c, &json!({ "warmup": n }).to_string()).await }
    })
    .await;
    eprintln!(
        "postgres cut: listening again {:?} after the path was back",
        up.elapsed()
    );
    pg.notify(&chan, r#"{"n":2}"#).await;
    let mut got = next_data(&mut ws).await;
    if got.get("lost").is_some() {
        eprintln!("postgres cut: the NOTIFY sent during the cut was delivered after all");
        got = next_data(&mut ws).await;
    }
    assert_eq!(got, json!({"n": 2}));
    wait_for_log(&["INFO", "postgres-source: reconnected to", &port]).await;
    assert_eq!(
        metric(
            addr,
            "gateway_plugin_restarts_total{channel=\"live\",plugin=\"postgres-source\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
    shutdown_promptly(gw, [ws]).await;
}

/// The path to PostgreSQL goes silent (nothing forwarded, nothing closed):
/// the health check notices within `health_check_secs` + 5 s, the plugin
/// reconnects once the path is back, and the stop is prompt throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_silent_connection_is_noticed_and_replaced() {
    require("PostgreSQL", POSTGRES).await;
    capture_logs();
    let Gated {
        gate,
        chan,
        gw,
        mut ws,
        pg,
        ..
    } = Gated::start("silent", json!({"health_check_secs": 1})).await;

    gate.freeze();
    let frozen = Instant::now();
    let port = format!(":{} ", gate.addr.port());
    let lost = wait_for_log(&["WARN", "postgres-source: connection to", &port, "lost"]).await;
    assert!(lost.contains("health check"), "{lost}");
    eprintln!("postgres silent: noticed after {:?}", frozen.elapsed());
    gate.open();
    wait_for_log(&["INFO", "postgres-source: reconnected to", &port]).await;
    warm_up(&mut ws, |n| {
        let (pg, c) = (&pg, &chan);
        async move { pg.notify(c, &json!({ "warmup": n }).to_string()).await }
    })
    .await;
    pg.notify(&chan, r#"{"n":1}"#).await;
    assert_eq!(next_data(&mut ws).await, json!({"n": 1}));
    shutdown_promptly(gw, [ws]).await;
}

/// A server that accepts the connection and never answers: the stop does
/// not wait for the startup exchange (which has no timeout of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stops_promptly_while_the_server_does_not_answer() {
    require("PostgreSQL", POSTGRES).await;
    let gate = Gate::new(POSTGRES).await;
    gate.freeze();
    let config = json!({
        "connection": format!("host=127.0.0.1 port={} user=postgres dbname=test", gate.addr.port()),
        "channels": [unique("gwt")],
    });
    let dep = deployment("mute", &config, "/mute");
    let gw = dep.start().await;
    eventually("the plugin connected to the silent gate", || {
        std::future::ready((gate.connections() > 0).then_some(()))
    })
    .await;
    shutdown_promptly(gw, []).await;
}
