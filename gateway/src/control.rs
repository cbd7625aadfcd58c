//! A session's control side: in-band authentication, the subscribe protocol
//! and its replies, and the subscriptions themselves.
//!
//! Replies are rendered from the endpoint's templates and written ahead of
//! queued data. Plugin commands run on blocking threads; their answers are
//! queued when they arrive.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::auth::{Inband, InbandResult, Principal};
use crate::channel::{CommandError, Subscription};
use crate::config::{Action, ChannelCfg, EndpointCfg, NotSubscribed, OnFull, TimestampFormat};
use crate::context::GatewayCtx;
use crate::filter::SubFilter;
use crate::queue::SessionQueue;
use crate::state::{ClientInfo, GatewayState};
use crate::template::{Template, With};
use crate::ws::close;

/// Plugin commands one client may have in flight.
const MAX_COMMANDS_IN_FLIGHT: usize = 4;

/// In-band authentications refused on one connection before it is closed
/// (1008): each is a signature check, which a client could otherwise ask
/// for without end.
pub const MAX_AUTH_FAILURES: u8 = 10;
/// Most subscriptions one connection may hold (with a `subscription_key`,
/// each value is one): every publish to a channel visits each of them.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// A session's control state.
pub struct Control {
    ep: Arc<EndpointCfg>,
    state: Arc<GatewayState>,
    queue: Arc<SessionQueue>,
    info: Arc<ClientInfo>,
    key: Option<(Arc<str>, Vec<u8>)>,
    params: Value,
    authed: bool,
    /// (channel, subscription key value, subscription).
    subs: Vec<(Arc<str>, Option<String>, Subscription)>,
    in_flight: Arc<AtomicUsize>,
    /// In-band authentications refused so far.
    auth_failures: u8,
    /// Per-principal slots taken at in-band authentication.
    guards: Vec<crate::limits::CountGuard>,
    /// A close the session should send.
    close: Option<(u16, &'static str)>,
    /// An in-band authentication set when the connection's token expires
    /// (`close_at_exp`): the session's deadline moves to it.
    expiry: Option<Option<std::time::SystemTime>>,
}

/// An error reply's code and message.
struct Refusal {
    code: &'static str,
    message: String,
}

/// Whether subscribing to `name` (with subscription key value `id`)
/// replaces the subscription to `n` (with `i`): the same channel, unless
/// both have key values and they differ.
fn replaces(name: &str, id: Option<&str>, n: &str, i: Option<&str>) -> bool {
    n == name && !matches!((id, i), (Some(a), Some(b)) if a != b)
}

fn refusal(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

impl Control {
    /// Control for a new session. `principal` is None while in-band
    /// authentication is pending; `guards` are its slots of the principal's.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ep: Arc<EndpointCfg>,
        state: Arc<GatewayState>,
        queue: Arc<SessionQueue>,
        info: Arc<ClientInfo>,
        key: Option<(Arc<str>, Vec<u8>)>,
        params: Value,
        principal: Option<Principal>,
        guards: Vec<crate::limits::CountGuard>,
    ) -> Control {
        Control {
            ep,
            state,
            queue,
            info,
            key,
            params,
            authed: principal.is_some(),
            expiry: principal.as_ref().and_then(|p| p.1).map(Some),
            subs: Vec::new(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            auth_failures: 0,
            guards,
            close: None,
        }
    }

    /// When the token of the handshake, or of an in-band authentication
    /// since the last call, expires (`Some(None)`: it does not close the
    /// connection).
    pub fn take_expiry(&mut self) -> Option<Option<std::time::SystemTime>> {
        self.expiry.take()
    }

    /// A close requested by the protocol (e.g. a principal over its limit).
    pub fn take_close(&mut self) -> Option<(u16, &'static str)> {
        self.close.take()
    }

    /// The client sent faster than its endpoint allows (`on_inbound_limit: error`).
    pub fn rate_limited(&self, out: &mut Vec<Bytes>) {
        out.extend(self.refuse_early(
            refusal("rate_limited", "too many messages; slow down"),
            None,
        ));
    }

    /// Whether in-band authentication is still awaited.
    pub fn awaiting_auth(&self) -> bool {
        !self.authed
    }

    /// Whether client text is read at all (stream endpoints ignore it once
    /// authenticated).
    pub fn reads_text(&self) -> bool {
        self.ep.protocol.is_some() || !self.authed
    }

    fn fmt(&self) -> TimestampFormat {
        self.ep
            .protocol
            .as_ref()
            .map(|p| p.timestamps)
            .unwrap_or_default()
    }

    fn channels_value(&self) -> Value {
        Value::Array(
            self.ep
                .channels
                .iter()
                .map(|c| Value::String(c.name.to_string()))
                .collect(),
        )
    }

    fn groups_value(&self) -> Value {
        let mut m = Map::new();
        for c in &self.ep.channels {
            for g in &c.groups {
                let e = m
                    .entry(g.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(a) = e {
                    a.push(Value::String(c.name.to_string()));
                }
            }
        }
        Value::Object(m)
    }

    /// Render `t` into a frame, with these extra roots.
    fn render(&self, t: &Template, extra: Vec<(&'static str, Value)>) -> Option<Bytes> {
        let v = self.render_value(t, extra);
        self.frame_of(v)
    }

    /// Render a reply of the in-band message (`auth.message.reply` or
    /// `error_reply`): checked against `auth.message.schema` when given,
    /// else against the protocol's schema.
    fn render_inband(&self, t: &Template, extra: Vec<(&'static str, Value)>) -> Option<Bytes> {
        let v = self.render_value(t, extra);
        match self.ep.auth.inband().and_then(|ib| ib.schema.as_deref()) {
            Some(schema) => self.frame_checked(v, Some(schema)),
            None => self.frame_of(v),
        }
    }

    /// The answer to an auth message that is refused (its token, or its
    /// principal's connection cap): the auth's own `error_reply`, else the
    /// protocol's error.
    fn auth_refused(&self, ib: &Inband, r: Refusal, msg: &Value) -> Option<Bytes> {
        match &ib.error_reply {
            Some(t) => self.render_inband(
                t,
                vec![
                    ("request", msg.clone()),
                    ("error", json!({"code": r.code, "message": r.message})),
                ],
            ),
            None => self.error(r, Some(msg), None),
        }
    }

    fn render_value(&self, t: &Template, extra: Vec<(&'static str, Value)>) -> Value {
        render_value(
            &self.state,
            &self.ep,
            &self.info,
            &self.params,
            self.fmt(),
            t,
            extra,
            self.channels_value(),
            self.groups_value(),
        )
    }

    fn frame_of(&self, v: Value) -> Option<Bytes> {
        let schema = self
            .ep
            .protocol
            .as_ref()
            .and_then(|p| p.validator.as_deref());
        self.frame_checked(v, schema)
    }

    /// Serialize a reply into a frame; one that fails `schema` is dropped,
    /// logged and counted.
    fn frame_checked(&self, v: Value, schema: Option<&jsonschema::Validator>) -> Option<Bytes> {
        if let Some(val) = schema
            && let Err(e) = val.validate(&v)
        {
            self.state
                .metrics
                .reply_schema_failures
                .fetch_add(1, Relaxed);
            tracing::warn!(endpoint = %self.ep.path.as_str(), instance_path = %e.instance_path(), error = %e, "dropped a reply that fails its schema");
            return None;
        }
        let body = serde_json::to_vec(&v).ok()?;
        Some(crate::ws::frame(crate::ws::OP_TEXT, &body))
    }

    fn error(&self, r: Refusal, request: Option<&Value>, channel: Option<&str>) -> Option<Bytes> {
        let p = self.ep.protocol.as_ref()?;
        let mut extra = vec![("error", json!({"code": r.code, "message": r.message}))];
        if let Some(q) = request {
            extra.push(("request", q.clone()));
        }
        if let Some(c) = channel {
            extra.push(("channel", Value::String(c.to_string())));
        }
        self.render(&p.replies.error, extra)
    }

    /// Messages sent on connect, then (if already authenticated) the
    /// automatic subscriptions.
    pub fn start(&mut self, out: &mut Vec<Bytes>) {
        for t in &self.ep.on_connect.clone() {
            out.extend(self.render(t, vec![]));
        }
        if self.authed {
            self.auto_subscribe();
        }
    }

    fn auto_subscribe(&mut self) {
        for c in self.ep.subscribe.clone() {
            self.subscribe(&c, None, None);
        }
    }

    /// Subscribe to `c`. Without `id` the subscription covers the channel
    /// and replaces every earlier one to it; with an `id` (the value of the
    /// protocol's `subscription_key`) it replaces only the one with that id,
    /// and one without id.
    fn subscribe(
        &mut self,
        c: &Arc<ChannelCfg>,
        filter: Option<Arc<SubFilter>>,
        id: Option<String>,
    ) {
        // Re-subscribing replaces the filters: drop the old one first.
        self.subs
            .retain(|(n, i, _)| !replaces(&c.name, id.as_deref(), n, i.as_deref()));
        let key = if self.ep.keyed.is_some() {
            self.key.clone()
        } else {
            None
        };
        let mut raced = false;
        let sub = loop {
            let Some(rt) = self.state.live().channels.get(&c.name).cloned() else {
                // Removed by a reload after this client connected: nothing
                // to follow (one channel of a set is skipped). Removed by
                // the reload this subscribe raced: the client is closed as
                // the channel's subscribers were at that moment.
                if raced {
                    self.queue.close(close::GOING_AWAY, "channel removed");
                }
                return;
            };
            // `None`: a reload retired `rt` between the read and the
            // subscribe; what is live now is the new runtime (or nothing).
            if let Some(sub) = rt.subscribe(key.clone(), self.queue.clone(), filter.clone()) {
                break sub;
            }
            raced = true;
            // A changed keyed channel's runtime is retired just before the
            // swap, which follows at once.
            std::thread::yield_now();
        };
        // Most sessions hold one subscription: room for exactly one at
        // first (a plain push reserves four, ~300 bytes per idle session).
        let first = self.subs.is_empty();
        self.subs.reserve_exact(usize::from(first));
        self.subs.push((c.name.clone(), id, sub));
        let mut listed = self.info.subscriptions.lock();
        if !listed.contains(&c.name) {
            let first = listed.is_empty();
            listed.reserve_exact(usize::from(first));
            listed.push(c.name.clone());
        }
    }

    /// End the subscriptions to `name` (only the one with `id`, if given;
    /// with an `id` no subscription has, the whole-channel subscription if
    /// there is one); false if there was none.
    fn unsubscribe(&mut self, name: &str, id: Option<&str>) -> bool {
        let before = self.subs.len();
        let known = id.is_some_and(|id| {
            self.subs
                .iter()
                .any(|(n, i, _)| &**n == name && i.as_deref() == Some(id))
        });
        self.subs.retain(|(n, i, _)| {
            &**n != name
                || match id {
                    None => false,
                    Some(id) if known => i.as_deref() != Some(id),
                    Some(_) => i.is_some(),
                }
        });
        if !self.subs.iter().any(|(n, _, _)| &**n == name) {
            self.info.subscriptions.lock().retain(|n| &**n != name);
        }
        self.subs.len() != before
    }

    /// The subscription key's value in `msg`, as JSON text.
    fn sub_id(p: &crate::config::ProtocolCfg, msg: &Value) -> Option<String> {
        let field = p.subscription_key.as_deref()?;
        match msg.get(field) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.to_string()),
        }
    }

    /// Handle one text message from the client.
    pub fn on_text(&mut self, text: &[u8], out: &mut Vec<Bytes>) {
        self.info.touch();
        if !self.reads_text() {
            return;
        }
        let msg: Value = match serde_json::from_slice(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                out.extend(self.refuse_early(
                    refusal("bad_request", "a message must be a JSON object"),
                    None,
                ));
                return;
            }
            Err(e) => {
                out.extend(self.refuse_early(
                    refusal("invalid_json", format!("not valid JSON: {e}")),
                    None,
                ));
                return;
            }
        };
        let auth = self.ep.auth.clone();
        if let Some(ib) = auth.inband()
            && ib.matches(&msg)
        {
            match auth.check_message(&msg) {
                InbandResult::Accepted(p, expires) => {
                    // A first auth takes a slot of its principal's; a later
                    // one as another principal moves the connection to that
                    // principal's count (the new slot first, then the old
                    // one is given back).
                    if let Some(name) = &p
                        && (self.guards.is_empty()
                            || self.info.principal.lock().as_deref() != Some(&**name))
                    {
                        match self.ep.limits.admit_principal(name) {
                            Ok(g) => self.guards = g,
                            Err(r) => {
                                self.state
                                    .metrics
                                    .refused_per_principal
                                    .fetch_add(1, Relaxed);
                                out.extend(self.auth_refused(
                                    ib,
                                    refusal(r.error, r.message),
                                    &msg,
                                ));
                                self.close = Some((
                                    crate::ws::close::POLICY,
                                    "too many connections for this principal",
                                ));
                                return;
                            }
                        }
                    }
                    if p.is_some() {
                        *self.info.principal.lock() = p.clone();
                    }
                    self.expiry = Some(expires);
                    if let Some(t) = &ib.reply {
                        out.extend(self.render_inband(
                            t,
                            vec![
                                ("request", msg.clone()),
                                ("principal", p.map(Value::String).unwrap_or(Value::Null)),
                            ],
                        ));
                    }
                    if !self.authed {
                        self.authed = true;
                        self.auto_subscribe();
                    }
                }
                InbandResult::Refused(code, message) => {
                    self.state.metrics.refused_auth.fetch_add(1, Relaxed);
                    out.extend(self.auth_refused(ib, refusal(code, message), &msg));
                    self.auth_failures = self.auth_failures.saturating_add(1);
                    if self.auth_failures >= MAX_AUTH_FAILURES {
                        self.close =
                            Some((crate::ws::close::POLICY, "too many failed authentications"));
                    }
                }
            }
            return;
        }
        let Some(p) = self.ep.protocol.clone() else {
            // A stream endpoint waiting for its handshake.
            if !self.authed {
                out.extend(
                    self.refuse_early(refusal("not_authenticated", self.auth_hint()), Some(&msg)),
                );
            }
            return;
        };
        let action = match msg.get(&p.action_field) {
            Some(Value::String(a)) => a.clone(),
            _ => {
                out.extend(self.error(
                    refusal(
                        "bad_request",
                        format!(
                            "a message needs a string field `{}` naming its action",
                            p.action_field
                        ),
                    ),
                    Some(&msg),
                    None,
                ));
                return;
            }
        };
        if !self.authed
            && !auth
                .inband()
                .is_some_and(|ib| ib.allow_before.contains(&action))
        {
            out.extend(self.error(
                refusal("not_authenticated", self.auth_hint()),
                Some(&msg),
                None,
            ));
            return;
        }
        let Some(act) = p.actions.get(&action) else {
            let mut names: Vec<&str> = p.actions.keys().map(String::as_str).collect();
            names.sort();
            out.extend(self.error(
                refusal(
                    "unknown_action",
                    format!("unknown action {action:?}; actions: {}", names.join(", ")),
                ),
                Some(&msg),
                None,
            ));
            return;
        };
        match act {
            Action::Ping => out.extend(self.render(&p.replies.pong, vec![("request", msg)])),
            Action::Status => out.extend(self.render(&p.replies.status, vec![("request", msg)])),
            Action::Subscribe | Action::Unsubscribe => {
                let name = match msg.get(&p.channel_field) {
                    Some(Value::String(c)) => c.clone(),
                    _ => {
                        out.extend(self.error(
                            refusal(
                                "bad_request",
                                format!(
                                    "`{action}` needs a string field `{}` naming the channel",
                                    p.channel_field
                                ),
                            ),
                            Some(&msg),
                            None,
                        ));
                        return;
                    }
                };
                if self.ep.channel(&name).is_none()
                    && let Some(set) = p.channel_set(&name, &self.ep.channels)
                {
                    // A set: every channel of it, one confirmation.
                    if matches!(act, Action::Unsubscribe) {
                        for c in &set {
                            self.unsubscribe(&c.name, None);
                        }
                        out.extend(self.render(
                            &p.replies.unsubscribed,
                            vec![("request", msg), ("channel", Value::String(name))],
                        ));
                        return;
                    }
                    let mut filters = Vec::new();
                    for c in &set {
                        match self.filters_of(&p, c, &msg) {
                            Ok(f) => filters.push(f),
                            Err(m) => {
                                out.extend(self.error(
                                    refusal("invalid_filter", m),
                                    Some(&msg),
                                    Some(&name),
                                ));
                                return;
                            }
                        }
                    }
                    out.extend(self.render(
                        &p.replies.subscribed,
                        vec![("request", msg.clone()), ("channel", Value::String(name))],
                    ));
                    for (c, f) in set.iter().zip(filters) {
                        self.subscribe(c, f.map(Arc::new), None);
                    }
                    return;
                }
                let Some(ch) = self
                    .ep
                    .channel(&name)
                    .filter(|c| self.state.live().channels.contains_key(&c.name))
                    .cloned()
                else {
                    out.extend(self.error(
                        refusal(
                            "unknown_channel",
                            format!(
                                    "unknown channel {name:?}; available: {}",
                                    self.ep
                                        .channels
                                        .iter()
                                        .map(|c| &*c.name)
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                        ),
                        Some(&msg),
                        Some(&name),
                    ));
                    return;
                };
                let id = Self::sub_id(&p, &msg);
                if matches!(act, Action::Unsubscribe) {
                    if self.unsubscribe(&name, id.as_deref())
                        || p.not_subscribed == NotSubscribed::Confirm
                    {
                        out.extend(self.render(
                            &p.replies.unsubscribed,
                            vec![("request", msg), ("channel", Value::String(name))],
                        ));
                    } else {
                        let what = match (&id, &p.subscription_key) {
                            (Some(v), Some(k)) => format!("{name:?} with {k} {v}"),
                            _ => format!("{name:?}"),
                        };
                        out.extend(self.error(
                            refusal("not_subscribed", format!("not subscribed to {what}")),
                            Some(&msg),
                            Some(&name),
                        ));
                    }
                    return;
                }
                // What this subscribe replaces (see `subscribe`) does not count.
                let replaced = self
                    .subs
                    .iter()
                    .filter(|(n, i, _)| replaces(&name, id.as_deref(), n, i.as_deref()))
                    .count();
                if self.subs.len() - replaced >= MAX_SUBSCRIPTIONS {
                    out.extend(self.error(
                        refusal(
                            "too_many_subscriptions",
                            format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                        ),
                        Some(&msg),
                        Some(&name),
                    ));
                    return;
                }
                let filter = match self.filters_of(&p, &ch, &msg) {
                    Ok(f) => f,
                    Err(m) => {
                        out.extend(self.error(
                            refusal("invalid_filter", m),
                            Some(&msg),
                            Some(&name),
                        ));
                        return;
                    }
                };
                // The confirmation goes out before any data of the channel.
                out.extend(self.render(
                    &p.replies.subscribed,
                    vec![("request", msg.clone()), ("channel", Value::String(name))],
                ));
                self.subscribe(&ch, filter.map(Arc::new), id);
            }
            Action::Command(cmd) => {
                if self.in_flight.load(Relaxed) >= MAX_COMMANDS_IN_FLIGHT {
                    out.extend(self.error(
                        refusal(
                            "busy",
                            format!("at most {MAX_COMMANDS_IN_FLIGHT} requests may be in flight"),
                        ),
                        Some(&msg),
                        None,
                    ));
                    return;
                }
                let Some(rt) = self.state.live().channels.get(&cmd.channel).cloned() else {
                    return;
                };
                let request = render_value(
                    &self.state,
                    &self.ep,
                    &self.info,
                    &self.params,
                    self.fmt(),
                    &cmd.request,
                    vec![("request", msg.clone())],
                    self.channels_value(),
                    self.groups_value(),
                );
                let body = serde_json::to_vec(&request).unwrap_or_default();
                let this = Replier {
                    state: self.state.clone(),
                    ep: self.ep.clone(),
                    info: self.info.clone(),
                    params: self.params.clone(),
                    fmt: self.fmt(),
                    channels: self.channels_value(),
                    groups: self.groups_value(),
                    queue: self.queue.clone(),
                };
                let in_flight = self.in_flight.clone();
                in_flight.fetch_add(1, Relaxed);
                let cmd = cmd.clone();
                tokio::spawn(async move {
                    let r = rt.command(body, cmd.timeout).await;
                    in_flight.fetch_sub(1, Relaxed);
                    let p = this.ep.protocol.as_ref();
                    let v = match r.map(|b| serde_json::from_slice::<Value>(&b)) {
                        Ok(Ok(result)) => p.map(|p| this.render(&p.replies.command, vec![("request", msg.clone()), ("result", result)])),
                        Ok(Err(e)) => p.map(|p| this.render(&p.replies.error, vec![("request", msg.clone()), ("error", json!({"code": "command_failed", "message": format!("the plugin answered with invalid JSON: {e}")}))])),
                        Err(e) => {
                            let (code, message) = command_error(&cmd.channel, e);
                            p.map(|p| this.render(&p.replies.error, vec![("request", msg.clone()), ("error", json!({"code": code, "message": message}))]))
                        }
                    };
                    if let Some(v) = v {
                        let body = serde_json::to_vec(&v).unwrap_or_default();
                        this.queue.push(
                            crate::ws::frame(crate::ws::OP_TEXT, &body),
                            OnFull::DropOldest,
                        );
                    }
                });
            }
        }
    }

    fn auth_hint(&self) -> String {
        match self.ep.auth.inband() {
            Some(ib) => format!(
                "authenticate first: send a message with {}",
                serde_json::to_string(&ib.match_fields).unwrap_or_default()
            ),
            None => "authenticate first".into(),
        }
    }

    /// An error before the protocol could be applied: the protocol's error
    /// reply, or for stream endpoints the in-band error reply.
    fn refuse_early(&self, r: Refusal, request: Option<&Value>) -> Option<Bytes> {
        if self.ep.protocol.is_some() {
            return self.error(r, request, None);
        }
        let t = self.ep.auth.inband()?.error_reply.as_ref()?;
        let mut extra = vec![("error", json!({"code": r.code, "message": r.message}))];
        if let Some(q) = request {
            extra.push(("request", q.clone()));
        }
        self.render_inband(t, extra)
    }

    fn filters_of(
        &self,
        p: &crate::config::ProtocolCfg,
        ch: &ChannelCfg,
        msg: &Value,
    ) -> Result<Option<SubFilter>, String> {
        let mut given: Vec<(&str, &Value)> = Vec::new();
        if p.filters_top_level
            && let Value::Object(m) = msg
        {
            for (k, v) in m {
                if *k != p.action_field
                    && *k != p.channel_field
                    && ch.filters.iter().any(|(n, _)| n == k)
                {
                    given.push((k, v));
                }
            }
        }
        if let Some(field) = &p.filters_field {
            match msg.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) => {
                    for (k, v) in m {
                        if !ch.filters.iter().any(|(n, _)| n == k) {
                            let names: Vec<&str> =
                                ch.filters.iter().map(|(n, _)| n.as_str()).collect();
                            return Err(format!(
                                "channel {:?} has no filter {k:?}; filters: {}",
                                ch.name,
                                if names.is_empty() {
                                    "none".into()
                                } else {
                                    names.join(", ")
                                }
                            ));
                        }
                        given.retain(|(n, _)| n != k);
                        given.push((k, v));
                    }
                }
                Some(_) => return Err(format!("`{field}` must be an object")),
            }
        }
        SubFilter::build(&ch.filters, &given)
    }
}

/// Message and code for a command that got no answer.
pub fn command_error(channel: &str, e: CommandError) -> (&'static str, String) {
    match e {
        CommandError::Unavailable => (
            "plugin_unavailable",
            format!("the source of channel {channel:?} is not running"),
        ),
        CommandError::Timeout => (
            "timeout",
            format!("the source of channel {channel:?} did not answer in time"),
        ),
        CommandError::Failed(m) => ("command_failed", m),
        CommandError::Crashed(m) => ("plugin_error", m),
        CommandError::Busy => (
            "busy",
            format!(
                "the source of channel {channel:?} is still running {} commands: try again later",
                crate::channel::MAX_CHANNEL_COMMANDS
            ),
        ),
    }
}

/// What an async command answer needs to render its reply.
struct Replier {
    state: Arc<GatewayState>,
    ep: Arc<EndpointCfg>,
    info: Arc<ClientInfo>,
    params: Value,
    fmt: TimestampFormat,
    channels: Value,
    groups: Value,
    queue: Arc<SessionQueue>,
}

impl Replier {
    fn render(&self, t: &Template, extra: Vec<(&'static str, Value)>) -> Value {
        render_value(
            &self.state,
            &self.ep,
            &self.info,
            &self.params,
            self.fmt,
            t,
            extra,
            self.channels.clone(),
            self.groups.clone(),
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn render_value(
    state: &GatewayState,
    _ep: &EndpointCfg,
    info: &ClientInfo,
    params: &Value,
    fmt: TimestampFormat,
    t: &Template,
    extra: Vec<(&'static str, Value)>,
    channels: Value,
    groups: Value,
) -> Value {
    let gw = GatewayCtx { state, fmt };
    let mut roots: Vec<(&'static str, Cow<Value>)> =
        extra.into_iter().map(|(k, v)| (k, Cow::Owned(v))).collect();
    if t.uses("client") {
        roots.push(("client", Cow::Owned(info.to_json())));
    }
    if t.uses("principal") && !roots.iter().any(|(k, _)| *k == "principal") {
        roots.push((
            "principal",
            Cow::Owned(
                info.principal
                    .lock()
                    .clone()
                    .map(Value::String)
                    .unwrap_or(Value::Null),
            ),
        ));
    }
    roots.push(("params", Cow::Borrowed(params)));
    roots.push(("channels", Cow::Owned(channels)));
    roots.push(("groups", Cow::Owned(groups)));
    let ctx = With {
        roots,
        parent: Some(&gw),
    };
    t.render(&ctx)
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("endpoint", &self.ep.path.as_str())
            .field("authed", &self.authed)
            .field(
                "subscriptions",
                &self.subs.iter().map(|(n, _, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}
