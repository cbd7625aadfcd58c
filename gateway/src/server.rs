//! Listeners, HTTP routing and the WebSocket upgrade.
//!
//! We run our own accept loop (hyper, HTTP/1.1 with upgrades) so that we know
//! the peer address and own the upgraded socket: the service wrapper moves
//! hyper's `OnUpgrade` into a slot that the warp route takes, and the
//! WebSocket is built with our own small buffers instead of warp's defaults
//! (about 128 KiB of read buffer per connection).
//!
//! A listener with `tls` runs the TLS handshake (rustls, see [`crate::tls`])
//! in each connection's task, then serves the same routes over the TLS
//! stream; a WebSocket upgraded there runs its session over TLS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{HeaderMap, Method, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tungstenite::handshake::derive_accept_key;
use warp::Filter;

use crate::auth::Principal;
use crate::router::Target;
use crate::session::{self, SessionCtx};
use crate::state::GatewayState;

/// How long a client may take to send its request headers; and, before
/// that, how long a `proxy_protocol` header and a TLS handshake may take
/// together.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long HTTP requests in flight get to finish at shutdown.
const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The peer and listener of a request.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Client address.
    pub peer: SocketAddr,
    /// Listener name.
    pub listener: Arc<str>,
}

/// Holds hyper's upgrade handle until the route decides to upgrade.
#[derive(Clone)]
struct UpgradeSlot(Arc<Mutex<Option<OnUpgrade>>>);

type Reply = warp::reply::Response;

