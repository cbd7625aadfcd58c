//! The AsyncAPI 3.0 document of a configuration (`gateway asyncapi`,
//! `admin.asyncapi`): valid against the official AsyncAPI 3.0.0 JSON Schema
//! for every shipped configuration, with the listeners, endpoints, schemas
//! and auth schemes of the configuration in it.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use gateway::asyncapi;
use gateway::config::{self, LoadOptions};
use serde_json::{Value, json};

/// The AsyncAPI 3.0.0 JSON Schema vendored in tests/data/asyncapi.
fn asyncapi_schema() -> jsonschema::Validator {
    let path = repo_root().join("tests/data/asyncapi/asyncapi-3.0.0.schema.json");
    let text = std::fs::read_to_string(&path).expect("read the AsyncAPI schema");
    let schema: Value = serde_json::from_str(&text).expect("the AsyncAPI schema is JSON");
    jsonschema::validator_for(&schema).expect("the AsyncAPI schema compiles")
}

/// Every mismatch of `doc` against the AsyncAPI 3.0.0 schema, as `path: message`.
fn invalid(schema: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    schema
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// A shipped configuration, loaded with the test plugins.
fn load(path: &Path) -> config::Config {
    let opts = LoadOptions {
        plugin_dirs: Some(vec![build_plugins()]),
        ..Default::default()
    };
    config::load(path, &opts).unwrap_or_else(|e| panic!("{} does not load:\n{e}", path.display()))
}

fn example(name: &str) -> Value {
    let cfg = load(&repo_root().join("examples").join(name).join("gateway.yaml"));
    asyncapi::document(&cfg, None)
}

fn read_json(rel: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The channel of the document whose address is `path` on server `server`.
fn channel<'a>(doc: &'a Value, server: &str, path: &str) -> &'a Value {
    let want = json!([{"$ref": format!("#/servers/{server}")}]);
    doc["channels"]
        .as_object()
        .unwrap()
        .values()
        .find(|c| c["address"] == path && c["servers"] == want)
        .unwrap_or_else(|| panic!("no channel {path} on {server} in\n{doc:#}"))
}

/// Follow a local `$ref` (`#/a/b`) in `doc`, and the `$ref`s it leads to.
fn resolve<'a>(doc: &'a Value, r: &Value) -> &'a Value {
    let p = r["$ref"].as_str().expect("a $ref");
    let v = doc
        .pointer(p.strip_prefix('#').unwrap())
        .unwrap_or_else(|| panic!("{p} does not resolve"));
    if v.get("$ref").is_some() {
        resolve(doc, v)
    } else {
        v
    }
}

/// The operations on channel `id` with `action`.
fn operations<'a>(doc: &'a Value, id: &str, action: &str) -> Vec<&'a Value> {
    let r = json!({"$ref": format!("#/channels/{id}")});
    doc["operations"]
        .as_object()
        .unwrap()
        .values()
        .filter(|o| o["channel"] == r && o["action"] == action)
        .collect()
}

fn channel_id(doc: &Value, channel: &Value) -> String {
    doc["channels"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, c)| *c == channel)
        .map(|(k, _)| k.clone())
        .unwrap()
}

