//! Messages per second through the plugin ABI push path into the publisher:
//! the real `ticker` plugin (loaded from its .so) emits as fast as it can, and
//! every message is copied at the boundary, framed, parsed, validated and
//! published (to no subscriber). Run with `cargo bench -p gateway --bench push_path`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use gateway::Gateway;
use gateway::config::{self, LoadOptions};

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "-q", "-p", "ticker"])
            .status()
            .expect("cargo build");
    assert!(status.success());
    let plugins = root.join("target/release");
    let dir = tempfile_dir();
    let total: u64 = 3_000_000;
    std::fs::copy(
        root.join("examples/bench/bench.schema.json"),
        dir.join("bench.schema.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("gateway.yaml"),
        format!("listeners: {{main: {{bind: \"127.0.0.1:0\"}}}}\nplugins: {{dirs: [{}]}}\nchannels: [push.yaml]\nlog: {{level: warn}}\n", plugins.display()),
    )
    .unwrap();
    std::fs::write(
        dir.join("push.yaml"),
        format!("channel: push\nschema: bench.schema.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {{rate: 100000000, pad: 100, limit: {total}}}\nendpoints: [{{path: /push}}]\n"),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = config::load(&dir.join("gateway.yaml"), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let gw = Gateway::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
        let m = gw.state().channels.get("push").unwrap().metrics.clone();
        let start = Instant::now();
        while m.published.load(Relaxed) + m.schema_failures.load(Relaxed) < total {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "too slow: {} published",
                m.published.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let published = m.published.load(Relaxed);
        assert_eq!(published, total, "every message valid and published");
        println!(
            "push path: {published} messages (~150 B, validated) in {secs:.2} s = {:.2} M msg/s",
            published as f64 / secs / 1e6
        );
        gw.shutdown().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gateway-push-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
