//! Compiling protocols, endpoints and HTTP routes: everything a client sees.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use serde_saphyr::Spanned;

use super::error::Sink;
use super::types::*;
use super::{ChannelCfg, Origin, compile_schema, compile_schema_json, unknown_listener};
use crate::auth::{Auth, Inband};
use crate::limits::ConnLimits;
use crate::router::PathPattern;
use crate::template::{Template, parse_path};

/// Roots available to reply, `on_connect` and HTTP body templates.
pub const REPLY_ROOTS: &[&str] = &[
    "request",
    "channel",
    "channels",
    "groups",
    "client",
    "error",
    "result",
    "params",
    "principal",
    "gateway",
    "listeners",
    "now",
    "now_iso",
    "now_unix",
    "now_unix_ms",
];

/// Roots available to channel envelopes.
pub const ENVELOPE_ROOTS: &[&str] = &[
    "data",
    "channel",
    "key",
    "gateway",
    "now",
    "now_iso",
    "now_unix",
    "now_unix_ms",
];

/// Roots available to a plugin command's request template.
pub const COMMAND_ROOTS: &[&str] = REPLY_ROOTS;

/// What a client action does.
#[derive(Debug)]
pub enum Action {
    /// Subscribe.
    Subscribe,
    /// Unsubscribe.
    Unsubscribe,
    /// Pong.
    Ping,
    /// Status.
    Status,
    /// A plugin command.
    Command(Arc<CommandCfg>),
}

/// A compiled plugin command call.
#[derive(Debug)]
pub struct CommandCfg {
    /// The channel whose plugin answers.
    pub channel: Arc<str>,
    /// The request (template).
    pub request: Template,
    /// Longest wait.
    pub timeout: Duration,
    /// Where it was written (line, column).
    pub line: u64,
    /// Column.
    pub col: u64,
}

/// A compiled client protocol.
#[derive(Debug)]
pub struct ProtocolCfg {
    /// Name in gateway.yaml.
    pub name: String,
    /// Field naming the action.
    pub action_field: String,
    /// Field naming the channel.
    pub channel_field: String,
    /// Filters beside the action fields.
    pub filters_top_level: bool,
    /// Field holding filters (when accepted there).
    pub filters_field: Option<String>,
    /// Field whose value identifies one of several subscriptions to a channel.
    pub subscription_key: Option<String>,
    /// What unsubscribing from a channel not followed answers.
    pub not_subscribed: NotSubscribed,
    /// `{{now}}` format.
    pub timestamps: TimestampFormat,
    /// Client action name → action.
    pub actions: HashMap<String, Action>,
    /// Replies.
    pub replies: Replies,
    /// Schema replies must satisfy.
    pub validator: Option<Arc<jsonschema::Validator>>,
    /// That schema as written (JSON).
    pub schema: Option<Value>,
    /// Subscribe names standing for several channels (or none).
    pub channel_sets: Vec<(String, ChannelSel)>,
}

impl ProtocolCfg {
    /// The channels of set `name` among `within`, if `name` is a set.
    pub fn channel_set(
        &self,
        name: &str,
        within: &[Arc<ChannelCfg>],
    ) -> Option<Vec<Arc<ChannelCfg>>> {
        self.channel_sets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, sel)| resolve(sel, within))
    }
}

impl ProtocolCfg {
    /// Client action names bound to `kind`.
    pub fn names_of(&self, kind: BuiltinAction) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .actions
            .iter()
            .filter(|(_, a)| {
                matches!(
                    (a, kind),
                    (Action::Subscribe, BuiltinAction::Subscribe)
                        | (Action::Unsubscribe, BuiltinAction::Unsubscribe)
                        | (Action::Ping, BuiltinAction::Ping)
                        | (Action::Status, BuiltinAction::Status)
                )
            })
            .map(|(k, _)| k.as_str())
            .collect();
        v.sort();
        v
    }
}

/// Reply templates.
#[derive(Debug)]
pub struct Replies {
    /// On connect.
    pub connected: Vec<Template>,
    /// Subscribe confirmed.
    pub subscribed: Template,
    /// Unsubscribe confirmed.
    pub unsubscribed: Template,
    /// Pong.
    pub pong: Template,
    /// Status.
    pub status: Template,
    /// Errors.
    pub error: Template,
    /// Command answers.
    pub command: Template,
}

/// A compiled channel selection.
#[derive(Clone, Debug)]
pub enum ChannelSel {
    /// Every channel.
    All,
    /// These.
    Names(Vec<Arc<str>>),
    /// Channels in these groups.
    Groups(Vec<String>),
    /// None.
    Nothing,
}

/// A WebSocket endpoint.
#[derive(Debug)]
pub struct EndpointCfg {
    /// Listener name.
    pub listener: String,
    /// Main path.
    pub path: PathPattern,
    /// Path and aliases.
    pub paths: Vec<PathPattern>,
    /// Pre-upgrade and in-band authentication.
    pub auth: Auth,
    /// Where `auth` was written (None: not written, no auth), for warnings.
    pub auth_at: Option<Origin>,
    /// Where this endpoint's own `limits.idle_timeout` and
    /// `limits.ping_interval` were written (None: gateway.yaml's apply), for
    /// warnings.
    pub idle_at: Option<Origin>,
    /// See `idle_at`.
    pub ping_at: Option<Origin>,
    /// Allowed Origin values (None: any).
    pub origins: Option<Vec<String>>,
    /// WebSocket subprotocols spoken here.
    pub subprotocols: Vec<String>,
    /// The control protocol (None: a one-way stream).
    pub protocol: Option<Arc<ProtocolCfg>>,
    /// Channels a client may receive here, in config order.
    pub channels: Vec<Arc<ChannelCfg>>,
    /// Channels subscribed on connect (after in-band auth).
    pub subscribe: Vec<Arc<ChannelCfg>>,
    /// Messages sent on connect.
    pub on_connect: Vec<Template>,
    /// The keyed channel it streams (path parameters select the key).
    pub keyed: Option<Arc<ChannelCfg>>,
    /// Its connection limits.
    pub limits: ConnLimits,
    /// Close codes sent as others (`close_codes`), e.g. `(1009, 1003)`.
    pub close_codes: Vec<(u16, u16)>,
}

