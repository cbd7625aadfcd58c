//! Several gateway instances as one over the local NATS (`broker: {kind:
//! nats}`): a source runs on one instance and every instance's clients get
//! its messages; the instance running it is killed and another takes over;
//! keyed streams, last values, commands and connection caps span instances.
//!
//! Each test uses its own subject prefix, so its streams and leases are its
//! own on the shared server.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway::Gateway;
use gateway::config::{self, LoadOptions};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::common::*;
use crate::support::*;

/// A subject prefix of its own for one test; its streams are deleted from
/// the shared NATS server when the test ends, passed or failed.
struct Prefix(String);

impl Prefix {
    fn new(what: &str) -> Prefix {
        Prefix(unique(what))
    }
}

impl std::ops::Deref for Prefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        delete_nats_streams(vec![
            format!("{}_messages", self.0),
            format!("{}_leases", self.0),
        ]);
    }
}

fn broker_yaml(prefix: &str, instance: &str, ttl: &str) -> String {
    format!(
        "broker:\n  kind: nats\n  url: nats://{NATS}\n  subject_prefix: {prefix}\n  lease_ttl: {ttl}\n  instance: {instance}\n"
    )
}

/// `gw-<name>.yaml` in `dep`: listener `main` on port 0, specs/*.yaml, the
/// cluster's broker, and `extra`.
fn instance_yaml(
    dep: &Deployment,
    name: &str,
    prefix: &str,
    ttl: &str,
    extra: &str,
) -> std::path::PathBuf {
    let file = format!("gw-{name}.yaml");
    dep.write(
        &file,
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n{}{extra}",
            target_dir().display(),
            broker_yaml(prefix, name, ttl)
        ),
    );
    dep.path(&file)
}

/// `specs/feed.yaml`: channel `feed` at `/feed` on `test-faults` with
/// `config` (a YAML flow mapping), and its schema.
fn feed_deployment(config: &str) -> Deployment {
    let dep = Deployment::new();
    dep.write("specs/schemas/any.json", ANY_SCHEMA).write(
        "specs/feed.yaml",
        &format!("channel: feed\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: push\n  config: {config}\nendpoints:\n  - path: /feed\n"),
    );
    dep
}

/// `gw.yaml` in `dep`: listener `main` on port 0, specs/*.yaml, `top`
/// (more top-level settings), and a NATS broker at `nats` with `broker`
/// (more broker settings).
fn own_nats_yaml(dep: &Deployment, nats: SocketAddr, top: &str, broker: &str) {
    dep.write(
        "gw.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n{top}broker:\n  kind: nats\n  url: nats://{nats}\n{broker}",
            target_dir().display(),
        ),
    );
}

async fn start_instance(path: &std::path::Path) -> Gateway {
    let cfg = config::load(path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("config should load:\n{e}"));
    Gateway::start(cfg)
        .await
        .unwrap_or_else(|e| panic!("gateway should start:\n{e}"))
}

/// Whether the instance at `addr` runs `channel`'s source now.
async fn holds_lease(addr: SocketAddr, channel: &str) -> bool {
    let (_, _, body) = http_body(addr, "GET", "/metrics", &[], "").await;
    body.lines().any(|l| {
        l.starts_with(&format!("gateway_source_lease_held{{channel=\"{channel}\""))
            && l.ends_with(" 1")
    })
}

/// Which of `addrs` runs `channel`'s source, once exactly one does.
async fn sole_holder(addrs: &[SocketAddr], channel: &str) -> usize {
    eventually("exactly one instance runs the source", || async {
        let mut held = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            if holds_lease(*a, channel).await {
                held.push(i);
            }
        }
        (held.len() == 1).then(|| held[0])
    })
    .await
}

/// One message as a client got it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Got {
    seq: u64,
    ts: u64,
}

