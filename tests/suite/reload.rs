//! Hot reload: channels added, changed and removed while clients stay
//! connected; a bad configuration refused with the running one kept;
//! connection limits that hold across the swap; the file watcher; SIGHUP.

use crate::common::*;

fn ticker_spec(name: &str, rate: u32, pad: u32) -> String {
    format!(
        "channel: {name}\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {{rate: {rate}, pad: {pad}}}\nendpoints:\n  - path: /{name}\n"
    )
}

fn seq(v: &serde_json::Value) -> i64 {
    v["seq"]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer seq in {v}"))
}

fn pad_len(v: &serde_json::Value) -> usize {
    v["pad"].as_str().map(str::len).unwrap_or(0)
}

/// Read until a message with a pad of `len` characters arrives (the stream
/// keeps flowing, so each read is bounded by PATIENCE).
async fn until_pad(ws: &mut Ws, len: usize) {
    for _ in 0..100_000 {
        if pad_len(&next_json(ws).await) == len {
            return;
        }
    }
    panic!("no message with a pad of {len}");
}

/// Read `n` messages, asserting each follows the one before.
async fn read_in_order(ws: &mut Ws, mut prev: i64, n: usize) -> i64 {
    for _ in 0..n {
        let s = seq(&next_json(ws).await);
        assert_eq!(s, prev + 1, "gap or reorder after {prev}");
        prev = s;
    }
    prev
}

/// Queue `message` at `rt`'s plugin once it runs.
async fn emit_when_running(rt: &gateway::channel::ChannelRuntime, message: serde_json::Value) {
    let request = serde_json::json!({"op": "emit", "messages": [message]}).to_string();
    eventually("the channel's plugin", || async {
        rt.command(request.clone().into_bytes(), PATIENCE)
            .await
            .ok()
    })
    .await;
}

/// Hold `rt`'s next poll inside the plugin, and have it emit `message`
/// when released.
async fn hold_with(rt: &gateway::channel::ChannelRuntime, message: serde_json::Value) {
    hold_a_poll(rt).await;
    plugin_command(rt, serde_json::json!({"op": "emit", "messages": [message]})).await;
}

/// A gateway serving [`jobs_spec`] streams of a million steps (reload by
/// hand), and a client that follows /jobs/a and got its first step.
async fn following_a_long_job() -> (Deployment, gateway::Gateway, std::net::SocketAddr, Ws) {
    let dep = Deployment::new();
    dep.gateway_yaml("reload:\n  watch: false\n")
        .write("specs/schemas/any.json", ANY_SCHEMA)
        .write("specs/jobs.yaml", &jobs_spec(1_000_000));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/jobs/a").await;
    next_json(&mut ws).await;
    (dep, gw, addr, ws)
}

/// A keyed channel of test-faults streams of `steps` steps, at /jobs/{id}.
fn jobs_spec(steps: u32) -> String {
    format!(
        "channel: jobs\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 20ms\n  config: {{steps: {steps}}}\nendpoints:\n  - path: /jobs/{{id}}\n"
    )
}

