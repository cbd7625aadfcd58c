//! Authentication modes with real clients: JWT from a header, a query
//! parameter or an in-band first message; handshakes; Origin allow-lists.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "iot-demo-secret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(alg: Algorithm, secret: &str, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn good(sub: &str) -> String {
    token(
        Algorithm::HS256,
        SECRET,
        json!({"sub": sub, "exp": now() + 600}),
    )
}

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// `alg: none`, unsigned.
fn none_token() -> String {
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"sub": "mallory", "exp": now() + 600}))
    )
}

fn deployment() -> Deployment {
    let dep = Deployment::new();
    dep.gateway_yaml(&format!(
        r#"
protocols:
  iot:
    filters_at: [top_level, filters]
    replies:
      status: {{type: status, user: "{{{{principal}}}}"}}
endpoints:
  - path: /ws
    protocol: iot
    channels: all
    auth:
      mode: jwt
      algorithm: HS256
      secret_env: GW_TEST_SURELY_UNSET_SECRET
      secret_default: {SECRET}
      message:
        match: {{type: auth}}
        token_field: token
        reply: {{type: auth_response, success: true}}
        error_reply: {{type: auth_response, success: false, error: "{{{{error.code}}}}", message: "{{{{error.message}}}}"}}
        allow_before: [ping]
  - path: /ws-quick
    protocol: iot
    channels: all
    auth:
      mode: jwt
      algorithm: HS256
      secret_env: GW_TEST_SURELY_UNSET_SECRET
      secret_default: {SECRET}
      message:
        match: {{type: auth}}
        token_field: token
        reply: {{type: auth_response, success: true}}
        error_reply: {{type: auth_response, success: false, error: "{{{{error.code}}}}", message: "{{{{error.message}}}}"}}
        allow_before: [ping]
        timeout: 300ms
  - path: /bearer
    channels: [feed]
    auth:
      mode: jwt
      algorithm: HS256
      secret_default: {SECRET}
      query: token
    origins: [https://app.example.com]
  - path: /rs
    channels: [feed]
    auth: {{mode: jwt, algorithm: RS256, jwks_file: keys/jwks.json, issuer: https://issuer.example, audience: [gateway]}}
  - path: /relay
    channels: all
    auth:
      mode: handshake
      message:
        match: {{type: handshake}}
        required: [client_id, version]
        reply: {{type: handshake_response, client_id: "{{{{request.client_id}}}}", accepted: true}}
        error_reply: {{type: error, code: "{{{{error.code}}}}", message: "{{{{error.message}}}}"}}
  - path: /relay-checked
    channels: all
    close_codes: {{1009: 1003}}
    limits: {{max_message_size: 1KiB}}
    auth:
      mode: handshake
      message:
        match: {{type: handshake}}
        required: [client_id]
        reply: {{type: handshake_response, client_id: "{{{{request.client_id}}}}"}}
        error_reply: {{type: error, code: "{{{{error.code}}}}"}}
        schema: schemas/handshake.json
http:
  - path: /emit/feed
    method: POST
    command: {{channel: feed, request: {{op: emit, messages: "{{{{request.body}}}}"}}}}
"#
    ))
    .write("specs/schemas/any.json", ANY_SCHEMA)
    // Client ids must start with "c"; errors carry a code.
    .write(
        "schemas/handshake.json",
        r#"{"oneOf": [
            {"type": "object", "required": ["type", "client_id"],
             "properties": {"type": {"const": "handshake_response"}, "client_id": {"type": "string", "pattern": "^c"}}},
            {"type": "object", "required": ["type", "code"], "properties": {"type": {"const": "error"}}}
        ]}"#,
    )
    .write("specs/feed.yaml", &bus_spec("feed", ""))
    .write(
        "keys/jwks.json",
        &std::fs::read_to_string(repo_root().join("gateway/tests/data/jwt/jwks.json")).unwrap(),
    );
    dep
}

async fn emit(addr: std::net::SocketAddr, messages: Value) {
    eventually("the plugin to take the message", || async {
        let (s, _, _) = http_body(addr, "POST", "/emit/feed", &[], &messages.to_string()).await;
        (s == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_jwt_gates_everything_but_ping() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws").await;

    // Before auth: ping is answered, subscribe is refused.
    send_json(&mut ws, &json!({"type": "ping", "timestamp": 1})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "pong", "timestamp": 1})
    );
    send_json(&mut ws, &json!({"type": "subscribe", "channel": "feed"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["error"], "not_authenticated", "{e}");

    // Bad tokens, each refused with the configured reply; the socket stays.
    let expired = token(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "u", "exp": now() - 3600}),
    );
    let wrong_key = token(
        Algorithm::HS256,
        "not-the-secret",
        json!({"sub": "u", "exp": now() + 600}),
    );
    let wrong_alg = token(
        Algorithm::HS384,
        SECRET,
        json!({"sub": "u", "exp": now() + 600}),
    );
    for (t, code) in [
        (expired.as_str(), "token_expired"),
        (wrong_key.as_str(), "invalid_token"),
        (wrong_alg.as_str(), "invalid_token"),
        (none_token().as_str(), "invalid_token"),
        ("garbage", "invalid_token"),
    ] {
        send_json(&mut ws, &json!({"type": "auth", "token": t})).await;
        let r = next_json(&mut ws).await;
        assert_eq!(r["type"], "auth_response");
        assert_eq!(r["success"], false);
        assert_eq!(r["error"], code, "{r}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    send_json(&mut ws, &json!({"type": "auth"})).await;
    assert_eq!(next_json(&mut ws).await["error"], "missing_token");

    send_json(&mut ws, &json!({"type": "auth", "token": good("alice")})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "auth_response", "success": true})
    );
    send_json(&mut ws, &json!({"type": "status"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "status", "user": "alice"})
    );
    send_json(&mut ws, &json!({"type": "subscribe", "channel": "feed"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    emit(addr, json!([{"x": 1}])).await;
    assert_eq!(next_json(&mut ws).await, json!({"x": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_in_band_auth_in_time_closes_with_1008() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws-quick").await;
    assert_eq!(close_code(&mut ws).await, Some(1008));
    let n = metric(addr, "gateway_auth_timeouts_total").await;
    assert_eq!(n, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_before_the_upgrade_from_bearer_or_query() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();

    let (status, body) = try_connect(addr, "/bearer", &[]).await.err().unwrap();
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "missing_token");

    let bad = format!("Bearer {}", none_token());
    let (status, body) = try_connect(addr, "/bearer", &[("Authorization", &bad)])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "invalid_token"
    );

    let expired = token(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "u", "exp": now() - 3600}),
    );
    let (status, body) = try_connect(addr, &format!("/bearer?token={expired}"), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "token_expired"
    );

    let ok = format!("Bearer {}", good("bob"));
    let mut a = try_connect(addr, "/bearer", &[("Authorization", &ok)])
        .await
        .unwrap();
    let mut b = try_connect(addr, &format!("/bearer?token={}", good("carol")), &[])
        .await
        .unwrap();
    // The handshake completes a little before the subscription is made.
    metric_becomes(
        addr,
        "gateway_subscribers{channel=\"feed\",plugin=\"test-faults\"}",
        2.0,
    )
    .await;
    emit(addr, json!([{"y": 2}])).await;
    assert_eq!(next_json(&mut a).await, json!({"y": 2}));
    assert_eq!(next_json(&mut b).await, json!({"y": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let ok = format!("Bearer {}", good("bob"));
    let (status, body) = try_connect(
        addr,
        "/bearer",
        &[
            ("Authorization", &ok),
            ("Origin", "https://evil.example.com"),
        ],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "origin_not_allowed"
    );
    // Allowed (case and trailing slash do not matter), and absent (not a browser).
    try_connect(
        addr,
        "/bearer",
        &[
            ("Authorization", &ok),
            ("Origin", "HTTPS://app.example.com/"),
        ],
    )
    .await
    .unwrap();
    try_connect(addr, "/bearer", &[("Authorization", &ok)])
        .await
        .unwrap();
    assert_eq!(
        metric(addr, "gateway_connections_refused_total{reason=\"origin\"}").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_first_then_a_one_way_stream() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/relay").await;
    send_json(&mut ws, &json!({"type": "hello"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["code"], "not_authenticated", "{e}");
    send_json(&mut ws, &json!({"type": "handshake", "client_id": "c1"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["code"], "invalid_handshake");
    assert!(e["message"].as_str().unwrap().contains("version"), "{e}");
    send_json(&mut ws, &json!({"type": "handshake", "client_id": "c1", "version": "1.0", "capabilities": ["sync"]})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "handshake_response", "client_id": "c1", "accepted": true})
    );
    emit(addr, json!([{"z": 3}])).await;
    assert_eq!(next_json(&mut ws).await, json!({"z": 3}));
    // Once streaming, client text is ignored: no reply, no close.
    send_text(&mut ws, "anything at all").await;
    emit(addr, json!([{"z": 4}])).await;
    assert_eq!(next_json(&mut ws).await, json!({"z": 4}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_replies_are_checked_against_their_schema() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let failures = "gateway_reply_schema_failures_total";
    let mut ws = connect(addr, "/relay-checked").await;
    // An error reply that satisfies the schema is sent.
    send_json(&mut ws, &json!({"type": "handshake"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "error", "code": "invalid_handshake"})
    );
    // A reply the schema refuses (client id "x9") is dropped and counted;
    // the handshake itself is accepted, so the stream starts.
    send_json(&mut ws, &json!({"type": "handshake", "client_id": "x9"})).await;
    eventually("the refused reply to be counted", || async {
        (metric(addr, failures).await == Some(1.0)).then_some(())
    })
    .await;
    // The reply is counted just before the session subscribes.
    metric_becomes(
        addr,
        "gateway_subscribers{channel=\"feed\",plugin=\"test-faults\"}",
        1.0,
    )
    .await;
    emit(addr, json!([{"z": 1}])).await;
    assert_eq!(next_json(&mut ws).await, json!({"z": 1}));
    // A reply that satisfies it is sent.
    let mut ok = connect(addr, "/relay-checked").await;
    send_json(&mut ok, &json!({"type": "handshake", "client_id": "c2"})).await;
    assert_eq!(
        next_json(&mut ok).await,
        json!({"type": "handshake_response", "client_id": "c2"})
    );
    assert_eq!(metric(addr, failures).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_map_the_gateways_codes_but_not_the_clients_echo() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // Too big: 1009, sent as 1003 on this endpoint.
    let mut ws = connect(addr, "/relay-checked").await;
    send_text(&mut ws, &"x".repeat(2048)).await;
    assert_eq!(close_code(&mut ws).await, Some(1003));
    // The same on an endpoint without the map.
    let mut plain = connect(addr, "/relay").await;
    send_text(
        &mut plain,
        &format!("{{\"pad\": \"{}\"}}", "x".repeat(70 * 1024)),
    )
    .await;
    assert_eq!(close_code(&mut plain).await, Some(1009));
    // A client's own Close is echoed with its code, unmapped.
    let mut ws = connect(addr, "/relay-checked").await;
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 1009.into(),
            reason: "".into(),
        },
    )))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_are_checked_against_a_jwks_file_with_iss_and_aud() {
    let data = repo_root().join("gateway/tests/data/jwt");
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(data.join("rsa_private.pem")).unwrap()).unwrap();
    let sign = |kid: &str, claims: Value| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        format!("Bearer {}", encode(&h, &claims, &key).unwrap())
    };
    let base = json!({"sub": "svc", "exp": now() + 600, "iss": "https://issuer.example", "aud": "gateway"});
    try_connect(
        addr,
        "/rs",
        &[("Authorization", &sign("rsa-1", base.clone()))],
    )
    .await
    .unwrap();
    let mut wrong_aud = base.clone();
    wrong_aud["aud"] = json!("other");
    let mut wrong_iss = base.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    for (auth, code) in [
        (sign("rsa-2", base.clone()), "invalid_token"),
        (sign("nope", base.clone()), "invalid_token"),
        (sign("rsa-1", wrong_aud), "invalid_audience"),
        (sign("rsa-1", wrong_iss), "invalid_issuer"),
        // Algorithm confusion: HS256 keyed with the public key's bytes.
        (
            format!(
                "Bearer {}",
                token(
                    Algorithm::HS256,
                    &std::fs::read_to_string(data.join("rsa_public.pem")).unwrap(),
                    base.clone()
                )
            ),
            "invalid_token",
        ),
    ] {
        let (status, body) = try_connect(addr, "/rs", &[("Authorization", &auth)])
            .await
            .err()
            .unwrap();
        assert_eq!(status, 401);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], code);
    }
}

/// With `close_at_exp`, a connection ends when its token does: 1008
/// `token expired`, counted. An in-band authentication with another token
/// moves the deadline, sooner or later. Without it, a connection outlives
/// its token (the token is checked when it is presented).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_at_exp_ends_a_connection_when_its_token_expires() {
    let dep = Deployment::new();
    let jwt = |extra: &str| {
        format!(
            "{{mode: jwt, algorithm: HS256, secret_default: {SECRET}, leeway: 0s, query: token{extra}}}"
        )
    };
    // The authentication deadline far away: the session's next deadline
    // after the first auth is then a ping, 30 s away.
    let inband = ", message: {match: {type: auth}, token_field: token, reply: {type: auth_response, success: true}, timeout: 60s}";
    dep.gateway_yaml(&format!(
        r#"
protocols:
  iot: {{}}
endpoints:
  - path: /expiring
    channels: [feed]
    auth: {}
  - path: /lasting
    channels: [feed]
    auth: {}
  - path: /ws
    protocol: iot
    channels: all
    subscribe: [feed]
    auth: {}
"#,
        jwt(", close_at_exp: true"),
        jwt(""),
        jwt(&format!(", close_at_exp: true{inband}")),
    ))
    .write("specs/schemas/any.json", ANY_SCHEMA)
    .write("specs/feed.yaml", &bus_spec("feed", ""));
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let feed = gw.state().live().channels["feed"].clone();
    let expiring_in = |s: u64| {
        token(
            Algorithm::HS256,
            SECRET,
            json!({"sub": "u", "exp": now() + s}),
        )
    };
    let auth = |t: String| json!({"type": "auth", "token": t});

    // Before the upgrade: closed when the token expires.
    let mut a = connect(addr, &format!("/expiring?token={}", expiring_in(1))).await;
    assert_eq!(close_code(&mut a).await, Some(1008));

    // In-band, again with a token expiring sooner: closed then, not at the
    // next deadline the session had (a ping, 30 s away).
    let mut b = connect(addr, "/ws").await;
    send_json(&mut b, &auth(expiring_in(600))).await;
    assert_eq!(next_json(&mut b).await["type"], "auth_response");
    send_json(&mut b, &auth(expiring_in(1))).await;
    assert_eq!(next_json(&mut b).await["type"], "auth_response");
    assert_eq!(close_code(&mut b).await, Some(1008));
    metric_becomes(
        addr,
        "gateway_connections_closed_by_limit_total{limit=\"token_expired\"}",
        2.0,
    )
    .await;

    // Again with a fresher token: the first one's deadline is gone. And
    // without close_at_exp, a connection outlives its token.
    let mut c = connect(addr, "/ws").await;
    send_json(&mut c, &auth(expiring_in(2))).await;
    assert_eq!(next_json(&mut c).await["type"], "auth_response");
    send_json(&mut c, &auth(expiring_in(600))).await;
    assert_eq!(next_json(&mut c).await["type"], "auth_response");
    let first_expiry = now() + 2;
    let mut d = connect(addr, &format!("/lasting?token={}", expiring_in(2))).await;
    while now() <= first_expiry {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    plugin_command(&feed, json!({"op": "emit", "messages": [{"y": 1}]})).await;
    assert_eq!(next_json(&mut c).await, json!({"y": 1}));
    assert_eq!(next_json(&mut d).await, json!({"y": 1}));
    assert_eq!(
        metric(
            addr,
            "gateway_connections_closed_by_limit_total{limit=\"token_expired\"}"
        )
        .await,
        Some(2.0)
    );
    gw.shutdown().await;
}

/// In-band authentication refused `MAX_AUTH_FAILURES` times on one
/// connection closes it (1008): each attempt is a signature check, which a
/// client could otherwise ask for without end. Each refusal is answered
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_failed_in_band_authentications_close_the_connection() {
    use gateway::control::MAX_AUTH_FAILURES;
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    let mut ws = connect(addr, "/ws").await;
    let bad = token(
        Algorithm::HS256,
        "not-the-secret",
        json!({"sub": "u", "exp": now() + 600}),
    );
    for i in 1..=MAX_AUTH_FAILURES {
        send_json(&mut ws, &json!({"type": "auth", "token": bad})).await;
        let r = next_json(&mut ws).await;
        assert_eq!(r["success"], false, "attempt {i}: {r}");
    }
    // Not the authentication timeout (10 s): this limit, at once.
    assert_eq!(
        close_frame(&mut ws).await,
        Some((1008, "too many failed authentications".to_string()))
    );
    // Fewer on another connection leave it open, and a good token works.
    let mut ok = connect(addr, "/ws").await;
    for _ in 1..MAX_AUTH_FAILURES {
        send_json(&mut ok, &json!({"type": "auth", "token": bad})).await;
        assert_eq!(next_json(&mut ok).await["success"], false);
    }
    send_json(&mut ok, &json!({"type": "auth", "token": good("u")})).await;
    assert_eq!(next_json(&mut ok).await["success"], true);
    gw.shutdown().await;
}