/// A client reading `{seq, ts}` messages in the background into a shared list.
struct Reader {
    got: Arc<Mutex<Vec<(Got, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    async fn connect(addr: SocketAddr, path: &str) -> Reader {
        let mut ws = connect(addr, path).await;
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                if let WsMessage::Text(t) = m {
                    let v: Value = serde_json::from_str(&t).expect("JSON");
                    let at = Instant::now();
                    g.lock().unwrap().push((
                        Got {
                            seq: v["seq"].as_u64().expect("seq"),
                            ts: v["ts"].as_u64().expect("ts"),
                        },
                        at,
                    ));
                }
            }
        });
        Reader { got, task }
    }

    fn snapshot(&self) -> Vec<(Got, Instant)> {
        self.got.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_three_processes_survives_killing_the_one_running_the_source() {
    require("NATS", NATS).await;
    const RATE: u64 = 50;
    const TTL: Duration = Duration::from_secs(2);
    let prefix = Prefix::new("gwkill");
    let dep = Deployment::new();
    dep.write("specs/schemas/ticker.json", &std::fs::read_to_string(repo_root().join("channel-specs/schemas/ticker.json")).unwrap())
        .write(
            "specs/ticker.yaml",
            &format!("channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {{rate: {RATE}}}\nendpoints:\n  - path: /ticker\n"),
        );
    let mut procs: Vec<GatewayProcess> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            GatewayProcess::spawn(
                &instance_yaml(&dep, n, &prefix, "2s", "log: {level: info}\n"),
                &[],
            )
        })
        .collect();
    // Exactly one of them runs the source.
    let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let holder = sole_holder(&addrs, "ticker").await;
    // Two clients on every instance.
    let mut readers = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        for _ in 0..2 {
            readers.push((i, Reader::connect(p.addr, "/ticker").await));
        }
    }
    eventually("every client gets messages", || async {
        readers.iter().all(|(_, r)| r.len() >= 10).then_some(())
    })
    .await;

    let killed_at = Instant::now();
    procs[holder].kill();
    let survivors: Vec<&Reader> = readers
        .iter()
        .filter(|(i, _)| *i != holder)
        .map(|(_, r)| r)
        .collect();
    // The new source starts its sequence again at 1.
    let restarted = |r: &Reader| {
        let g = r.snapshot();
        g.windows(2)
            .position(|w| w[1].0.seq < w[0].0.seq)
            .map(|i| (i + 1, g.len()))
    };
    eventually(
        "every survivor gets 20 messages of the new source",
        || async {
            survivors
                .iter()
                .all(|r| restarted(r).is_some_and(|(i, n)| n >= i + 20))
                .then_some(())
        },
    )
    .await;

    let mut takeover = Duration::ZERO;
    let mut before_last = Vec::new();
    let mut after_first = Vec::new();
    let reference: Vec<Got> = {
        let g = survivors[0].snapshot();
        let (i, _) = restarted(survivors[0]).unwrap();
        g[i..i + 20].iter().map(|(m, _)| *m).collect()
    };
    for r in &survivors {
        let g = r.snapshot();
        let (i, _) = restarted(r).unwrap();
        let (old, new) = g.split_at(i);
        // No duplicates, no gaps, on both sides of the takeover.
        for part in [old, new] {
            for w in part.windows(2) {
                assert_eq!(
                    w[1].0.seq,
                    w[0].0.seq + 1,
                    "gap or duplicate: {:?} then {:?}",
                    w[0].0,
                    w[1].0
                );
                assert!(w[1].0.ts > w[0].0.ts);
            }
        }
        assert_eq!(
            new[0].0.seq, 1,
            "the new source starts from its first message"
        );
        // Every survivor got the same messages of the new source.
        let mine: Vec<Got> = new[..20].iter().map(|(m, _)| *m).collect();
        assert_eq!(mine, reference, "survivors got different messages");
        takeover = takeover.max(new[0].1.duration_since(killed_at));
        before_last.push(old.last().unwrap().0);
        after_first.push(new[0].0);
    }
    // The last message before the kill is the same for every survivor: what
    // the killed instance published reached all of them or none.
    assert!(
        before_last.windows(2).all(|w| w[0] == w[1]),
        "{before_last:?}"
    );
    let gap_ns = after_first[0].ts - before_last[0].ts;
    let not_produced = (gap_ns as f64 / 1e9 * RATE as f64).round() as u64 - 1;
    eprintln!(
        "takeover: first message of the new source {takeover:?} after the kill (lease_ttl {TTL:?}); \
         source silent for {:.2} s between its last message before the kill (seq {}) and the first after; \
         at {RATE} msg/s about {not_produced} messages were never produced; none published was lost or duplicated",
        gap_ns as f64 / 1e9,
        before_last[0].seq,
    );
    assert!(
        takeover <= TTL + Duration::from_secs(3),
        "takeover took {takeover:?}, lease_ttl is {TTL:?}"
    );
    // Exactly one survivor runs the source now.
    let mut held = 0;
    for (i, p) in procs.iter().enumerate() {
        if i != holder && holds_lease(p.addr, "ticker").await {
            held += 1;
        }
    }
    assert_eq!(held, 1, "exactly one survivor runs the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keyed_streams_last_values_and_commands_span_instances() {
    require("NATS", NATS).await;
    let prefix = Prefix::new("gwkeyed");
    let dep = Deployment::new();
    dep.write("specs/schemas/any.json", ANY_SCHEMA)
        .write(
            "specs/jobs.yaml",
            "channel: jobs\nschema: schemas/any.json\nlast_value: true\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 100ms\n  config: {steps: 1000}\nendpoints:\n  - path: /jobs/{job_id}\n",
        )
        .write(
            "specs/feed.yaml",
            "channel: feed\nschema: schemas/any.json\nlast_value: true\nsource:\n  plugin: test-faults\n  mode: push\n  config: {burst: 0, interval_ms: 5}\nendpoints:\n  - path: /feed\n",
        );
    let http = "http:\n  - path: /emit\n    method: POST\n    command: {channel: feed, request: {op: emit, messages: \"{{request.body}}\"}}\n  - path: /open-keys\n    command: {channel: jobs, request: {op: status}}\n";
    let a = start_instance(&instance_yaml(&dep, "a", &prefix, "3s", http)).await;
    let aa = a.addr("main").unwrap();
    eventually("a runs both sources", || async {
        (holds_lease(aa, "jobs").await && holds_lease(aa, "feed").await).then_some(())
    })
    .await;
    let b = start_instance(&instance_yaml(&dep, "b", &prefix, "3s", http)).await;
    let ba = b.addr("main").unwrap();
    assert!(!holds_lease(ba, "jobs").await && !holds_lease(ba, "feed").await);

    // A command asked on b runs on a's plugin; what it emits reaches both.
    let mut on_a = connect(aa, "/feed").await;
    let mut on_b = connect(ba, "/feed").await;
    // The handshake completes a little before the subscription is made.
    wait_subscribed(aa, "feed", "test-faults", 1).await;
    wait_subscribed(ba, "feed", "test-faults", 1).await;
    let (s, _, reply) = http_body(
        ba,
        "POST",
        "/emit",
        &[("content-type", "application/json")],
        r#"[{"n": 1}, {"n": 2}]"#,
    )
    .await;
    assert_eq!(s, 200, "{reply}");
    assert_eq!(serde_json::from_str::<Value>(&reply).unwrap()["queued"], 2);
    for ws in [&mut on_a, &mut on_b] {
        let mut ns = Vec::new();
        while ns.len() < 2 {
            let m = next_json(ws).await;
            if let Some(n) = m["n"].as_u64() {
                ns.push(n);
            }
        }
        assert_eq!(ns, [1, 2]);
    }
    // The latest message is the last value on an instance started later.
    let c = start_instance(&instance_yaml(&dep, "c", &prefix, "3s", http)).await;
    let ca = c.addr("main").unwrap();
    let mut on_c = connect(ca, "/feed").await;
    assert_eq!(next_json(&mut on_c).await, json!({"n": 2}));
    drop(on_c);

    // A keyed stream followed only on b: a's plugin opens it.
    let mut x = connect(ba, "/jobs/j1").await;
    let first = next_json_or_close(&mut x)
        .await
        .unwrap_or_else(|c| panic!("x closed: {c:?}"));
    assert_eq!(
        (first["key"].as_str(), first["step"].as_u64()),
        (Some("j1"), Some(1)),
        "{first}"
    );
    let (_, _, status) = http_body(ba, "GET", "/open-keys", &[], "").await;
    assert_eq!(
        serde_json::from_str::<Value>(&status).unwrap()["open_keys"],
        json!(["j1"])
    );
    for step in 2..=3 {
        assert_eq!(next_json(&mut x).await["step"].as_u64(), Some(step));
    }
    // A first subscriber of j1 on c gets its last value at once, then the
    // next steps: no duplicate, no gap.
    let mut y = connect(ca, "/jobs/j1").await;
    let y1 = next_json(&mut y).await["step"].as_u64().unwrap();
    let mut x_steps = vec![3];
    loop {
        let s = next_json(&mut x).await["step"].as_u64().unwrap();
        x_steps.push(s);
        if s >= y1 + 3 {
            break;
        }
    }
    assert!(
        x_steps.contains(&y1),
        "y's first step {y1} is one x got too: {x_steps:?}"
    );
    let mut prev = y1;
    for _ in 0..3 {
        let s = next_json(&mut y).await["step"].as_u64().unwrap();
        assert_eq!(s, prev + 1, "y: {prev} then {s}");
        prev = s;
    }
    // Nobody follows j1 any more: a's plugin closes it.
    drop((x, y));
    eventually("j1 closed at the plugin", || async {
        let (_, _, status) = http_body(ba, "GET", "/open-keys", &[], "").await;
        (serde_json::from_str::<Value>(&status).unwrap()["open_keys"] == json!([])).then_some(())
    })
    .await;
    drop((on_a, on_b));
    for g in [a, b, c] {
        assert!(g.shutdown().await, "every task ends at shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_connection_caps_count_every_instance() {
    require("NATS", NATS).await;
    let prefix = Prefix::new("gwcaps");
    let dep = feed_deployment("{burst: 0, interval_ms: 50}");
    let limits = "limits: {max_connections: 3}\nhttp:\n  - path: /stats\n    body: {here: \"{{gateway.connections}}\", cluster: \"{{gateway.cluster}}\"}\n";
    let a = start_instance(&instance_yaml(&dep, "a", &prefix, "3s", limits)).await;
    let b = start_instance(&instance_yaml(&dep, "b", &prefix, "3s", limits)).await;
    let (aa, ba) = (a.addr("main").unwrap(), b.addr("main").unwrap());
    let a1 = connect(aa, "/feed").await;
    let a2 = connect(aa, "/feed").await;
    // b learns a's count from a's next heartbeat.
    eventually("b counts a's connections", || async {
        (metric(ba, "gateway_cluster_connections").await == Some(2.0)).then_some(())
    })
    .await;
    let b1 = connect(ba, "/feed").await;
    let (status, body) = try_connect(ba, "/feed", &[])
        .await
        .expect_err("the fourth connection of the cluster is refused");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    // Per instance the caps would have let it in: b has one connection
    // (counted when its session starts, a little after the 101).
    metric_becomes(ba, "gateway_connections", 1.0).await;
    // Stats routes tell this instance's figures from the cluster's.
    let want = json!({"here": 1, "cluster": {"instance": "b", "instances": 2, "connections": 3}});
    eventually("b's stats to count its connection", || async {
        let (_, _, stats) = http_body(ba, "GET", "/stats", &[], "").await;
        (serde_json::from_str::<Value>(&stats).ok() == Some(want.clone())).then_some(())
    })
    .await;
    // Once a's connections go, b admits again.
    drop((a1, a2));
    let b2 = eventually("b admits once a's connections are gone", || async {
        try_connect(ba, "/feed", &[]).await.ok()
    })
    .await;
    drop((b1, b2));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_source_moves_at_once_when_its_instance_shuts_down() {
    require("NATS", NATS).await;
    let prefix = Prefix::new("gwmove");
    let dep = feed_deployment("{burst: 1, interval_ms: 20}");
    // A long lease: only giving it up at shutdown can move the source fast.
    let a = start_instance(&instance_yaml(&dep, "a", &prefix, "60s", "")).await;
    let aa = a.addr("main").unwrap();
    eventually("a runs the source", || async {
        holds_lease(aa, "feed").await.then_some(())
    })
    .await;
    let b = start_instance(&instance_yaml(&dep, "b", &prefix, "60s", "")).await;
    let ba = b.addr("main").unwrap();
    let mut on_b = connect(ba, "/feed").await;
    next_json(&mut on_b).await;
    let stopped = Instant::now();
    a.shutdown().await;
    eventually("b runs the source", || async {
        holds_lease(ba, "feed").await.then_some(())
    })
    .await;
    // The new source's first message (test-faults counts from 1 again).
    loop {
        if next_json(&mut on_b).await["seq"] == 1 {
            break;
        }
    }
    let moved = stopped.elapsed();
    eprintln!("source moved to b {moved:?} after a began shutting down (lease_ttl 60s)");
    assert!(moved < Duration::from_secs(10), "{moved:?}");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_last_value_outlives_the_instance_that_published_it() {
    require("NATS", NATS).await;
    let prefix = Prefix::new("gwlast");
    let dep = Deployment::new();
    dep.write("specs/schemas/any.json", ANY_SCHEMA).write(
        "specs/feed.yaml",
        "channel: feed\nschema: schemas/any.json\nlast_value: true\nsource:\n  plugin: test-faults\n  mode: push\n  config: {burst: 0, interval_ms: 5}\nendpoints:\n  - path: /feed\n",
    );
    let http = "http:\n  - path: /emit\n    method: POST\n    command: {channel: feed, request: {op: emit, messages: \"{{request.body}}\"}}\n";
    let path = instance_yaml(&dep, "a", &prefix, "3s", http);
    let a = start_instance(&path).await;
    let aa = a.addr("main").unwrap();
    // The source starts once this instance holds the channel's lease; a
    // command before that is refused (503 plugin_unavailable).
    metric_becomes(
        aa,
        "gateway_plugin_up{channel=\"feed\",plugin=\"test-faults\"}",
        1.0,
    )
    .await;
    let mut ws = connect(aa, "/feed").await;
    let (s, _, reply) = http_body(
        aa,
        "POST",
        "/emit",
        &[("content-type", "application/json")],
        r#"[{"v": "kept"}]"#,
    )
    .await;
    assert_eq!(s, 200, "{reply}");
    assert_eq!(next_json(&mut ws).await, json!({"v": "kept"}));
    drop(ws);
    assert!(a.shutdown().await);
    // The same instance name again, in a new process life: the last value
    // it published before is its own no more, and is served.
    let a = start_instance(&path).await;
    let mut ws = connect(a.addr("main").unwrap(), "/feed").await;
    assert_eq!(next_json(&mut ws).await, json!({"v": "kept"}));
    drop(ws);
    assert!(a.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_credentials_come_from_the_environment_and_are_never_logged() {
    let secret = format!("pw-{}", unique("s"));
    let nats = PrivateServer::nats(&["--user", "gw", "--pass", &secret]).await;
    let dep = feed_deployment("{burst: 1, interval_ms: 50}");
    own_nats_yaml(
        &dep,
        nats.addr,
        "",
        "  user_env: GW_TEST_NATS_USER\n  password_env: GW_TEST_NATS_PASSWORD\n",
    );
    // The right credentials: the instance joins and runs the source.
    let gw = GatewayProcess::spawn(
        &dep.path("gw.yaml"),
        &[
            ("GW_TEST_NATS_USER", "gw"),
            ("GW_TEST_NATS_PASSWORD", &secret),
        ],
    );
    eventually("the source runs", || async {
        holds_lease(gw.addr, "feed").await.then_some(())
    })
    .await;
    let mut ws = connect(gw.addr, "/feed").await;
    assert!(next_json(&mut ws).await["seq"].is_u64());
    drop((ws, gw));
    // A wrong password: the gateway does not start, names the setting and
    // the server, and logs no secret.
    let wrong = format!("{secret}-wrong");
    let out = Command::new(target_dir().join("gateway"))
        .args(["--config", dep.path("gw.yaml").to_str().unwrap()])
        .envs([
            ("GW_TEST_NATS_USER", "gw"),
            ("GW_TEST_NATS_PASSWORD", wrong.as_str()),
        ])
        .output()
        .expect("run gateway");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "gw.yaml:9:3: broker: cannot connect to NATS at nats://{}",
            nats.addr
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&secret),
        "the password is logged: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keyed_source_is_taken_over_with_the_keys_the_cluster_follows() {
    require("NATS", NATS).await;
    // The default lease_ttl: the standbys try every second while the
    // others' heartbeats (keyed interest) arrive about as often.
    let prefix = Prefix::new("gwkeyover");
    let dep = Deployment::new();
    dep.write("specs/schemas/any.json", ANY_SCHEMA).write(
        "specs/jobs.yaml",
        "channel: jobs\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 100ms\n  config: {steps: 100000}\nendpoints:\n  - path: /jobs/{job_id}\n",
    );
    let http = "http:\n  - path: /open-keys\n    command: {channel: jobs, request: {op: status}}\n";
    let mut procs: Vec<GatewayProcess> = ["a", "b", "c"]
        .iter()
        .map(|n| GatewayProcess::spawn(&instance_yaml(&dep, n, &prefix, "6s", http), &[]))
        .collect();
    let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let holder = sole_holder(&addrs, "jobs").await;
    // Clients of the two other instances follow k1 and k2.
    let others: Vec<usize> = (0..3).filter(|i| *i != holder).collect();
    let mut k1 = connect(procs[others[0]].addr, "/jobs/k1").await;
    let mut k2 = connect(procs[others[1]].addr, "/jobs/k2").await;
    for ws in [&mut k1, &mut k2] {
        next_json(ws).await;
    }
    let killed_at = Instant::now();
    procs[holder].kill();
    // A survivor takes the source over and opens both keys again: their
    // steps start over (a new plugin instance).
    for (ws, key) in [(&mut k1, "k1"), (&mut k2, "k2")] {
        loop {
            let m = next_json(ws).await;
            assert_eq!(m["key"], key);
            if m["step"] == 1 {
                break;
            }
        }
    }
    let took = killed_at.elapsed();
    eprintln!("keyed source taken over with its two keys {took:?} after the kill (lease_ttl 6s)");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let new_holder = others[sole_holder(&[addrs[others[0]], addrs[others[1]]], "jobs").await];
    let (_, _, status) = http_body(procs[new_holder].addr, "GET", "/open-keys", &[], "").await;
    assert_eq!(
        serde_json::from_str::<Value>(&status).unwrap()["open_keys"],
        json!(["k1", "k2"])
    );
}

/// A cluster on its own NATS server (memory streams): the server goes away
/// and comes back empty. The instance makes its streams again and runs the
/// source again; and a shutdown while NATS is down does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rides_out_a_nats_restart_and_shuts_down_without_nats() {
    let mut nats = PrivateServer::nats(&[]).await;
    let dep = feed_deployment("{burst: 1, interval_ms: 20}");
    own_nats_yaml(&dep, nats.addr, "", "  lease_ttl: 2s\n  instance: solo\n");
    let gw = start_instance(&dep.path("gw.yaml")).await;
    let addr = gw.addr("main").unwrap();
    eventually("the source runs", || async {
        holds_lease(addr, "feed").await.then_some(())
    })
    .await;
    let mut ws = connect(addr, "/feed").await;
    next_json(&mut ws).await;

    nats.stop().await;
    nats.start().await;
    let back = Instant::now();
    // Messages flow again: the source runs under a lease in the new server's
    // streams. (test-faults counts from 1 again when it is restarted.)
    loop {
        let v = next_json(&mut ws).await;
        if v["seq"] == 1 {
            break;
        }
    }
    eprintln!(
        "cluster: the source ran again {:?} after NATS came back",
        back.elapsed()
    );
    assert!(holds_lease(addr, "feed").await);

    nats.stop().await;
    drop(ws);
    let t0 = Instant::now();
    let done = gw.shutdown().await;
    let took = t0.elapsed();
    eprintln!("cluster: shutdown with NATS down took {took:?}");
    assert!(
        done,
        "shutdown hit its deadline ({took:?}) waiting for NATS"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// A lease write whose acknowledgement was lost (NATS stored it, the
/// instance timed out) leaves the instance with a stale sequence. Its next
/// write is refused as "held", yet the lease is its own: it is taken as such
/// (not given up until it expires, a source outage of a whole lease_ttl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_lease_write_with_a_stale_sequence_adopts_its_own_lease() {
    require("NATS", NATS).await;
    let prefix = Prefix::new("gwstale");
    let dep = feed_deployment("{}");
    let path = instance_yaml(&dep, "a", &prefix, "30s", "");
    let cfg = config::load(&path, &LoadOptions::default()).expect("config");
    let config::BrokerCfg::Nats(nats) = cfg.broker.clone() else {
        panic!("a NATS broker")
    };
    let other = instance_yaml(&dep, "b", &prefix, "30s", "");
    let other = config::load(&other, &LoadOptions::default()).expect("config");
    let config::BrokerCfg::Nats(other) = other.broker.clone() else {
        panic!("a NATS broker")
    };
    let a = gateway::cluster::Cluster::connect(nats)
        .await
        .expect("a joins");
    let b = gateway::cluster::Cluster::connect(other)
        .await
        .expect("b joins");
    let key = a.lease_key("feed");
    let first = a.lease_write(&key, 0).await.expect("a takes the lease");
    // a renews, but its acknowledgement "was lost": it still holds `first`.
    let second = a.lease_write(&key, first).await.expect("a renews");
    // Its next renewal names the stale sequence: still its own lease.
    let third = a
        .lease_write(&key, first)
        .await
        .expect("a's own lease, written with a stale sequence");
    assert!(third > second, "{third} after {second}");
    // Someone else's lease stays someone else's.
    assert!(matches!(
        b.lease_write(&key, first).await,
        Err(gateway::cluster::LeaseError::Held)
    ));
}

/// While NATS is away, messages for the other instances wait in the outbox,
/// which holds at most 64 MiB: 150 messages of 900 KB published then keep
/// about 70 and drop the rest, counted (the outbox used to take them all,
/// up to 65,536 messages of any size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_outbox_is_bounded_in_bytes_while_nats_is_away() {
    let mut nats = PrivateServer::nats(&[]).await;
    let dep = feed_deployment("{burst: 1, interval_ms: 60000}");
    own_nats_yaml(
        &dep,
        nats.addr,
        "publish:\n  path: /publish\n  listener: main\n  auth: {mode: none}\n  requests_per_ip: 10000/s\n",
        "  instance: solo\n",
    );
    let gw = start_instance(&dep.path("gw.yaml")).await;
    let addr = gw.addr("main").unwrap();
    nats.stop().await;
    let body = serde_json::json!({ "pad": "x".repeat(900_000) }).to_string();
    for _ in 0..150 {
        let (status, _, text) = http_body(addr, "POST", "/publish/feed", &[], &body).await;
        assert!(status < 300, "{status} {text}");
    }
    let dropped = metric(addr, "gateway_broker_send_dropped_total")
        .await
        .unwrap_or(0.0);
    eprintln!("cluster outbox: {dropped} of 150 messages of 900 KB dropped while NATS was away");
    assert!(
        (70.0..=90.0).contains(&dropped),
        "{dropped} dropped: 64 MiB hold about 74 of them"
    );
    drop(nats);
    gw.shutdown().await;
}

/// A lease stream made by hand without `max_age` would keep a dead
/// instance's lease for ever: the instance refuses to start, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_a_lease_stream_whose_leases_never_expire() {
    require("NATS", NATS).await;
    let prefix = Prefix::new("gwnoage");
    let js = async_nats::jetstream::new(async_nats::connect(NATS).await.expect("NATS"));
    js.create_stream(async_nats::jetstream::stream::Config {
        name: format!("{}_leases", &*prefix),
        subjects: vec![format!("{}.lease.>", &*prefix)],
        max_messages_per_subject: 1,
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create the lease stream");
    let dep = feed_deployment("{}");
    let path = instance_yaml(&dep, "a", &prefix, "5s", "");
    let cfg = config::load(&path, &LoadOptions::default()).expect("config");
    let Err(e) = Gateway::start(cfg).await else {
        panic!("the gateway started on leases that never expire")
    };
    let e = e.to_string();
    assert!(
        e.contains(&format!(
            "the lease stream {}_leases has no max_age",
            &*prefix
        )),
        "{e}"
    );
}

/// The instance running a source is cut off from NATS long enough for
/// another to take the source over. What it made
/// meanwhile waits in its outbox; when it is back, that is dropped and
/// counted, not sent: the other instances' clients never get the old
/// holder's messages after the new holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_cut_off_holder_sends_nothing_stale_when_it_is_back() {
    require("NATS", NATS).await;
    let prefix = Prefix::new("gwfence");
    let gate = Gate::new(NATS).await;
    gate.open();
    let dep_a = feed_deployment("{burst: 1, interval_ms: 20}");
    own_nats_yaml(
        &dep_a,
        gate.addr,
        "",
        &format!(
            "  subject_prefix: {}\n  lease_ttl: 2s\n  instance: a\n",
            &*prefix
        ),
    );
    let a = start_instance(&dep_a.path("gw.yaml")).await;
    let aa = a.addr("main").unwrap();
    eventually("a runs the source", || async {
        holds_lease(aa, "feed").await.then_some(())
    })
    .await;
    let dep_b = feed_deployment("{burst: 1, interval_ms: 20}");
    let b = start_instance(&instance_yaml(&dep_b, "b", &prefix, "2s", "")).await;
    let ba = b.addr("main").unwrap();
    let mut on_b = connect(ba, "/feed").await;
    next_json(&mut on_b).await;

    // Cut, and refused until opened again: a's client knows it is offline.
    gate.close();
    // b takes the source over: its own count starts at 1.
    while next_json(&mut on_b).await["seq"] != 1 {}
    let mut last = 1;
    let next = async |ws: &mut Ws, last: &mut u64| {
        let v = next_json(ws).await;
        let seq = v["seq"].as_u64().expect("seq");
        assert_eq!(seq, *last + 1, "after {last}, the old holder's {v}");
        *last = seq;
    };
    next(&mut on_b, &mut last).await;
    gate.open();
    // a is back and has dropped what it made while cut off.
    let dropped = "gateway_broker_send_dropped_total";
    let deadline = Instant::now() + PATIENCE;
    while metric(aa, dropped).await.unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < deadline, "a dropped nothing");
        next(&mut on_b, &mut last).await;
    }
    eprintln!(
        "cluster fence: a dropped {} stale messages; b's client went on to {last}",
        metric(aa, dropped).await.unwrap_or(0.0)
    );
    for _ in 0..25 {
        next(&mut on_b, &mut last).await;
    }
    drop(on_b);
    b.shutdown().await;
    a.shutdown().await;
}
