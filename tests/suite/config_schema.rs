//! The JSON Schemas of gateway.yaml and channel specs (`gateway schema`):
//! the copies in docs/schema/ are current, every shipped YAML file names its
//! schema on its first line and satisfies it, and wrong files fail it.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;
use gateway::config::schema::{SchemaKind, json_schema, render};
use serde_json::Value;

/// Every YAML file of the repository: gateway.yaml files and channel specs
/// (tests/suite/shipped_yaml.rs checks that each one is one or the other).
fn shipped() -> Vec<(PathBuf, SchemaKind)> {
    shipped_yaml_files()
        .into_iter()
        .map(|p| {
            let kind = if p.file_name().is_some_and(|n| n == "gateway.yaml") {
                SchemaKind::Gateway
            } else {
                SchemaKind::Channel
            };
            (p, kind)
        })
        .collect()
}

fn validator(kind: SchemaKind) -> jsonschema::Validator {
    jsonschema::validator_for(&json_schema(kind)).expect("the generated schema compiles")
}

/// YAML text as JSON, as an editor checking it against the schema sees it:
/// YAML 1.2, where `off` and `no` are strings, not booleans.
fn as_json(text: &str) -> Value {
    let opts = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_str_with_options(text, opts).expect("valid YAML")
}

/// Every mismatch of `text` against `kind`'s schema, as `path: message`.
fn mismatches(kind: SchemaKind, text: &str) -> Vec<String> {
    let v = validator(kind);
    let doc = as_json(text);
    v.iter_errors(&doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn schema_file(kind: SchemaKind) -> PathBuf {
    repo_root().join("docs/schema").join(kind.file_name())
}

fn arg(kind: SchemaKind) -> &'static str {
    match kind {
        SchemaKind::Gateway => "gateway",
        SchemaKind::Channel => "channel",
    }
}

#[test]
fn committed_schemas_are_what_gateway_schema_prints() {
    for kind in [SchemaKind::Gateway, SchemaKind::Channel] {
        let path = schema_file(kind);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(
            committed == render(kind),
            "docs/schema/{} is stale: regenerate it with `cargo run -- schema {} > docs/schema/{}`",
            kind.file_name(),
            arg(kind),
            kind.file_name()
        );
    }
}

#[test]
fn the_binary_prints_the_schemas() {
    build_plugins();
    for kind in [SchemaKind::Gateway, SchemaKind::Channel] {
        let out = Command::new(target_dir().join("gateway"))
            .args(["schema", arg(kind)])
            .output()
            .expect("run the gateway binary");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), render(kind));
        // Printing a schema needs no configuration.
        assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    }
}

#[test]
fn every_shipped_yaml_names_its_schema_and_satisfies_it() {
    let files = shipped();
    assert!(
        files.len() >= 40,
        "found only {} YAML files under {}",
        files.len(),
        repo_root().display()
    );
    let mut problems = Vec::new();
    for (path, kind) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let first = text.lines().next().unwrap_or("");
        match first.strip_prefix("# yaml-language-server: $schema=") {
            Some(rel) => {
                let named = path.parent().unwrap().join(rel);
                if named.canonicalize().ok() != schema_file(*kind).canonicalize().ok() {
                    problems.push(format!(
                        "{}: the modeline names {rel}, not docs/schema/{}",
                        path.display(),
                        kind.file_name()
                    ));
                }
            }
            None => problems.push(format!(
                "{}: the first line should be `# yaml-language-server: $schema=<relative path to docs/schema/{}>`",
                path.display(),
                kind.file_name()
            )),
        }
        for m in mismatches(*kind, &text) {
            problems.push(format!("{}: {m}", path.display()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

const GOOD_GATEWAY: &str = "\
listeners:
  main:
    bind: 127.0.0.1:8080
    status_codes: {405: 404}
channels: [specs/*.yaml]
limits: {max_message_size: 64KiB, session_queue: 16, inbound_messages: 100/s, idle_timeout: off}
admin: {asyncapi: /asyncapi.json}
";

const GOOD_CHANNEL: &str = "\
channel: ticker
schema: schemas/ticker.json
source: {plugin: ticker, mode: poll, interval: 1s}
endpoints:
  - path: /ws/{id}
    auth: {mode: api_key, query: api_key, keys_env: KEYS}
examples:
  - {seq: 1}
";

#[test]
fn good_files_satisfy_the_schemas() {
    assert_eq!(
        mismatches(SchemaKind::Gateway, GOOD_GATEWAY),
        Vec::<String>::new()
    );
    assert_eq!(
        mismatches(SchemaKind::Channel, GOOD_CHANNEL),
        Vec::<String>::new()
    );
}

#[test]
fn wrong_files_are_rejected_by_the_schemas() {
    let gateway_cases = [
        // A misspelt key.
        GOOD_GATEWAY.replace("limits:", "limts:"),
        // A word where a count belongs.
        GOOD_GATEWAY.replace("session_queue: 16", "session_queue: lots"),
        // A size without a known unit.
        GOOD_GATEWAY.replace("64KiB", "64kb"),
        // A rate that is not COUNT/PERIOD.
        GOOD_GATEWAY.replace("100/s", "fast"),
        // No listeners.
        GOOD_GATEWAY.replace(
            "listeners:\n  main:\n    bind: 127.0.0.1:8080\n    status_codes: {405: 404}\n",
            "",
        ),
        // A status that is not a number.
        GOOD_GATEWAY.replace("{405: 404}", "{405: nope}"),
    ];
    for text in &gateway_cases {
        assert!(
            !mismatches(SchemaKind::Gateway, text).is_empty(),
            "the gateway.yaml schema accepts:\n{text}"
        );
    }
    let channel_cases = [
        GOOD_CHANNEL.replace("interval: 1s", "intervl: 1s"),
        GOOD_CHANNEL.replace("mode: poll", "mode: pull"),
        GOOD_CHANNEL.replace("interval: 1s", "interval: 5"),
        GOOD_CHANNEL.replace("mode: api_key", "mode: basic"),
        GOOD_CHANNEL.replace("query: api_key", "querry: api_key"),
        GOOD_CHANNEL.replace("channel: ticker\n", ""),
        GOOD_CHANNEL.replace("examples:\n  - {seq: 1}\n", "examples: {seq: 1}\n"),
    ];
    for text in &channel_cases {
        assert!(
            !mismatches(SchemaKind::Channel, text).is_empty(),
            "the channel spec schema accepts:\n{text}"
        );
    }
}
