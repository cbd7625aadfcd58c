//! Unit tests against a real HTTP server on 127.0.0.1:0 (a std thread).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use plugin_api::abi::{GW_LOG_INFO, GW_LOG_WARN, GW_OK, GW_REJECTED};
use plugin_api::testing::{Loaded, TestHost};
use serde_json::json;

use super::*;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Answers each request with the next scripted `(status, body)`; the last
/// one repeats.
struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Vec<(u16, String)>>>,
}

impl Server {
    fn start(script: Vec<(u16, &str)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(
            script
                .into_iter()
                .map(|(s, b)| (s, b.to_owned()))
                .collect::<Vec<_>>(),
        ));
        let (seen2, script2) = (seen.clone(), script.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let Some(req) = read_request(&stream) else {
                    continue;
                };
                seen2.lock().unwrap().push(req);
                let (status, body) = {
                    let mut s = script2.lock().unwrap();
                    if s.len() > 1 {
                        s.remove(0)
                    } else {
                        s[0].clone()
                    }
                };
                let mut stream = stream;
                // A 3xx answer's script text is its Location.
                let (location, body) = match status {
                    300..=399 => (format!("Location: {body}\r\n"), String::new()),
                    _ => (String::new(), body),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\n{location}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Server { url, seen, script }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn answer(&self, status: u16, body: &str) {
        *self.script.lock().unwrap() = vec![(status, body.to_owned())];
    }
}

fn read_request(stream: &TcpStream) -> Option<Seen> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let len = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn plugin(host: &TestHost, config: Value) -> HttpPoll {
    HttpPoll::new(Config::parse(config, no_env).unwrap(), host.host())
}

fn polls(p: &HttpPoll, host: &TestHost, n: usize) {
    let out = host.emitter();
    for _ in 0..n {
        p.poll(None, &out).unwrap();
    }
}

fn warnings(host: &TestHost) -> Vec<String> {
    host.logs()
        .into_iter()
        .filter(|(l, _)| *l == GW_LOG_WARN)
        .map(|(_, m)| m)
        .collect()
}

#[test]
fn config_defaults_and_errors() {
    let c = Config::parse(json!({"url": "http://example.com/a?token=x"}), no_env).unwrap();
    assert_eq!(c.method, Method::Get);
    assert_eq!(c.timeout, Duration::from_secs(10));
    assert!(c.skip_unchanged);
    assert_eq!(c.max_skip, 32);
    assert!(c.headers.is_empty() && c.body.is_none());
    assert_eq!(c.url_for_logs, "http://example.com/a");
    let c = Config::parse(json!({"url": "https://u:p@example.com:8443/x"}), no_env).unwrap();
    assert_eq!(c.url_for_logs, "https://example.com:8443/x");

    for (config, expect) in [
        (json!({}), "`url` is required"),
        (Value::Null, "`url` is required"),
        (json!({"url": "/quotes"}), "must be absolute"),
        (json!({"url": "example.com/x"}), "is not a valid URL"),
        (
            json!({"url": "ftp://example.com/x"}),
            "scheme must be http or https",
        ),
        (json!({"url": "http://a b/"}), "is not a valid URL"),
        (
            json!({"url": "http://a/", "method": "PUT"}),
            "unknown variant `PUT`",
        ),
        (
            json!({"url": "http://a/", "body": {"q": 1}}),
            "`body` needs `method: POST`",
        ),
        (
            json!({"url": "http://a/", "timeout": "soon"}),
            "`timeout` \"soon\" is not a duration",
        ),
        (
            json!({"url": "http://a/", "timeout": "0s"}),
            "`timeout` must be more than 0",
        ),
        (
            json!({"url": "http://a/", "extract": "data"}),
            "`extract` must be a JSON pointer",
        ),
        (
            json!({"url": "http://a/", "fields": {}}),
            "`fields` must name at least one field",
        ),
        (
            json!({"url": "http://a/", "fields": {"x": "a"}}),
            "`fields.x` must be a JSON pointer",
        ),
        (
            json!({"url": "http://a/", "headers": {"bad name": "v"}}),
            "invalid header name",
        ),
        (
            json!({"url": "http://a/", "headers": {"x": "a\nb"}}),
            "invalid value for header",
        ),
        (
            json!({"url": "http://a/", "headers_env": {"Authorization": "NOPE_UNSET"}}),
            "environment variable NOPE_UNSET (`headers_env.Authorization`) is not set",
        ),
        (
            json!({"url": "http://a/", "basic_auth_env": {"user": "U"}}),
            "missing field `password`",
        ),
        (
            json!({"url": "http://a/", "skip_unchanged": "yes"}),
            "invalid type",
        ),
        (
            json!({"url": "http://a/", "interval": "1s"}),
            "unknown field `interval`",
        ),
        (json!(["http://a/"]), "expected a JSON object"),
    ] {
        let e = Config::parse(config.clone(), no_env).unwrap_err();
        assert!(e.message().starts_with("http-poll: "), "{config}: {e}");
        assert!(e.message().contains(expect), "{config}: {e}");
    }
}

#[test]
fn base64_matches_rfc_4648_vectors() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
        ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded);
    }
}

