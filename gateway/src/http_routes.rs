//! HTTP JSON routes configured beside the sockets: templates over gateway
//! state, a channel's latest message, or a plugin command that answers.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Buf;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Method, StatusCode};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::config::{HttpAnswer, HttpRouteCfg, TimestampFormat};
use crate::context::GatewayCtx;
use crate::control::command_error;
use crate::server::{error_reply, json_reply};
use crate::state::GatewayState;
use crate::template::With;

type Reply = warp::reply::Response;

/// `request.query`: a repeated parameter is its first occurrence, as
/// authentication reads it (a token in the query), so that what was checked
/// and what the templates see are one value.
fn query_object(query: &str) -> Value {
    let mut m = Map::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        m.entry(k.into_owned())
            .or_insert_with(|| Value::String(v.into_owned()));
    }
    Value::Object(m)
}

/// How long a request's body may take to arrive, whole, at the least; a
/// route whose `max_body` is larger than `BODY_RATE` bytes a second would
/// fill gets a second more per `BODY_RATE` bytes (a large body on a slow
/// link is not cut off).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The slowest upload a body of `max_body` bytes is given time for.
pub const BODY_RATE: usize = 64 << 10;

/// How long a body of at most `max_body` bytes may take to arrive.
pub fn body_deadline(max_body: usize) -> std::time::Duration {
    BODY_TIMEOUT.max(std::time::Duration::from_secs(
        (max_body / BODY_RATE) as u64,
    ))
}

/// The messages of a publish body, each as it was sent: an array's
/// elements, or the one message; None for `null`.
fn published_items(raw: &[u8]) -> serde_json::Result<Option<Vec<&RawValue>>> {
    match raw.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(raw).map(Some),
        _ => {
            let one: &RawValue = serde_json::from_slice(raw)?;
            Ok((one.get() != "null").then(|| vec![one]))
        }
    }
}

async fn read_body<S, B>(mut body: S, limit: usize) -> Result<Vec<u8>, Reply>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            error_reply(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("could not read the request body: {e}"),
            )
        })?;
        if out.len() + chunk.remaining() > limit {
            return Err(error_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("the request body is larger than {limit} bytes"),
            ));
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            out.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    Ok(out)
}