impl EndpointCfg {
    /// The channel named `name`, if served here.
    pub fn channel(&self, name: &str) -> Option<&Arc<ChannelCfg>> {
        self.channels.iter().find(|c| &*c.name == name)
    }
}

/// What an HTTP route answers with.
#[derive(Debug)]
pub enum HttpAnswer {
    /// A template.
    Body(Template),
    /// A channel's latest message.
    Latest(Arc<str>),
    /// A plugin command (optionally wrapped by a template).
    Command(Arc<CommandCfg>, Option<Template>),
    /// The publish API: the `channel` path parameter names one of these.
    Publish(Vec<Arc<str>>),
}

/// An HTTP JSON route.
#[derive(Debug)]
pub struct HttpRouteCfg {
    /// Listener.
    pub listener: String,
    /// Path.
    pub path: PathPattern,
    /// Method.
    pub method: http::Method,
    /// Auth (before anything else).
    pub auth: Auth,
    /// Where `auth` was written (None: not written, no auth), for warnings.
    pub auth_at: Option<Origin>,
    /// The answer.
    pub answer: HttpAnswer,
    /// Success status.
    pub status: http::StatusCode,
    /// Largest body.
    pub max_body: usize,
    /// Requests per client IP.
    pub per_ip: Option<Arc<crate::limits::IpLimiter>>,
    /// Whether the request body is read ([`reads_body`]).
    pub reads_body: bool,
}

/// Whether a route reads the request body: on POST, and on GET when the
/// answer's templates read `request.body` (or the whole `request`). Read
/// and parsed, a body costs up to ~30 times its bytes in memory for as long
/// as the request runs; a route that never looks at it does not take it.
fn reads_body(method: &http::Method, answer: &HttpAnswer) -> bool {
    let reads = |t: &Template| {
        t.vars()
            .iter()
            .any(|v| v.root == "request" && v.rest.first().is_none_or(|s| s == "body"))
    };
    *method == http::Method::POST
        || match answer {
            HttpAnswer::Body(t) => reads(t),
            HttpAnswer::Latest(_) => false,
            HttpAnswer::Command(c, t) => reads(&c.request) || t.as_ref().is_some_and(reads),
            HttpAnswer::Publish(_) => true,
        }
}

/// Everything endpoint compilation needs to look things up.
pub(crate) struct Lookup<'a> {
    pub channels: &'a [Arc<ChannelCfg>],
    pub protocols: &'a HashMap<String, Arc<ProtocolCfg>>,
    /// Protocols defined but with errors (already reported).
    pub broken_protocols: Vec<String>,
    pub listener_names: &'a [&'a str],
    /// (listener, path shape) → what serves it and where.
    pub paths: &'a mut HashMap<(String, String), (String, Origin)>,
    /// gateway.yaml's limits.
    pub limits: &'a super::Limits,
    /// Keyed limiters created here are registered for pruning.
    pub prunable: &'a mut crate::limits::Prunable,
    /// Where counters and limiters come from (shared across reloads).
    pub pool: &'a crate::limits::LimiterPool,
}

fn template(v: &Value, roots: &[&str]) -> Result<Template, String> {
    Template::compile(v, roots)
}

fn spanned_template(
    sink: &mut Sink,
    s: &Spanned<Value>,
    field: &str,
    roots: &[&str],
) -> Option<Template> {
    match template(&s.value, roots) {
        Ok(t) => Some(t),
        Err(m) => {
            sink.at(s, field, m);
            None
        }
    }
}

fn many(o: &OneOrMany) -> Vec<&Value> {
    match o {
        OneOrMany::One(v) => vec![v],
        OneOrMany::Many(v) => v.iter().collect(),
    }
}

impl Lookup<'_> {
    /// The per-IP rate limiter of setting `id`, registered for pruning.
    fn ip_limiter(&mut self, id: &str, rate: Rate) -> Arc<crate::limits::IpLimiter> {
        let lim = self.pool.rate(id, rate);
        self.prunable.limiters.push(lim.clone());
        lim
    }
}

/// The listener named by `given`, or the only one; errors point at `given`,
/// or at `near` when none was given.
fn pick_listener<T>(
    sink: &mut Sink,
    lk: &Lookup,
    given: Option<&Spanned<String>>,
    near: &Spanned<T>,
    field: String,
) -> Option<String> {
    match given {
        Some(l) if lk.listener_names.contains(&l.value.as_str()) => Some(l.value.clone()),
        Some(l) => {
            sink.at(l, field, unknown_listener(&l.value, lk.listener_names));
            None
        }
        None if lk.listener_names.len() == 1 => Some(lk.listener_names[0].to_string()),
        None => {
            sink.at(
                near,
                field,
                format!(
                    "several listeners are defined ({}); name one with `listener:`",
                    lk.listener_names.join(", ")
                ),
            );
            None
        }
    }
}

