//! Configuration mistakes and the exact error lines they produce
//! (`file:line:col: field.path: message`), through the library and through
//! `gateway check`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::common::*;
use gateway::Gateway;
use gateway::config::{self, LoadOptions};

/// A valid push channel on the `ticker` plugin (needs `shipped_schema("ticker.json")`).
const TICKER_SPEC: &str = "\
channel: ticker
schema: schemas/ticker.json
source:
  plugin: ticker
  mode: push
endpoints:
  - path: /ws/ticker
";

/// A push channel on the `ticker` plugin validated by `schemas/main.json`
/// (written by the test).
const TICKER_ON_MAIN_JSON: &str =
    "channel: ticker\nschema: schemas/main.json\nsource:\n  plugin: ticker\n  mode: push\n";

/// A deployment with the harness gateway.yaml (plus `extra`) and the ticker schema.
fn deployment(extra: &str) -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(extra).shipped_schema("ticker.json");
    dep
}

/// Absolute path of a file in the deployment, as error lines print it.
fn at(dep: &Deployment, rel: &str) -> String {
    dep.path(rel).display().to_string()
}

/// Every error line of a load that must fail.
fn errors(dep: &Deployment) -> Vec<String> {
    errors_with(dep, &LoadOptions::default())
}

fn errors_with(dep: &Deployment, opts: &LoadOptions) -> Vec<String> {
    match config::load(&dep.path("gateway.yaml"), opts) {
        Ok(_) => panic!("the configuration should not load"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// A plugin directory holding only a copy of libticker.so, so that the list
/// of available plugins does not depend on what else is in target/.
fn ticker_only_plugin_dir(dep: &Deployment, rel: &str, file: &str) -> PathBuf {
    let dir = dep.path(rel);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(target_dir().join("libticker.so"), dir.join(file)).expect("copy libticker.so");
    dir
}

// --- Parse errors: the YAML does not fit the schema. ---

#[test]
fn unknown_key_in_a_channel_spec_lists_the_expected_keys() {
    let dep = deployment("");
    dep.write(
        "specs/system.yaml",
        "channel: system\nschema: schemas/ticker.json\nsource:\n  plugin: system-metrics\n  mode: poll\n  intervl: 5s\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:6:3: source.intervl: unknown field `intervl`, expected one of plugin, builtin, mode, interval, config, call_timeout",
            at(&dep, "specs/system.yaml")
        )]
    );
}

#[test]
fn unknown_top_level_key_in_gateway_yaml() {
    let dep = deployment("limts:\n  max_connections: 10\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:8:1: limts: unknown field `limts`, expected one of listeners, plugins, channels, admin, limits, log, shutdown, reload, protocols, endpoints, http, publish, broker",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn word_where_an_integer_is_expected() {
    let dep = deployment("limits:\n  max_connections: lots\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:20: limits.max_connections: expected a non-negative integer, got `lots`",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn negative_number_where_a_count_is_expected() {
    let dep = deployment("limits:\n  session_queue: -5\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:18: limits.session_queue: expected a non-negative integer, got `-5`",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn empty_value_where_an_integer_is_expected() {
    let dep = deployment("limits:\n  max_connections:\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:18: limits.max_connections: expected a non-negative integer, got an empty value",
            at(&dep, "gateway.yaml")
        )]
    );
}

/// A key written with nothing after it (or `~`) where text is expected: the
/// error says so in the config's terms (serde's own message named Rust
/// types), also for a key that has a default when it is not written.
#[test]
fn empty_value_where_a_duration_is_expected() {
    let dep = deployment("limits:\n  ping_interval:\n  pong_timeout: ~\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:16: limits.ping_interval: expected a value, got an empty value",
            at(&dep, "gateway.yaml")
        )]
    );
    let dep = deployment("limits:\n  pong_timeout: ~\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:17: limits.pong_timeout: expected a value, got an empty value",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn list_where_a_single_value_is_expected() {
    let dep = deployment("log:\n  level: [info, debug]\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:10: log.level: expected a single value, got a list",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn single_value_where_a_list_is_expected() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        "listeners:\n  main:\n    bind: 127.0.0.1:0\nchannels: specs/*.yaml\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:11: channels: expected a list, got `specs/*.yaml`",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn mapping_where_a_list_is_expected() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  path: /ws/ticker\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:7:3: endpoints: expected a list, got a mapping",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn word_where_a_boolean_is_expected() {
    let dep = deployment("admin:\n  enabled: maybe\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:12: admin.enabled: expected true or false, got `maybe`",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn unknown_enum_value_lists_the_choices() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: pull\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:9: source.mode: unknown variant `pull`, expected one of poll, push",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn unknown_on_full_policy_lists_the_choices() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nqueue:\n  on_full: block\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:7:12: queue.on_full: unknown variant `block`, expected one of drop_oldest, close",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn unknown_auth_mode_lists_the_choices() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    auth:\n      mode: basic\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:7: endpoints[0].auth.mode: unknown variant `basic`, expected one of none, api_key, jwt, handshake",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn bad_duration() {
    let dep = deployment("");
    dep.write(
        "specs/system.yaml",
        "channel: system\nschema: schemas/ticker.json\nsource:\n  plugin: system-metrics\n  mode: poll\n  interval: five seconds\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:6:13: source.interval: invalid duration \"five seconds\": write a number and a unit, e.g. 250ms, 5s, 1m, 24h",
            at(&dep, "specs/system.yaml")
        )]
    );
}

#[test]
fn duration_without_a_unit() {
    let dep = deployment("");
    dep.write(
        "specs/system.yaml",
        "channel: system\nschema: schemas/ticker.json\nsource:\n  plugin: system-metrics\n  mode: poll\n  interval: 5\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:6:13: source.interval: invalid duration \"5\": write a number and a unit, e.g. 250ms, 5s, 1m, 24h",
            at(&dep, "specs/system.yaml")
        )]
    );
}

#[test]
fn zero_duration() {
    let dep = deployment("shutdown:\n  deadline: 0s\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:13: shutdown.deadline: invalid duration \"0s\": must be greater than zero",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn durations_and_sizes_in_human_units_load() {
    // humantime accepts a space and long unit names: `5 sec` is 5 seconds.
    let dep = deployment(
        "limits:\n  max_message_size: 1MiB\n  session_queue: 64\nshutdown:\n  deadline: 5 sec\n",
    );
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let cfg = dep.load().unwrap_or_else(|e| panic!("should load:\n{e}"));
    assert_eq!(cfg.shutdown_deadline, std::time::Duration::from_secs(5));
    assert_eq!(cfg.limits.max_message_size, 1024 * 1024);
    assert_eq!(cfg.limits.session_queue, 64);
}

#[test]
fn bad_size() {
    let dep = deployment("limits:\n  max_message_size: 64 kilobytes\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:21: limits.max_message_size: invalid size \"64 kilobytes\": write bytes as an integer or with a unit, e.g. 4096, 64KiB, 1MiB",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn missing_required_key() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nsource:\n  plugin: ticker\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:2:1: .: missing field `schema`",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn empty_channel_spec() {
    let dep = deployment("");
    dep.write("specs/ticker.yaml", "# nothing yet\n");
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:2:1: .: the file is empty",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn missing_gateway_yaml() {
    let dep = Deployment::new();
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:0:0: .: cannot read file: No such file or directory (os error 2)",
            at(&dep, "gateway.yaml")
        )]
    );
}

// --- Schemas. ---

#[test]
fn missing_schema_file() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/tick.json\nsource:\n  plugin: ticker\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:2:9: schema: cannot read schema {}: No such file or directory (os error 2)",
            at(&dep, "specs/ticker.yaml"),
            at(&dep, "specs/schemas/tick.json")
        )]
    );
}

#[test]
fn schema_that_is_not_a_json_schema() {
    let dep = deployment("");
    dep.write("specs/schemas/bad.json", r#"{"type": 12}"#);
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/bad.json\nsource:\n  plugin: ticker\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:2:9: schema: schema {} is not a valid JSON Schema: 12 is not valid under any of the schemas listed in the 'anyOf' keyword (at /type)",
            at(&dep, "specs/ticker.yaml"),
            at(&dep, "specs/schemas/bad.json")
        )]
    );
}

/// A misspelt keyword or format is an annotation to a JSON Schema
/// validator: the check it names silently did not happen (`requird` left
/// every field optional). Both are refused, with the keyword meant.
#[test]
fn a_schema_with_a_misspelt_keyword_or_format_is_refused() {
    let dep = deployment("");
    dep.write(
        "specs/schemas/typo.json",
        r#"{"type": "object", "requird": ["seq"], "properties": {"seq": {"type": "integer", "minimun": 1}, "x": {"anyOf": [{"maxLenght": 3}]}}, "x-owner": "team"}"#,
    );
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/typo.json\nsource:\n  plugin: ticker\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:2:9: schema: schema {} uses unknown keyword `requird` at / (did you mean `required`?), unknown keyword `minimun` at /properties/seq (did you mean `minimum`?), unknown keyword `maxLenght` at /properties/x/anyOf/0 (did you mean `maxLength`?): validation would ignore them; correct them (a custom annotation: prefix it with x-)",
            at(&dep, "specs/ticker.yaml"),
            at(&dep, "specs/schemas/typo.json")
        )]
    );
    dep.write(
        "specs/schemas/typo.json",
        r#"{"type": "object", "properties": {"at": {"type": "string", "format": "date-tme"}}}"#,
    );
    let errs = errors(&dep);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("is not a valid JSON Schema") && errs[0].contains("date-tme"),
        "{errs:?}"
    );
}

