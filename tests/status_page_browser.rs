//! The status page in a real browser: headless Chromium (`/usr/bin/chromium`,
//! Debian's package), driven over the Chrome DevTools Protocol. The page must
//! run under its own Content-Security-Policy, show a refused key plainly, and
//! render the gateway's state live; a screenshot is checked and saved to
//! `target/status-page.png`.
//!
//! `cargo test --workspace --features browser --test status_page_browser` (`.ci/run`
//! installs Chromium when it is missing).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";
const KEY: &str = "status-browser-key";
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 900;

/// A headless Chromium in its own process group, killed (group and all)
/// when dropped, also when the test fails.
struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    devtools: String,
}

impl Chromium {
    fn launch() -> Chromium {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
        );
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                &format!("--window-size={WIDTH},{HEIGHT}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start chromium");
        // Chromium prints where DevTools listens on stderr; the rest of its
        // stderr is drained so it never blocks on a full pipe.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let mut browser = Chromium {
            child,
            _profile: profile,
            devtools: String::new(),
        };
        browser.devtools = rx
            .recv_timeout(PATIENCE)
            .expect("chromium printed no DevTools address in time");
        browser
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helper processes: the group this test started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools protocol connection to the browser, with one page attached.
struct Cdp {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
            .await
            .expect("DevTools connect timed out")
            .expect("DevTools connect");
        Cdp {
            ws,
            next_id: 0,
            session: None,
        }
    }

    /// Call `method`; its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params).await {
            Ok(v) => v,
            Err(e) => panic!("{method} failed: {e}"),
        }
    }

    /// Call `method`; its result, or the protocol's error.
    async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send to DevTools");
        let deadline = deadline();
        loop {
            before(deadline, &format!("the answer to {method}"));
            let m = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("DevTools answered nothing in time")
                .expect("DevTools closed")
                .expect("DevTools read");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).expect("DevTools sends JSON");
            if v["id"] == id {
                return match v.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    /// A new page, attached (flat sessions), sized WIDTH × HEIGHT.
    async fn open_page(&mut self) {
        let t = self
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target = t["targetId"].as_str().expect("targetId").to_string();
        let a = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        self.session = Some(a["sessionId"].as_str().expect("sessionId").to_string());
        self.call("Page.enable", json!({})).await;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
    }

    async fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url})).await;
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
    }

    /// Evaluate `expr` in the page; its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluate `expr` until `ok` accepts its value; that value. An
    /// evaluation that fails (a page still loading) counts as not yet.
    async fn eval_until(&mut self, what: &str, expr: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = deadline();
        loop {
            let v = match self
                .try_call(
                    "Runtime.evaluate",
                    json!({"expression": expr, "returnByValue": true}),
                )
                .await
            {
                Ok(r) if r.get("exceptionDetails").is_none() => r["result"]["value"].clone(),
                Ok(r) => r,
                Err(e) => e,
            };
            if ok(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; the page shows {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the page shows, as JSON.
const PAGE_STATE: &str = r#"(() => {
  const q = (s) => document.querySelector(s);
  const text = (s) => { const e = q(s); return e ? e.textContent : null; };
  return {
    conn: text('#conn'),
    delay: text('#delay'),
    message: q('#message').hidden ? null : text('#message'),
    keyform: !q('#keyform').hidden,
    channels: Array.from(document.querySelectorAll('#channels tbody tr')).map((r) => r.dataset.channel),
    faults_subscribers: text('#channels tr[data-channel="faults"] .subscribers'),
    faults_failing_path: text('#channels tr[data-channel="faults"] .last-failure'),
    faults_failures: text('#channels tr[data-channel="faults"] .validation-failures'),
    flaky_restarts: text('#channels tr[data-channel="flaky"] .restarts'),
    refused_limit: text('#limits tr[data-limit="connections refused: limit"] .count'),
    listeners: Array.from(document.querySelectorAll('#listeners tbody tr')).map((r) => r.dataset.listener),
    endpoints: Array.from(document.querySelectorAll('#endpoints tbody tr')).map((r) => r.dataset.endpoint),
    header_bg: getComputedStyle(q('header')).backgroundColor,
    body_bg: getComputedStyle(document.body).backgroundColor,
  };
})()"#;

/// The status page deployment (see `status_page_deployment`), at a pace
/// a browser redraws comfortably.
fn deployment() -> Deployment {
    status_page_deployment(KEY, "200ms", "50ms", 4, 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_live_in_chromium() {
    let dep = deployment();
    let gw = dep.start().await;
    let addr = gw.addr("main").unwrap();
    // Something to show: a subscriber, and a connection over its endpoint's cap.
    let mut sub = connect(addr, "/ws/faults").await;
    next_json(&mut sub).await;
    assert!(try_connect(addr, "/ws/faults", &[]).await.is_err());

    let browser = Chromium::launch();
    let mut cdp = Cdp::connect(&browser.devtools).await;
    cdp.open_page().await;

    // A wrong key: the socket is refused and the page says so.
    cdp.navigate(&format!("http://{addr}/status#key=not-the-key"))
        .await;
    let refused = cdp
        .eval_until("the refusal", PAGE_STATE, |v| v["conn"] == "refused")
        .await;
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused") && m.contains("/ws/status")),
        "{refused}"
    );
    assert_eq!(refused["keyform"], true, "{refused}");
    assert_eq!(refused["channels"], json!([]), "{refused}");

    // The key in the query string: live figures (the key moves to the fragment).
    cdp.navigate("about:blank").await;
    cdp.navigate(&format!("http://{addr}/status?key={KEY}"))
        .await;
    let shown = cdp
        .eval_until("the live figures", PAGE_STATE, |v| {
            v["conn"] == "live"
                && v["faults_subscribers"] == "1"
                && v["faults_failing_path"] == "/seq"
                && v["flaky_restarts"].as_str().is_some_and(|r| r != "0")
                && v["refused_limit"] == "1"
        })
        .await;
    assert_eq!(
        shown["channels"],
        json!(["faults", "flaky", "status"]),
        "{shown}"
    );
    assert_eq!(shown["listeners"], json!(["main"]), "{shown}");
    assert_eq!(
        shown["endpoints"],
        json!(["/ws/faults", "/ws/flaky", "/ws/status"]),
        "{shown}"
    );
    assert!(shown["message"].is_null(), "{shown}");
    // The snapshots themselves are timed writes, so the delay line has data.
    assert!(
        shown["delay"]
            .as_str()
            .is_some_and(|d| d.starts_with("delivery delay p50 ≤ ") && d.contains(" write")),
        "{shown}"
    );
    // The inline style ran too (its hash is in the policy).
    assert_eq!(shown["header_bg"], "rgb(255, 255, 255)", "{shown}");
    assert_eq!(shown["body_bg"], "rgb(246, 247, 249)", "{shown}");
    let location = cdp.eval("location.search + location.hash").await;
    assert_eq!(location, format!("#key={KEY}"));

    // The figures follow: the subscriber leaves.
    drop(sub);
    cdp.eval_until("the subscriber gone", PAGE_STATE, |v| {
        v["faults_subscribers"] == "0"
    })
    .await;

    let shot = cdp
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png_bytes = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("screenshot is base64");
    let out = target_dir()
        .parent()
        .expect("target/")
        .join("status-page.png");
    std::fs::write(&out, &png_bytes).expect("save the screenshot");
    let (width, height, pixels) = decode_png(&png_bytes);
    assert_eq!((width, height), (WIDTH, HEIGHT), "{}", out.display());
    // Not blank: many colours, and much of it not the page background.
    let mut colours = std::collections::HashSet::new();
    let mut background = 0usize;
    for p in &pixels {
        colours.insert(*p);
        if *p == [246, 247, 249] {
            background += 1;
        }
    }
    assert!(
        colours.len() > 50,
        "{} looks blank: {} colours",
        out.display(),
        colours.len()
    );
    let other = pixels.len() - background;
    assert!(
        other * 4 > pixels.len(),
        "{} looks empty: {other} of {} pixels differ from the background",
        out.display(),
        pixels.len()
    );
    eprintln!("screenshot: {}", out.display());

    drop(cdp);
    drop(browser);
    gw.shutdown().await;
}

/// A PNG's size and its pixels as RGB.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "8-bit screenshot");
    let step = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(step)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, pixels)
}
