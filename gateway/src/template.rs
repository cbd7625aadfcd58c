//! JSON templates: the replies, envelopes and HTTP bodies an operator writes
//! in YAML.
//!
//! A template is any YAML value. A string that is exactly `{{path}}` is
//! replaced by the value at `path` (an object, a list, a number: whatever it
//! is). A string with `{{path}}` inside other text gets the value spliced in
//! as text. Paths are dotted: `request.data`, `client.id`, `data.cpu.total`,
//! `items.0`. The first segment names a root that the context provides
//! (which roots exist depends on where the template is used; an unknown root
//! is a configuration error).
//!
//! A whole-string placeholder whose value is missing leaves its key out of
//! the enclosing object (so optional fields disappear), becomes `null` in a
//! list, and renders as `null` at the top. Missing values spliced into text
//! are empty. `{{path ?? default}}` renders `default` (a JSON value: `null`,
//! `0`, `false`, `"none"`, `[]`, `{}`) where the value is missing, so a key
//! can be kept: `data: "{{request.data ?? null}}"`.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// A compiled template.
#[derive(Clone, Debug)]
pub enum Template {
    /// A value with no placeholder in it.
    Literal(Value),
    /// An object some of whose values are templates.
    Object(Vec<(String, Template)>),
    /// A list some of whose items are templates.
    Array(Vec<Template>),
    /// A string that is exactly one placeholder.
    Var(VarPath),
    /// A string with placeholders inside text.
    Text(Vec<Part>),
}

/// A dotted path: its root and the steps below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VarPath {
    /// The first segment.
    pub root: String,
    /// The rest.
    pub rest: Vec<String>,
    /// What a missing value renders as (`{{request.data ?? null}}`).
    pub default: Option<Value>,
}

/// A piece of a text template.
#[derive(Clone, Debug)]
pub enum Part {
    /// Verbatim text.
    Lit(String),
    /// A placeholder.
    Var(VarPath),
}

/// Resolves paths to values, lazily: what a template does not use is never
/// computed.
pub trait Context {
    /// The value at `p`, or None if there is none here.
    fn lookup(&self, p: &VarPath) -> Option<Value>;
}

impl Template {
    /// Compile `v`, allowing only the given roots.
    pub fn compile(v: &Value, roots: &[&str]) -> Result<Template, String> {
        Ok(match v {
            Value::String(s) => compile_str(s, roots)?,
            Value::Array(items) => {
                let ts = items
                    .iter()
                    .map(|i| Template::compile(i, roots))
                    .collect::<Result<Vec<_>, _>>()?;
                if ts.iter().all(|t| matches!(t, Template::Literal(_))) {
                    Template::Literal(v.clone())
                } else {
                    Template::Array(ts)
                }
            }
            Value::Object(m) => {
                let ts = m
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Template::compile(v, roots)?)))
                    .collect::<Result<Vec<_>, String>>()?;
                if ts.iter().all(|(_, t)| matches!(t, Template::Literal(_))) {
                    Template::Literal(v.clone())
                } else {
                    Template::Object(ts)
                }
            }
            other => Template::Literal(other.clone()),
        })
    }

    /// A template that is just `value`.
    pub fn literal(value: Value) -> Template {
        Template::Literal(value)
    }

    /// Every path this template reads.
    pub fn vars(&self) -> Vec<&VarPath> {
        let mut out = Vec::new();
        self.collect_vars(&mut out);
        out
    }

    fn collect_vars<'a>(&'a self, out: &mut Vec<&'a VarPath>) {
        match self {
            Template::Literal(_) => {}
            Template::Object(kv) => kv.iter().for_each(|(_, t)| t.collect_vars(out)),
            Template::Array(ts) => ts.iter().for_each(|t| t.collect_vars(out)),
            Template::Var(p) => out.push(p),
            Template::Text(parts) => out.extend(parts.iter().filter_map(|p| match p {
                Part::Var(v) => Some(v),
                Part::Lit(_) => None,
            })),
        }
    }

    /// Whether the template reads `root`.
    pub fn uses(&self, root: &str) -> bool {
        self.vars().iter().any(|v| v.root == root)
    }

    /// Render with `ctx`.
    pub fn render(&self, ctx: &dyn Context) -> Value {
        self.render_opt(ctx).unwrap_or(Value::Null)
    }

    fn render_opt(&self, ctx: &dyn Context) -> Option<Value> {
        match self {
            Template::Literal(v) => Some(v.clone()),
            Template::Var(p) => lookup(ctx, p),
            Template::Object(kv) => {
                let mut m = Map::with_capacity(kv.len());
                for (k, t) in kv {
                    if let Some(v) = t.render_opt(ctx) {
                        m.insert(k.clone(), v);
                    }
                }
                Some(Value::Object(m))
            }
            Template::Array(ts) => Some(Value::Array(
                ts.iter()
                    .map(|t| t.render_opt(ctx).unwrap_or(Value::Null))
                    .collect(),
            )),
            Template::Text(parts) => {
                let mut s = String::new();
                for p in parts {
                    match p {
                        Part::Lit(l) => s.push_str(l),
                        Part::Var(v) => match lookup(ctx, v) {
                            Some(Value::String(x)) => s.push_str(&x),
                            Some(Value::Null) | None => {}
                            Some(other) => s.push_str(&other.to_string()),
                        },
                    }
                }
                Some(Value::String(s))
            }
        }
    }
}