/// A misspelt keyword in a schema that the channel's schema refers to in
/// another file by a `$ref` (or that one refers to, in its own file or
/// another) is refused the same way, naming the files and `$ref`s that lead
/// to it; a `#/pointer` fragment checks the schema it points at, not the
/// rest of its file (an OpenAPI document's `openapi` or `info` are no
/// keywords), and files that refer back to each other are each read once.
/// Corrected, the channel loads and the `$ref`s are followed.
#[test]
fn a_misspelt_keyword_in_a_file_a_schema_refers_to_is_refused() {
    let dep = deployment("");
    dep.write(
        "specs/schemas/main.json",
        r#"{"type": "object", "properties": {"price": {"$ref": "common.json#/$defs/price"}, "currency": {"$ref": "api.json#/components/schemas/Currency"}}}"#,
    );
    dep.write(
        "specs/schemas/common.json",
        r#"{"$defs": {"price": {"$ref": "units/money.json"}}}"#,
    );
    dep.write(
        "specs/schemas/units/money.json",
        r#"{"type": "number", "minimun": 0, "not": {"$ref": "../main.json"}, "x-unit": "EUR"}"#,
    );
    let api = |code: &str| {
        format!(
            r##"{{"openapi": "3.1.0", "info": {{"title": "prices"}}, "components": {{"schemas": {{"Currency": {{"$ref": "#/components/schemas/Code"}}, "Code": {{"type": "string", {code}: 3}}}}}}}}"##
        )
    };
    dep.write("specs/schemas/api.json", &api(r#""maxLength""#));
    dep.write("specs/ticker.yaml", TICKER_ON_MAIN_JSON);
    let main = at(&dep, "specs/schemas/main.json");
    let spec = at(&dep, "specs/ticker.yaml");
    let money = format!("{}/units/money.json", at(&dep, "specs/schemas"));
    let tail = "validation would ignore it; correct it (a custom annotation: prefix it with x-)";
    assert_eq!(
        errors(&dep),
        [format!(
            "{spec}:2:9: schema: schema {main}, which refers to {} (`$ref` at /properties/price/$ref), which refers to {money} (`$ref` at /$defs/price/$ref): {money} uses unknown keyword `minimun` at / (did you mean `minimum`?): {tail}",
            at(&dep, "specs/schemas/common.json"),
        )]
    );
    dep.write(
        "specs/schemas/units/money.json",
        r#"{"type": "number", "minimum": 0, "not": {"$ref": "../main.json"}, "x-unit": "EUR"}"#,
    );
    dep.write("specs/schemas/api.json", &api(r#""maxLenght""#));
    let api_path = at(&dep, "specs/schemas/api.json");
    assert_eq!(
        errors(&dep),
        [format!(
            "{spec}:2:9: schema: schema {main}, which refers to {api_path} (`$ref` at /properties/currency/$ref), whose `$ref` at /components/schemas/Currency/$ref points to /components/schemas/Code: {api_path} uses unknown keyword `maxLenght` at /components/schemas/Code (did you mean `maxLength`?): {tail}",
        )]
    );
    dep.write("specs/schemas/api.json", &api(r#""maxLength""#));
    let cfg = dep
        .load()
        .unwrap_or_else(|e| panic!("the corrected schemas should load: {e}"));
    // The `$ref`s resolve: the other files' `minimum` and `maxLength` are
    // checked.
    let v = &cfg.channels[0].validator;
    assert!(v.is_valid(&serde_json::json!({"price": 3, "currency": "EUR"})));
    assert!(!v.is_valid(&serde_json::json!({"price": -3})));
    assert!(!v.is_valid(&serde_json::json!({"currency": "EURO"})));
}

/// A `$ref` by `file:` URI (`file:///abs`, `file:/abs`) is followed like a
/// relative one.
#[test]
fn a_misspelt_keyword_in_a_file_a_file_uri_refers_to_is_refused() {
    let dep = deployment("");
    dep.write("specs/schemas/typo.json", r#"{"minimun": 1}"#);
    let typo = std::fs::canonicalize(dep.path("specs/schemas/typo.json")).unwrap();
    for uri in [
        format!("file://{}", typo.display()),
        format!("file:{}", typo.display()),
    ] {
        dep.write(
            "specs/schemas/main.json",
            &format!(r#"{{"type": "object", "properties": {{"a": {{"$ref": "{uri}"}}}}}}"#),
        );
        dep.write("specs/ticker.yaml", TICKER_ON_MAIN_JSON);
        assert_eq!(
            errors(&dep),
            [format!(
                "{}:2:9: schema: schema {}, which refers to {t} (`$ref` at /properties/a/$ref): {t} uses unknown keyword `minimun` at / (did you mean `minimum`?): validation would ignore it; correct it (a custom annotation: prefix it with x-)",
                at(&dep, "specs/ticker.yaml"),
                at(&dep, "specs/schemas/main.json"),
                t = typo.display(),
            )],
            "{uri}"
        );
    }
}

/// A `$ref` is joined onto the path of the file that holds it as written,
/// `..` taken out without resolving symlinks, as the validator joins URIs:
/// through a symlinked directory, `../x.json` is the file next to the link,
/// and that is the file checked (and, once corrected, the one validated).
#[test]
fn a_ref_through_a_symlinked_directory_is_followed_as_the_validator_does() {
    let dep = deployment("");
    std::fs::create_dir_all(dep.path("elsewhere")).unwrap();
    std::fs::create_dir_all(dep.path("specs/schemas")).unwrap();
    std::os::unix::fs::symlink(dep.path("elsewhere"), dep.path("specs/schemas/link")).unwrap();
    dep.write(
        "specs/schemas/main.json",
        r#"{"type": "object", "properties": {"a": {"$ref": "link/common.json"}}}"#,
    );
    dep.write("elsewhere/common.json", r#"{"$ref": "../units.json"}"#);
    dep.write(
        "specs/schemas/units.json",
        r#"{"type": "integer", "minimun": 1}"#,
    );
    dep.write("specs/ticker.yaml", TICKER_ON_MAIN_JSON);
    let errs = errors(&dep);
    assert!(
        errs.len() == 1
            && errs[0].contains(&format!(
                "{} uses unknown keyword `minimun`",
                at(&dep, "specs/schemas/units.json")
            )),
        "{errs:?}"
    );
    dep.write(
        "specs/schemas/units.json",
        r#"{"type": "integer", "minimum": 1}"#,
    );
    let cfg = dep
        .load()
        .unwrap_or_else(|e| panic!("the corrected schemas should load: {e}"));
    let v = &cfg.channels[0].validator;
    assert!(v.is_valid(&serde_json::json!({"a": 1})));
    assert!(!v.is_valid(&serde_json::json!({"a": 0})));
}

/// What the `$ref` check does not follow: a document with an `$id` (its
/// `$ref`s resolve against that, not the file's place) and `$ref` inside
/// data (`default`, `examples`), so neither refuses a schema that loaded
/// before.
#[test]
fn the_ref_check_follows_only_what_the_validator_reads_from_files() {
    let dep = deployment("");
    dep.write(
        "specs/schemas/main.json",
        r#"{"type": "object", "default": {"$ref": "typo.json"}, "properties": {"a": {"$ref": "with-id.json"}}}"#,
    );
    dep.write(
        "specs/schemas/with-id.json",
        r#"{"$id": "https://example.com/with-id.json", "type": "integer", "not": {"$ref": "typo.json"}, "examples": [{"$ref": "typo.json"}], "$defs": {"embedded": {"$id": "typo.json", "minimum": 100}}}"#,
    );
    dep.write("specs/schemas/typo.json", r#"{"minimun": 1}"#);
    dep.write("specs/ticker.yaml", TICKER_ON_MAIN_JSON);
    let cfg = dep
        .load()
        .unwrap_or_else(|e| panic!("nothing refers to the file typo.json as a schema: {e}"));
    // `with-id.json`'s `typo.json` is the schema embedded in it.
    let v = &cfg.channels[0].validator;
    assert!(v.is_valid(&serde_json::json!({"a": 99})));
    assert!(!v.is_valid(&serde_json::json!({"a": 100})));
}

/// A client that only listens answers Pings and sends nothing else, so an
/// `idle_timeout` no longer than `ping_interval` closes it as idle. The
/// warning names where `idle_timeout` was written (gateway.yaml or the
/// endpoint's own `limits`) and where `ping_interval` came from.
#[test]
fn an_idle_timeout_pings_do_not_beat_is_warned_where_it_is_written() {
    let dep = deployment("limits:\n  idle_timeout: 20s\n");
    let second = "\
channel: second
schema: schemas/ticker.json
source:
  plugin: ticker
  mode: push
endpoints:
  - path: /own
    limits:
      idle_timeout: 5s
      ping_interval: off
  - path: /mixed
    limits:
      ping_interval: 1m
  - path: /fine
    limits:
      ping_interval: 10s
";
    dep.write("specs/ticker.yaml", TICKER_SPEC)
        .write("specs/second.yaml", second);
    let gw = at(&dep, "gateway.yaml");
    let spec = at(&dep, "specs/second.yaml");
    let cfg = dep.load().unwrap_or_else(|e| panic!("{e}"));
    let mut idle: Vec<&String> = cfg
        .warnings
        .iter()
        .filter(|w| w.contains("closed as idle"))
        .collect();
    idle.sort();
    let tail = "a client that only listens sends nothing but Pongs, and is closed as idle; make ping_interval shorter than idle_timeout";
    assert_eq!(
        idle,
        [
            &format!(
                "{gw}:9: limits.idle_timeout: endpoint /mixed: idle_timeout is 20s and ping_interval (60s, {spec}:13) is not shorter: {tail}"
            ),
            &format!(
                "{gw}:9: limits.idle_timeout: endpoint /ws/ticker: idle_timeout is 20s and ping_interval (30s, the default) is not shorter: {tail}"
            ),
            &format!(
                "{spec}:9: endpoints[0].limits.idle_timeout: endpoint /own: idle_timeout is 5s and ping_interval is off (line 10): {tail}"
            ),
        ]
    );
}

#[test]
fn schema_that_is_not_json() {
    let dep = deployment("");
    dep.write("specs/schemas/bad.json", "{\"type\": ");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/bad.json\nsource:\n  plugin: ticker\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:2:9: schema: schema {} is not valid JSON: EOF while parsing a value at line 1 column 9",
            at(&dep, "specs/ticker.yaml"),
            at(&dep, "specs/schemas/bad.json")
        )]
    );
}

// --- Sample messages (`examples`). ---

#[test]
fn examples_that_fit_the_schema_load() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        &format!("{TICKER_SPEC}examples:\n  - {{seq: 1, ts: 5}}\n  - {{seq: 2, ts: 6, pad: xx}}\n"),
    );
    let cfg = dep.load().unwrap_or_else(|e| panic!("should load:\n{e}"));
    assert_eq!(
        cfg.channels[0].examples,
        [
            serde_json::json!({"seq": 1, "ts": 5}),
            serde_json::json!({"seq": 2, "ts": 6, "pad": "xx"})
        ]
    );
}

#[test]
fn example_mismatches_name_the_example_and_the_instance_path() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        &format!(
            "{TICKER_SPEC}examples:\n  - {{seq: 1, ts: 5}}\n  - {{seq: 0, ts: 5}}\n  - seq: 3\n  - {{seq: 4, ts: 5, extra: {{pad: yy}}}}\n  - {{seq: 5, ts: 5, pad: \"zz\"}}\n"
        ),
    );
    let spec = at(&dep, "specs/ticker.yaml");
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{spec}:10:5: examples[1]: the example does not satisfy schema schemas/ticker.json at /seq: 0 is less than the minimum of 1; correct the example or the schema"
            ),
            format!(
                "{spec}:11:5: examples[2]: the example does not satisfy schema schemas/ticker.json at /: \"ts\" is a required property; correct the example or the schema"
            ),
            format!(
                "{spec}:12:5: examples[3]: the example does not satisfy schema schemas/ticker.json at /: Additional properties are not allowed ('extra' was unexpected); correct the example or the schema"
            ),
            format!(
                "{spec}:13:5: examples[4]: the example does not satisfy schema schemas/ticker.json at /pad: \"zz\" does not match \"^x*$\"; correct the example or the schema"
            ),
        ]
    );
}