/// The old source's last messages come before the new source's (a reload
/// that changed the channel): the two publishers never interleave. And what
/// a removed channel's source hands over after the removal is nobody's: the
/// channel, added again, does not replay it as its last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_source_s_last_messages_come_first_and_a_removed_one_s_go_nowhere() {
    use serde_json::json;
    let dep = Deployment::new();
    // burst 0: the plugin emits only what the `emit` command queued.
    let spec = |interval: &str| {
        format!(
            "channel: slow\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: {interval}\n  config: {{burst: 0}}\nlast_value: true\nendpoints:\n  - path: /slow\n"
        )
    };
    dep.gateway_yaml("")
        .write("specs/schemas/any.json", ANY_SCHEMA)
        .write("specs/slow.yaml", &spec("20ms"))
        // Another channel, so that removing `slow` leaves a configuration.
        .write("specs/other.yaml", &bus_spec("other", ""));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/slow").await;

    // Changed: the old source is held in a poll while the new one runs.
    let old = gw.state().live().channels["slow"].clone();
    emit_when_running(&old, json!({"n": "first"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"n": "first"}));
    hold_with(&old, json!({"n": "old"})).await;
    let new = then_release(&old, async {
        dep.write("specs/slow.yaml", &spec("25ms"));
        gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
        let new = gw.state().live().channels["slow"].clone();
        emit_when_running(&new, json!({"n": "new"})).await;
        let polls = plugin_command(&new, json!({"op": "status"})).await["polls"]
            .as_u64()
            .unwrap();
        eventually("the new source's message emitted", || async {
            let now = plugin_command(&new, json!({"op": "status"})).await["polls"]
                .as_u64()
                .unwrap();
            (now >= polls + 2).then_some(())
        })
        .await;
        new
    })
    .await;
    assert_eq!(next_json(&mut ws).await, json!({"n": "old"}));
    assert_eq!(next_json(&mut ws).await, json!({"n": "new"}));

    // Removed while its source is held; its message comes after.
    hold_with(&new, json!({"n": "removed"})).await;
    then_release(&new, async {
        std::fs::remove_file(dep.path("specs/slow.yaml")).unwrap();
        let report = gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.removed, ["slow"]);
    })
    .await;
    assert_eq!(close_code(&mut ws).await, Some(1001));
    tokio::time::timeout(PATIENCE, new.published_all().cancelled())
        .await
        .expect("the removed source's last message handed over");
    dep.write("specs/slow.yaml", &spec("20ms"));
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    let again = gw.state().live().channels["slow"].clone();
    let mut ws = connect(addr, "/slow").await;
    emit_when_running(&again, json!({"n": "fresh"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"n": "fresh"}),
        "a removed channel's message was replayed"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_added_changed_and_removed_without_dropping_the_others() {
    let dep = Deployment::new();
    dep.gateway_yaml("reload:\n  watch: false\n")
        .shipped_schema("ticker.json")
        .write("specs/keep.yaml", &ticker_spec("keep", 200, 8))
        .write("specs/change.yaml", &ticker_spec("change", 200, 8))
        .write("specs/gone.yaml", &ticker_spec("gone", 200, 8));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut keep = connect(addr, "/keep").await;
    let mut change = connect(addr, "/change").await;
    let mut gone = connect(addr, "/gone").await;
    let first = seq(&next_json(&mut keep).await);
    let before = next_json(&mut change).await;
    assert_eq!(pad_len(&before), 8);
    next_json(&mut gone).await;

    dep.write("specs/change.yaml", &ticker_spec("change", 200, 24))
        .write("specs/new.yaml", &ticker_spec("new", 200, 8));
    std::fs::remove_file(dep.path("specs/gone.yaml")).unwrap();
    let report = gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.added, ["new"]);
    assert_eq!(report.changed, ["change"]);
    assert_eq!(report.removed, ["gone"]);
    assert_eq!(report.unchanged, 1);
    assert_eq!(report.closed, 1);
    assert_eq!(report.generation, 2);

    // The removed channel's client is told why.
    assert_eq!(
        close_frame(&mut gone).await,
        Some((1001, "channel removed".to_string()))
    );
    // The unchanged channel never paused: its sequence runs on without a gap
    // from before the reload to well after it.
    read_in_order(&mut keep, first, 400).await;
    // The changed channel's client stays connected and gets the new settings.
    until_pad(&mut change, 24).await;
    // New connections see the new configuration.
    let mut new = connect(addr, "/new").await;
    assert_eq!(pad_len(&next_json(&mut new).await), 8);
    let (status, _, body) = http(addr, "GET", "/gone", &[]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        metric(addr, "gateway_config_reloads_total{result=\"ok\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(addr, "gateway_closed_by_reload_total").await,
        Some(1.0)
    );
    let m = http(addr, "GET", "/metrics", &[]).await.2;
    assert!(
        !m.contains("channel=\"gone\""),
        "a removed channel is no longer listed"
    );
    assert!(m.contains("gateway_messages_published_total{channel=\"new\""));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_is_refused_and_the_running_one_kept() {
    let dep = Deployment::new();
    dep.gateway_yaml("reload:\n  watch: false\n")
        .shipped_schema("ticker.json")
        .write("specs/keep.yaml", &ticker_spec("keep", 200, 8));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut keep = connect(addr, "/keep").await;
    let mut prev = seq(&next_json(&mut keep).await);

    // A spec naming a schema that does not exist: the whole reload is refused.
    dep.write(
        "specs/broken.yaml",
        "channel: broken\nschema: schemas/missing.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /broken\n",
    );
    let err = gw.reload().await.expect_err("a broken spec is refused");
    let text = err.to_string();
    assert!(
        text.contains("broken.yaml:2:9: schema: cannot read schema"),
        "{text}"
    );
    prev = read_in_order(&mut keep, prev, 50).await;
    std::fs::remove_file(dep.path("specs/broken.yaml")).unwrap();

    // Moving a listener needs a restart: refused, saying so.
    let yaml = std::fs::read_to_string(dep.path("gateway.yaml")).unwrap();
    dep.write(
        "gateway.yaml",
        &yaml.replace("bind: 127.0.0.1:0", "bind: 127.0.0.1:1"),
    );
    let err = gw.reload().await.expect_err("a moved listener is refused");
    let text = err.to_string();
    assert!(
        text.contains("gateway.yaml:3:11: listeners.main.bind: listener \"main\" moved from 127.0.0.1:0 to 127.0.0.1:1")
            && text.contains("restart the gateway"),
        "{text}"
    );
    read_in_order(&mut keep, prev, 50).await;
    assert_eq!(
        metric(addr, "gateway_config_reloads_total{result=\"error\"}").await,
        Some(2.0)
    );
    assert_eq!(
        metric(addr, "gateway_config_reloads_total{result=\"ok\"}").await,
        Some(0.0)
    );
    // The running configuration still accepts new clients.
    let mut again = connect(addr, "/keep").await;
    next_json(&mut again).await;
    let (status, _, _) = http(addr, "GET", "/broken", &[]).await;
    assert_eq!(status, 404);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_count_the_connections_open_before_a_reload() {
    let dep = Deployment::new();
    let yaml =
        |cap: u32| format!("reload:\n  watch: false\nlimits:\n  max_connections_per_ip: {cap}\n");
    dep.gateway_yaml(&yaml(2))
        .shipped_schema("ticker.json")
        .write("specs/keep.yaml", &ticker_spec("keep", 50, 8));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let a = connect(addr, "/keep").await;
    let b = connect(addr, "/keep").await;
    // A reload that changes something else: the two connections still count.
    dep.write("specs/other.yaml", &ticker_spec("other", 50, 8));
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = try_connect(addr, "/keep", &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status, 429, "{body}");
    // Raising the cap applies to the same count.
    dep.gateway_yaml(&yaml(3));
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    let c = connect(addr, "/keep").await;
    let (status, body) = try_connect(addr, "/other", &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status, 429, "{body}");
    drop((a, b, c));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_keyed_channel_closes_its_streams_for_the_clients_to_reopen() {
    let (dep, gw, addr, mut ws) = following_a_long_job().await;
    dep.write("specs/jobs.yaml", &jobs_spec(2));
    let report = gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.changed.len(), report.closed), (1, 1));
    assert_eq!(
        close_frame(&mut ws).await,
        Some((1001, "channel reconfigured".to_string()))
    );
    // Reopened, the stream comes from the new source: two steps, then 1000.
    let mut ws = connect(addr, "/jobs/a").await;
    assert_eq!(next_json(&mut ws).await["step"], 1);
    assert_eq!(next_json(&mut ws).await["step"], 2);
    assert_eq!(close_code(&mut ws).await, Some(1000));
    gw.shutdown().await;
}

/// A subscribe that read the live channels just before a reload retired
/// the runtime it found (a changed keyed channel's, a removed channel's) is
/// refused by that runtime, and the session subscribes through what is live
/// now: before, it followed a runtime nobody publishes to again, its keyed
/// stream opened at a stopped source, and it was never told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_through_a_runtime_a_reload_retired_is_refused() {
    use gateway::queue::SessionQueue;
    use std::sync::Arc;
    let (dep, gw, _addr, _ws) = following_a_long_job().await;
    dep.write("specs/other.yaml", &bus_spec("other", ""));
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    let queue = Arc::new(SessionQueue::new(16));
    let key = || Some(("b".into(), br#"{"id":"b"}"#.to_vec()));
    let old = gw.state().live().channels["jobs"].clone();
    let before = old.subscribe(key(), queue.clone(), None);
    assert!(before.is_some(), "a live runtime takes a subscriber");
    drop(before);

    dep.write("specs/jobs.yaml", &jobs_spec(2));
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        old.subscribe(key(), queue.clone(), None).is_none(),
        "a changed keyed channel's old runtime took a subscriber"
    );
    let new = gw.state().live().channels["jobs"].clone();
    assert!(new.subscribe(key(), queue.clone(), None).is_some());

    std::fs::remove_file(dep.path("specs/jobs.yaml")).unwrap();
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        new.subscribe(key(), queue.clone(), None).is_none(),
        "a removed channel's runtime took a subscriber"
    );
    gw.shutdown().await;
}

/// A push source whose instance a command still runs in (one waiting on
/// `hold`, past its timeout) ends at a reload that changed the channel all
/// the same. Before, the command's clone of the instance kept the old source
/// running: it went on emitting (checked against the old schema), its
/// publisher never ended, and after waiting 5 s for it the new source's
/// messages interleaved with the old one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_ends_at_a_reload_while_a_command_still_runs_in_it() {
    use gateway::channel::CommandError;
    use serde_json::json;
    let dep = Deployment::new();
    let spec = |ms: u32| {
        format!(
            "channel: pushy\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: push\n  config: {{interval_ms: {ms}}}\nendpoints:\n  - path: /pushy\n"
        )
    };
    dep.gateway_yaml("reload:\n  watch: false\n")
        .write("specs/schemas/any.json", ANY_SCHEMA)
        .write("specs/pushy.yaml", &spec(5));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/pushy").await;
    next_json(&mut ws).await;
    let old = gw.state().live().channels["pushy"].clone();
    // To release the hold after the reload, when the runtime no longer
    // reaches this instance.
    // The runtime records the instance once `start` returns; a push
    // plugin's first message can reach the client before that.
    let inst = eventually("the runtime to record the running instance", || {
        std::future::ready(old.current_instance())
    })
    .await;
    plugin_command(&old, json!({"op": "hold"})).await;
    let r = old
        .command(
            br#"{"op":"wait"}"#.to_vec(),
            std::time::Duration::from_millis(50),
        )
        .await;
    assert!(matches!(r, Err(CommandError::Timeout)), "{r:?}");

    dep.write("specs/pushy.yaml", &spec(6));
    gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
    let ended = tokio::time::timeout(PATIENCE, old.published_all().cancelled()).await;
    // The new source's messages count from 1 again, and only they follow.
    let mut prev = seq(&next_json(&mut ws).await);
    while prev != 1 {
        prev = seq(&next_json(&mut ws).await);
    }
    for _ in 0..50 {
        let n = seq(&next_json(&mut ws).await);
        assert_eq!(n, prev + 1, "an old source's message among the new one's");
        prev = n;
    }
    tokio::task::spawn_blocking(move || {
        inst.command(br#"{"op":"release"}"#).expect("release");
    })
    .await
    .unwrap();
    assert!(ended.is_ok(), "the old source was still running");
    gw.shutdown().await;
}

/// What a changed keyed channel's old source hands over after the reload
/// (here a poll held across it) does not reach the streams reopened on the
/// new source: their first message is the new source's first step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_keyed_channel_s_old_source_does_not_reach_the_reopened_streams() {
    let (dep, gw, addr, mut ws) = following_a_long_job().await;
    let old = gw.state().live().channels["jobs"].clone();
    hold_a_poll(&old).await;
    let mut ws = then_release(&old, async {
        dep.write("specs/jobs.yaml", &jobs_spec(2));
        gw.reload().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(close_code(&mut ws).await, Some(1001));
        let ws = connect(addr, "/jobs/a").await;
        let new = gw.state().live().channels["jobs"].clone();
        eventually("the new source's stream opened", || async {
            let v = new
                .command(br#"{"op":"status"}"#.to_vec(), PATIENCE)
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&v).ok()?;
            (v["polls"].as_u64()? >= 2).then_some(())
        })
        .await;
        ws
    })
    .await;
    assert_eq!(next_json(&mut ws).await["step"], 1);
    assert_eq!(next_json(&mut ws).await["step"], 2);
    assert_eq!(close_code(&mut ws).await, Some(1000));
    // The old source's message is counted where it went: nowhere.
    metric_becomes(
        addr,
        "gateway_messages_discarded_total{channel=\"jobs\",plugin=\"test-faults\"}",
        1.0,
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reloads_when_a_spec_file_appears() {
    let dep = Deployment::new();
    dep.gateway_yaml("reload:\n  interval: 50ms\n")
        .shipped_schema("ticker.json")
        .write("specs/keep.yaml", &ticker_spec("keep", 100, 8));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let (status, _, _) = http(addr, "GET", "/later", &[]).await;
    assert_eq!(status, 404);
    dep.write("specs/later.yaml", &ticker_spec("later", 100, 8));
    eventually("the watcher's reload", || async {
        metric(addr, "gateway_config_reloads_total{result=\"ok\"}")
            .await
            .filter(|v| *v >= 1.0)
    })
    .await;
    let mut ws = connect(addr, "/later").await;
    next_json(&mut ws).await;
    // A broken edit is refused and counted; the watcher keeps watching.
    dep.write("specs/later.yaml", "channel: [");
    eventually("the refused reload", || async {
        metric(addr, "gateway_config_reloads_total{result=\"error\"}")
            .await
            .filter(|v| *v >= 1.0)
    })
    .await;
    next_json(&mut ws).await;
    dep.write("specs/later.yaml", &ticker_spec("later", 100, 16));
    until_pad(&mut ws, 16).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    let dep = Deployment::new();
    dep.gateway_yaml("reload:\n  watch: false\n")
        .shipped_schema("ticker.json")
        .write("specs/keep.yaml", &ticker_spec("keep", 200, 8));
    let gw = GatewayProcess::spawn(&dep.path("gateway.yaml"), &[]);
    let addr = gw.addr;
    let mut keep = connect(addr, "/keep").await;
    let first = seq(&next_json(&mut keep).await);
    dep.write("specs/added.yaml", &ticker_spec("added", 200, 8));
    gw.signal("HUP");
    let logged = gw.wait_log("configuration reloaded");
    assert_eq!(logged["added"], "[\"added\"]", "{logged}");
    let mut added = connect(addr, "/added").await;
    next_json(&mut added).await;
    read_in_order(&mut keep, first, 200).await;
    let mut gw = gw;
    gw.signal("TERM");
    let _ = gw.child.wait();
}