/// Answer one request to an HTTP route.
#[allow(clippy::too_many_arguments)]
pub async fn handle<S, B>(
    state: &Arc<GatewayState>,
    route: Arc<HttpRouteCfg>,
    method: Method,
    headers: &HeaderMap,
    query: &str,
    body: S,
    peer: std::net::SocketAddr,
    params: crate::router::Params,
) -> Reply
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    if let Some(lim) = &route.per_ip
        && let Err(wait) = crate::limits::check_ip(lim, peer.ip())
    {
        state
            .metrics
            .http_rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let secs = crate::limits::retry_after_secs(wait);
        let mut r = error_reply(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("too many requests from {}; retry in {secs} s", peer.ip()),
        );
        if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return r;
    }
    if method != route.method && !(method == Method::HEAD && route.method == Method::GET) {
        let mut r = error_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{} accepts {} only", route.path.as_str(), route.method),
        );
        let allow = if route.method == Method::GET {
            "GET, HEAD"
        } else {
            route.method.as_str()
        };
        if let Ok(v) = http::HeaderValue::from_str(allow) {
            r.headers_mut().insert(http::header::ALLOW, v);
        }
        return r;
    }
    let principal = match route.auth.check_request(headers, query) {
        Ok(p) => p.and_then(|p| p.0),
        Err(e) => {
            // Not `refused_auth`: that one counts WebSocket upgrades.
            state
                .metrics
                .http_refused_auth
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return error_reply(e.status, e.error, &e.message);
        }
    };
    let reads_body = route.reads_body;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if reads_body && declared.is_some_and(|n| n > route.max_body) {
        return error_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("the request body is larger than {} bytes", route.max_body),
        );
    }
    // The headers had HEADER_TIMEOUT; the body gets as long: a client that
    // sends it a byte at a time, or never ends it, does not hold a
    // connection (and up to max_body of memory) for good.
    let deadline = body_deadline(route.max_body);
    let read = async {
        if reads_body {
            read_body(body, route.max_body).await
        } else {
            Ok(Default::default())
        }
    };
    let raw = match tokio::time::timeout(deadline, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(r)) => return r,
        Err(_) => {
            return error_reply(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                &format!("the request body did not arrive within {deadline:?}"),
            );
        }
    };
    // The publish API takes each message as it was sent (parsed once, not
    // into values: re-serialized, its keys would be sorted and a large
    // integer turned into a float, where a plugin's message goes out byte
    // for byte); every other route, the body as a value for its templates.
    let mut published = None;
    let parsed = if raw.iter().all(u8::is_ascii_whitespace) {
        Ok(Value::Null)
    } else if matches!(route.answer, HttpAnswer::Publish(_)) {
        published_items(&raw).map(|items| {
            published = items;
            Value::Null
        })
    } else {
        serde_json::from_slice::<Value>(&raw)
    };
    let body_json = match parsed {
        Ok(v) => v,
        Err(e) => {
            return error_reply(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &format!("the request body is not valid JSON: {e}"),
            );
        }
    };
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            // Strip the port (and IPv6 brackets keep theirs).
            match h.rfind(':') {
                Some(i) if !h[i..].contains(']') => h[..i].to_string(),
                _ => h.to_string(),
            }
        })
        .unwrap_or_else(|| "localhost".into());
    let request = json!({
        "method": method.as_str(),
        "path": route.path.as_str(),
        "query": query_object(query),
        "body": body_json,
        "host": host,
    });
    let gw = GatewayCtx {
        state,
        fmt: TimestampFormat::Iso8601,
    };
    let ctx_with = |extra: Vec<(&'static str, Value)>| {
        let mut roots: Vec<(&'static str, Cow<'static, Value>)> = vec![
            ("request", Cow::Owned(request.clone())),
            (
                "principal",
                Cow::Owned(principal.clone().map(Value::String).unwrap_or(Value::Null)),
            ),
        ];
        roots.extend(extra.into_iter().map(|(k, v)| (k, Cow::Owned(v))));
        roots
    };
    match &route.answer {
        HttpAnswer::Publish(allowed) => {
            let name = params.first().map(|(_, v)| v.as_str()).unwrap_or("");
            let Some(rt) = allowed
                .iter()
                .find(|c| &***c == name)
                .and_then(|c| state.live().channels.get(c).cloned())
            else {
                let names: Vec<&str> = allowed.iter().map(|c| &**c).collect();
                return error_reply(
                    StatusCode::NOT_FOUND,
                    "unknown_channel",
                    &format!(
                        "no channel {name:?} accepts published messages; channels: {}",
                        names.join(", ")
                    ),
                );
            };
            let Some(items) = published else {
                return error_reply(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "POST a JSON message, or a JSON array of messages",
                );
            };
            if rt.inject_capacity() == 0 {
                return error_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    &format!("channel {name:?} is not taking messages now (it is stopping)"),
                );
            }
            if items.len() > rt.inject_capacity() {
                return error_reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "batch_too_large",
                    &format!(
                        "at most {} messages per request (limits.source_buffer)",
                        rt.inject_capacity()
                    ),
                );
            }
            // As large as a plugin's message may be.
            let cap = state.config().limits.max_plugin_message();
            if let Some(i) = items.iter().position(|m| m.get().len() > cap) {
                return json_reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &json!({
                        "error": "message_too_large",
                        "message": format!("message {i} is larger than {cap} bytes (the most a plugin may emit: limits.max_message_size, at least 1 MiB)"),
                        "index": i,
                    }),
                );
            }
            // All or nothing: every message is checked before any is published.
            let mut msgs = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match rt.check(item.get().as_bytes()) {
                    Ok(m) => msgs.push(m),
                    Err(e) => {
                        let (instance_path, message) = match e {
                            crate::channel::Dropped::Invalid {
                                instance_path,
                                error,
                            } => (instance_path, error),
                            crate::channel::Dropped::NotJson(e) => ("/".to_string(), e.to_string()),
                        };
                        return json_reply(
                            StatusCode::BAD_REQUEST,
                            &json!({
                                "error": "validation_failed",
                                "message": format!("message {i} fails the schema of channel {name:?}: {message}"),
                                "index": i,
                                "instance_path": instance_path,
                            }),
                        );
                    }
                }
            }
            let n = msgs.len();
            if !rt.inject(msgs) {
                let mut r = error_reply(
                    StatusCode::TOO_MANY_REQUESTS,
                    "busy",
                    "the channel's publish buffer is full; retry shortly",
                );
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
                return r;
            }
            json_reply(route.status, &json!({"accepted": n}))
        }
        HttpAnswer::Body(t) => {
            let ctx = With {
                roots: ctx_with(vec![]),
                parent: Some(&gw),
            };
            json_reply(route.status, &t.render(&ctx))
        }
        HttpAnswer::Latest(ch) => match state.live().channels.get(ch).and_then(|c| c.latest()) {
            Some(m) => {
                let mut r = Reply::new(m.json().to_vec().into());
                *r.status_mut() = route.status;
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            None => error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_data",
                &format!("channel {ch:?} has published nothing yet"),
            ),
        },
        HttpAnswer::Command(cmd, wrap) => {
            let Some(rt) = state.live().channels.get(&cmd.channel).cloned() else {
                return error_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "plugin_unavailable",
                    "channel not running",
                );
            };
            let req = {
                let ctx = With {
                    roots: ctx_with(vec![]),
                    parent: Some(&gw),
                };
                cmd.request.render(&ctx)
            };
            let bytes = serde_json::to_vec(&req).unwrap_or_default();
            match rt.command(bytes, cmd.timeout).await {
                Ok(answer) => {
                    let result: Value = match serde_json::from_slice(&answer) {
                        Ok(v) => v,
                        Err(e) => {
                            return error_reply(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "plugin_error",
                                &format!("the plugin answered with invalid JSON: {e}"),
                            );
                        }
                    };
                    match wrap {
                        None => json_reply(route.status, &result),
                        Some(t) => {
                            let ctx = With {
                                roots: ctx_with(vec![("result", result)]),
                                parent: Some(&gw),
                            };
                            json_reply(route.status, &t.render(&ctx))
                        }
                    }
                }
                Err(e) => {
                    let status = match &e {
                        crate::channel::CommandError::Unavailable => {
                            StatusCode::SERVICE_UNAVAILABLE
                        }
                        crate::channel::CommandError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                        crate::channel::CommandError::Failed(_) => StatusCode::BAD_REQUEST,
                        crate::channel::CommandError::Crashed(_) => {
                            StatusCode::INTERNAL_SERVER_ERROR
                        }
                        crate::channel::CommandError::Busy => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    let (code, message) = command_error(&cmd.channel, e);
                    error_reply(status, code, &message)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 s at the least; a second per 64 KiB of `max_body` beyond that.
    #[test]
    fn a_large_body_gets_time_in_proportion() {
        use std::time::Duration;
        assert_eq!(body_deadline(256), Duration::from_secs(10));
        assert_eq!(body_deadline(1 << 20), Duration::from_secs(16));
        assert_eq!(body_deadline(10_000_000), Duration::from_secs(152));
    }
}