fn lookup(ctx: &dyn Context, p: &VarPath) -> Option<Value> {
    ctx.lookup(p).or_else(|| p.default.clone())
}

/// The value at `rest` below `root`.
pub fn walk(root: &Value, rest: &[String]) -> Option<Value> {
    get_path(root, rest).cloned()
}

/// One step down a dotted path: an object key, or a list index.
pub fn step_into<'a>(v: &'a Value, step: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m.get(step),
        Value::Array(a) => step.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    }
}

/// Follow a dotted path (already split) inside a value.
pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for s in path {
        cur = step_into(cur, s)?;
    }
    Some(cur)
}

/// Split and check a dotted path.
pub fn parse_path(text: &str) -> Result<Vec<String>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty path".into());
    }
    let steps: Vec<String> = t.split('.').map(str::to_string).collect();
    if let Some(bad) = steps.iter().find(|s| {
        s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }) {
        return Err(format!(
            "invalid path {t:?} (segment {bad:?}): use names and indices separated by dots, e.g. `request.data` or `items.0`"
        ));
    }
    Ok(steps)
}

fn var(text: &str, roots: &[&str]) -> Result<VarPath, String> {
    let (path, default) = match text.split_once("??") {
        None => (text, None),
        Some((path, d)) => {
            let d = serde_json::from_str::<Value>(d.trim()).map_err(|_| {
                format!(
                    "in {{{{{text}}}}}: the default after `??` must be a JSON value, e.g. null, 0, false, \"none\", [] or {{}}"
                )
            })?;
            (path, Some(d))
        }
    };
    let text = path.trim();
    let mut steps = parse_path(text).map_err(|e| format!("in {{{{{text}}}}}: {e}"))?;
    let root = steps.remove(0);
    if !roots.contains(&root.as_str()) {
        return Err(format!(
            "unknown variable {{{{{}}}}}: available here: {}",
            text.trim(),
            roots.join(", ")
        ));
    }
    Ok(VarPath {
        root,
        rest: steps,
        default,
    })
}

/// The placeholder at the start of `after` (the text after `{{`): what is
/// inside it, and its length up to and including the closing `}}`.
fn placeholder(after: &str) -> Option<(&str, usize)> {
    let j = after.find("}}")?;
    if let Some(q) = after[..j].find("??") {
        // The default is JSON and may end in `}` itself (`{{x ?? {}}}`):
        // read one JSON value, then expect the closing braces.
        let d = &after[q + 2..];
        let mut values = serde_json::Deserializer::from_str(d).into_iter::<Value>();
        if let Some(Ok(_)) = values.next() {
            let end = q + 2 + values.byte_offset();
            let tail = &after[end..];
            let gap = tail.len() - tail.trim_start().len();
            if tail[gap..].starts_with("}}") {
                return Some((&after[..end], end + gap + 2));
            }
        }
    }
    Some((&after[..j], j + 2))
}