#[test]
fn check_reports_example_mismatches() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        &format!("{TICKER_SPEC}examples:\n  - {{seq: one, ts: 5}}\n"),
    );
    let gw = dep.path("gateway.yaml");
    let out = gateway_bin(&["check".as_ref(), "--config".as_ref(), gw.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{}:9:5: examples[0]: the example does not satisfy schema schemas/ticker.json at /seq: \"one\" is not of type \"integer\"; correct the example or the schema\n\
             1 error(s) in {}\n",
            at(&dep, "specs/ticker.yaml"),
            gw.display()
        )
    );
}

// --- Plugins. ---

#[test]
fn unknown_plugin_names_the_directory_and_the_available_plugins() {
    let dep = Deployment::new();
    // plugins.dirs is relative to gateway.yaml.
    ticker_only_plugin_dir(&dep, "plugins", "libticker.so");
    dep.write(
        "gateway.yaml",
        "listeners:\n  main:\n    bind: 127.0.0.1:0\nplugins:\n  dirs: [plugins]\nchannels:\n  - specs/*.yaml\n",
    );
    dep.shipped_schema("ticker.json");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: tickr\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:11: source.plugin: no plugin \"tickr\": looked for libtickr.so in {}; available: ticker",
            at(&dep, "specs/ticker.yaml"),
            at(&dep, "plugins")
        )]
    );
}

#[test]
fn unknown_plugin_with_plugin_dirs_overridden() {
    let dep = deployment("");
    let dir = ticker_only_plugin_dir(&dep, "only-ticker", "libticker.so");
    let empty = dep.path("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    dep.write(
        "specs/faults.yaml",
        "channel: faults\nschema: schemas/ticker.json\nsource:\n  plugin: test-faults\n  mode: push\n",
    );
    let opts = LoadOptions {
        plugin_dirs: Some(vec![empty.clone(), dir.clone()]),
        ..LoadOptions::default()
    };
    assert_eq!(
        errors_with(&dep, &opts),
        [format!(
            "{}:4:11: source.plugin: no plugin \"test-faults\": looked for libtest_faults.so in {}, {}; available: ticker",
            at(&dep, "specs/faults.yaml"),
            empty.display(),
            dir.display()
        )]
    );
}

#[test]
fn no_plugin_directory() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        "listeners:\n  main:\n    bind: 127.0.0.1:0\nchannels:\n  - specs/*.yaml\n",
    );
    dep.shipped_schema("ticker.json");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:0:0: plugins.dirs: no plugin directory configured; add e.g. `plugins: {{dirs: [target/release]}}`",
            at(&dep, "gateway.yaml")
        )]
    );
}

/// A plugin directory that does not exist is reported once, where it is
/// configured, not as a missing plugin in every channel spec.
#[test]
fn a_plugin_directory_that_does_not_exist() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        "listeners:\n  main:\n    bind: 127.0.0.1:0\nplugins:\n  dirs: [no-such-dir]\nchannels:\n  - specs/*.yaml\n",
    );
    dep.shipped_schema("ticker.json");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    dep.write(
        "specs/other.yaml",
        &TICKER_SPEC
            .replace("channel: ticker", "channel: other")
            .replace("/ws/ticker", "/ws/other"),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:10: plugins.dirs: no plugin directory exists ({}): build the plugins (cargo build --release) or correct the path (relative to this file)",
            at(&dep, "gateway.yaml"),
            at(&dep, "no-such-dir")
        )]
    );
}

#[test]
fn plugin_declaring_another_name() {
    let dep = deployment("");
    let dir = ticker_only_plugin_dir(&dep, "plugins", "libnot_ticker.so");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: not-ticker\n  mode: push\n",
    );
    let opts = LoadOptions {
        plugin_dirs: Some(vec![dir.clone()]),
        ..LoadOptions::default()
    };
    assert_eq!(
        errors_with(&dep, &opts),
        [format!(
            "{}:4:11: source.plugin: {} declares plugin name \"ticker\", not \"not-ticker\"",
            at(&dep, "specs/ticker.yaml"),
            dir.join("libnot_ticker.so").display()
        )]
    );
}

#[test]
fn abi_mismatched_plugin_names_both_versions() {
    let dep = deployment("");
    dep.write(
        "specs/old.yaml",
        "channel: old\nschema: schemas/ticker.json\nsource:\n  plugin: test-abi-mismatch\n  mode: poll\n  interval: 1s\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:11: source.plugin: plugin {} speaks plugin ABI v2; this gateway speaks v1: rebuild the plugin against plugin-api for ABI v1",
            at(&dep, "specs/old.yaml"),
            target_dir().join("libtest_abi_mismatch.so").display()
        )]
    );
}

#[test]
fn mode_the_plugin_does_not_support() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: poll\n  interval: 1s\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:9: source.mode: plugin \"ticker\" does not support poll mode (it supports: push, command)",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn poll_source_without_interval() {
    let dep = deployment("");
    dep.write(
        "specs/system.yaml",
        "channel: system\nschema: schemas/ticker.json\nsource:\n  plugin: system-metrics\n  mode: poll\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:9: source.interval: poll sources need an interval, e.g. `interval: 5s`",
            at(&dep, "specs/system.yaml")
        )]
    );
}

#[test]
fn push_source_with_interval() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  interval: 1s\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:6:13: source.interval: interval applies to poll sources only; remove it or use `mode: poll`",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

// --- Channels and endpoints. ---

#[test]
fn duplicate_path_on_a_listener_names_the_other_channel() {
    let dep = deployment("");
    dep.write(
        "specs/a.yaml",
        "channel: a\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/a\n",
    );
    dep.write(
        "specs/b.yaml",
        "channel: b\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/b\n  - path: /ws/a\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:8:11: endpoints[1].path: path \"/ws/a\" on listener \"main\" is already served by channel \"a\" ({}:7:11)",
            at(&dep, "specs/b.yaml"),
            at(&dep, "specs/a.yaml")
        )]
    );
}

#[test]
fn path_parameters_with_different_names_still_collide() {
    let dep = deployment("");
    dep.write(
        "specs/a.yaml",
        "channel: a\nschema: schemas/ticker.json\nsource:\n  plugin: test-faults\n  mode: push\nendpoints:\n  - path: /jobs/{id}\n",
    );
    dep.write(
        "specs/b.yaml",
        "channel: b\nschema: schemas/ticker.json\nsource:\n  plugin: test-faults\n  mode: push\nendpoints:\n  - path: /jobs/{job_id}\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:7:11: endpoints[0].path: path \"/jobs/{{job_id}}\" on listener \"main\" is already served by channel \"a\" ({}:7:11)",
            at(&dep, "specs/b.yaml"),
            at(&dep, "specs/a.yaml")
        )]
    );
}

