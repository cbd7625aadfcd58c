//! The AsyncAPI 3.0 document of a configuration (`gateway asyncapi`,
//! `admin.asyncapi`).
//!
//! The document describes the gateway as the application: listeners are
//! servers, WebSocket endpoints are channels (path parameters become channel
//! parameters), and each channel's JSON Schema is the payload of its
//! message. Operations follow AsyncAPI 3.0's meaning of `action`, from the
//! gateway's side: `send` for what the gateway sends to clients (channel
//! messages, protocol replies), `receive` for what clients send (the actions
//! of the endpoint's control protocol, an in-band auth message). Endpoint
//! auth modes become security schemes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::auth::{Auth, Inband};
use crate::config::{Action, ChannelCfg, Config, EndpointCfg, ProtocolCfg};

/// The AsyncAPI version of the document.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// An identifier AsyncAPI accepts as a key (`[A-Za-z0-9_-]`).
fn ident(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let out = out.trim_matches('-').to_string();
    if out.is_empty() { "root".into() } else { out }
}

/// A JSON Schema as an AsyncAPI payload: the schema itself, as written,
/// tagged with its JSON Schema version (from `$schema`; the gateway compiles
/// a schema without one as 2020-12).
pub fn payload(schema: &Value) -> Value {
    let draft = schema.get("$schema").and_then(Value::as_str).unwrap_or("");
    let version = if draft.contains("draft-07") {
        "draft-07"
    } else if draft.contains("draft-06") {
        "draft-06"
    } else if draft.contains("draft-04") {
        "draft-04"
    } else if draft.contains("2019-09") {
        "draft-2019-09"
    } else {
        "draft-2020-12"
    };
    json!({
        "schemaFormat": format!("application/schema+json;version={version}"),
        "schema": schema,
    })
}

/// Builds the document: components are shared, channels and operations are
/// per endpoint.
struct Doc<'a> {
    cfg: &'a Config,
    messages: Map<String, Value>,
    schemes: Map<String, Value>,
    channels: Map<String, Value>,
    operations: Map<String, Value>,
    /// The key each named thing got (a channel's message, a protocol's
    /// message, a security scheme): names that `ident` makes alike
    /// (`prices.eu`, `prices-eu`) get keys of their own.
    keys: HashMap<String, String>,
    /// Each listener's key under `servers`.
    servers: HashMap<String, String>,
}

fn reference(path: &str) -> Value {
    json!({ "$ref": path })
}

/// A key not yet in `map`: `base`, else `base-2`, `base-3`, ...
fn fresh(map: &Map<String, Value>, base: &str) -> String {
    if !map.contains_key(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|k| !map.contains_key(k))
        .unwrap_or_default()
}

/// The key of `name` in `map`, made once per name: `ident(base)`, or a fresh
/// one if another name took it; and whether it was made now.
fn key_for(
    keys: &mut HashMap<String, String>,
    map: &Map<String, Value>,
    name: String,
    base: &str,
) -> (String, bool) {
    if let Some(k) = keys.get(&name) {
        return (k.clone(), false);
    }
    let k = fresh(map, &ident(base));
    keys.insert(name, k.clone());
    (k, true)
}