/// Compile the protocols of gateway.yaml.
pub(crate) fn compile_protocols(
    sink: &mut Sink,
    base: &Path,
    protocols: &BTreeMap<String, Spanned<ProtocolFile>>,
    channels: &[Arc<ChannelCfg>],
) -> HashMap<String, Arc<ProtocolCfg>> {
    let names: Vec<Arc<str>> = channels.iter().map(|c| c.name.clone()).collect();
    let channel_names = &names[..];
    let mut out = HashMap::new();
    for (name, p) in protocols {
        let f = |k: &str| format!("protocols.{name}.{k}");
        if name == "stream" {
            sink.at(
                p,
                format!("protocols.{name}"),
                "`stream` is the built-in one-way protocol; give this protocol another name",
            );
            continue;
        }
        let pv = &p.value;
        let mut ok = true;
        let mut actions = HashMap::new();
        match &pv.actions {
            None => {
                actions.insert("subscribe".to_string(), Action::Subscribe);
                actions.insert("unsubscribe".to_string(), Action::Unsubscribe);
                actions.insert("ping".to_string(), Action::Ping);
                actions.insert("status".to_string(), Action::Status);
            }
            Some(map) => {
                for (client_name, a) in map {
                    let act = match &a.value {
                        ActionFile::Builtin(BuiltinAction::Subscribe) => Action::Subscribe,
                        ActionFile::Builtin(BuiltinAction::Unsubscribe) => Action::Unsubscribe,
                        ActionFile::Builtin(BuiltinAction::Ping) => Action::Ping,
                        ActionFile::Builtin(BuiltinAction::Status) => Action::Status,
                        ActionFile::Command(c) => {
                            match compile_command(
                                sink,
                                CmdSpec {
                                    channel: &c.channel,
                                    request: c.request.as_ref(),
                                    timeout: c.timeout,
                                    line: a.referenced.line(),
                                    col: a.referenced.column(),
                                },
                                &f(&format!("actions.{client_name}.command")),
                                channel_names,
                            ) {
                                Some(c) => Action::Command(Arc::new(c)),
                                None => {
                                    ok = false;
                                    continue;
                                }
                            }
                        }
                    };
                    actions.insert(client_name.clone(), act);
                }
            }
        }
        let r = &pv.replies;
        let mut tpl = |o: &Option<Spanned<Value>>, key: &str, default: Value| -> Template {
            match o {
                Some(s) => spanned_template(sink, s, &f(&format!("replies.{key}")), REPLY_ROOTS)
                    .unwrap_or_else(|| {
                        ok = false;
                        Template::literal(Value::Null)
                    }),
                None => template(&default, REPLY_ROOTS).unwrap_or(Template::literal(default)),
            }
        };
        let af = pv.action_field.clone();
        let cf = pv.channel_field.clone();
        let subscribed = tpl(
            &r.subscribed,
            "subscribed",
            serde_json::json!({af.clone(): "subscribed", cf.clone(): "{{channel}}"}),
        );
        let unsubscribed = tpl(
            &r.unsubscribed,
            "unsubscribed",
            serde_json::json!({af.clone(): "unsubscribed", cf.clone(): "{{channel}}"}),
        );
        let pong = tpl(
            &r.pong,
            "pong",
            serde_json::json!({af.clone(): "pong", "data": "{{request.data}}", "timestamp": "{{request.timestamp}}"}),
        );
        let status = tpl(
            &r.status,
            "status",
            serde_json::json!({af.clone(): "status", "client_id": "{{client.id}}", "connected_at": "{{client.connected_at}}", "subscriptions": "{{client.subscriptions}}"}),
        );
        let error = tpl(
            &r.error,
            "error",
            serde_json::json!({af.clone(): "error", "error": "{{error.code}}", "message": "{{error.message}}"}),
        );
        let command = tpl(&r.command, "command", serde_json::json!("{{result}}"));
        let mut connected = Vec::new();
        if let Some(c) = &r.connected {
            for v in many(&c.value) {
                match template(v, REPLY_ROOTS) {
                    Ok(t) => connected.push(t),
                    Err(m) => {
                        sink.at(c, f("replies.connected"), m);
                        ok = false;
                    }
                }
            }
        }
        let (validator, schema) = match &pv.schema {
            None => (None, None),
            Some(s) => match compile_schema_json(&base.join(&s.value)) {
                Ok((v, j)) => (Some(Arc::new(v)), Some(j)),
                Err(m) => {
                    sink.at(s, f("schema"), m);
                    ok = false;
                    (None, None)
                }
            },
        };
        let mut channel_sets = Vec::new();
        for (set, sel) in &pv.channel_sets {
            if channel_names.iter().any(|n| **n == **set) {
                sink.at(
                    sel,
                    f(&format!("channel_sets.{set}")),
                    format!("{set:?} is already a channel name"),
                );
                ok = false;
                continue;
            }
            match select(&sel.value, channels, true) {
                Ok(s) => channel_sets.push((set.clone(), s)),
                Err(m) => {
                    sink.at(sel, f(&format!("channel_sets.{set}")), m);
                    ok = false;
                }
            }
        }
        if pv.filters_at.is_empty() {
            sink.at(
                p,
                f("filters_at"),
                "list at least one of `top_level` and `filters`",
            );
            ok = false;
        }
        if ok {
            out.insert(
                name.clone(),
                Arc::new(ProtocolCfg {
                    name: name.clone(),
                    action_field: pv.action_field.clone(),
                    channel_field: pv.channel_field.clone(),
                    filters_top_level: pv.filters_at.contains(&FiltersAt::TopLevel),
                    filters_field: pv
                        .filters_at
                        .contains(&FiltersAt::Filters)
                        .then(|| pv.filters_field.clone()),
                    subscription_key: pv.subscription_key.clone(),
                    not_subscribed: pv.not_subscribed,
                    timestamps: pv.timestamps,
                    actions,
                    replies: Replies {
                        connected,
                        subscribed,
                        unsubscribed,
                        pong,
                        status,
                        error,
                        command,
                    },
                    validator,
                    schema,
                    channel_sets,
                }),
            );
        }
    }
    out
}