#[test]
fn duplicate_channel_name_across_files() {
    let dep = deployment("");
    dep.write("specs/a.yaml", TICKER_SPEC);
    dep.write(
        "specs/b.yaml",
        "# the same channel again\nchannel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:2:10: channel: channel \"ticker\" is already defined at {}:1:10",
            at(&dep, "specs/b.yaml"),
            at(&dep, "specs/a.yaml")
        )]
    );
}

#[test]
fn invalid_channel_name() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: my ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:1:10: channel: invalid channel name \"my ticker\": use letters, digits, '-', '_' and '.'",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn channel_glob_matching_no_file() {
    let dep = deployment("  - more-specs/*.yaml\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:8:5: channels[1]: no file matches \"{}\"",
            at(&dep, "gateway.yaml"),
            at(&dep, "more-specs/*.yaml")
        )]
    );
}

#[test]
fn endpoint_on_an_unknown_listener() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    listener: public\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:8:15: endpoints[0].listener: no listener named \"public\"; defined: main",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn endpoint_without_listener_when_several_are_defined() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n  internal:\n    bind: 127.0.0.1:0\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    );
    dep.shipped_schema("ticker.json");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:7:11: endpoints[0].listener: several listeners are defined (internal, main); name one with `listener:`",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn admin_on_an_unknown_listener() {
    let dep = deployment("admin:\n  listener: admin\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:13: admin.listener: no listener named \"admin\"; defined: main",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn path_not_starting_with_a_slash() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: ws/ticker\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:7:11: endpoints[0].path: path \"ws/ticker\" must start with '/'",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn path_parameters_on_a_plugin_without_keyed_streams() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker/{symbol}\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:7:11: endpoints[0].path: path parameters select keyed streams, but plugin \"ticker\" has none (it supports: push, command)",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn api_key_auth_without_query_or_header() {
    let dep = deployment("");
    dep.write("specs/keys.txt", "secret\n");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    auth:\n      mode: api_key\n      keys_file: keys.txt\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:7: endpoints[0].auth: api_key needs `query` (e.g. api_key), `header` (e.g. X-Api-Key) or both",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn api_key_auth_without_keys() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    auth:\n      mode: api_key\n      header: X-Api-Key\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:7: endpoints[0].auth: api_key needs `keys_env` (an environment variable holding comma-separated keys) or `keys_file`",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn api_key_auth_with_an_unset_environment_variable() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    auth:\n      mode: api_key\n      query: api_key\n      keys_env: CONFIG_ERRORS_TEST_NEVER_SET_KEYS\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:7: endpoints[0].auth: environment variable CONFIG_ERRORS_TEST_NEVER_SET_KEYS is not set; it should hold the accepted API keys, comma-separated",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn api_key_auth_with_a_missing_keys_file() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    auth:\n      mode: api_key\n      query: api_key\n      keys_file: keys.txt\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:7: endpoints[0].auth: cannot read keys_file {}: No such file or directory (os error 2)",
            at(&dep, "specs/ticker.yaml"),
            at(&dep, "specs/keys.txt")
        )]
    );
}

#[test]
fn api_key_auth_with_an_unknown_key() {
    // `auth` is an internally tagged enum (`mode:` picks the variant), which
    // serde buffers: the error points at the `auth:` key, not at the typo.
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nendpoints:\n  - path: /ws/ticker\n    auth:\n      mode: api_key\n      querry: api_key\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:8:5: endpoints[0].auth: unknown field `querry`, expected one of query, header, keys_env, keys_file",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn admin_asyncapi_must_be_a_free_path() {
    let dep = deployment("admin:\n  asyncapi: asyncapi.json\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:13: admin.asyncapi: invalid path \"asyncapi.json\": write a path starting with '/', without parameters, e.g. /asyncapi.json",
            at(&dep, "gateway.yaml")
        )]
    );
    let dep = deployment("admin:\n  asyncapi: /metrics\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:13: admin.asyncapi: path \"/metrics\" is an admin route already; choose another, e.g. /asyncapi.json",
            at(&dep, "gateway.yaml")
        )]
    );
    let dep = deployment("admin:\n  asyncapi: /ws/ticker\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let spec = at(&dep, "specs/ticker.yaml");
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:13: admin.asyncapi: path \"/ws/ticker\" on listener \"main\" is already served by channel \"ticker\" ({spec}:7:11)",
            at(&dep, "gateway.yaml")
        )]
    );
}

/// The admin routes are answered first on the admin listener: an endpoint
/// at one of their paths would never be reached, and is refused.
#[test]
fn an_endpoint_at_an_admin_path_is_refused() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        &TICKER_SPEC.replace("path: /ws/ticker", "path: /metrics"),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:7:11: endpoints[0].path: path \"/metrics\" on listener \"main\" is an admin route, answered before channel \"ticker\", which would never be reached: choose another path, or serve the admin routes on another listener (admin.listener)",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

/// A rate whose period the limiter cannot count is refused at its line
/// (it made `gateway check` panic).
#[test]
fn a_rate_with_a_period_too_long_is_refused() {
    let dep = deployment("limits:\n  new_connections_per_ip: 1/600y\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let errs = errors(&dep);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(&format!(
            "{}:9:27: limits.new_connections_per_ip: invalid rate \"1/600y\"",
            at(&dep, "gateway.yaml")
        )) && errs[0].contains("at most 100 years"),
        "{errs:?}"
    );
}

/// `log.level` is checked: a word that is no level used to be read as a
/// target name (logging nothing else), and a bad directive was skipped with
/// an unlocated line on stderr.
#[test]
fn a_log_level_that_is_no_level_is_refused() {
    for (level, what) in [
        ("verbose", "unknown level \"verbose\""),
        (
            "\"gateway=verbse,info\"",
            "invalid directive in \"gateway=verbse,info\"",
        ),
    ] {
        let dep = deployment(&format!("log:\n  level: {level}\n"));
        dep.write("specs/ticker.yaml", TICKER_SPEC);
        let errs = errors(&dep);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(&format!(
                "{}:9:10: log.level: {what}",
                at(&dep, "gateway.yaml")
            )) && errs[0].contains("write a level (trace, debug, info, warn, error, off)"),
            "{errs:?}"
        );
    }
    for ok in ["debug", "WARN", "gateway=debug,info", "off"] {
        let dep = deployment(&format!("log:\n  level: {ok}\n"));
        dep.write("specs/ticker.yaml", TICKER_SPEC);
        dep.load().unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// HTTP routes and the publish API take a token by header or query only: an
/// auth with `message` is refused there even with `bearer` (the default) or
/// `query` on, since an in-band auth lets a request without a token through
/// (a publish with no token was accepted).
#[test]
fn an_in_band_auth_is_refused_on_http_routes_and_the_publish_api() {
    let jwt = "{mode: jwt, algorithm: HS256, secret_default: s3cret, message: {match: {type: auth}, token_field: token}}";
    let dep = deployment(&format!(
        "publish:\n  auth: {jwt}\nhttp:\n  - path: /stats\n    auth: {jwt}\n    body: {{ok: true}}\n"
    ));
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let file = at(&dep, "gateway.yaml");
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{file}:9:9: publish.auth: the publish API authenticates by header or query only: remove `message` (and use `jwt` or `api_key`)"
            ),
            format!(
                "{file}:12:11: http[0].auth: HTTP routes authenticate by header or query only: remove `message` (and use `jwt` or `api_key`)"
            ),
        ]
    );
}

/// The status page's endpoint declared but refused for its own error (here
/// a keys file that does not exist) gets that error only, not a second
/// one saying there is no such endpoint.
#[test]
fn a_refused_status_endpoint_is_not_also_reported_missing() {
    let dep = status_page_deployment("k", "1s", "1s", 1000, 1000);
    std::fs::remove_file(dep.path("specs/status.keys")).unwrap();
    let errs = errors(&dep);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(&at(&dep, "specs/status.yaml")) && errs[0].contains("status.keys"),
        "{errs:?}"
    );
    // An HTTP route at that path is no endpoint: still said.
    let dep = deployment(
        "admin:\n  status_page:\n    path: /status\n    endpoint: /feed\nhttp:\n  - path: /feed\n    body: {ok: true}\n",
    );
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let errs = errors(&dep);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("no endpoint \"/feed\""), "{errs:?}");
}

/// An idle timeout no longer than the ping interval closes clients that
/// only listen (their Pongs are all they send): loaded, with a warning.
#[test]
fn an_idle_timeout_not_longer_than_the_ping_interval_is_warned_about() {
    for (limits, warned) in [
        ("idle_timeout: 1s\n  ping_interval: 5s", true),
        ("idle_timeout: 1s\n  ping_interval: off", true),
        ("idle_timeout: 60s\n  ping_interval: 30s", false),
    ] {
        let dep = deployment(&format!("limits:\n  {limits}\n"));
        dep.write("specs/ticker.yaml", TICKER_SPEC);
        let cfg = dep.load().unwrap_or_else(|e| panic!("{e}"));
        let w: Vec<_> = cfg
            .warnings
            .iter()
            .filter(|w| w.contains("idle_timeout"))
            .collect();
        assert_eq!(!w.is_empty(), warned, "{limits}: {w:?}");
        if warned {
            assert!(
                w[0].contains("endpoint /ws/ticker")
                    && w[0].contains("make ping_interval shorter than idle_timeout"),
                "{w:?}"
            );
        }
    }
}

// --- Listeners. ---

