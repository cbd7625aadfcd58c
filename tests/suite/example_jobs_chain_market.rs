//! examples/jobs-chain-market, as a client written from
//! /work/shared/reference-apis.md §1 sees it: three listeners, API key by
//! query or header, an Origin allow-list, a keyed job stream that ends with
//! close 1000 after a terminal state, blockchain and marketplace events with
//! every documented type and field, and client messages ignored.

use std::collections::{BTreeSet, HashSet};

use crate::common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const EXAMPLE: &str = "jobs-chain-market";
const LISTENERS: [&str; 3] = ["jobs", "chain", "market"];
const KEY: &str = "test-key";
const ORIGIN_OK: &str = "http://localhost:3000";
const TERMINAL: [&str; 4] = ["COMPLETED", "FAILED", "CANCELLED", "EXPIRED"];

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect()
}

fn is_iso(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() >= 20 && s.as_bytes()[4] == b'-' && s.as_bytes()[10] == b'T' && s.ends_with('Z')
    })
}

/// Follow one job to its end; returns the states seen and the close code.
async fn follow_job(ws: &mut Ws, job_id: &str) -> (Vec<Value>, Option<u16>) {
    let schema = example_schema(EXAMPLE, "schemas/job-status.json");
    let mut seen = Vec::new();
    let until = deadline();
    loop {
        before(until, "the job's terminal state and close");
        match next_json_or_close(ws).await {
            Ok(m) => {
                assert_schema(&schema, "a job status", &m);
                assert_eq!(
                    keys(&m),
                    BTreeSet::from([
                        "job_id",
                        "state",
                        "assigned_miner_id",
                        "timestamp",
                        "progress"
                    ]),
                    "{m}"
                );
                assert_eq!(m["job_id"], job_id);
                assert!(is_iso(&m["timestamp"]), "{m}");
                let p = m["progress"].as_f64().expect("progress is a number");
                assert!((0.0..=1.0).contains(&p), "{m}");
                // Keep-alive while the job runs: ignored. (After the last
                // status the server may already be closing: a failed send
                // is not the point here.)
                let _ = ws
                    .send(Message::Text(json!({"type": "ping"}).to_string().into()))
                    .await;
                seen.push(m);
            }
            Err(code) => return (seen, code),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stream_runs_to_one_terminal_state_then_closes_1000() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let jobs = gw.addr("jobs").unwrap();
    let mut ws = try_connect(
        jobs,
        &format!("/v1/jobs/job-42/ws?api_key={KEY}"),
        &[("Origin", ORIGIN_OK)],
    )
    .await
    .expect("a valid key and an allowed origin connect");
    send_text(&mut ws, "garbage, not JSON").await;
    let (seen, code) = follow_job(&mut ws, "job-42").await;
    assert_eq!(code, Some(1000), "the stream ends with a normal close");

    // QUEUED (no miner, progress 0), RUNNING (progress rising), one terminal state, last.
    let states: Vec<&str> = seen.iter().map(|m| m["state"].as_str().unwrap()).collect();
    assert_eq!(states[0], "QUEUED", "{states:?}");
    assert!(seen[0]["assigned_miner_id"].is_null());
    assert!(states.contains(&"RUNNING"), "{states:?}");
    let last = *states.last().unwrap();
    assert!(TERMINAL.contains(&last), "{states:?}");
    assert_eq!(
        states.iter().filter(|s| TERMINAL.contains(s)).count(),
        1,
        "exactly one terminal state, the last message: {states:?}"
    );
    let first_running = states.iter().position(|s| *s == "RUNNING").unwrap();
    assert!(
        states[..first_running].iter().all(|s| *s == "QUEUED"),
        "{states:?}"
    );
    assert!(
        states[first_running..states.len() - 1]
            .iter()
            .all(|s| *s == "RUNNING"),
        "{states:?}"
    );
    let progress: Vec<f64> = seen
        .iter()
        .map(|m| m["progress"].as_f64().unwrap())
        .collect();
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress rises: {progress:?}"
    );
    assert_eq!(
        last == "COMPLETED",
        *progress.last().unwrap() == 1.0,
        "{progress:?}"
    );
    let miners: HashSet<&str> = seen[first_running..]
        .iter()
        .map(|m| {
            m["assigned_miner_id"]
                .as_str()
                .expect("a miner once running")
        })
        .collect();
    assert_eq!(miners.len(), 1, "one miner runs the job: {miners:?}");

    // The job stays finished: a new client gets its terminal status, then 1000.
    let mut again = try_connect(jobs, "/v1/jobs/job-42/ws", &[("X-Api-Key", KEY)])
        .await
        .expect("header key");
    let (seen2, code2) = follow_job(&mut again, "job-42").await;
    assert_eq!(code2, Some(1000));
    assert_eq!(seen2.len(), 1, "{seen2:?}");
    assert_eq!(seen2[0]["state"], last);
    assert_eq!(
        seen2[0]["progress"],
        *seen.last().unwrap().get("progress").unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_origins_are_checked_on_every_listener() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let err_schema = example_schema(EXAMPLE, "schemas/http-error.json");
    let paths = [
        ("jobs", "/v1/jobs/7/ws"),
        ("chain", "/v1/events"),
        ("market", "/v1/events"),
    ];
    for (listener, path) in paths {
        let addr = gw.addr(listener).unwrap();
        let refused = |r: Result<Ws, (u16, String)>| match r {
            Ok(_) => panic!("{listener} {path}: connected"),
            Err((status, body)) => {
                let v: Value = serde_json::from_str(&body).expect("a JSON error body");
                assert_schema(&err_schema, "an HTTP refusal", &v);
                (status, v["error"].as_str().unwrap().to_owned())
            }
        };
        assert_eq!(
            refused(try_connect(addr, path, &[]).await),
            (401, "missing_api_key".into()),
            "{listener}: no key"
        );
        assert_eq!(
            refused(try_connect(addr, &format!("{path}?api_key=wrong"), &[]).await),
            (403, "invalid_api_key".into()),
            "{listener}: unknown key in the query"
        );
        assert_eq!(
            refused(try_connect(addr, path, &[("X-Api-Key", "wrong")]).await),
            (403, "invalid_api_key".into()),
            "{listener}: unknown key in the header"
        );
        assert_eq!(
            refused(
                try_connect(
                    addr,
                    &format!("{path}?api_key={KEY}"),
                    &[("Origin", "https://evil.example")]
                )
                .await
            ),
            (403, "origin_not_allowed".into()),
            "{listener}: an origin not in the allow-list"
        );
        // Accepted: key in the query or the header, with or without an allowed Origin.
        for (p, h) in [
            (format!("{path}?api_key={KEY}"), vec![("Origin", ORIGIN_OK)]),
            (path.to_string(), vec![("X-Api-Key", KEY)]),
            (
                path.to_string(),
                vec![("X-Api-Key", KEY), ("Origin", "http://127.0.0.1:3000")],
            ),
        ] {
            let mut ws = try_connect(addr, &p, &h)
                .await
                .unwrap_or_else(|e| panic!("{listener} {p} {h:?}: {e:?}"));
            assert!(next_json(&mut ws).await.is_object());
        }
    }
    // Each stream is on its own listener only.
    let jobs = gw.addr("jobs").unwrap();
    let chain = gw.addr("chain").unwrap();
    let q = format!("?api_key={KEY}");
    assert_eq!(
        try_connect(jobs, &format!("/v1/events{q}"), &[])
            .await
            .err()
            .map(|e| e.0),
        Some(404)
    );
    assert_eq!(
        try_connect(chain, &format!("/v1/jobs/7/ws{q}"), &[])
            .await
            .err()
            .map(|e| e.0),
        Some(404)
    );
}

/// Read events until every type in `types` was seen, checking each one;
/// pings and garbage are sent all along and must change nothing.
async fn collect_types(ws: &mut Ws, types: &[&str], check: &mut dyn FnMut(&Value)) -> usize {
    let mut seen = BTreeSet::new();
    let mut n = 0;
    let until = deadline();
    while !types.iter().all(|t| seen.contains(*t)) {
        before(until, &format!("every type of {types:?}; seen {seen:?}"));
        let m = next_json(ws).await;
        let t = m["type"].as_str().expect("a string type").to_owned();
        assert!(types.contains(&t.as_str()), "unknown type {t}");
        assert!(is_iso(&m["timestamp"]), "{m}");
        check(&m);
        seen.insert(t);
        n += 1;
        if n % 3 == 0 {
            send_json(ws, &json!({"type": "ping"})).await;
        } else if n % 5 == 0 {
            send_text(ws, "{not json").await;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blockchain_events_of_every_type() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let chain = gw.addr("chain").unwrap();
    let schema = example_schema(EXAMPLE, "schemas/blockchain-event.json");
    let mut ws = try_connect(chain, "/v1/events", &[("X-Api-Key", KEY)])
        .await
        .expect("connect");
    send_json(&mut ws, &json!({"type": "ping"})).await;
    let mut last_height: Option<u64> = None;
    let mut block_txs: HashSet<String> = HashSet::new();
    let mut pending: HashSet<String> = HashSet::new();
    let confirmed_pending = std::cell::Cell::new(0);
    let mut check = |m: &Value| {
        assert_schema(&schema, "a blockchain event", m);
        match m["type"].as_str().unwrap() {
            "new_block" => {
                let b = &m["block"];
                let h = b["height"].as_u64().expect("height");
                assert!(b["hash"].is_string() && is_iso(&b["timestamp"]), "{m}");
                if let Some(prev) = last_height {
                    assert_eq!(h, prev + 1, "heights increase by one");
                }
                last_height = Some(h);
                block_txs = b["transactions"]
                    .as_array()
                    .expect("transactions: []")
                    .iter()
                    .map(|t| t.as_str().unwrap().to_owned())
                    .collect();
            }
            "transaction_confirmed" => {
                let tx = m["tx_hash"].as_str().expect("tx_hash").to_owned();
                assert!(
                    block_txs.contains(&tx),
                    "confirmed in the latest block: {m}"
                );
                assert_eq!(m["block_height"].as_u64(), last_height);
                if pending.remove(&tx) {
                    confirmed_pending.set(confirmed_pending.get() + 1);
                }
            }
            "transaction_pending" => {
                pending.insert(m["tx_hash"].as_str().expect("tx_hash").to_owned());
            }
            "fork_detected" => assert!(m["height"].is_u64(), "{m}"),
            "sync_status" => assert!(m["current_height"].is_u64(), "{m}"),
            _ => unreachable!(),
        }
    };
    collect_types(
        &mut ws,
        &[
            "new_block",
            "transaction_confirmed",
            "transaction_pending",
            "fork_detected",
            "sync_status",
        ],
        &mut check,
    )
    .await;
    // Transactions seen pending get confirmed by a later block.
    let until = deadline();
    while confirmed_pending.get() == 0 {
        before(until, "a pending transaction to be confirmed");
        let m = next_json(&mut ws).await;
        check(&m);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketplace_events_of_every_type() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let market = gw.addr("market").unwrap();
    let schema = example_schema(EXAMPLE, "schemas/marketplace-event.json");
    let mut ws = try_connect(market, &format!("/v1/events?api_key={KEY}"), &[])
        .await
        .expect("connect");
    send_text(&mut ws, "hello?").await;
    let mut opened: HashSet<String> = HashSet::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut check = |m: &Value| {
        assert_schema(&schema, "a marketplace event", m);
        match m["type"].as_str().unwrap() {
            "new_offer" => {
                let o = &m["offer"];
                for k in ["id", "gpu_type", "currency"] {
                    assert!(o[k].is_string(), "{k}: {m}");
                }
                assert!(o["gpu_memory"].as_u64().is_some_and(|g| g > 0), "{m}");
                assert!(o["price_per_hour"].as_f64().is_some_and(|p| p > 0.0), "{m}");
                assert!(
                    opened.insert(o["id"].as_str().unwrap().to_owned()),
                    "a new id"
                );
            }
            "offer_matched" | "offer_expired" | "offer_cancelled" => {
                let id = m["offer_id"].as_str().expect("offer_id").to_owned();
                assert!(closed.insert(id.clone()), "an offer closes once: {m}");
            }
            "price_update" => {
                assert!(m["gpu_type"].is_string(), "{m}");
                assert!(
                    m["average_price_per_hour"]
                        .as_f64()
                        .is_some_and(|p| p > 0.0)
                );
            }
            _ => unreachable!(),
        }
    };
    collect_types(
        &mut ws,
        &[
            "new_offer",
            "offer_matched",
            "offer_expired",
            "offer_cancelled",
            "price_update",
        ],
        &mut check,
    )
    .await;
    // Still connected, still streaming after all that client noise.
    send_json(&mut ws, &json!({"type": "ping"})).await;
    check(&next_json(&mut ws).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_limits_are_enforced() {
    let gw = start_example(EXAMPLE, &LISTENERS).await;
    let chain = gw.addr("chain").unwrap();
    for e in &gw.state().config().endpoints {
        assert_eq!(
            e.limits.max_duration,
            Some(std::time::Duration::from_secs(24 * 3600)),
            "{}",
            e.path.as_str()
        );
    }
    // At most 10 connections per client IP on `addr`: ten are held (and
    // returned), the 11th handshake is refused with 429.
    async fn ten_then_refused(addr: std::net::SocketAddr, name: &str) -> Vec<Ws> {
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(
                try_connect(addr, "/v1/events?api_key=test-key", &[])
                    .await
                    .unwrap_or_else(|e| panic!("{name}: within the per-IP limit: {e:?}")),
            );
        }
        let (status, body) = try_connect(addr, "/v1/events?api_key=test-key", &[])
            .await
            .expect_err("the 11th connection is refused");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (429, Some("too_many_connections_per_ip")),
            "{name}"
        );
        held
    }
    let mut held = ten_then_refused(chain, "chain").await;
    // Each listener counts its own ten, as each of the reference's three
    // servers does: the same client IP, at its limit on the chain listener,
    // still gets ten on the market one and ten on the jobs one, each job
    // its own path, and an 11th on neither.
    let _market = ten_then_refused(gw.addr("market").unwrap(), "market").await;
    let jobs = gw.addr("jobs").unwrap();
    let job = |n: usize| format!("/v1/jobs/job-{n}/ws?api_key=test-key");
    let mut job_streams = Vec::new();
    for n in 0..10 {
        job_streams.push(
            try_connect(jobs, &job(n), &[])
                .await
                .expect("the jobs listener counts its own connections"),
        );
    }
    let (status, _) = try_connect(jobs, &job(10), &[])
        .await
        .expect_err("the 11th job stream is refused");
    assert_eq!(status, 429);
    // More than 100 messages a second terminate the connection.
    let mut chatty = held.pop().unwrap();
    for _ in 0..1000 {
        use futures_util::SinkExt;
        if chatty
            .send(tokio_tungstenite::tungstenite::Message::Text(
                r#"{"type":"ping"}"#.into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut chatty).await, Some(1008));
}