#[test]
fn every_shipped_configuration_has_a_valid_asyncapi_document() {
    let schema = asyncapi_schema();
    let files: Vec<_> = shipped_yaml_files()
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "gateway.yaml"))
        .collect();
    assert!(files.len() >= 9, "found {files:?}");
    let mut problems = Vec::new();
    for f in &files {
        let cfg = load(f);
        let doc = asyncapi::document(&cfg, None);
        assert_eq!(doc["asyncapi"], "3.0.0");
        assert_eq!(
            doc["channels"].as_object().unwrap().len(),
            cfg.endpoints.len(),
            "{}: one AsyncAPI channel per endpoint",
            f.display()
        );
        assert_eq!(
            doc["servers"].as_object().unwrap().len(),
            cfg.listeners.len(),
            "{}: one server per listener",
            f.display()
        );
        for m in invalid(&schema, &doc) {
            problems.push(format!("{}: {m}", f.display()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_schema_check_catches_a_broken_document() {
    // The validation above can fail: a document missing what AsyncAPI
    // requires, or with an action AsyncAPI does not know, is refused.
    let schema = asyncapi_schema();
    let mut doc = example("minimal");
    assert_eq!(invalid(&schema, &doc), Vec::<String>::new());
    doc.as_object_mut().unwrap().remove("info");
    assert!(!invalid(&schema, &doc).is_empty());
    let mut doc = example("minimal");
    let op = doc["operations"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    op["action"] = json!("publish");
    assert!(!invalid(&schema, &doc).is_empty());
}

#[test]
fn listeners_paths_schemas_examples_and_api_keys_are_in_the_document() {
    let doc = example("jobs-chain-market");
    // Servers: the listeners, as configured.
    assert_eq!(
        doc["servers"]["jobs"]["host"], "127.0.0.1:8011",
        "{:#}",
        doc["servers"]
    );
    assert_eq!(doc["servers"]["jobs"]["protocol"], "ws");
    assert_eq!(doc["servers"]["chain"]["host"], "127.0.0.1:8080");
    assert_eq!(doc["servers"]["market"]["host"], "127.0.0.1:8102");

    // A path parameter.
    let jobs = channel(&doc, "jobs", "/v1/jobs/{job_id}/ws");
    assert!(jobs["parameters"]["job_id"].is_object(), "{jobs:#}");
    assert_eq!(jobs["parameters"].as_object().unwrap().len(), 1);

    // Its message: the channel's schema as the payload, the spec's examples.
    let messages = jobs["messages"].as_object().unwrap();
    assert_eq!(messages.len(), 1, "{jobs:#}");
    let msg = resolve(&doc, messages.values().next().unwrap());
    assert_eq!(
        msg["payload"]["schema"],
        read_json("examples/jobs-chain-market/schemas/job-status.json")
    );
    assert_eq!(
        msg["payload"]["schemaFormat"],
        "application/schema+json;version=draft-2020-12"
    );
    assert_eq!(msg["examples"].as_array().unwrap().len(), 3);
    assert_eq!(
        msg["examples"][0]["payload"],
        json!({"job_id": "42", "state": "QUEUED", "assigned_miner_id": null, "timestamp": "2026-12-01T12:00:00.000Z", "progress": 0})
    );

    // The gateway sends it, to clients presenting an API key.
    let id = channel_id(&doc, jobs);
    let sends = operations(&doc, &id, "send");
    assert_eq!(sends.len(), 1);
    assert_eq!(
        resolve(&doc, &sends[0]["messages"][0]),
        msg,
        "the operation names the channel's message"
    );
    assert!(operations(&doc, &id, "receive").is_empty());
    let mut schemes: Vec<&Value> = sends[0]["security"]
        .as_array()
        .expect("the endpoint's auth")
        .iter()
        .map(|r| resolve(&doc, r))
        .collect();
    schemes.sort_by_key(|s| s["in"].as_str().unwrap().to_string());
    assert_eq!(
        schemes,
        [
            &json!({"type": "httpApiKey", "in": "header", "name": "x-api-key", "description": "An API key in a request header of the upgrade."}),
            &json!({"type": "httpApiKey", "in": "query", "name": "api_key", "description": "An API key in a query parameter of the upgrade request."}),
        ]
    );

    // The same path on two listeners is two channels.
    let chain = channel(&doc, "chain", "/v1/events");
    let market = channel(&doc, "market", "/v1/events");
    assert_ne!(channel_id(&doc, chain), channel_id(&doc, market));
}

#[test]
fn protocol_actions_are_client_messages_and_in_band_auth_is_described() {
    let doc = example("iot-telemetry");
    let ws = channel(&doc, "main", "/ws");
    let id = channel_id(&doc, ws);
    let receives = operations(&doc, &id, "receive");
    // The client messages: each action of the protocol, and the auth message.
    let mut consts: Vec<String> = receives
        .iter()
        .map(|o| resolve(&doc, &o["messages"][0]))
        .filter_map(|m| m["payload"]["properties"]["type"]["const"].as_str())
        .map(str::to_string)
        .collect();
    consts.sort();
    assert!(consts.contains(&"subscribe".to_string()), "{consts:?}");
    assert!(consts.contains(&"unsubscribe".to_string()), "{consts:?}");
    assert!(consts.contains(&"auth".to_string()), "{consts:?}");
    let subscribe = receives
        .iter()
        .find(|o| {
            resolve(&doc, &o["messages"][0])["payload"]["properties"]["type"]["const"]
                == "subscribe"
        })
        .unwrap();
    let payload = &resolve(&doc, &subscribe["messages"][0])["payload"];
    assert_eq!(payload["required"], json!(["type", "channel"]));
    assert!(subscribe["reply"]["messages"].is_array(), "{subscribe:#}");
    // Every channel of the endpoint is a message the gateway sends there.
    let sends = operations(&doc, &id, "send");
    assert_eq!(sends.len(), 1);
    let sent: Vec<&Value> = sends[0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| resolve(&doc, r))
        .collect();
    for ch in ["telemetry", "alerts", "system", "devices"] {
        assert!(
            sent.iter().any(|m| m["name"] == ch),
            "{ch} is not sent on /ws: {sent:#?}"
        );
    }
}

#[test]
fn tls_listeners_are_wss_and_jwt_is_a_bearer_scheme() {
    let dep = Deployment::new();
    let (cert, key) = self_signed_cert();
    dep.write("tls/cert.pem", &cert).write("tls/key.pem", &key);
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    tls: {{cert: tls/cert.pem, key: tls/key.pem}}\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    );
    dep.shipped_schema("ticker.json");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    auth: {mode: jwt, algorithm: HS256, secret_default: s3cret, query: token}\n",
    );
    let cfg = dep.load().unwrap_or_else(|e| panic!("{e}"));
    let doc = asyncapi::document(&cfg, None);
    assert_eq!(invalid(&asyncapi_schema(), &doc), Vec::<String>::new());
    assert_eq!(doc["servers"]["main"]["protocol"], "wss");
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    let mut got: Vec<&Value> = schemes.values().collect();
    got.sort_by_key(|s| s["type"].as_str().unwrap().to_string());
    assert_eq!(got[0]["type"], "http");
    assert_eq!(got[0]["scheme"], "bearer");
    assert_eq!(got[0]["bearerFormat"], "JWT");
    assert_eq!(got[1]["type"], "httpApiKey");
    assert_eq!(got[1]["in"], "query");
    assert_eq!(got[1]["name"], "token");
    assert_eq!(got.len(), 2);
}

#[test]
fn the_binary_prints_the_document() {
    build_plugins();
    let gw = repo_root().join("examples/minimal/gateway.yaml");
    let out = Command::new(target_dir().join("gateway"))
        .arg("asyncapi")
        .arg("--config")
        .arg(&gw)
        .arg("--plugin-dir")
        .arg(target_dir())
        .env_remove("RUST_LOG")
        .output()
        .expect("run the gateway binary");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(printed, asyncapi::document(&load(&gw), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_the_document_at_its_path() {
    let gw = start_example("jobs-chain-market", &["jobs", "chain", "market"]).await;
    let admin = gw.addr("jobs").unwrap();
    let (status, head, body) = http(admin, "GET", "/asyncapi.json", &[]).await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(invalid(&asyncapi_schema(), &doc), Vec::<String>::new());
    // The served document names the addresses actually bound.
    for name in ["jobs", "chain", "market"] {
        let addr = gw.addr(name).unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(doc["servers"][name]["host"], addr.to_string());
    }
    // Only on the admin listener, only at its path.
    let (status, _, _) = http(gw.addr("chain").unwrap(), "GET", "/asyncapi.json", &[]).await;
    assert_eq!(status, 404);
    let (status, _, _) = http(admin, "GET", "/asyncapi.yaml", &[]).await;
    assert_eq!(status, 404);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_admin_asyncapi_nothing_is_served() {
    let dep = Deployment::new();
    dep.gateway_yaml("").shipped_schema("ticker.json");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n",
    );
    let gw = dep.start().await;
    let (status, _, _) = http(gw.addr("main").unwrap(), "GET", "/asyncapi.json", &[]).await;
    assert_eq!(status, 404);
    let (status, _, _) = http(gw.addr("main").unwrap(), "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

/// Names that make the same AsyncAPI key (`a.b` and `a-b`) get keys of
/// their own: each endpoint's message has its own channel's schema, each
/// listener its own server, each API-key header its own scheme. Before, the
/// second took the first's message, server or scheme.
#[test]
fn names_alike_as_keys_keep_their_own_entries() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  a.b: {{bind: 127.0.0.1:0}}\n  a-b: {{bind: 127.0.0.1:0}}\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    )
    .write("specs/schemas/one.json", r#"{"type": "object", "title": "one"}"#)
    .write("specs/schemas/two.json", r#"{"type": "object", "title": "two"}"#)
    .write(
        "specs/dot.yaml",
        "channel: p.q\nschema: schemas/one.json\nsource: {plugin: ticker, mode: push}\nendpoints:\n  - path: /dot\n    listener: a.b\n    auth: {mode: api_key, header: x.key, keys_env: PATH}\n",
    )
    .write(
        "specs/dash.yaml",
        "channel: p-q\nschema: schemas/two.json\nsource: {plugin: ticker, mode: push}\nendpoints:\n  - path: /dash\n    listener: a-b\n    auth: {mode: api_key, header: x-key, keys_env: PATH}\n",
    );
    let cfg = load(&dep.path("gateway.yaml"));
    let doc = asyncapi::document(&cfg, None);
    assert!(invalid(&asyncapi_schema(), &doc).is_empty(), "{doc:#}");
    let servers = doc["servers"].as_object().unwrap();
    assert_eq!(servers.len(), 2, "{doc:#}");
    let mut titles = Vec::new();
    let mut schemes = Vec::new();
    for (path, listener) in [("/dot", "a.b"), ("/dash", "a-b")] {
        let c = doc["channels"]
            .as_object()
            .unwrap()
            .values()
            .find(|c| c["address"] == path)
            .unwrap();
        let server = resolve(&doc, &c["servers"][0]);
        assert_eq!(server["title"], format!("listener {listener}"));
        let id = channel_id(&doc, c);
        let send = operations(&doc, &id, "send");
        let msg = resolve(&doc, &send[0]["messages"][0]);
        titles.push(msg["payload"]["schema"]["title"].clone());
        schemes.push(resolve(&doc, &send[0]["security"][0])["name"].clone());
    }
    assert_eq!(titles, [json!("one"), json!("two")]);
    assert_eq!(schemes, [json!("x.key"), json!("x-key")]);
}