#[test]
fn invalid_listener_address() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: localhost\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    );
    dep.shipped_schema("ticker.json");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:3:11: listeners.main.bind: invalid address \"localhost\": write host:port, e.g. 127.0.0.1:8080",
            at(&dep, "gateway.yaml")
        )]
    );
}

/// Two listeners on one port are refused at load (it failed only at bind);
/// a wildcard takes the port on every address of its family, and an IPv6
/// one on IPv4's too. Port 0 may be asked for any number of times.
#[test]
fn two_listeners_on_one_port_are_refused() {
    for (a, b, clash) in [
        ("127.0.0.1:18080", "0.0.0.0:18080", true),
        ("127.0.0.1:18080", "127.0.0.1:18080", true),
        ("127.0.0.1:18080", "'[::]:18080'", true),
        ("127.0.0.1:18080", "'[::1]:18080'", false),
        ("127.0.0.1:18080", "127.0.0.2:18080", false),
        ("127.0.0.1:0", "127.0.0.1:0", false),
    ] {
        let dep = Deployment::new();
        dep.write(
            "gateway.yaml",
            &format!(
                "listeners:\n  main:\n    bind: {a}\n  public:\n    bind: {b}\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
                target_dir().display()
            ),
        );
        dep.shipped_schema("ticker.json");
        dep.write(
            "specs/ticker.yaml",
            &TICKER_SPEC.replace("path: /ws/ticker", "path: /ws/ticker\n    listener: main"),
        );
        if clash {
            let errs = errors(&dep);
            assert_eq!(errs.len(), 1, "{a} {b}: {errs:?}");
            assert!(
                errs[0].starts_with(&format!(
                    "{}:5:11: listeners.public.bind: ",
                    at(&dep, "gateway.yaml")
                )) && errs[0].contains("overlaps listener \"main\"")
                    && errs[0].contains("give this one another port"),
                "{a} {b}: {errs:?}"
            );
        } else {
            dep.load().unwrap_or_else(|e| panic!("{a} {b}: {e}"));
        }
    }
}

#[test]
fn listen_override_naming_an_unknown_listener() {
    let dep = deployment("");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let opts = LoadOptions {
        listen: BTreeMap::from([("public".to_string(), "127.0.0.1:0".to_string())]),
        ..LoadOptions::default()
    };
    assert_eq!(
        errors_with(&dep, &opts),
        [format!(
            "{}:0:0: listeners.public: --listen names listener \"public\", which {} does not define",
            at(&dep, "gateway.yaml"),
            at(&dep, "gateway.yaml")
        )]
    );
}

#[tokio::test]
async fn listener_address_already_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("local addr");
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: \"{addr}\"\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    );
    dep.shipped_schema("ticker.json");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let cfg = dep.load().unwrap_or_else(|e| panic!("should load:\n{e}"));
    let Err(errors) = Gateway::start(cfg).await else {
        panic!("the gateway should not start on a port in use");
    };
    assert_eq!(
        errors.to_string(),
        format!(
            "{}:3:11: listeners.main.bind: cannot listen on {addr}: Address already in use (os error 98)",
            at(&dep, "gateway.yaml")
        )
    );
    drop(taken);
}

// --- TLS listeners. ---

/// A deployment whose listener `main` serves TLS with `tls/cert.pem` and
/// `tls/key.pem` (`cert` on line 5, col 13; `key` on line 6, col 12), with
/// whichever of the two files are given.
fn tls_deployment(cert: Option<&str>, key: Option<&str>) -> Deployment {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    tls:\n      cert: tls/cert.pem\n      key: tls/key.pem\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    );
    dep.shipped_schema("ticker.json");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    if let Some(c) = cert {
        dep.write("tls/cert.pem", c);
    }
    if let Some(k) = key {
        dep.write("tls/key.pem", k);
    }
    dep
}

const CERT_HINT: &str = "`cert` must be a PEM file holding the server's certificate (-----BEGIN CERTIFICATE-----), then any intermediates";
const KEY_HINT: &str = "`key` must be a PEM file holding the certificate's private key, unencrypted (BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)";

#[test]
fn tls_listener_loads_with_a_matching_certificate_and_key() {
    let (cert, key) = self_signed_cert();
    let dep = tls_deployment(Some(&cert), Some(&key));
    let cfg = dep.load().unwrap_or_else(|e| panic!("should load:\n{e}"));
    assert!(cfg.listeners[0].tls.is_some());
}

#[test]
fn tls_certificate_file_missing() {
    let (_, key) = self_signed_cert();
    let dep = tls_deployment(None, Some(&key));
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:13: listeners.main.tls.cert: cannot read certificate file {}: No such file or directory (os error 2); {CERT_HINT}",
            at(&dep, "gateway.yaml"),
            at(&dep, "tls/cert.pem")
        )]
    );
}

#[test]
fn tls_key_of_another_certificate() {
    let (cert, _) = self_signed_cert();
    let (_, other_key) = self_signed_cert();
    let dep = tls_deployment(Some(&cert), Some(&other_key));
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:6:12: listeners.main.tls.key: the private key in {} does not belong to the certificate in {}: give the key the certificate was issued for",
            at(&dep, "gateway.yaml"),
            at(&dep, "tls/key.pem"),
            at(&dep, "tls/cert.pem")
        )]
    );
}

#[test]
fn tls_files_without_a_certificate_or_a_key() {
    let (cert, key) = self_signed_cert();
    // Swapped: the certificate file holds the key.
    let dep = tls_deployment(Some(&key), Some(&cert));
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:13: listeners.main.tls.cert: {} holds no certificate (it holds a private key: are `cert` and `key` swapped?); {CERT_HINT}",
            at(&dep, "gateway.yaml"),
            at(&dep, "tls/cert.pem")
        )]
    );
    let dep = tls_deployment(Some(&cert), Some("not a key\n"));
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:6:12: listeners.main.tls.key: {} holds no private key; {KEY_HINT}",
            at(&dep, "gateway.yaml"),
            at(&dep, "tls/key.pem")
        )]
    );
    let dep = tls_deployment(
        Some(&cert),
        Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:6:12: listeners.main.tls.key: the private key in {} is not usable (failed to parse private key as RSA, ECDSA, or EdDSA); supported keys: RSA (2048 bits or more), ECDSA P-256 or P-384, Ed25519",
            at(&dep, "gateway.yaml"),
            at(&dep, "tls/key.pem")
        )]
    );
}

#[test]
fn tls_settings_misspelled() {
    let dep = Deployment::new();
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    tsl: {{cert: c.pem, key: k.pem}}\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:5: listeners.main.tsl: unknown field `tsl`, expected one of bind, tls, status_codes, trusted_proxies, client_ip_header, proxy_protocol",
            at(&dep, "gateway.yaml")
        )]
    );
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    tls: {{cert: c.pem, private_key: k.pem}}\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
            target_dir().display()
        ),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:24: listeners.main.tls.private_key: unknown field `private_key`, expected one of cert, key",
            at(&dep, "gateway.yaml")
        )]
    );
}

// --- Several mistakes at once. ---

#[test]
fn mistakes_in_several_files_are_reported_together_in_order() {
    let dep = deployment("admin:\n  listener: admin\n");
    // b.yaml: a parse error stops at the first mistake of that file.
    dep.write(
        "specs/b.yaml",
        "channel: b\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  intervl: 1s\n",
    );
    // a.yaml: three independent mistakes, all reported.
    dep.write(
        "specs/a.yaml",
        "channel: a\nschema: schemas/missing.json\nsource:\n  plugin: system-metrics\n  mode: poll\nendpoints:\n  - path: /ws/a\n  - path: /ws/a2\n    listener: public\n",
    );
    // c.yaml: a mistake of its own, and a path a.yaml already serves.
    dep.write(
        "specs/c.yaml",
        "channel: c\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  interval: 2s\nendpoints:\n  - path: /ws/a\n",
    );
    let gw = at(&dep, "gateway.yaml");
    let a = at(&dep, "specs/a.yaml");
    let b = at(&dep, "specs/b.yaml");
    let c = at(&dep, "specs/c.yaml");
    let missing = at(&dep, "specs/schemas/missing.json");
    // gateway.yaml first, then the spec files in name order, each in file order.
    let expected = [
        format!("{gw}:9:13: admin.listener: no listener named \"admin\"; defined: main"),
        format!(
            "{a}:2:9: schema: cannot read schema {missing}: No such file or directory (os error 2)"
        ),
        format!("{a}:5:9: source.interval: poll sources need an interval, e.g. `interval: 5s`"),
        format!("{a}:9:15: endpoints[1].listener: no listener named \"public\"; defined: main"),
        format!(
            "{b}:6:3: source.intervl: unknown field `intervl`, expected one of plugin, builtin, mode, interval, config, call_timeout"
        ),
        format!(
            "{c}:6:13: source.interval: interval applies to poll sources only; remove it or use `mode: poll`"
        ),
        format!(
            "{c}:8:11: endpoints[0].path: path \"/ws/a\" on listener \"main\" is already served by channel \"a\" ({a}:7:11)"
        ),
    ];
    assert_eq!(errors(&dep), expected);
    // The whole list prints one error per line.
    let all = dep.load().expect_err("should fail").to_string();
    assert_eq!(all, expected.join("\n"));
}

// --- The binary. ---