impl Doc<'_> {
    /// The component message of a channel (what the gateway sends on it).
    fn channel_message(&mut self, ch: &ChannelCfg) -> String {
        let (id, new) = key_for(
            &mut self.keys,
            &self.messages,
            format!("channel\0{}", ch.name),
            &ch.name,
        );
        if new {
            let mut m = json!({
                "name": &*ch.name,
                "title": format!("{} message", ch.name),
                "description": format!(
                    "A message of channel `{}` (source `{}`). Every message is validated against the channel's schema before it is sent.",
                    ch.name,
                    ch.source.name()
                ),
                "contentType": "application/json",
                "payload": payload(&ch.schema),
            });
            if !ch.description.is_empty() {
                m["summary"] = Value::String(ch.description.clone());
            }
            if !ch.examples.is_empty() {
                m["examples"] = ch
                    .examples
                    .iter()
                    .enumerate()
                    .map(|(i, e)| json!({"name": format!("example-{}", i + 1), "payload": e}))
                    .collect();
            }
            self.messages.insert(id.clone(), m);
        }
        id
    }

    /// A protocol message from a builder, under `protocol-<name>-<what>`.
    fn protocol_message(
        &mut self,
        p: &ProtocolCfg,
        what: &str,
        build: impl FnOnce() -> Value,
    ) -> String {
        let (id, new) = key_for(
            &mut self.keys,
            &self.messages,
            format!("protocol\0{}\0{what}", p.name),
            &format!("{}-{}", ident(&p.name), ident(what)),
        );
        if new {
            let m = build();
            self.messages.insert(id.clone(), m);
        }
        id
    }

    /// The message a client sends for action `name` of protocol `p`.
    fn client_message(&mut self, p: &ProtocolCfg, name: &str, action: &Action) -> String {
        self.protocol_message(p, &format!("{name}-request"), || {
            let af = &p.action_field;
            let cf = &p.channel_field;
            let mut props = Map::new();
            props.insert(af.clone(), json!({ "const": name }));
            let mut required = vec![Value::String(af.clone())];
            let what = match action {
                Action::Subscribe | Action::Unsubscribe => {
                    props.insert(
                        cf.clone(),
                        json!({"type": "string", "description": "A channel name (or a channel set of the protocol)."}),
                    );
                    required.push(Value::String(cf.clone()));
                    if let Some(f) = &p.filters_field
                        && matches!(action, Action::Subscribe)
                    {
                        props.insert(
                            f.clone(),
                            json!({"type": "object", "description": "Filters, by the names the channel defines."}),
                        );
                    }
                    if let Some(k) = &p.subscription_key {
                        props.insert(
                            k.clone(),
                            json!({"description": "Identifies one of several subscriptions to the channel."}),
                        );
                    }
                    if matches!(action, Action::Subscribe) {
                        "Subscribe to a channel."
                    } else {
                        "Unsubscribe from a channel."
                    }
                }
                Action::Ping => "Ping: answered with the protocol's `pong` reply.",
                Action::Status => "Ask for this connection's status: answered with the `status` reply.",
                Action::Command(_) => "A request answered by a plugin command: answered with the `command` reply.",
            };
            let mut description = what.to_string();
            if let Action::Command(c) = action {
                description.push_str(&format!(" The plugin of channel `{}` answers.", c.channel));
            }
            json!({
                "name": name,
                "title": format!("{name} ({} protocol)", p.name),
                "summary": what,
                "description": description,
                "contentType": "application/json",
                "payload": {
                    "type": "object",
                    "required": required,
                    "properties": props,
                },
            })
        })
    }

    /// The replies of protocol `p`: its reply schema when it has one.
    fn reply_message(&mut self, p: &ProtocolCfg) -> String {
        self.protocol_message(p, "reply", || {
            let payload = match &p.schema {
                Some(s) => payload(s),
                None => json!({"type": "object"}),
            };
            json!({
                "name": "reply",
                "title": format!("{} protocol reply", p.name),
                "summary": "A reply of the protocol: connected, subscribed, unsubscribed, pong, status, error or a command's answer.",
                "description": format!(
                    "Rendered from the reply templates of protocol `{}`.{}",
                    p.name,
                    if p.schema.is_some() { " Every reply is validated against the protocol's schema." } else { "" }
                ),
                "contentType": "application/json",
                "payload": payload,
            })
        })
    }

    fn scheme(&mut self, id: &str, scheme: Value) -> Value {
        let (id, new) = key_for(&mut self.keys, &self.schemes, format!("scheme\0{id}"), id);
        if new {
            self.schemes.insert(id.clone(), scheme);
        }
        reference(&format!("#/components/securitySchemes/{id}"))
    }

    /// The security schemes of an auth mode, and a description of in-band auth.
    fn security(&mut self, auth: &Auth) -> (Vec<Value>, Option<(String, &'static str)>) {
        let mut refs = Vec::new();
        let mut inband = None;
        match auth {
            Auth::None => {}
            Auth::ApiKey { query, header, .. } => {
                if let Some(h) = header {
                    refs.push(self.scheme(
                        &format!("apiKey-header-{h}"),
                        json!({"type": "httpApiKey", "in": "header", "name": h.as_str(), "description": "An API key in a request header of the upgrade."}),
                    ));
                }
                if let Some(q) = query {
                    refs.push(self.scheme(
                        &format!("apiKey-query-{q}"),
                        json!({"type": "httpApiKey", "in": "query", "name": q, "description": "An API key in a query parameter of the upgrade request."}),
                    ));
                }
            }
            Auth::Jwt(j) => {
                let alg = j.verifier.algorithm();
                if j.bearer {
                    refs.push(self.scheme(
                        &format!("jwt-bearer-{alg}"),
                        json!({"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": format!("A JWT signed with {alg}, in `Authorization: Bearer` of the upgrade request.")}),
                    ));
                }
                if let Some(q) = &j.query {
                    refs.push(self.scheme(
                        &format!("jwt-query-{q}-{alg}"),
                        json!({"type": "httpApiKey", "in": "query", "name": q, "description": format!("A JWT signed with {alg}, in a query parameter of the upgrade request.")}),
                    ));
                }
                if j.inband.is_some() {
                    inband = Some((
                        format!("a JWT signed with {alg} in the client's first message"),
                        "jwt",
                    ));
                }
            }
            Auth::Handshake(_) => {
                inband = Some((
                    "a handshake message as the client's first message".to_string(),
                    "handshake",
                ));
            }
        }
        (refs, inband)
    }

    /// The in-band auth message of an endpoint.
    fn auth_message(inband: &Inband, kind: &str) -> Value {
        let mut props = Map::new();
        let mut required = Vec::new();
        for (k, v) in &inband.match_fields {
            props.insert(k.clone(), json!({ "const": v }));
            required.push(Value::String(k.clone()));
        }
        let mut fields: Vec<&str> = inband.required.iter().map(String::as_str).collect();
        let token = inband
            .token_field
            .as_ref()
            .map(|t| t.join("."))
            .unwrap_or_default();
        if let Some(first) = inband.token_field.as_ref().and_then(|t| t.first()) {
            fields.push(first);
        }
        for f in fields {
            if !props.contains_key(f) {
                props.insert(f.to_string(), json!({}));
                required.push(Value::String(f.to_string()));
            }
        }
        let description = if kind == "jwt" {
            format!("Authenticates the connection: the JWT is in `{token}`.")
        } else {
            "Authenticates the connection: the handshake's required fields.".to_string()
        };
        json!({
            "name": "auth",
            "title": "In-band authentication",
            "summary": "The client's first message, before anything else is answered.",
            "description": format!(
                "{description} It must arrive within {} s of the connection.",
                inband.timeout.as_secs_f64()
            ),
            "contentType": "application/json",
            "payload": {"type": "object", "required": required, "properties": props},
        })
    }

    fn endpoint(&mut self, ep: &EndpointCfg) {
        let path = ep.path.as_str();
        let cid = {
            let base = ident(path);
            if self.channels.contains_key(&base) {
                fresh(&self.channels, &format!("{base}-{}", ident(&ep.listener)))
            } else {
                base
            }
        };
        let chan_ref = reference(&format!("#/channels/{cid}"));
        let msg_ref = |key: &str| reference(&format!("#/channels/{cid}/messages/{key}"));
        let mut messages = Map::new();

        // What the gateway sends.
        let sent: &[Arc<ChannelCfg>] = if ep.protocol.is_some() {
            &ep.channels
        } else {
            &ep.subscribe
        };
        let mut send_msgs = Vec::new();
        for ch in sent {
            let id = self.channel_message(ch);
            messages.insert(
                id.clone(),
                reference(&format!("#/components/messages/{id}")),
            );
            send_msgs.push(msg_ref(&id));
        }
        let (security, inband) = self.security(&ep.auth);
        let mut description = format!(
            "WebSocket endpoint on listener `{}`. {}",
            ep.listener,
            match &ep.protocol {
                None =>
                    "A one-way stream: the gateway sends the messages of its channels.".to_string(),
                Some(p) => format!(
                    "Clients speak protocol `{}`: they subscribe to the channels they want (`{}` names the action, `{}` the channel).",
                    p.name, p.action_field, p.channel_field
                ),
            }
        );
        if ep.paths.len() > 1 {
            let aliases: Vec<&str> = ep.paths[1..].iter().map(|p| p.as_str()).collect();
            description.push_str(&format!(" Also served at {}.", aliases.join(", ")));
        }
        if let Some((how, _)) = &inband {
            description.push_str(&format!(" Clients authenticate with {how}."));
        }

        // Replies and client messages of the control protocol.
        let mut receive = Vec::new();
        if let Some(p) = &ep.protocol {
            let reply = self.reply_message(p);
            messages.insert(
                reply.clone(),
                reference(&format!("#/components/messages/{reply}")),
            );
            send_msgs.push(msg_ref(&reply));
            let mut names: Vec<(&String, &Action)> = p.actions.iter().collect();
            names.sort_by_key(|(n, _)| n.as_str());
            for (name, action) in names {
                let id = self.client_message(p, name, action);
                messages.insert(
                    id.clone(),
                    reference(&format!("#/components/messages/{id}")),
                );
                receive.push((ident(name), id));
            }
            let reply_ref = msg_ref(&reply);
            for (name, id) in &receive {
                let op = fresh(&self.operations, &format!("{cid}-{name}"));
                let mut o = json!({
                    "action": "receive",
                    "channel": chan_ref.clone(),
                    "title": format!("{name} on {path}"),
                    "messages": [msg_ref(id)],
                    "reply": {"channel": chan_ref.clone(), "messages": [reply_ref.clone()]},
                });
                if !security.is_empty() {
                    o["security"] = Value::Array(security.clone());
                }
                self.operations.insert(op, o);
            }
        }
        if let Some((_, kind)) = &inband {
            let inb = match &ep.auth {
                Auth::Jwt(j) => j.inband.as_ref(),
                Auth::Handshake(h) => Some(&**h),
                _ => None,
            };
            if let Some(inb) = inb {
                let id = fresh(&messages, "auth");
                messages.insert(id.clone(), Doc::auth_message(inb, kind));
                let op = fresh(&self.operations, &format!("{cid}-auth"));
                self.operations.insert(
                    op,
                    json!({
                        "action": "receive",
                        "channel": chan_ref.clone(),
                        "title": format!("authenticate on {path}"),
                        "messages": [msg_ref(&id)],
                    }),
                );
            }
        }

        let op = fresh(&self.operations, &format!("{cid}-send"));
        let mut o = json!({
            "action": "send",
            "channel": chan_ref.clone(),
            "title": format!("messages sent on {path}"),
            "messages": send_msgs,
        });
        if !security.is_empty() {
            o["security"] = Value::Array(security);
        }
        self.operations.insert(op, o);

        let mut c = json!({
            "address": path,
            "title": path,
            "description": description,
            "servers": [reference(&format!("#/servers/{}", self.servers[&ep.listener]))],
            "messages": messages,
        });
        let params = ep.path.params();
        if !params.is_empty() {
            let keyed = ep
                .keyed
                .as_ref()
                .map(|c| c.name.to_string())
                .unwrap_or_default();
            let p: Map<String, Value> = params
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        json!({"description": format!("Path parameter: with the others, selects one keyed stream of channel `{keyed}`.")}),
                    )
                })
                .collect();
            c["parameters"] = Value::Object(p);
        }
        self.channels.insert(cid, c);
    }
}