/// A command call as written, with where it was written.
pub(crate) struct CmdSpec<'a> {
    pub channel: &'a str,
    pub request: Option<&'a Value>,
    pub timeout: Option<Duration>,
    pub line: u64,
    pub col: u64,
}

impl<'a> CmdSpec<'a> {
    fn of(c: &'a CommandFile) -> CmdSpec<'a> {
        CmdSpec {
            channel: &c.channel.value,
            request: c.request.as_ref(),
            timeout: c.timeout.map(|d| d.0),
            line: c.channel.referenced.line(),
            col: c.channel.referenced.column(),
        }
    }
}

pub(crate) fn compile_command(
    sink: &mut Sink,
    c: CmdSpec,
    field: &str,
    channel_names: &[Arc<str>],
) -> Option<CommandCfg> {
    if !channel_names.iter().any(|n| **n == *c.channel) {
        sink.push(
            c.line,
            c.col,
            format!("{field}.channel"),
            format!(
                "no channel named {:?}; defined: {}",
                c.channel,
                join(channel_names)
            ),
        );
        return None;
    }
    let request = match c.request {
        None => Template::literal(Value::Object(Default::default())),
        Some(v) => match template(v, COMMAND_ROOTS) {
            Ok(t) => t,
            Err(m) => {
                sink.push(c.line, c.col, format!("{field}.request"), m);
                return None;
            }
        },
    };
    Some(CommandCfg {
        channel: c.channel.into(),
        request,
        timeout: c.timeout.unwrap_or(Duration::from_secs(10)),
        line: c.line,
        col: c.col,
    })
}

fn join(names: &[Arc<str>]) -> String {
    let v: Vec<&str> = names.iter().map(|n| &**n).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Resolve a selection against the channels.
fn select(
    sel: &ChannelSelFile,
    channels: &[Arc<ChannelCfg>],
    allow_none: bool,
) -> Result<ChannelSel, String> {
    let names: Vec<Arc<str>> = channels.iter().map(|c| c.name.clone()).collect();
    let check = |n: &str| -> Result<Arc<str>, String> {
        names
            .iter()
            .find(|x| ***x == *n)
            .cloned()
            .ok_or_else(|| format!("no channel named {n:?}; defined: {}", join(&names)))
    };
    match sel {
        ChannelSelFile::Name(n) if n == "all" => Ok(ChannelSel::All),
        ChannelSelFile::Name(n) if n == "none" && allow_none => Ok(ChannelSel::Nothing),
        ChannelSelFile::Name(n) => Ok(ChannelSel::Names(vec![check(n)?])),
        ChannelSelFile::List(l) => Ok(ChannelSel::Names(
            l.iter().map(|n| check(n)).collect::<Result<_, _>>()?,
        )),
        ChannelSelFile::Group(g) => {
            let mut gs: Vec<String> = g.groups.clone().unwrap_or_default();
            gs.extend(g.group.clone());
            if gs.is_empty() {
                return Err("write `{group: NAME}` or `{groups: [A, B]}`".into());
            }
            for name in &gs {
                if !channels.iter().any(|c| c.groups.contains(name)) {
                    let mut known: Vec<&str> = channels
                        .iter()
                        .flat_map(|c| c.groups.iter().map(String::as_str))
                        .collect();
                    known.sort();
                    known.dedup();
                    return Err(format!(
                        "no channel is in group {name:?}; groups: {}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ));
                }
            }
            Ok(ChannelSel::Groups(gs))
        }
    }
}

fn resolve(sel: &ChannelSel, within: &[Arc<ChannelCfg>]) -> Vec<Arc<ChannelCfg>> {
    within
        .iter()
        .filter(|c| match sel {
            ChannelSel::All => true,
            ChannelSel::Nothing => false,
            ChannelSel::Names(n) => n.contains(&c.name),
            ChannelSel::Groups(g) => c.groups.iter().any(|x| g.contains(x)),
        })
        .cloned()
        .collect()
}

/// Compile one endpoint. `own` is the channel of the spec it sits in.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compile_endpoint(
    sink: &mut Sink,
    file: &Path,
    dir: &Path,
    prefix: &str,
    ep: &EndpointFile,
    own: Option<&Arc<ChannelCfg>>,
    own_name: Option<&str>,
    lk: &mut Lookup,
) -> Option<EndpointCfg> {
    // A spec whose channel failed to compile: its endpoints are still
    // checked (listener, paths), then dropped.
    let own_failed = own.is_none() && own_name.is_some();
    let mut protocol_broken = false;
    let f = |k: &str| format!("{prefix}.{k}");
    let mut ok = true;
    let listener = pick_listener(sink, lk, ep.listener.as_ref(), &ep.path, f("listener"))?;
    let protocol = match &ep.protocol {
        None => None,
        Some(p) if p.value == "stream" => None,
        Some(p) => match lk.protocols.get(&p.value) {
            Some(p) => Some(p.clone()),
            // Its own errors are reported; check the rest of the endpoint.
            None if lk.broken_protocols.contains(&p.value) => {
                ok = false;
                protocol_broken = true;
                None
            }
            None => {
                let mut known: Vec<&str> = lk.protocols.keys().map(String::as_str).collect();
                known.sort();
                known.insert(0, "stream");
                sink.at(
                    p,
                    f("protocol"),
                    format!(
                        "no protocol named {:?}; defined: {} (protocols are defined in gateway.yaml under `protocols:`)",
                        p.value,
                        known.join(", ")
                    ),
                );
                return None;
            }
        },
    };
    // Paths.
    let mut paths = Vec::new();
    let mut all: Vec<&Spanned<String>> = vec![&ep.path];
    all.extend(ep.aliases.iter());
    for (i, p) in all.iter().enumerate() {
        let field = if i == 0 {
            f("path")
        } else {
            f(&format!("aliases[{}]", i - 1))
        };
        match PathPattern::parse(&p.value) {
            Ok(pat) => {
                let key = (listener.clone(), pat.shape());
                let origin = Origin::of(file, p, &field);
                if let Some((other, prev)) = lk.paths.get(&key) {
                    sink.at(
                        p,
                        &field,
                        format!(
                            "path {:?} on listener {listener:?} is already served by {other} ({}:{}:{})",
                            p.value,
                            prev.file.display(),
                            prev.line,
                            prev.col
                        ),
                    );
                    ok = false;
                    continue;
                }
                let what = match own_name {
                    Some(c) => format!("channel {c:?}"),
                    None => format!("endpoint {:?}", ep.path.value),
                };
                lk.paths.insert(key, (what, origin));
                paths.push(pat);
            }
            Err(m) => {
                sink.at(p, &field, m);
                ok = false;
            }
        }
    }
    if own_failed {
        return None;
    }
    // What the endpoint serves.
    let channels: Vec<Arc<ChannelCfg>> = match (own, &ep.channels) {
        (Some(c), None) => vec![c.clone()],
        (Some(_), Some(s)) => {
            sink.at(
                s,
                f("channels"),
                "an endpoint in a channel spec serves that channel; list several channels in a gateway.yaml endpoint instead",
            );
            return None;
        }
        (None, None) => {
            sink.at(
                &ep.path,
                f("channels"),
                "say which channels this endpoint serves: a name, a list, `all` or `{group: NAME}`",
            );
            return None;
        }
        (None, Some(s)) => match select(&s.value, lk.channels, false) {
            Ok(sel) => resolve(&sel, lk.channels),
            Err(m) => {
                sink.at(s, f("channels"), m);
                return None;
            }
        },
    };
    let subscribe = match (&ep.subscribe, &protocol) {
        (None, None) if !protocol_broken => channels.clone(),
        (None, _) => Vec::new(),
        (Some(s), _) => match select(&s.value, &channels, true) {
            Ok(sel) => resolve(&sel, &channels),
            Err(m) => {
                sink.at(
                    s,
                    f("subscribe"),
                    format!("{m} (among the channels this endpoint serves)"),
                );
                ok = false;
                Vec::new()
            }
        },
    };
    if protocol.is_none() && subscribe.is_empty() && ok && !protocol_broken {
        sink.at(
            &ep.path,
            f("subscribe"),
            "a stream endpoint (no `protocol`) must subscribe its clients to at least one channel",
        );
        ok = false;
    }
    // Path parameters select a keyed stream of one channel.
    let has_params = paths.iter().any(|p| !p.params().is_empty());
    let keyed = if has_params {
        if channels.len() != 1 || protocol.is_some() {
            sink.at(
                &ep.path,
                f("path"),
                "path parameters select a keyed stream: such an endpoint streams exactly one channel and has no `protocol`",
            );
            ok = false;
            None
        } else {
            let c = &channels[0];
            if !c.source.keyed() {
                sink.at(
                    &ep.path,
                    f("path"),
                    format!(
                        "path parameters select keyed streams, but {} has none (it supports: {})",
                        c.source.describe(),
                        c.source.modes_text()
                    ),
                );
                ok = false;
            }
            Some(c.clone())
        }
    } else {
        None
    };
    if let Some(k) = channels.iter().find(|c| c.keyed)
        && keyed.is_none()
        && ok
    {
        {
            sink.at(
                &ep.path,
                f("path"),
                format!(
                    "channel {:?} is made of keyed streams: serve it only on endpoints with path parameters",
                    k.name
                ),
            );
            ok = false;
        }
    }
    let auth = match &ep.auth {
        None => Auth::None,
        Some(a) => match compile_auth(&a.value, dir) {
            Ok(a) => a,
            Err(m) => {
                sink.at(a, f("auth"), m);
                return None;
            }
        },
    };
    let on_connect = match &ep.on_connect {
        Some(oc) => {
            let mut v = Vec::new();
            for t in many(&oc.value) {
                match template(t, REPLY_ROOTS) {
                    Ok(t) => v.push(t),
                    Err(m) => {
                        sink.at(oc, f("on_connect"), m);
                        ok = false;
                    }
                }
            }
            v
        }
        None => protocol
            .as_ref()
            .map(|p| p.replies.connected.clone())
            .unwrap_or_default(),
    };
    if let Some(o) = &ep.origins {
        for (i, x) in o.iter().enumerate() {
            if !(x == "*" || x.starts_with("http://") || x.starts_with("https://")) {
                sink.at(
                    &ep.path,
                    f(&format!("origins[{i}]")),
                    format!("invalid origin {x:?}: write scheme://host[:port], e.g. https://app.example.com"),
                );
                ok = false;
            }
        }
    }
    let close_codes = match &ep.close_codes {
        None => Vec::new(),
        Some(cc) => match code_map(
            &cc.value,
            CLOSE_CODES_SENT,
            crate::ws::valid_close_code,
            "a server may send 1000-1003, 1007-1014 or 3000-4999",
        ) {
            Ok(v) => v,
            Err(m) => {
                sink.at(cc, f("close_codes"), m);
                ok = false;
                Vec::new()
            }
        },
    };
    if !ok || paths.is_empty() {
        return None;
    }
    let limits = endpoint_limits(
        &format!("endpoint {listener} {}", paths[0].as_str()),
        ep.limits.as_ref().map(|l| &l.value),
        lk,
    );
    Some(EndpointCfg {
        listener,
        path: paths[0].clone(),
        paths,
        auth,
        auth_at: ep.auth.as_ref().map(|a| Origin::of(file, a, f("auth"))),
        idle_at: ep.limits.as_ref().and_then(|l| {
            let at = l.value.idle_timeout.as_ref()?;
            Some(Origin::of(file, at, f("limits.idle_timeout")))
        }),
        ping_at: ep.limits.as_ref().and_then(|l| {
            let at = l.value.ping_interval.as_ref()?;
            Some(Origin::of(file, at, f("limits.ping_interval")))
        }),
        origins: ep.origins.as_ref().map(|o| {
            o.iter()
                .map(|x| x.trim_end_matches('/').to_ascii_lowercase())
                .collect()
        }),
        subprotocols: ep.subprotocols.clone(),
        protocol,
        channels,
        subscribe,
        on_connect,
        keyed,
        limits,
        close_codes,
    })
}

/// The close codes the gateway sends (docs/architecture.md#close-codes).
pub(crate) const CLOSE_CODES_SENT: &[u16] = &[1000, 1001, 1002, 1007, 1008, 1009];

/// Check a `{from: to}` map of codes: each `from` one the gateway sends,
/// each `to` one it may send instead.
pub(crate) fn code_map(
    m: &std::collections::BTreeMap<u16, u16>,
    sent: &[u16],
    valid: fn(u16) -> bool,
    hint: &str,
) -> Result<Vec<(u16, u16)>, String> {
    let list = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    for (from, to) in m {
        if !sent.contains(from) {
            return Err(format!(
                "{from} is not a code the gateway sends; it sends {}",
                list(sent)
            ));
        }
        if !valid(*to) {
            return Err(format!("{from}: {to} cannot be sent in its place; {hint}"));
        }
    }
    Ok(m.iter().map(|(a, b)| (*a, *b)).collect())
}

/// An endpoint's limits; `id` names the endpoint in the limiter pool.
fn endpoint_limits(id: &str, own: Option<&EndpointLimitsFile>, lk: &mut Lookup) -> ConnLimits {
    let g = lk.limits;
    let d = EndpointLimitsFile::default();
    let e = own.unwrap_or(&d);
    let mut l = ConnLimits {
        total: e.max_connections.map(|n| {
            lk.pool
                .counter(&format!("{id} max_connections"), n, "endpoint")
        }),
        per_ip: g.per_ip.iter().cloned().collect(),
        per_principal: g.per_principal.iter().cloned().collect(),
        new_per_ip: g.new_per_ip.iter().cloned().collect(),
        inbound: e.inbound_messages.or(g.inbound),
        on_inbound: e.on_inbound_limit.unwrap_or(g.on_inbound),
        max_message_size: e
            .max_message_size
            .map(|b| b.0)
            .unwrap_or(g.max_message_size),
        max_duration: e
            .max_connection_duration
            .map(|d| d.0)
            .unwrap_or(g.max_duration),
        idle_timeout: e
            .idle_timeout
            .as_ref()
            .map_or(g.idle_timeout, |d| d.value.0),
        ping_interval: e
            .ping_interval
            .as_ref()
            .map_or(g.ping_interval, |d| d.value.0),
        pong_timeout: e.pong_timeout.map(|d| d.0).unwrap_or(g.pong_timeout),
        write_interval: e.write_interval.map(|d| d.0).unwrap_or(g.write_interval),
    };
    if let Some(n) = e.max_connections_per_ip {
        l.per_ip.push(
            lk.pool
                .counter(&format!("{id} max_connections_per_ip"), n, "client IP"),
        );
    }
    if let Some(n) = e.max_connections_per_principal {
        l.per_principal.push(lk.pool.counter(
            &format!("{id} max_connections_per_principal"),
            n,
            "principal",
        ));
    }
    if let Some(r) = e.new_connections_per_ip {
        l.new_per_ip
            .push(lk.ip_limiter(&format!("{id} new_connections_per_ip"), r));
    }
    l
}

/// Compile an HTTP route.
pub(crate) fn compile_http(
    sink: &mut Sink,
    file: &Path,
    dir: &Path,
    i: usize,
    r: &HttpRouteFile,
    lk: &mut Lookup,
) -> Option<HttpRouteCfg> {
    let f = |k: &str| format!("http[{i}].{k}");
    let names: Vec<Arc<str>> = lk.channels.iter().map(|c| c.name.clone()).collect();
    let listener = pick_listener(sink, lk, r.listener.as_ref(), &r.path, f("listener"))?;
    let path = match PathPattern::parse(&r.path.value) {
        Ok(p) if p.params().is_empty() => p,
        Ok(_) => {
            sink.at(&r.path, f("path"), "HTTP routes take no path parameters");
            return None;
        }
        Err(m) => {
            sink.at(&r.path, f("path"), m);
            return None;
        }
    };
    let method = match r.method.as_ref().map(|m| m.value.to_ascii_uppercase()) {
        None => http::Method::GET,
        Some(m) if m == "GET" => http::Method::GET,
        Some(m) if m == "POST" => http::Method::POST,
        Some(m) => {
            if let Some(s) = &r.method {
                sink.at(
                    s,
                    f("method"),
                    format!("method {m:?} is not supported: use GET or POST"),
                );
            }
            return None;
        }
    };
    let answer = if let Some(l) = &r.latest {
        if r.body.is_some() || r.command.is_some() {
            sink.at(
                l,
                f("latest"),
                "`latest` answers by itself: remove `body` and `command`",
            );
            return None;
        }
        if !names.iter().any(|n| **n == *l.value) {
            sink.at(
                l,
                f("latest"),
                format!("no channel named {:?}; defined: {}", l.value, join(&names)),
            );
            return None;
        }
        // Its messages go to its keyed streams: the channel itself never
        // has a latest one, and the route would answer 503 for good.
        if lk.channels.iter().any(|c| *c.name == *l.value && c.keyed) {
            sink.at(
                l,
                f("latest"),
                format!(
                    "channel {:?} is made of keyed streams and has no latest message of its own; `latest` takes an unkeyed channel",
                    l.value
                ),
            );
            return None;
        }
        HttpAnswer::Latest(l.value.as_str().into())
    } else if let Some(c) = &r.command {
        let cmd = compile_command(sink, CmdSpec::of(c), &f("command"), &names)?;
        let body = match &r.body {
            Some(b) => Some(spanned_template(sink, b, &f("body"), REPLY_ROOTS)?),
            None => None,
        };
        HttpAnswer::Command(Arc::new(cmd), body)
    } else if let Some(b) = &r.body {
        HttpAnswer::Body(spanned_template(sink, b, &f("body"), REPLY_ROOTS)?)
    } else {
        sink.at(
            &r.path,
            f("body"),
            "say what the route answers: `body` (a template), `latest: CHANNEL` or `command: {channel, request}`",
        );
        return None;
    };
    let key = (listener.clone(), path.shape());
    if let Some((other, prev)) = lk.paths.get(&key) {
        sink.at(
            &r.path,
            f("path"),
            format!(
                "path {:?} on listener {listener:?} is already served by {other} ({}:{}:{})",
                r.path.value,
                prev.file.display(),
                prev.line,
                prev.col
            ),
        );
        return None;
    }
    lk.paths.insert(
        key,
        (
            format!("HTTP route {:?}", r.path.value),
            Origin::of(file, &r.path, f("path")),
        ),
    );
    let auth = match &r.auth {
        None => Auth::None,
        // Any `message` is refused, not only one without `bearer` or
        // `query`: a request without a token would pass (an in-band auth
        // makes the token optional before the upgrade).
        Some(span) => match compile_auth(&span.value, dir) {
            Ok(a) if a.inband().is_some() => {
                sink.at(
                    span,
                    f("auth"),
                    "HTTP routes authenticate by header or query only: remove `message` (and use `jwt` or `api_key`)",
                );
                return None;
            }
            Ok(a) => a,
            Err(m) => {
                sink.at(span, f("auth"), m);
                return None;
            }
        },
    };
    let status = match r.status {
        None => http::StatusCode::OK,
        Some(s) => match http::StatusCode::from_u16(s) {
            Ok(s) if s.is_success() => s,
            _ => {
                sink.at(
                    &r.path,
                    f("status"),
                    format!("status {s} is not a 2xx success status"),
                );
                return None;
            }
        },
    };
    let per_ip = match r.requests_per_ip {
        Some(rate) => {
            Some(lk.ip_limiter(&format!("http {listener} {method} {}", path.as_str()), rate))
        }
        None => lk.limits.http_per_ip.clone(),
    };
    Some(HttpRouteCfg {
        listener,
        path,
        reads_body: reads_body(&method, &answer),
        method,
        auth,
        auth_at: r.auth.as_ref().map(|a| Origin::of(file, a, f("auth"))),
        answer,
        status,
        max_body: r.max_body.map(|b| b.0).unwrap_or(1 << 20),
        per_ip,
    })
}

fn compile_inband(m: &InbandFile, jwt: bool, dir: &Path) -> Result<Inband, String> {
    if m.match_fields.is_empty() {
        return Err("`message.match` must name at least one field that identifies the message, e.g. `{type: auth}`".into());
    }
    let token_field = match (&m.token_field, jwt) {
        (Some(t), true) => Some(parse_path(t)?),
        (None, true) => {
            return Err(
                "`message.token_field` names the field holding the token, e.g. `token`".into(),
            );
        }
        (Some(_), false) => {
            return Err("`token_field` applies to `mode: jwt` only".into());
        }
        (None, false) => None,
    };
    let reply = m
        .reply
        .as_ref()
        .map(|v| Template::compile(v, REPLY_ROOTS))
        .transpose()
        .map_err(|e| format!("message.reply: {e}"))?;
    let error_reply = m
        .error_reply
        .as_ref()
        .map(|v| Template::compile(v, REPLY_ROOTS))
        .transpose()
        .map_err(|e| format!("message.error_reply: {e}"))?;
    let schema = m
        .schema
        .as_ref()
        .map(|s| compile_schema(&dir.join(s)).map(Arc::new))
        .transpose()
        .map_err(|e| format!("message.schema: {e}"))?;
    Ok(Inband {
        match_fields: m.match_fields.clone(),
        token_field,
        required: m.required.clone(),
        reply,
        error_reply,
        schema,
        timeout: m
            .timeout
            .as_ref()
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(10)),
        allow_before: m.allow_before.clone(),
    })
}

/// Compile an auth mode.
pub(crate) fn compile_auth(a: &AuthFile, spec_dir: &Path) -> Result<Auth, String> {
    match a {
        AuthFile::None => Ok(Auth::None),
        AuthFile::ApiKey {
            query,
            header,
            keys_env,
            keys_file,
        } => super::compile_api_key(query, header, keys_env, keys_file, spec_dir),
        AuthFile::Jwt {
            algorithm,
            secret_env,
            secret_default,
            public_key_file,
            jwks_file,
            issuer,
            audience,
            leeway,
            require_exp,
            close_at_exp,
            principal_claim,
            bearer,
            query,
            message,
        } => {
            let settings = crate::jwt::JwtSettings {
                algorithm: algorithm.clone(),
                secret_env: secret_env.clone(),
                secret_default: secret_default.clone(),
                public_key_file: public_key_file.clone(),
                jwks_file: jwks_file.clone(),
                issuer: issuer.clone(),
                audience: audience.clone(),
                leeway: leeway.clone(),
                require_exp: *require_exp,
                close_at_exp: *close_at_exp,
                principal_claim: principal_claim.clone(),
            };
            let verifier = crate::jwt::JwtVerifier::compile(&settings, spec_dir)?;
            if !bearer && query.is_none() && message.is_none() {
                return Err("the token must come from somewhere: `bearer: true`, `query: NAME` or `message: {...}`".into());
            }
            let inband = message
                .as_ref()
                .map(|m| compile_inband(m, true, spec_dir))
                .transpose()?;
            Ok(Auth::Jwt(Arc::new(crate::auth::JwtAuth {
                verifier,
                bearer: *bearer,
                query: query.clone(),
                inband,
            })))
        }
        AuthFile::Handshake { message } => Ok(Auth::Handshake(Arc::new(compile_inband(
            message, false, spec_dir,
        )?))),
    }
}

impl ChannelSel {
    /// Whether nothing is selected.
    pub fn is_nothing(&self) -> bool {
        matches!(self, ChannelSel::Nothing)
    }
}

/// Compile the HTTP publish API into a route `POST {path}/{channel}`.
pub(crate) fn compile_publish(
    sink: &mut Sink,
    file: &Path,
    dir: &Path,
    p: &PublishFile,
    lk: &mut Lookup,
) -> Option<HttpRouteCfg> {
    let listener = pick_listener(
        sink,
        lk,
        p.listener.as_ref(),
        &p.auth,
        "publish.listener".to_string(),
    )?;
    let prefix = p
        .path
        .as_ref()
        .map(|s| s.value.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "/publish".into());
    let path = match PathPattern::parse(&format!("{prefix}/{{channel}}")) {
        Ok(x) if x.params().len() == 1 => x,
        Ok(_) | Err(_) => {
            if let Some(s) = &p.path {
                sink.at(
                    s,
                    "publish.path",
                    format!(
                        "invalid path prefix {:?}: write e.g. /publish (without parameters)",
                        s.value
                    ),
                );
            }
            return None;
        }
    };
    // Default: all of them.
    let sel = match &p.channels {
        None => ChannelSel::All,
        Some(s) => match select(&s.value, lk.channels, false) {
            Ok(sel) => sel,
            Err(m) => {
                sink.at(s, "publish.channels", m);
                return None;
            }
        },
    };
    let channels: Vec<Arc<str>> = resolve(&sel, lk.channels)
        .iter()
        // The builtin ones (the status page's data) only when named: a
        // publisher could otherwise show operators a made-up state.
        .filter(|c| {
            !matches!(c.source.kind, super::SourceKind::Builtin(_))
                || matches!(&sel, ChannelSel::Names(n) if n.contains(&c.name))
        })
        .map(|c| c.name.clone())
        .collect();
    if p.channels.is_some()
        && let Some(k) = lk
            .channels
            .iter()
            .find(|c| c.keyed && channels.contains(&c.name))
    {
        sink.at(
            &p.auth,
            "publish.channels",
            format!(
                "channel {:?} is made of keyed streams; the publish API publishes to unkeyed channels only",
                k.name
            ),
        );
        return None;
    }
    let channels: Vec<Arc<str>> = channels
        .into_iter()
        .filter(|n| lk.channels.iter().any(|c| c.name == *n && !c.keyed))
        .collect();
    let auth = match compile_auth(&p.auth.value, dir) {
        Ok(a) if a.inband().is_some() => {
            sink.at(
                &p.auth,
                "publish.auth",
                "the publish API authenticates by header or query only: remove `message` (and use `jwt` or `api_key`)",
            );
            return None;
        }
        Ok(a) => a,
        Err(m) => {
            sink.at(&p.auth, "publish.auth", m);
            return None;
        }
    };
    let key = (listener.clone(), path.shape());
    if let Some((other, prev)) = lk.paths.get(&key) {
        sink.at(
            &p.auth,
            "publish.path",
            format!(
                "path {:?} on listener {listener:?} is already served by {other} ({}:{}:{})",
                path.as_str(),
                prev.file.display(),
                prev.line,
                prev.col
            ),
        );
        return None;
    }
    lk.paths.insert(
        key,
        (
            "the publish API".into(),
            Origin::of(file, &p.auth, "publish"),
        ),
    );
    Some(HttpRouteCfg {
        listener,
        path,
        method: http::Method::POST,
        auth,
        auth_at: Some(Origin::of(file, &p.auth, "publish.auth")),
        answer: HttpAnswer::Publish(channels),
        status: http::StatusCode::ACCEPTED,
        max_body: p.max_body.map(|b| b.0).unwrap_or(1 << 20),
        per_ip: match p.requests_per_ip {
            Some(rate) => Some(lk.ip_limiter("publish", rate)),
            None => lk.limits.http_per_ip.clone(),
        },
        reads_body: true,
    })
}