fn gateway_bin(args: &[&std::ffi::OsStr]) -> Output {
    build_plugins();
    Command::new(target_dir().join("gateway"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the gateway binary")
}

#[test]
fn check_reports_every_error_and_exits_1() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  interval: 1s\nendpoints:\n  - path: /ws/ticker\n    listener: public\n",
    );
    let gw = dep.path("gateway.yaml");
    let out = gateway_bin(&["check".as_ref(), "--config".as_ref(), gw.as_os_str()]);
    let spec = at(&dep, "specs/ticker.yaml");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{spec}:6:13: source.interval: interval applies to poll sources only; remove it or use `mode: poll`\n\
             {spec}:9:15: endpoints[0].listener: no listener named \"public\"; defined: main\n\
             2 error(s) in {}\n",
            gw.display()
        )
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[test]
fn check_on_a_good_config_says_ok_and_exits_0() {
    let dep = deployment("");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let gw = dep.path("gateway.yaml");
    let out = gateway_bin(&["check".as_ref(), "--config".as_ref(), gw.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}: OK (1 listener(s), 1 channel(s), 1 endpoint(s), plugins: ticker)\n",
            gw.display()
        )
    );
}

#[test]
fn check_honours_plugin_dir_override() {
    let dep = deployment("");
    let dir = ticker_only_plugin_dir(&dep, "only-ticker", "libticker.so");
    dep.write(
        "specs/system.yaml",
        "channel: system\nschema: schemas/ticker.json\nsource:\n  plugin: system-metrics\n  mode: poll\n  interval: 1s\n",
    );
    let gw = dep.path("gateway.yaml");
    let out = gateway_bin(&[
        "check".as_ref(),
        "--config".as_ref(),
        gw.as_os_str(),
        "--plugin-dir".as_ref(),
        dir.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{}:4:11: source.plugin: no plugin \"system-metrics\": looked for libsystem_metrics.so in {}; available: ticker\n\
             1 error(s) in {}\n",
            at(&dep, "specs/system.yaml"),
            dir.display(),
            gw.display()
        )
    );
}

#[test]
fn help_mentions_check_and_config() {
    let out = gateway_bin(&["--help".as_ref()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("check"), "{help}");
    assert!(help.contains("--config"), "{help}");
}

// --- Protocols, endpoints and HTTP routes. ---

#[test]
fn endpoint_protocol_channel_and_group_mistakes_are_located() {
    let dep = deployment(
        "protocols:\n  svc:\n    action_field: action\n    replies:\n      pong: {type: pong, at: \"{{clock}}\"}\nendpoints:\n  - path: /ws\n    protocol: sv\n    channels: all\n  - path: /a\n    protocol: svc\n    channels: [ticker, weather]\n  - path: /b\n    protocol: svc\n    channels: {group: media}\n  - path: /c\n    channels: all\n    subscribe: none\n  - path: /d\n    channels: all\n",
    );
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let g = at(&dep, "gateway.yaml");
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{g}:12:13: protocols.svc.replies.pong: unknown variable {{{{clock}}}}: available here: request, channel, channels, groups, client, error, result, params, principal, gateway, listeners, now, now_iso, now_unix, now_unix_ms"
            ),
            format!(
                "{g}:15:15: endpoints[0].protocol: no protocol named \"sv\"; defined: stream (protocols are defined in gateway.yaml under `protocols:`)"
            ),
            format!(
                "{g}:19:15: endpoints[1].channels: no channel named \"weather\"; defined: ticker"
            ),
            format!(
                "{g}:22:15: endpoints[2].channels: no channel is in group \"media\"; groups: none"
            ),
            format!(
                "{g}:23:11: endpoints[3].subscribe: a stream endpoint (no `protocol`) must subscribe its clients to at least one channel"
            ),
        ]
    );
}

#[test]
fn filter_auth_and_route_mistakes_are_located() {
    let dep = deployment(
        "http:\n  - path: /nothing\n  - path: /cmd\n    command: {channel: ticker, request: {op: x}}\n  - path: /x\n    method: PUT\n    body: {}\n",
    );
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\nfilters:\n  both: {match: a, project: b}\n  key_only: {match: a, key: b}\nendpoints:\n  - path: /t\n    auth: {mode: jwt, algorithm: HS256, secret_env: GW_SURELY_UNSET_VAR}\n  - path: /u\n    auth: {mode: jwt, algorithm: none, secret_default: s}\n",
    );
    let g = at(&dep, "gateway.yaml");
    let t = at(&dep, "specs/ticker.yaml");
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{g}:9:11: http[0].body: say what the route answers: `body` (a template), `latest: CHANNEL` or `command: {{channel, request}}`"
            ),
            format!("{g}:13:13: http[2].method: method \"PUT\" is not supported: use GET or POST"),
            format!(
                "{t}:7:9: filters.both: a filter is one of `match: FIELD`, `project: FIELD` or `frequency: true`"
            ),
            format!("{t}:8:13: filters.key_only: `key` applies to `frequency` filters only"),
            format!(
                "{t}:11:11: endpoints[0].auth: environment variable GW_SURELY_UNSET_VAR (secret_env) is not set, and there is no secret_default"
            ),
            format!(
                "{t}:13:11: endpoints[1].auth: unknown algorithm \"none\"; accepted: HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384"
            ),
        ]
    );
}

#[test]
fn close_codes_must_map_a_code_the_gateway_sends_to_one_it_may_send() {
    for (map, msg) in [
        (
            "{1011: 1000}",
            "1011 is not a code the gateway sends; it sends 1000, 1001, 1002, 1007, 1008, 1009",
        ),
        (
            "{1009: 1006}",
            "1009: 1006 cannot be sent in its place; a server may send 1000-1003, 1007-1014 or 3000-4999",
        ),
    ] {
        let dep = deployment(&format!(
            "endpoints:\n  - path: /t\n    channels: all\n    close_codes: {map}\n"
        ));
        dep.write("specs/ticker.yaml", TICKER_SPEC);
        assert_eq!(
            errors(&dep),
            [format!(
                "{}:11:18: endpoints[0].close_codes: {msg}",
                at(&dep, "gateway.yaml")
            )]
        );
    }
}

#[test]
fn listener_status_codes_must_map_an_error_status_to_an_error_status() {
    for (map, msg) in [
        (
            "{200: 404}",
            "200 is not a code the gateway sends; it sends 400, 401, 403, 404, 405, 408, 413, 426, 429, 500, 503, 504",
        ),
        (
            "{405: 302}",
            "405: 302 cannot be sent in its place; answer an error status, 400-599",
        ),
    ] {
        let dep = Deployment::new();
        dep.shipped_schema("ticker.json");
        dep.write(
            "gateway.yaml",
            &format!(
                "listeners:\n  main:\n    bind: 127.0.0.1:0\n    status_codes: {map}\nplugins:\n  dirs: [{}]\nchannels:\n  - specs/*.yaml\n",
                target_dir().display()
            ),
        );
        dep.write("specs/ticker.yaml", TICKER_SPEC);
        assert_eq!(
            errors(&dep),
            [format!(
                "{}:4:19: listeners.main.status_codes: {msg}",
                at(&dep, "gateway.yaml")
            )]
        );
    }
}

// --- Builtin sources and the status page. ---

#[test]
fn a_source_with_both_a_plugin_and_a_builtin() {
    let dep = deployment("");
    dep.write(
        "specs/status.yaml",
        "channel: status\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  builtin: status\n  mode: push\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:12: source.builtin: give either `plugin` (a source plugin) or `builtin` (a source of the gateway's own), not both",
            at(&dep, "specs/status.yaml")
        )]
    );
}

#[test]
fn a_source_with_neither_a_plugin_nor_a_builtin() {
    let dep = deployment("");
    dep.write(
        "specs/status.yaml",
        "channel: status\nschema: schemas/ticker.json\nsource:\n  interval: 1s\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:3: source: name what produces the messages: `plugin: NAME` (a source plugin) or `builtin: status`",
            at(&dep, "specs/status.yaml")
        )]
    );
}

#[test]
fn an_unknown_builtin_source_and_a_builtin_without_interval() {
    let dep = deployment("");
    dep.write(
        "specs/a.yaml",
        "channel: a\nschema: schemas/ticker.json\nsource:\n  builtin: stats\n  interval: 1s\n",
    );
    dep.write(
        "specs/b.yaml",
        "channel: b\nschema: schemas/ticker.json\nsource:\n  builtin: status\n  mode: push\n  config: {x: 1}\n",
    );
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{}:4:12: source.builtin: unknown builtin source \"stats\"; the builtin sources are: status",
                at(&dep, "specs/a.yaml")
            ),
            format!(
                "{}:4:12: source.config: builtin source \"status\" takes no `config`; remove it",
                at(&dep, "specs/b.yaml")
            ),
            format!(
                "{}:4:12: source.interval: builtin source \"status\" needs an interval, e.g. `interval: 1s`",
                at(&dep, "specs/b.yaml")
            ),
            format!(
                "{}:5:9: source.mode: builtin source \"status\" publishes every `interval`: remove `mode` or write `mode: poll`",
                at(&dep, "specs/b.yaml")
            ),
        ]
    );
}

#[test]
fn trusted_proxies_must_be_addresses_or_networks() {
    let dep = Deployment::new();
    dep.shipped_schema("ticker.json").write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    trusted_proxies: [10.0.0.0/8, proxy.local, 10.0.0.1/8]\nplugins:\n  dirs: [{}]\nchannels: []\n",
            target_dir().display()
        ),
    );
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{}:4:35: listeners.main.trusted_proxies[1]: \"proxy.local\" is not an IP address or network: write e.g. 10.0.0.5, 10.0.0.0/8 or fd00::/8",
                at(&dep, "gateway.yaml")
            ),
            format!(
                "{}:4:48: listeners.main.trusted_proxies[2]: \"10.0.0.1/8\" has bits set past its /8 prefix: write 10.0.0.0/8",
                at(&dep, "gateway.yaml")
            ),
        ]
    );
}