fn compile_str(s: &str, roots: &[&str]) -> Result<Template, String> {
    if !s.contains("{{") {
        return Ok(Template::Literal(Value::String(s.to_string())));
    }
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        if i > 0 {
            parts.push(Part::Lit(rest[..i].to_string()));
        }
        let after = &rest[i + 2..];
        let Some((inner, len)) = placeholder(after) else {
            return Err(format!("unclosed {{{{ in {s:?}"));
        };
        parts.push(Part::Var(var(inner, roots)?));
        rest = &after[len..];
    }
    if !rest.is_empty() {
        parts.push(Part::Lit(rest.to_string()));
    }
    if let [Part::Var(v)] = &parts[..] {
        return Ok(Template::Var(v.clone()));
    }
    Ok(Template::Text(parts))
}

/// A context made of fixed roots, falling back to another context.
pub struct With<'a> {
    /// Roots defined here.
    pub roots: Vec<(&'static str, Cow<'a, Value>)>,
    /// Where other roots are looked up.
    pub parent: Option<&'a dyn Context>,
}

impl Context for With<'_> {
    fn lookup(&self, p: &VarPath) -> Option<Value> {
        for (k, v) in &self.roots {
            if *k == p.root {
                return walk(v, &p.rest);
            }
        }
        self.parent.and_then(|x| x.lookup(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> With<'static> {
        With {
            roots: vec![
                (
                    "request",
                    Cow::Owned(json!({"data": {"a": [1, 2]}, "n": 5})),
                ),
                ("channel", Cow::Owned(json!("news"))),
            ],
            parent: None,
        }
    }

    #[test]
    fn whole_placeholders_keep_their_type_and_text_is_spliced() {
        let t = Template::compile(
            &json!({"type": "pong", "data": "{{request.data}}", "n": "{{request.n}}",
                    "msg": "subscribed to {{channel}} ({{request.n}})", "second": "{{request.data.a.1}}"}),
            &["request", "channel"],
        )
        .unwrap();
        assert_eq!(
            t.render(&ctx()),
            json!({"type": "pong", "data": {"a": [1, 2]}, "n": 5, "msg": "subscribed to news (5)", "second": 2})
        );
    }

    #[test]
    fn missing_values_drop_their_key_and_literals_stay_literal() {
        let t = Template::compile(
            &json!({"x": "{{request.nope}}", "l": ["{{request.nope}}"], "t": "a{{request.nope}}b"}),
            &["request"],
        )
        .unwrap();
        assert_eq!(t.render(&ctx()), json!({"l": [null], "t": "ab"}));
        assert!(matches!(
            Template::compile(&json!({"a": [1, "x"]}), &[]).unwrap(),
            Template::Literal(_)
        ));
    }

    #[test]
    fn a_default_stands_in_for_a_missing_value_only() {
        let t = Template::compile(
            &json!({"d": "{{request.nope ?? null}}", "o": "{{request.nope??{}}}", "s": "{{ request.nope ?? \"-\" }}",
                    "l": ["{{request.nope ?? [1]}}"], "t": "n={{request.nope ?? 0}};", "x": "{{request.n ?? null}}",
                    "k": "{{request.data ?? {\"a\": {}}}}"}),
            &["request"],
        )
        .unwrap();
        assert_eq!(
            t.render(&ctx()),
            json!({"d": null, "o": {}, "s": "-", "l": [[1]], "t": "n=0;", "x": 5, "k": {"a": [1, 2]}})
        );
        let e = Template::compile(&json!("{{request.nope ?? nothing}}"), &["request"]).unwrap_err();
        assert!(e.contains("must be a JSON value"), "{e}");
        let e = Template::compile(&json!("{{nope ?? 1}}"), &["request"]).unwrap_err();
        assert!(e.starts_with("unknown variable {{nope}}"), "{e}");
    }

    #[test]
    fn unknown_roots_and_bad_syntax_are_config_errors() {
        let e = Template::compile(&json!("{{clinet.id}}"), &["client", "now"]).unwrap_err();
        assert_eq!(
            e,
            "unknown variable {{clinet.id}}: available here: client, now"
        );
        assert!(
            Template::compile(&json!("{{client.id"), &["client"])
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            Template::compile(&json!("{{client..id}}"), &["client"])
                .unwrap_err()
                .contains("invalid path")
        );
    }
}