#[test]
fn shape_extracts_and_renames() {
    let c = |extra: Value| {
        let mut v = json!({"url": "http://a/"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Config::parse(v, no_env).unwrap()
    };
    let resp = json!({"data": {"price": 3, "meta": {"sym": "X"}}, "other": 1});
    assert_eq!(shape(&c(json!({})), resp.clone()).unwrap(), resp);
    assert_eq!(
        shape(&c(json!({"extract": "/data/meta"})), resp.clone()).unwrap(),
        json!({"sym": "X"})
    );
    assert_eq!(
        shape(
            &c(json!({"extract": "/data", "fields": {"p": "/price", "s": "/meta/sym", "gone": "/nope", "all": ""}})),
            resp.clone()
        )
        .unwrap(),
        json!({"p": 3, "s": "X", "all": {"price": 3, "meta": {"sym": "X"}}})
    );
    let e = shape(&c(json!({"extract": "/missing"})), resp).unwrap_err();
    assert!(e.contains("nothing at `extract` \"/missing\""), "{e}");
}

#[test]
fn polls_extract_rename_and_skip_unchanged() {
    let server = Server::start(vec![
        (200, r#"{"data":{"price":1,"sym":"X","noise":9}}"#),
        (200, r#"{"data":{"price":1,"sym":"X","noise":10}}"#),
        (200, r#"{"data":{"price":2,"sym":"X","noise":11}}"#),
    ]);
    let host = TestHost::new();
    let p = plugin(
        &host,
        json!({"url": format!("{}/quote?s=X", server.url), "extract": "/data",
               "fields": {"value": "/price", "symbol": "/sym"}}),
    );
    polls(&p, &host, 4);
    // The second response differs only in a field not picked: skipped.
    let got: Vec<Value> = host.json_messages().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        got,
        vec![
            json!({"value": 1, "symbol": "X"}),
            json!({"value": 2, "symbol": "X"})
        ]
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/quote?s=X");
    assert!(host.logs().is_empty(), "{:?}", host.logs());
}

#[test]
fn skip_unchanged_false_emits_every_poll() {
    let server = Server::start(vec![(200, r#"{"a":1}"#)]);
    let host = TestHost::new();
    let p = plugin(&host, json!({"url": server.url, "skip_unchanged": false}));
    polls(&p, &host, 3);
    assert_eq!(host.message_count(), 3);
}

#[test]
fn headers_env_basic_auth_and_post_body() {
    let server = Server::start(vec![(200, r#"{"ok":true}"#)]);
    let env = |name: &str| match name {
        "TOKEN_VAR" => Some("Bearer s3cret\n".to_owned()),
        "USER_VAR" => Some("Aladdin".to_owned()),
        "PASS_VAR" => Some("open sesame".to_owned()),
        _ => None,
    };
    let config = Config::parse(
        json!({"url": server.url, "method": "POST", "body": {"query": "q", "n": [1]},
               "headers": {"X-Static": "one"}, "headers_env": {"X-Token": "TOKEN_VAR"},
               "basic_auth_env": {"user": "USER_VAR", "password": "PASS_VAR"}, "timeout": "2s"}),
        env,
    )
    .unwrap();
    let host = TestHost::new();
    let p = HttpPoll::new(config, host.host());
    polls(&p, &host, 1);
    assert_eq!(host.json_messages()[0].1, json!({"ok": true}));
    let req = &server.seen()[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.header("x-static"), Some("one"));
    assert_eq!(req.header("x-token"), Some("Bearer s3cret"));
    assert_eq!(
        req.header("authorization"),
        Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
    );
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(
        serde_json::from_slice::<Value>(&req.body).unwrap(),
        json!({"query": "q", "n": [1]})
    );
}

#[test]
fn upstream_errors_back_off_then_recover() {
    let server = Server::start(vec![(503, "overloaded")]);
    let host = TestHost::new();
    let mut p = plugin(&host, json!({"url": server.url, "max_skip": 4}));
    p.log_every = Duration::ZERO;
    let requests = || server.seen().len();
    // Failure 1 → skip 1 poll; failure 2 → skip 2; 3 → 4; 4 → 4 (capped).
    let mut pattern = Vec::new();
    for _ in 0..16 {
        let before = requests();
        polls(&p, &host, 1);
        pattern.push(requests() - before);
    }
    assert_eq!(
        pattern,
        [1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
        "1 = a request was sent"
    );
    assert_eq!(host.message_count(), 0);
    let w = warnings(&host);
    assert_eq!(w.len(), 5, "{w:?}");
    assert!(w[0].contains("HTTP 503 Service Unavailable"), "{}", w[0]);
    assert!(w[0].contains("\"overloaded\""), "{}", w[0]);
    assert!(w[0].contains("skipping the next 1 polls"), "{}", w[0]);
    assert!(
        w[4].contains("failure 5 in a row, skipping the next 4"),
        "{}",
        w[4]
    );

    // Not JSON is an error too.
    server.answer(200, "<html>");
    polls(&p, &host, 5);
    let w = warnings(&host);
    assert!(w[5].contains("not JSON"), "{}", w[5]);
    assert!(w[5].contains("\"<html>\""), "{}", w[5]);

    // Recovery: the next request succeeds, resets the backoff, logs once.
    server.answer(200, r#"{"up":1}"#);
    for _ in 0..5 {
        polls(&p, &host, 1);
        if host.message_count() > 0 {
            break;
        }
    }
    assert_eq!(host.json_messages()[0].1, json!({"up": 1}));
    let infos: Vec<_> = host
        .logs()
        .into_iter()
        .filter(|(l, _)| *l == GW_LOG_INFO)
        .collect();
    assert_eq!(infos.len(), 1);
    assert!(
        infos[0].1.contains("recovered after 6 failed polls"),
        "{infos:?}"
    );
    let before = requests();
    polls(&p, &host, 3);
    assert_eq!(requests() - before, 3, "no backoff after a success");
}

#[test]
fn failure_logs_are_rate_limited() {
    let server = Server::start(vec![(500, "{}")]);
    let host = TestHost::new();
    let p = plugin(&host, json!({"url": server.url, "max_skip": 0}));
    polls(&p, &host, 5);
    assert_eq!(server.seen().len(), 5, "max_skip 0: no backoff");
    // The default 10 s window: only the first failure is logged.
    assert_eq!(warnings(&host).len(), 1);
}

#[test]
fn transport_errors_are_logged_not_fatal() {
    // A port nothing listens on (bound, then closed).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = TestHost::new();
    let p = plugin(&host, json!({"url": format!("http://127.0.0.1:{port}/")}));
    polls(&p, &host, 1);
    let w = warnings(&host);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("request failed"), "{}", w[0]);
}

#[test]
fn a_rejected_message_counts_as_a_failure() {
    let server = Server::start(vec![(200, r#"{"a":1}"#)]);
    let host = TestHost::new();
    host.set_emit_status(GW_REJECTED);
    let p = plugin(&host, json!({"url": server.url}));
    polls(&p, &host, 1);
    let w = warnings(&host);
    assert!(w[0].contains("refused the message"), "{w:?}");
}

/// A response the gateway always refuses is a failure in a row like any
/// other: the backoff grows, one warning per 10 s, no "recovered" line
/// between (the fetch's success used to reset both before the emit).
#[test]
fn a_message_refused_every_time_backs_off() {
    let server = Server::start(vec![(200, r#"{"a":1}"#)]);
    let host = TestHost::new();
    host.set_emit_status(GW_REJECTED);
    let p = plugin(&host, json!({"url": server.url, "skip_unchanged": false}));
    polls(&p, &host, 20);
    // Failures 1, 2, 3, 4, 5 skip 1, 2, 4, 8 polls: requests at polls 1, 3, 6, 11, 20.
    assert_eq!(server.seen().len(), 5);
    assert_eq!(warnings(&host).len(), 1, "{:?}", host.logs());
    assert!(
        !host.logs().iter().any(|(_, m)| m.contains("recovered")),
        "{:?}",
        host.logs()
    );
}

#[test]
fn through_the_abi() {
    let server = Server::start(vec![(200, r#"{"a":1}"#)]);
    let host = TestHost::new();
    let loaded = Loaded::of::<HttpPoll>();
    assert_eq!(loaded.name(), "http-poll");
    let inst = loaded
        .create(&host, &json!({"url": server.url}).to_string())
        .unwrap();
    assert_eq!(inst.poll(""), (GW_OK, String::new()));
    assert_eq!(
        host.messages(),
        vec![(String::new(), r#"{"a":1}"#.to_owned())]
    );
    let e = loaded
        .create(&host, r#"{"url":"http://a/","x":1}"#)
        .err()
        .unwrap();
    assert!(e.contains("unknown field `x`"), "{e}");
}

/// Redirects are followed when the config sets no headers; with headers
/// (which may carry credentials) they are not: the request never reaches
/// the other address, and the warning says why and what to do.
#[test]
fn redirects_are_not_followed_with_configured_headers() {
    let target = Server::start(vec![(200, r#"{"ok":true}"#)]);
    let moved = Server::start(vec![(302, &format!("{}/final?k=v", target.url))]);

    let host = TestHost::new();
    let p = plugin(&host, json!({"url": moved.url}));
    polls(&p, &host, 1);
    assert_eq!(host.json_messages()[0].1, json!({"ok": true}));
    assert_eq!(target.seen().len(), 1);

    let env = |name: &str| (name == "KEY_VAR").then(|| "s3cret".to_owned());
    let config = Config::parse(
        json!({"url": moved.url, "headers_env": {"X-Api-Key": "KEY_VAR"}}),
        env,
    )
    .unwrap();
    let host = TestHost::new();
    let p = HttpPoll::new(config, host.host());
    polls(&p, &host, 1);
    assert_eq!(host.message_count(), 0);
    assert_eq!(
        target.seen().len(),
        1,
        "the key went to the redirect's target"
    );
    assert_eq!(moved.seen()[1].header("x-api-key"), Some("s3cret"));
    let w = warnings(&host);
    assert!(
        w[0].contains("the redirect to")
            && w[0].contains("/final\"")
            && w[0].contains("set `url` to the final address"),
        "{w:?}"
    );
}