/// `proxy_protocol` without `trusted_proxies` would let any client that
/// reaches the port name any address: refused, with the fix.
#[test]
fn proxy_protocol_needs_trusted_proxies() {
    let dep = Deployment::new();
    dep.shipped_schema("ticker.json").write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    proxy_protocol: true\n  ok:\n    bind: 127.0.0.1:0\n    proxy_protocol: true\n    trusted_proxies: [10.0.0.0/8]\n  off:\n    bind: 127.0.0.1:0\n    proxy_protocol: false\nplugins:\n  dirs: [{}]\nchannels: []\n",
            target_dir().display()
        ),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:21: listeners.main.proxy_protocol: proxy_protocol needs trusted_proxies, the addresses of the load balancers that write the header: without it any client that reaches the port could write one naming any address; list them, e.g. `trusted_proxies: [10.0.1.23, 10.0.2.23]`",
            at(&dep, "gateway.yaml")
        )]
    );
}

/// `client_ip_header` on a listener that trusts no proxy would read
/// nothing: refused, with the fix; an unknown header name lists the known.
#[test]
fn client_ip_header_needs_trusted_proxies_and_a_known_header() {
    let dep = Deployment::new();
    dep.shipped_schema("ticker.json").write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    client_ip_header: forwarded\n  ok:\n    bind: 127.0.0.1:0\n    trusted_proxies: [10.0.0.5]\n    client_ip_header: x-real-ip\nplugins:\n  dirs: [{}]\nchannels: []\n",
            target_dir().display()
        ),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:23: listeners.main.client_ip_header: client_ip_header says which header the proxies in trusted_proxies name the client in, and this listener trusts none, so no header is read: list the proxies, e.g. `trusted_proxies: [10.0.1.23]`, or remove client_ip_header",
            at(&dep, "gateway.yaml")
        )]
    );
    dep.write(
        "gateway.yaml",
        &format!(
            "listeners:\n  main:\n    bind: 127.0.0.1:0\n    trusted_proxies: [10.0.0.5]\n    client_ip_header: x-client-ip\nplugins:\n  dirs: [{}]\nchannels: []\n",
            target_dir().display()
        ),
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:5:23: listeners.main.client_ip_header: unknown variant `x-client-ip`, expected one of x-forwarded-for, forwarded, x-real-ip",
            at(&dep, "gateway.yaml")
        )]
    );
}

#[test]
fn call_timeout_is_for_plugin_sources_and_takes_a_duration_or_off() {
    let dep = deployment("");
    dep.write(
        "specs/a.yaml",
        "channel: a\nschema: schemas/ticker.json\nsource:\n  builtin: status\n  interval: 1s\n  call_timeout: 5s\n",
    );
    dep.write(
        "specs/b.yaml",
        "channel: b\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  call_timeout: soon\n",
    );
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{}:6:17: source.call_timeout: builtin source \"status\" makes no plugin calls: remove `call_timeout`",
                at(&dep, "specs/a.yaml")
            ),
            format!(
                "{}:6:17: source.call_timeout: invalid duration \"soon\": write a number and a unit, e.g. 30s, 1m, or `off`",
                at(&dep, "specs/b.yaml")
            ),
        ]
    );
    // A duration, or off.
    for t in ["30s", "off"] {
        let dep = deployment("");
        dep.write(
            "specs/c.yaml",
            &format!("channel: c\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n  mode: push\n  call_timeout: {t}\n"),
        );
        let cfg = dep.load().unwrap_or_else(|e| panic!("{t}: {e}"));
        let want = (t == "30s").then_some(std::time::Duration::from_secs(30));
        let c = cfg.channels.iter().find(|c| &*c.name == "c").unwrap();
        assert_eq!(c.source.call_timeout, want, "{t}");
    }
}

#[test]
fn a_plugin_source_without_a_mode() {
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        "channel: ticker\nschema: schemas/ticker.json\nsource:\n  plugin: ticker\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:4:3: source.mode: plugin sources need a mode: `mode: poll` (with an interval) or `mode: push`",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

#[test]
fn the_status_page_needs_a_status_channel_behind_an_api_key() {
    // An endpoint whose channel is not the builtin status source.
    let dep = deployment("admin:\n  status_page:\n    endpoint: /ws/ticker\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:10:15: admin.status_page.endpoint: endpoint \"/ws/ticker\" serves channel \"ticker\", whose source is plugin \"ticker\", not `builtin: status`",
            at(&dep, "gateway.yaml")
        )]
    );
    // The path of the AsyncAPI document.
    let dep = deployment(
        "admin:\n  asyncapi: /api\n  status_page:\n    path: /api\n    endpoint: /ws/ticker\n",
    );
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep)[0],
        format!(
            "{}:11:11: admin.status_page.path: path \"/api\" is already served on the admin listener \"main\"; pick another",
            at(&dep, "gateway.yaml")
        )
    );
    // No such endpoint.
    let dep = deployment("admin:\n  status_page:\n    path: /healthz\n    endpoint: /ws/nothing\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{}:10:11: admin.status_page.path: path \"/healthz\" is already served on the admin listener \"main\"; pick another",
                at(&dep, "gateway.yaml")
            ),
            format!(
                "{}:11:15: admin.status_page.endpoint: no endpoint \"/ws/nothing\" on the admin listener \"main\": the page connects back to the host it was loaded from; serve a channel with `source: {{builtin: status}}` there",
                at(&dep, "gateway.yaml")
            ),
        ]
    );
    // The status channel open to anyone.
    let dep = deployment("admin:\n  status_page:\n    endpoint: /ws/status\n");
    dep.write(
        "specs/status.yaml",
        "channel: status\nschema: schemas/ticker.json\nsource:\n  builtin: status\n  interval: 1s\nendpoints:\n  - path: /ws/status\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:10:15: admin.status_page.endpoint: endpoint \"/ws/status\" has auth mode none: the status page needs `mode: api_key` with a `query` parameter (a browser sends the key in the URL)",
            at(&dep, "gateway.yaml")
        )]
    );
    // The key in a header only: a browser's WebSocket cannot send it.
    let dep = deployment("admin:\n  status_page:\n    endpoint: /ws/status\n");
    dep.write("specs/status.keys", "k\n");
    dep.write(
        "specs/status.yaml",
        "channel: status\nschema: schemas/ticker.json\nsource:\n  builtin: status\n  interval: 1s\nendpoints:\n  - path: /ws/status\n    auth: {mode: api_key, header: X-Api-Key, keys_file: status.keys}\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:10:15: admin.status_page.endpoint: endpoint \"/ws/status\" takes its API key from a header only: add e.g. `query: api_key` (a browser sends the key in the URL)",
            at(&dep, "gateway.yaml")
        )]
    );
    // Admin routes switched off.
    let dep = deployment("admin:\n  enabled: false\n  status_page:\n    endpoint: /ws/status\n");
    dep.write(
        "specs/status.yaml",
        "channel: status\nschema: schemas/ticker.json\nsource:\n  builtin: status\n  interval: 1s\n",
    );
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:11:5: admin.status_page: the status page is an admin route: remove `admin.enabled: false` or the status page",
            at(&dep, "gateway.yaml")
        )]
    );
}

// --- The broker. ---

#[test]
fn broker_settings_are_checked_where_they_are_written() {
    let dep = deployment(
        "broker:\n  kind: nats\n  url: nats://127.0.0.1:4222,http://example.com\n  subject_prefix: my.prefix\n  lease_ttl: 90s\n  instance: a b\n  token_env: GW_TEST_BROKER_TOKEN_UNSET\n",
    );
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let gw = at(&dep, "gateway.yaml");
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{gw}:10:8: broker.url: \"http://example.com\" is not a NATS server URL (invalid scheme for NATS server URL: http): write nats://HOST:PORT (several separated by commas)"
            ),
            format!(
                "{gw}:11:19: broker.subject_prefix: \"my.prefix\" cannot prefix NATS subjects, streams and buckets: use letters, digits, '-' and '_'"
            ),
            format!(
                "{gw}:12:14: broker.lease_ttl: 90s is out of range: a lease lives from 1s to 60s"
            ),
            format!(
                "{gw}:13:13: broker.instance: \"a b\" is not a valid instance name: use letters, digits, '-' and '_'"
            ),
            format!(
                "{gw}:14:14: broker.token_env: environment variable \"GW_TEST_BROKER_TOKEN_UNSET\" is not set (or empty): set it, or remove `token_env`"
            ),
        ]
    );
}

