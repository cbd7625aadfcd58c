//! HTTP JSON routes beside the sockets, on several listeners: gateway state
//! through templates, a channel's latest message, plugin commands, and the
//! errors (400, 401, 404, 405, 413, 503).

use crate::common::*;
use serde_json::{Value, json};

fn deployment() -> Deployment {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            r#"
listeners:
  ws: {{bind: 127.0.0.1:0}}
  rest: {{bind: 127.0.0.1:0}}
plugins:
  dirs: [{}]
channels: [specs/*.yaml]
admin: {{listener: rest}}
protocols:
  svc: {{action_field: action, channel_field: service}}
endpoints:
  - path: /ws
    listener: ws
    protocol: svc
    channels: all
  - path: /stream
    listener: ws
    channels: [feed]
http:
  - path: /ws/stats
    listener: ws
    body:
      status: success
      data:
        total_connections: "{{{{gateway.connections}}}}"
        clients: "{{{{gateway.clients}}}}"
        subscription_counts: "{{{{gateway.subscription_counts}}}}"
      timestamp: "{{{{now}}}}"
  - path: /ws/services
    listener: ws
    body: "{{{{gateway.channels}}}}"
  - path: /ws/endpoints
    listener: ws
    body: "{{{{gateway.endpoints}}}}"
  - path: /api/v1/
    listener: rest
    body:
      streams: "ws://{{{{request.host}}}}:{{{{listeners.ws.port}}}}/stream"
  - path: /latest
    listener: rest
    latest: feed
  - path: /echo
    listener: rest
    command: {{channel: feed, request: {{op: echo, level: "{{{{request.query.level}}}}"}}}}
  - path: /force
    listener: rest
    method: POST
    status: 202
    max_body: 64
    command: {{channel: feed, request: {{op: echo, types: "{{{{request.body.sync_types}}}}"}}}}
    body: {{status: sync_triggered, sync_types: "{{{{result.types}}}}"}}
  - path: /fail
    listener: rest
    command: {{channel: feed, request: {{op: fail}}}}
  - path: /down
    listener: rest
    command: {{channel: broken, request: {{op: echo}}}}
  - path: /secret
    listener: rest
    auth: {{mode: api_key, header: X-Api-Key, keys_file: keys.txt}}
    body: {{ok: true}}
  - path: /emit
    listener: rest
    method: POST
    command: {{channel: feed, request: {{op: emit, messages: "{{{{request.body}}}}"}}}}
"#,
            target_dir().display()
        ),
    )
    .write("keys.txt", "k-1\n")
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/feed.yaml", &bus_spec("feed", "description: a test feed\ngroups: [g]\n"))
    .write(
        "specs/broken.yaml",
        "channel: broken\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: push\n  config: {fail_create: nope}\n",
    );
    dep
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_from_state_latest_values_and_commands() {
    let dep = deployment();
    let gw = dep.start().await;
    let ws_addr = gw.addr("ws").unwrap();
    let rest = gw.addr("rest").unwrap();

    // Admin routes moved to `rest`; sockets are on `ws` only.
    assert_eq!(http(rest, "GET", "/healthz", &[]).await.0, 200);
    assert_eq!(http(ws_addr, "GET", "/healthz", &[]).await.0, 404);
    assert_eq!(http(rest, "GET", "/ws/stats", &[]).await.0, 404);

    let mut a = connect(ws_addr, "/ws").await;
    send_json(&mut a, &json!({"action": "subscribe", "service": "feed"})).await;
    assert_eq!(next_json(&mut a).await["action"], "subscribed");
    let _b = connect(ws_addr, "/stream").await;

    let stats = eventually("both clients listed", || async {
        let (s, _, body) = http(ws_addr, "GET", "/ws/stats", &[]).await;
        assert_eq!(s, 200);
        let v = json_of(&body);
        (v["data"]["total_connections"] == 2 && v["data"]["subscription_counts"]["feed"] == 2)
            .then_some(v)
    })
    .await;
    assert_eq!(stats["status"], "success");
    let clients = stats["data"]["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2);
    assert_eq!(clients[0]["subscriptions"], json!(["feed"]));
    assert_eq!(clients[0]["path"], "/ws");
    for k in ["client_id", "connected_at", "last_activity"] {
        assert!(clients[0][k].is_string(), "{k} in {}", clients[0]);
    }

    let (_, _, body) = http(ws_addr, "GET", "/ws/services", &[]).await;
    let services = json_of(&body);
    let feed = services
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "feed")
        .unwrap();
    assert_eq!(feed["description"], "a test feed");
    assert_eq!(feed["groups"], json!(["g"]));
    let (_, _, body) = http(ws_addr, "GET", "/ws/endpoints", &[]).await;
    let eps = json_of(&body);
    assert_eq!(eps[0]["url"], format!("ws://{ws_addr}/ws"));
    assert_eq!(eps[1]["url"], format!("ws://{ws_addr}/stream"));

    let (_, _, body) = http(rest, "GET", "/api/v1/", &[]).await;
    assert_eq!(
        json_of(&body)["streams"],
        format!("ws://127.0.0.1:{}/stream", ws_addr.port())
    );

    // Latest value: 503 until the channel has published, then the message.
    let (s, _, body) = http(rest, "GET", "/latest", &[]).await;
    assert_eq!(
        (s, json_of(&body)["error"].as_str()),
        (503, Some("no_data"))
    );
    eventually("the plugin to take the message", || async {
        let (s, _, _) = http_body(rest, "POST", "/emit", &[], r#"[{"n": 1}]"#).await;
        (s == 200).then_some(())
    })
    .await;
    assert_eq!(next_json(&mut a).await, json!({"n": 1}));
    let (s, head, body) = http(rest, "GET", "/latest", &[]).await;
    assert_eq!((s, json_of(&body)), (200, json!({"n": 1})));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json")
    );

    // Commands: query and body reach the plugin; its answer is the body.
    let (s, _, body) = http(rest, "GET", "/echo?level=info&limit=5", &[]).await;
    assert_eq!(
        (s, json_of(&body)),
        (200, json!({"op": "echo", "level": "info"}))
    );
    // A repeated parameter is its first occurrence, as authentication
    // reads one (it was the last).
    let (s, _, body) = http(rest, "GET", "/echo?level=info&level=debug", &[]).await;
    assert_eq!(
        (s, json_of(&body)),
        (200, json!({"op": "echo", "level": "info"}))
    );
    let (s, _, body) = http_body(
        rest,
        "POST",
        "/force",
        &[],
        r#"{"sync_types": ["StateSync"]}"#,
    )
    .await;
    assert_eq!(
        (s, json_of(&body)),
        (
            202,
            json!({"status": "sync_triggered", "sync_types": ["StateSync"]})
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_errors_are_json_with_the_right_status() {
    let dep = deployment();
    let gw = dep.start().await;
    let rest = gw.addr("rest").unwrap();
    eventually("the plugin to run", || async {
        (http(rest, "GET", "/echo", &[]).await.0 == 200).then_some(())
    })
    .await;
    for (method, path, body, status, error) in [
        ("POST", "/force", "{not json", 400, "invalid_json"),
        (
            "POST",
            "/force",
            &"x".repeat(65) as &str,
            413,
            "body_too_large",
        ),
        ("GET", "/force", "", 405, "method_not_allowed"),
        ("GET", "/nowhere", "", 404, "not_found"),
        ("GET", "/fail", "", 400, "command_failed"),
        ("GET", "/down", "", 503, "plugin_unavailable"),
        ("GET", "/secret", "", 401, "missing_api_key"),
    ] {
        let (s, _, b) = http_body(rest, method, path, &[], body).await;
        assert_eq!(s, status, "{method} {path}: {b}");
        assert_eq!(json_of(&b)["error"], error, "{method} {path}");
    }
    let (s, _, b) = http(rest, "GET", "/secret", &[("X-Api-Key", "k-1")]).await;
    assert_eq!((s, json_of(&b)), (200, json!({"ok": true})));
    let (s, _, _) = http(rest, "GET", "/secret", &[("X-Api-Key", "k-2")]).await;
    assert_eq!(s, 403);
    // A route whose answer never reads `request.body` does not take the
    // body at all (it would cost memory, parsed, for nothing).
    let (s, _, b) = http_body(rest, "GET", "/echo?level=3", &[], "{not json").await;
    assert_eq!((s, json_of(&b)["level"].clone()), (200, json!("3")), "{b}");
    // A GET route takes HEAD too, and says so (RFC 9110).
    let (s, head, _) = http_body(rest, "POST", "/echo", &[], "{}").await;
    assert_eq!(s, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
}
