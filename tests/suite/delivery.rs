//! Fan-out: ordered delivery to several clients, invalid messages dropped and
//! counted, keyed streams ending with Close 1000.

use crate::common::*;

fn seq(v: &serde_json::Value) -> i64 {
    v["seq"]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer seq in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clients_receive_every_message_in_order() {
    ordered_delivery("").await;
}

async fn ordered_delivery(extra: &str) {
    let dep = Deployment::new();
    dep.gateway_yaml(extra)
        .shipped_schema("ticker.json")
        .write(
            "specs/ticker.yaml",
            "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {rate: 2000, pad: 100}\nendpoints:\n  - path: /ticker\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(addr, "/ticker").await);
    }
    // Each client may join at a different point of the stream; from its first
    // message on it must see every message, in order, with no gap or repeat.
    let mut handles = Vec::new();
    for mut ws in clients {
        handles.push(tokio::spawn(async move {
            let first = seq(&next_json(&mut ws).await);
            let mut prev = first;
            for _ in 0..1000 {
                let m = next_json(&mut ws).await;
                let s = seq(&m);
                assert_eq!(s, prev + 1, "gap or reorder after {prev}");
                assert_eq!(m["pad"].as_str().map(str::len), Some(100));
                prev = s;
            }
            prev - first
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), 1000);
    }
    let drops = metric(
        addr,
        "gateway_slow_consumer_drops_total{channel=\"ticker\",plugin=\"ticker\"}",
    )
    .await;
    assert_eq!(drops, Some(0.0));
    // A batch is counted once all its frames are queued: a client may read
    // the last of them first.
    eventually("deliveries counted", || async {
        metric(
            addr,
            "gateway_deliveries_total{channel=\"ticker\",plugin=\"ticker\"}",
        )
        .await
        .filter(|v| *v >= 4004.0)
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_dropped_counted_and_never_delivered() {
    let dep = Deployment::new();
    dep.gateway_yaml("").write("specs/schemas/seq.json", SEQ_SCHEMA).write(
        "specs/faulty.yaml",
        "channel: faulty\nschema: schemas/seq.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 10ms\n  config: {invalid_every: 2}\nendpoints:\n  - path: /faulty\n",
    );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/faulty").await;
    // Every even seq is emitted as a string and fails the schema: the client
    // sees only odd numbers, each exactly once, in order.
    let mut prev = seq(&next_json(&mut ws).await);
    assert_eq!(prev % 2, 1, "an invalid message was delivered");
    for _ in 0..20 {
        let s = seq(&next_json(&mut ws).await);
        assert_eq!(s, prev + 2, "expected the next valid message after {prev}");
        prev = s;
    }
    let series = "gateway_validation_failures_total{channel=\"faulty\",plugin=\"test-faults\"}";
    let failures = eventually("validation failures counted", || async {
        metric(addr, series).await.filter(|v| *v >= 20.0)
    })
    .await;
    let published = metric(
        addr,
        "gateway_messages_published_total{channel=\"faulty\",plugin=\"test-faults\"}",
    )
    .await
    .unwrap();
    // Half of what the plugin emitted is invalid (the publisher may be one message ahead of either count).
    assert!(
        (failures - published).abs() <= 2.0,
        "failures {failures} vs published {published}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_stream_delivers_its_steps_then_closes_normally() {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write(
            "specs/schemas/step.json",
            r#"{"type":"object","required":["key","step","final","params"],
               "properties":{"step":{"type":"integer"},"key":{"type":"string"},"final":{"type":"boolean"},
                             "params":{"type":"object","required":["job_id"]}}}"#,
        )
        .write(
            "specs/jobs.yaml",
            "channel: jobs\nschema: schemas/step.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  config: {steps: 3}\nendpoints:\n  - path: /v1/jobs/{job_id}/ws\n",
        );
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut a = connect(addr, "/v1/jobs/job-42/ws").await;
    let mut b = connect(addr, "/v1/jobs/job%207/ws").await;
    for (ws, id) in [(&mut a, "job-42"), (&mut b, "job 7")] {
        for step in 1..=3 {
            let m = next_json(ws).await;
            assert_eq!(m["key"], id);
            assert_eq!(m["params"]["job_id"], id);
            assert_eq!(m["step"], step);
            assert_eq!(m["final"], step == 3);
        }
        assert_eq!(
            close_code(ws).await,
            Some(1000),
            "terminal state closes normally"
        );
    }
    gw.shutdown().await;
}

fn keyed_deployment(path: &str, steps: u32) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml("")
        .write("specs/schemas/step.json", r#"{"type":"object","required":["key","step","params"]}"#)
        .write(
            "specs/jobs.yaml",
            &format!("channel: jobs\nschema: schemas/step.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  config: {{steps: {steps}}}\nendpoints:\n  - path: {path}\n"),
        );
    dep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_joining_an_ended_stream_while_others_still_close_gets_a_fresh_stream() {
    let dep = keyed_deployment("/v1/jobs/{job_id}/ws", 1);
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // A reads its stream to the end but never answers the Close, so its
    // session lingers, still subscribed, for a while.
    let mut a = connect(addr, "/v1/jobs/j1/ws").await;
    assert_eq!(next_json(&mut a).await["step"], 1);
    let raw = a.into_inner();
    // B asks for the same key meanwhile: the plugin must open it again.
    let mut b = connect(addr, "/v1/jobs/j1/ws").await;
    let m = next_json(&mut b).await;
    assert_eq!(
        (m["key"].as_str(), m["step"].as_i64()),
        (Some("j1"), Some(1))
    );
    assert_eq!(close_code(&mut b).await, Some(1000));
    drop(raw);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_path_parameters_never_share_a_stream() {
    let dep = keyed_deployment("/t/{tenant}/{job}", 3);
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut a = connect(addr, "/t/acme/secret%2F1").await;
    let mut b = connect(addr, "/t/acme%2Fsecret/1").await;
    for _ in 0..3 {
        let ma = next_json(&mut a).await;
        assert_eq!(
            ma["params"],
            serde_json::json!({"tenant": "acme", "job": "secret/1"})
        );
        let mb = next_json(&mut b).await;
        assert_eq!(
            mb["params"],
            serde_json::json!({"tenant": "acme/secret", "job": "1"})
        );
        assert_ne!(ma["key"], mb["key"]);
    }
    gw.shutdown().await;
}