#[test]
fn broker_nats_settings_need_kind_nats_and_one_way_to_authenticate() {
    let dep = deployment("broker:\n  subject_prefix: gw\n  lease_ttl: 5s\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let gw = at(&dep, "gateway.yaml");
    assert_eq!(
        errors(&dep),
        [
            format!(
                "{gw}:9:19: broker.subject_prefix: only the nats broker takes this: set `kind: nats`, or remove it"
            ),
            format!(
                "{gw}:10:14: broker.lease_ttl: only the nats broker takes this: set `kind: nats`, or remove it"
            ),
        ]
    );
    let dep = deployment("broker:\n  kind: nats\n  token_env: HOME\n  creds_env: HOME\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:3: broker: choose one way to authenticate: token_env, user_env with password_env, or creds_env",
            at(&dep, "gateway.yaml")
        )]
    );
    let dep = deployment("broker:\n  kind: nats\n  kinds: nats\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let e = errors(&dep);
    assert!(
        e.len() == 1
            && e[0].contains("unknown field `kinds`, expected one of kind, url, subject_prefix"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_broker_stops_the_start_naming_the_broker_setting() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let dep = deployment("broker:\n  kind: nats\n  url: nats://127.0.0.1:1\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let cfg = dep
        .load()
        .unwrap_or_else(|e| panic!("config should load:\n{e}"));
    let e = match Gateway::start(cfg).await {
        Ok(_) => panic!("the gateway should not start without its broker"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.starts_with(&format!(
            "{}:9:3: broker: cannot connect to NATS at nats://127.0.0.1:1",
            at(&dep, "gateway.yaml")
        )),
        "{e}"
    );
}

// --- Channel linger. ---

#[test]
fn a_linger_longer_than_a_second_is_refused_where_it_is_written() {
    let dep = deployment("");
    dep.write("specs/ticker.yaml", &format!("{TICKER_SPEC}linger: 2s\n"));
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:8:9: linger: 2s is too long: a channel lingers at most 1s",
            at(&dep, "specs/ticker.yaml")
        )]
    );
    dep.write("specs/ticker.yaml", &format!("{TICKER_SPEC}linger: 0s\n"));
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:8:9: linger: invalid duration \"0s\": must be greater than zero",
            at(&dep, "specs/ticker.yaml")
        )]
    );
}

// --- write_interval. ---

#[test]
fn a_write_interval_longer_than_a_second_is_refused_where_it_is_written() {
    let dep = deployment("limits:\n  write_interval: 2s\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:19: limits.write_interval: 2s is too long: it is at most 1s (10ms to 20ms saves most of the CPU it can), or `off`",
            at(&dep, "gateway.yaml")
        )]
    );
    let dep = deployment("limits:\n  write_interval: 0ms\n");
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    assert_eq!(
        errors(&dep),
        [format!(
            "{}:9:19: limits.write_interval: \"0ms\" is no interval: write `off` to write at once, or a duration such as 15ms (10ms to 20ms saves most of the CPU it can)",
            at(&dep, "gateway.yaml")
        )]
    );
    // An endpoint's own, in a channel spec.
    let dep = deployment("");
    dep.write(
        "specs/ticker.yaml",
        &TICKER_SPEC.replace(
            "  - path: /ws/ticker\n",
            "  - path: /ws/ticker\n    limits:\n      write_interval: 1500ms\n",
        ),
    );
    let e = errors(&dep);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(&at(&dep, "specs/ticker.yaml"))
            && e[0].contains("write_interval: 1500ms is too long: it is at most 1s"),
        "{e:?}"
    );
}

/// The gateway-wide `write_interval` applies to every endpoint; an
/// endpoint's own, `off` included, wins.
#[test]
fn an_endpoints_write_interval_overrides_the_gateway_wide_one() {
    let dep = deployment(
        "limits:\n  write_interval: 15ms\nendpoints:\n  - path: /a\n    channels: [ticker]\n  - path: /b\n    channels: [ticker]\n    limits: {write_interval: 40ms}\n  - path: /c\n    channels: [ticker]\n    limits: {write_interval: off}\n",
    );
    dep.write("specs/ticker.yaml", TICKER_SPEC);
    let cfg = dep.load().unwrap_or_else(|e| panic!("{e}"));
    let of = |path: &str| {
        cfg.endpoints
            .iter()
            .find(|e| e.path.as_str() == path)
            .unwrap_or_else(|| panic!("no endpoint {path}"))
            .limits
            .write_interval
    };
    let ms = |n| Some(std::time::Duration::from_millis(n));
    assert_eq!(
        (of("/ws/ticker"), of("/a"), of("/b"), of("/c")),
        (ms(15), ms(15), ms(40), None)
    );
    assert_eq!(cfg.limits.write_interval, ms(15));
}

/// `latest` on a keyed channel: its messages go to its keyed streams, so
/// the route would answer 503 `no_data` for good.
#[test]
fn latest_of_a_keyed_channel_is_refused() {
    let dep = deployment("http:\n  - path: /jobs-latest\n    latest: jobs\n");
    dep.write("specs/schemas/any.json", ANY_SCHEMA).write(
        "specs/jobs.yaml",
        "channel: jobs\nschema: schemas/any.json\nsource:\n  plugin: test-faults\n  mode: poll\n  interval: 1s\nendpoints:\n  - path: /jobs/{id}\n",
    );
    let g = at(&dep, "gateway.yaml");
    assert_eq!(
        errors(&dep),
        [format!(
            "{g}:10:13: http[0].latest: channel \"jobs\" is made of keyed streams and has no latest message of its own; `latest` takes an unkeyed channel"
        )]
    );
}

/// A JWT secret written in the config file, or shorter than its HMAC
/// algorithm needs (RFC 7518 §3.2: the hash's size), or an API key shorter
/// than 16 bytes, loads with a warning:
/// one per finding, naming every endpoint and route it applies to. `gateway
/// check` prints it, as the gateway logs it when it starts. (The
/// `secret_default` warning was logged before logging was set up, so
/// nobody saw it at start.)
#[test]
fn inline_or_short_jwt_secrets_and_short_api_keys_are_warned_about() {
    let long = "k".repeat(32);
    let dep = deployment(&format!(
        r#"endpoints:
  - path: /a
    channels: [ticker]
    auth: {{mode: jwt, algorithm: HS256, secret_default: s3cret}}
  - path: /b
    channels: [ticker]
    auth: {{mode: jwt, algorithm: HS256, secret_default: s3cret}}
  - path: /c
    channels: [ticker]
    auth: {{mode: jwt, algorithm: HS512, secret_default: {long}}}
  - path: /d
    channels: [ticker]
    auth: {{mode: jwt, algorithm: HS256, secret_default: {long}}}
  - path: /e
    channels: [ticker]
    auth: {{mode: api_key, header: X-Api-Key, keys_file: keys.txt}}
  - path: /g
    channels: [ticker]
    auth: {{mode: jwt, algorithm: HS256, secret_env: GW_TEST_SURELY_UNSET_SECRET, secret_default: {long}}}
  - path: /e2
    channels: [ticker]
    auth: {{mode: api_key, header: X-Api-Key, keys_file: keys.txt}}
http:
  - path: /f
    auth: {{mode: jwt, algorithm: HS256, secret_default: s3cret}}
    body: {{}}
"#
    ));
    // A channel spec's endpoint with the short secret: the first place the
    // finding is written, so the warning starts there.
    let second = TICKER_SPEC
        .replace("channel: ticker", "channel: second")
        .replace(
            "  - path: /ws/ticker\n",
            "  - path: /s\n    auth: {mode: jwt, algorithm: HS256, secret_default: s3cret}\n",
        );
    dep.write("specs/ticker.yaml", TICKER_SPEC)
        .write("specs/second.yaml", &second)
        .write("keys.txt", "k1\n0123456789abcdef0123\n");
    // Where each `auth:` is: gateway.yaml's endpoints start at line 8, after
    // the harness's listener, plugins and channels.
    let gw = at(&dep, "gateway.yaml");
    let spec = at(&dep, "specs/second.yaml");
    let cfg = dep.load().unwrap_or_else(|e| panic!("{e}"));
    let jwt: Vec<String> = cfg
        .warnings
        .iter()
        .filter(|w| w.contains("JWT"))
        .cloned()
        .collect();
    assert_eq!(
        jwt,
        [
            format!(
                "{spec}:8: endpoint /s on main, endpoint /a on main ({gw}:11), endpoint /b on main ({gw}:14), endpoint /d on main ({gw}:20), GET /f on main ({gw}:32): JWT HS256 verification uses secret_default from the config file; set the secret through secret_env outside demos"
            ),
            format!(
                "{spec}:8: endpoint /s on main, endpoint /a on main ({gw}:11), endpoint /b on main ({gw}:14), GET /f on main ({gw}:32): the JWT HS256 secret (secret_default) is 6 bytes; HS256 needs at least 32 (RFC 7518 §3.2): a shorter one can be guessed offline from any one token; use e.g. `openssl rand -hex 32`"
            ),
            format!(
                "{gw}:17: endpoint /c on main: JWT HS512 verification uses secret_default from the config file; set the secret through secret_env outside demos"
            ),
            format!(
                "{gw}:17: endpoint /c on main: the JWT HS512 secret (secret_default) is 32 bytes; HS512 needs at least 64 (RFC 7518 §3.2): a shorter one can be guessed offline from any one token; use e.g. `openssl rand -hex 64`"
            ),
            format!(
                "{gw}:26: endpoint /g on main: JWT HS256 verification uses secret_default from the config file: environment variable GW_TEST_SURELY_UNSET_SECRET (secret_env) is not set; set it outside demos"
            ),
        ]
    );
    // API keys shorter than 16 bytes, likewise (one of two here), with the
    // second endpoint in the same file by its line.
    let keys: Vec<&String> = cfg
        .warnings
        .iter()
        .filter(|w| w.contains("API key"))
        .collect();
    assert_eq!(
        keys,
        [&format!(
            "{gw}:23: endpoint /e on main, endpoint /e2 on main (line 29): 1 of its 2 API key(s) are shorter than 16 bytes: a short key can be guessed, by trying it here or against its principal (a hash of the key, in logs and plugin requests); use random keys, e.g. `openssl rand -hex 16`"
        )]
    );
    let out = gateway_bin(&[
        "check".as_ref(),
        "--config".as_ref(),
        dep.path("gateway.yaml").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("warning: ").map(str::to_string))
        .filter(|w| w.contains("JWT"))
        .collect();
    assert_eq!(printed, jwt);
}