/// A JSON reply with a status.
pub fn json_reply(status: StatusCode, body: &serde_json::Value) -> Reply {
    let mut r = Reply::new(body.to_string().into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error_reply(status: StatusCode, error: &str, message: &str) -> Reply {
    json_reply(
        status,
        &serde_json::json!({ "error": error, "message": message }),
    )
}

/// What a 426 must carry (RFC 9110 §15.5.22, §7.8): the protocol to upgrade
/// to, and `Connection: upgrade` beside `Upgrade`.
fn upgrade_headers(r: &mut Reply) {
    let h = r.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
}

/// Serve one listener until `shutdown`.
pub async fn serve_listener(
    listener: TcpListener,
    name: Arc<str>,
    state: Arc<GatewayState>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let admin = state.config().admin_listener.as_deref() == Some(&*name);
    let filter = routes(state.clone(), name.clone(), admin, tracker.clone());
    let svc = warp::service(filter);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        // The listener's TLS and PROXY protocol settings as configured now:
        // a reload (a renewed certificate, say) applies to the next connection.
        let config = state.config();
        let listener = config.listener(&name);
        let tls = listener
            .and_then(|l| l.tls.clone())
            .map(tokio_rustls::TlsAcceptor::from);
        // Some(whether the sender may write a header) on a proxy_protocol
        // listener (whose trusted_proxies the configuration requires).
        let proxied = listener
            .filter(|l| l.proxy_protocol)
            .map(|l| crate::forwarded::is_trusted(&l.trusted_proxies, peer.ip()));
        drop(config);
        let metrics = state.metrics.clone();
        let name = name.clone();
        tracker.spawn(async move {
            // A PROXY protocol header and a TLS handshake, where the
            // listener has them, get HEADER_TIMEOUT together.
            let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
            let mut tcp = tcp;
            let peer = match proxied {
                None => peer,
                Some(trusted) => {
                    let client = crate::proxy_protocol::client(&mut tcp, peer, trusted);
                    let got = tokio::select! {
                        r = tokio::time::timeout_at(deadline, client) => r
                            .unwrap_or_else(|_| Err("no PROXY protocol header within 10 s".into())),
                        _ = shutdown.cancelled() => return,
                    };
                    match got {
                        Ok(client) => client,
                        Err(e) => {
                            metrics.proxy_protocol_refused.fetch_add(1, Relaxed);
                            tracing::debug!(%peer, listener = %name, error = %e, "connection closed: PROXY protocol");
                            return;
                        }
                    }
                }
            };
            let info = ConnInfo {
                peer,
                listener: name,
            };
            let hyper_svc =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    let slot =
                        UpgradeSlot(Arc::new(Mutex::new(Some(hyper::upgrade::on(&mut req)))));
                    req.extensions_mut().insert(slot);
                    req.extensions_mut().insert(info.clone());
                    let mut svc = svc.clone();
                    async move { svc.call(req).await }
                });
            let Some(acceptor) = tls else {
                return serve_http(TokioIo::new(tcp), hyper_svc, shutdown).await;
            };
            // The TLS handshake runs here, in the connection's own task, and
            // gets as long as a client has to send its request headers
            // (less the time its PROXY protocol header took).
            let handshake = tokio::select! {
                r = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => r,
                _ = shutdown.cancelled() => return,
            };
            match handshake {
                Ok(Ok(stream)) => serve_http(TokioIo::new(stream), hyper_svc, shutdown).await,
                Ok(Err(e)) => {
                    metrics.tls_handshake_failures.fetch_add(1, Relaxed);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.tls_handshake_failures.fetch_add(1, Relaxed);
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// Serve HTTP/1.1 (with upgrades) on one connection, plain or TLS, until the
/// client goes or the gateway shuts down.
async fn serve_http<I, S, B>(io: I, svc: S, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A client that never finishes its request headers is dropped
    // after HEADER_TIMEOUT (hyper needs a timer for that).
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => { let _ = r; }
        _ = shutdown.cancelled() => {
            // Let a request in flight finish, briefly; upgraded
            // sessions have their own shutdown.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HTTP_DRAIN, conn).await;
        }
    }
}

/// GET, and HEAD (load balancers check health with it; no body is sent).
fn get_or_head() -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::get().or(warp::head()).unify()
}
fn routes(
    state: Arc<GatewayState>,
    listener: Arc<str>,
    admin: bool,
    tracker: TaskTracker,
) -> warp::filters::BoxedFilter<(Reply,)> {
    let st = state.clone();
    let ws = warp::any()
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::get::<ConnInfo>())
        .and(warp::ext::get::<UpgradeSlot>())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  headers: HeaderMap,
                  query: String,
                  info: ConnInfo,
                  slot: UpgradeSlot,
                  body| {
                let st = st.clone();
                // The routes of the configuration served now (a reload
                // replaces them; requests already routed keep theirs), and
                // the proxies its listener believes: one look at it.
                let live = st.live();
                let router = live.routers.get(&*listener).cloned();
                let mut info = info;
                // Behind trusted reverse proxies: the client they name.
                let (trusted, header) = live.config.listener_trusted_proxies(&listener);
                info.peer = crate::forwarded::client_addr(info.peer, &headers, trusted, header);
                let listener = listener.clone();
                let tracker = tracker.clone();
                async move {
                    let mut reply = route(
                        &st, router, &tracker, method, path, &headers, &query, info, slot, body,
                    )
                    .await;
                    // The listener's `status_codes`: errors answered as others.
                    let from = reply.status().as_u16();
                    if from >= 400
                        && let Some((_, to)) = st
                            .config()
                            .listener_status_codes(&listener)
                            .iter()
                            .find(|(f, _)| *f == from)
                        && let Ok(to) = StatusCode::from_u16(*to)
                    {
                        *reply.status_mut() = to;
                    }
                    reply
                }
            },
        );
    if !admin {
        return ws.boxed();
    }
    let s1 = state.clone();
    let s2 = state.clone();
    let healthz = warp::path!("healthz")
        .and(get_or_head())
        .map(|| json_reply(StatusCode::OK, &serde_json::json!({"status": "ok"})));
    let readyz = warp::path!("readyz").and(get_or_head()).map(move || {
        let (ok, body) = s1.readiness();
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_reply(status, &body)
    });
    let metrics = warp::path!("metrics").and(get_or_head()).map(move || {
        let mut text = s2.metrics.render();
        if let Some(c) = &s2.cluster {
            c.render(&s2, &mut text);
        }
        let mut r = Reply::new(text.into());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    });
    // The status page, at the path the configuration served now names.
    let s3 = state.clone();
    let status_page = get_or_head()
        .and(warp::path::full())
        .and(warp::header::optional::<String>("host"))
        .and_then(move |path: warp::path::FullPath, host: Option<String>| {
            let page = s3
                .config()
                .status_page
                .as_ref()
                .filter(|p| p.path == path.as_str())
                .map(|p| crate::status::page(p, host.as_deref()));
            async move { page.ok_or_else(warp::reject::not_found) }
        });
    // `admin.asyncapi`: the document of the configuration served now, at
    // the path it names (a reload may move or remove it).
    let s3 = state.clone();
    let asyncapi =
        get_or_head()
            .and(warp::path::full())
            .and_then(move |path: warp::path::FullPath| {
                let cfg = s3.config();
                let hit = cfg.asyncapi_path.as_deref() == Some(path.as_str());
                let reply = hit.then(|| {
                    let doc = crate::asyncapi::document(&cfg, Some(&s3.addrs));
                    json_reply(StatusCode::OK, &doc)
                });
                async move { reply.ok_or_else(warp::reject::not_found) }
            });
    healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(status_page)
        .unify()
        .or(asyncapi)
        .unify()
        .or(ws)
        .unify()
        .boxed()
}

/// Answer one request on a listener: its endpoint's upgrade or refusal, its
/// HTTP route's answer, or 404.
#[allow(clippy::too_many_arguments)]
async fn route<S, B>(
    st: &Arc<GatewayState>,
    router: Option<Arc<crate::router::Router>>,
    tracker: &TaskTracker,
    method: Method,
    path: warp::path::FullPath,
    headers: &HeaderMap,
    query: &str,
    info: ConnInfo,
    slot: UpgradeSlot,
    body: S,
) -> Reply
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Unpin,
    B: bytes::Buf,
{
    let Some((target, params)) = router.and_then(|r| r.find(path.as_str())) else {
        return error_reply(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("nothing is served at {}", path.as_str()),
        );
    };
    match target {
        Target::Ws(endpoint) => handle_endpoint(
            st,
            endpoint,
            params,
            tracker,
            method,
            path.as_str(),
            headers,
            query,
            info,
            slot,
        ),
        Target::Http(route) => {
            crate::http_routes::handle(st, route, method, headers, query, body, info.peer, params)
                .await
        }
    }
}

fn header_has(headers: &HeaderMap, name: http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The session future for an upgraded connection, boxed: the socket taken
/// back from hyper (plain TCP or TLS) with what the client already sent.
fn session_on(
    upgraded: hyper::upgrade::Upgraded,
    ctx: Box<SessionCtx>,
) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
    // Take the socket back from hyper: the session owns it, with no
    // buffering layer in between. `read_buf` is a view into hyper's
    // connection buffer (kilobytes): keep a copy of what the client already
    // sent, not the buffer.
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Some(Box::pin(session::run_tcp(
            parts.io.into_inner(),
            parts.read_buf.to_vec(),
            ctx,
        ))),
        Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(parts) => Some(Box::pin(session::run_tls(
                parts.io.into_inner(),
                parts.read_buf.to_vec(),
                ctx,
            ))),
            Err(_) => {
                tracing::error!(
                    peer = %ctx.peer,
                    "upgraded connection is neither a TCP nor a TLS stream"
                );
                None
            }
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_endpoint(
    state: &Arc<GatewayState>,
    endpoint: Arc<crate::config::EndpointCfg>,
    params: crate::router::Params,
    tracker: &TaskTracker,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    query: &str,
    info: ConnInfo,
    slot: UpgradeSlot,
) -> Reply {
    let m = &state.metrics;
    if method != Method::GET {
        m.refused_bad_request.fetch_add(1, Relaxed);
        let mut r = error_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "WebSocket endpoints accept GET upgrades only",
        );
        // RFC 9110 §15.5.6: a 405 lists the methods the target takes.
        r.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
        return r;
    }
    if !header_has(headers, http::header::UPGRADE, "websocket")
        || !header_has(headers, http::header::CONNECTION, "upgrade")
    {
        m.refused_bad_request.fetch_add(1, Relaxed);
        let mut r = error_reply(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            &format!("{path} is a WebSocket endpoint: connect with a WebSocket client"),
        );
        upgrade_headers(&mut r);
        return r;
    }
    if headers
        .get(http::header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        m.refused_bad_request.fetch_add(1, Relaxed);
        let mut r = error_reply(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "only WebSocket version 13 is supported",
        );
        r.headers_mut().insert(
            http::header::SEC_WEBSOCKET_VERSION,
            http::HeaderValue::from_static("13"),
        );
        upgrade_headers(&mut r);
        return r;
    }
    let Some(key) = headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .filter(|k| valid_ws_key(k.as_bytes()))
    else {
        m.refused_bad_request.fetch_add(1, Relaxed);
        return error_reply(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "missing or malformed Sec-WebSocket-Key (base64 of 16 bytes)",
        );
    };
    // A client that asks for subprotocols gets one the endpoint speaks, or
    // a refusal: a 101 without one would make a browser fail the
    // connection after it was counted (RFC 6455 4.1, WHATWG WebSockets).
    let offered: Vec<&str> = headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let subprotocol = match offered
        .iter()
        .find(|p| endpoint.subprotocols.iter().any(|s| s == *p))
    {
        Some(p) => http::HeaderValue::from_str(p).ok(),
        None if offered.is_empty() => None,
        None => {
            m.refused_bad_request.fetch_add(1, Relaxed);
            let speaks = if endpoint.subprotocols.is_empty() {
                "no subprotocol: connect without Sec-WebSocket-Protocol".to_string()
            } else {
                format!("only {}", endpoint.subprotocols.join(", "))
            };
            return error_reply(
                StatusCode::BAD_REQUEST,
                "unsupported_subprotocol",
                &format!(
                    "the client offered {}; {path} speaks {speaks}",
                    offered.join(", ")
                ),
            );
        }
    };
    if let Some(allowed) = &endpoint.origins
        && let Some(origin) = headers.get(http::header::ORIGIN)
    {
        let o = origin
            .to_str()
            .unwrap_or("")
            .trim_end_matches('/')
            .to_ascii_lowercase();
        if !allowed.iter().any(|a| a == "*" || *a == o) {
            m.refused_origin.fetch_add(1, Relaxed);
            tracing::debug!(peer = %info.peer, path, origin = %o, "connection refused: origin not allowed");
            return error_reply(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                &format!("origin {o:?} is not allowed to connect here"),
            );
        }
    }
    // Rates and per-IP caps before any costly auth work.
    let guards = match endpoint.limits.admit_ip(info.peer.ip()) {
        Ok(g) => g,
        Err(r) => return limit_reply(state, &info, path, r),
    };
    let principal = match endpoint.auth.check_request(headers, query) {
        Ok(p) => p,
        Err(e) => {
            m.refused_auth.fetch_add(1, Relaxed);
            tracing::debug!(peer = %info.peer, path, error = e.error, "connection refused by auth");
            return error_reply(e.status, e.error, &e.message);
        }
    };
    let principal_guards = match &principal {
        Some(Principal(Some(p), _)) => match endpoint.limits.admit_principal(p) {
            Ok(g) => g,
            Err(r) => return limit_reply(state, &info, path, r),
        },
        _ => Vec::new(),
    };
    // From the first step of shutdown: the sources stop, and the clients
    // they still feed are closed next; a new session would only get 1001.
    if state.shutting_down() {
        return error_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the gateway is shutting down",
        );
    }
    let Some(permit) = state.try_connection() else {
        m.refused_limit.fetch_add(1, Relaxed);
        return error_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the gateway is at its connection limit; retry later",
        );
    };
    let Some(on_upgrade) = slot.0.lock().take() else {
        return error_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "upgrade unavailable",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let params_obj: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let key = if endpoint.keyed.is_some() {
        // One parameter: its value is the key. Several: values joined by '/'
        // with '%' and '/' escaped, so that {a: "x/y", b: "z"} and
        // {a: "x", b: "y/z"} are different streams.
        let values: Vec<String> = if params.len() == 1 {
            vec![params[0].1.clone()]
        } else {
            params
                .iter()
                .map(|(_, v)| v.replace('%', "%25").replace('/', "%2F"))
                .collect()
        };
        let params_json = serde_json::to_vec(&params_obj).unwrap_or_default();
        Some((Arc::<str>::from(values.join("/")), params_json))
    } else {
        None
    };
    // Boxed: the session's futures carry a pointer, not a copy each.
    let ctx = Box::new(SessionCtx {
        conn_id: state.next_conn_id(),
        peer: info.peer,
        endpoint: endpoint.clone(),
        path: path.into(),
        key,
        params: serde_json::Value::Object(params_obj),
        principal,
        guards,
        principal_guards,
        state: state.clone(),
    });
    // The task holds only what the upgrade needs, and then one pointer: the
    // session's own state machine lives in a box of its exact size, so a
    // plain TCP session does not pay for the larger TLS one (a future is as
    // large as its largest state).
    // Captured values are used in place, not rebound: a rebinding
    // (`let _permit = permit`) or a copy only the error path reads (the peer,
    // which `ctx` has) would each add their size to every task, and the task
    // is padded to 128 bytes (256 bytes with these, 384 without).
    tracker.spawn(async move {
        let session = match on_upgrade.await {
            Ok(upgraded) => session_on(upgraded, ctx),
            Err(e) => {
                tracing::debug!(peer = %ctx.peer, error = %e, "upgrade failed");
                None
            }
        };
        if let Some(session) = session {
            session.await;
        }
        // The connection slot is held until the session ends.
        drop(permit);
    });
    let mut r = Reply::new(Default::default());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    if let Some(p) = subprotocol {
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// A refusal by a connection limit: 429 (with Retry-After for rates), or
/// 503 for an endpoint's total.
fn limit_reply(
    state: &GatewayState,
    info: &ConnInfo,
    path: &str,
    r: crate::limits::Refused,
) -> Reply {
    let m = &state.metrics;
    let status = match r.error {
        "rate_limited" => {
            m.refused_rate.fetch_add(1, Relaxed);
            StatusCode::TOO_MANY_REQUESTS
        }
        "too_many_connections_per_ip" => {
            m.refused_per_ip.fetch_add(1, Relaxed);
            StatusCode::TOO_MANY_REQUESTS
        }
        "too_many_connections_per_principal" => {
            m.refused_per_principal.fetch_add(1, Relaxed);
            StatusCode::TOO_MANY_REQUESTS
        }
        _ => {
            m.refused_limit.fetch_add(1, Relaxed);
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    tracing::debug!(peer = %info.peer, path, error = r.error, "connection refused by a limit");
    let mut reply = error_reply(status, r.error, &r.message);
    if let Some(wait) = r.retry_after
        && let Ok(v) =
            http::HeaderValue::from_str(&crate::limits::retry_after_secs(wait).to_string())
    {
        reply.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    reply
}

/// RFC 6455 §4.1: the key is 16 random bytes, base64-encoded (24 characters).
fn valid_ws_key(k: &[u8]) -> bool {
    k.len() == 24
        && k.ends_with(b"==")
        && k[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// Bound listeners by name.
pub type BoundListeners = HashMap<String, TcpListener>;
