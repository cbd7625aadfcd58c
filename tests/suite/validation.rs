//! Channel schemas are compiled with format checks on.

use gateway::config::compile_schema;
use serde_json::json;

/// Compile `schema` from a file named s.json, as a channel's schema is.
fn compile(schema: &str) -> Result<jsonschema::Validator, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.json");
    std::fs::write(&file, schema).unwrap();
    compile_schema(&file)
}

#[test]
fn formats_are_checked() {
    let v = compile(
        r#"{"type":"object","properties":{"at":{"type":"string","format":"date-time"},"mail":{"type":"string","format":"email"}}}"#,
    )
    .unwrap();
    assert!(
        v.validate(&json!({"at": "2026-11-23T10:00:00.123Z", "mail": "a@example.org"}))
            .is_ok()
    );
    let bad = json!({"at": "2026-13-45T99:00:00Z"});
    let err = v.validate(&bad).unwrap_err();
    assert_eq!(err.instance_path().to_string(), "/at");
    assert!(v.validate(&json!({"mail": "not an address"})).is_err());
}

#[test]
fn the_shipped_schemas_accept_what_the_shipped_plugins_describe() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("channel-specs/schemas");
    let ticker = compile_schema(&root.join("ticker.json")).unwrap();
    assert!(
        ticker
            .validate(&json!({"seq": 1, "ts": 1_763_892_000_000_000_000u64}))
            .is_ok()
    );
    assert!(ticker.validate(&json!({"seq": "1", "ts": 1})).is_err());
    assert!(
        ticker
            .validate(&json!({"seq": 1, "ts": 1, "extra": true}))
            .is_err()
    );
}

/// Patterns that need backtracking (lookahead, a backreference) compile
/// beside plain ones, and each decides as ECMA-262 does, reporting the
/// failing property.
#[test]
fn patterns_with_and_without_lookaround() {
    let v = compile(
        r#"{"type":"object","properties":{
            "pad":{"type":"string","pattern":"^x*$"},
            "code":{"type":"string","pattern":"^\\d{3}-[A-Z]+$"},
            "password":{"type":"string","pattern":"^(?=.*\\d)(?=.*[a-z]).{8,}$"},
            "twice":{"type":"string","pattern":"^(ab)\\1$"}}}"#,
    )
    .unwrap();
    for ok in [
        json!({"pad": "", "code": "123-AB"}),
        json!({"pad": "xxxx", "password": "abcdefg1"}),
        json!({"twice": "abab"}),
    ] {
        assert!(v.is_valid(&ok), "{ok} should be valid");
    }
    for (bad, at) in [
        (json!({"pad": "xxy"}), "/pad"),
        (json!({"code": "12-AB"}), "/code"),
        (json!({"password": "abcdefgh"}), "/password"),
        (json!({"twice": "abba"}), "/twice"),
    ] {
        let err = v.validate(&bad).unwrap_err();
        assert_eq!(err.instance_path().to_string(), at, "{bad}");
    }
}

/// A pattern that is not a regular expression is refused, naming the schema.
#[test]
fn a_pattern_that_is_not_a_regex_is_refused() {
    let err = compile(r#"{"type":"string","pattern":"^(x$"}"#).unwrap_err();
    assert!(
        err.contains("is not a valid JSON Schema") && err.contains("s.json"),
        "{err}"
    );
}