/// The AsyncAPI 3.0.0 document of `cfg`. `addrs` are the bound addresses
/// of a running gateway (None: the addresses as configured).
pub fn document(cfg: &Config, addrs: Option<&BTreeMap<String, SocketAddr>>) -> Value {
    let mut servers = Map::new();
    let mut server_keys = HashMap::new();
    for l in &cfg.listeners {
        let addr = addrs
            .and_then(|a| a.get(&l.name))
            .copied()
            .unwrap_or(l.bind);
        let tls = l.tls.is_some();
        let mut s = json!({
            "host": addr.to_string(),
            "protocol": if tls { "wss" } else { "ws" },
            "title": format!("listener {}", l.name),
            "description": format!(
                "Listener `{}` ({}). Its HTTP routes and, on the admin listener, /healthz, /readyz and /metrics are served on the same address{}.",
                l.name,
                if tls { "TLS" } else { "plain TCP" },
                if tls { " over https" } else { "" },
            ),
        });
        if cfg.admin_listener.as_deref() == Some(l.name.as_str()) {
            s["tags"] = json!([{"name": "admin", "description": "Serves the admin routes."}]);
        }
        let (key, _) = key_for(&mut server_keys, &servers, l.name.clone(), &l.name);
        servers.insert(key, s);
    }
    let mut doc = Doc {
        cfg,
        messages: Map::new(),
        schemes: Map::new(),
        channels: Map::new(),
        operations: Map::new(),
        keys: HashMap::new(),
        servers: server_keys,
    };
    let mut eps: Vec<&Arc<EndpointCfg>> = doc.cfg.endpoints.iter().collect();
    eps.sort_by(|a, b| {
        (a.listener.as_str(), a.path.as_str()).cmp(&(b.listener.as_str(), b.path.as_str()))
    });
    for ep in eps {
        doc.endpoint(ep);
    }
    let mut components = Map::new();
    components.insert("messages".into(), Value::Object(doc.messages));
    if !doc.schemes.is_empty() {
        components.insert("securitySchemes".into(), Value::Object(doc.schemes));
    }
    let file = cfg.file.display().to_string();
    json!({
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": format!("gateway ({file})"),
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "The WebSocket API of the gateway serving {file}: {} channel(s) on {} endpoint(s). Generated from the configuration.",
                cfg.channels.len(),
                cfg.endpoints.len()
            ),
        },
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": doc.channels,
        "operations": doc.operations,
        "components": components,
    })
}
